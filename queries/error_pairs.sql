-- Error of each fine-tuned checkpoint against its model's original, per dataset, amendment type
-- and belief condition (`none`: original and original_neutral prompts; `belief`: correct and
-- incorrect), from the maintained `cells`: the points of the paper's Fig. 2 scatter
-- (`candor report`'s fig_error_scatter). Errors in percent of the answers in the statistics.
WITH side AS (
    SELECT model, checkpoint, checkpoint_epoch, is_finetuned, dataset, amendment_type,
        CASE WHEN prompt_type IN ('correct', 'incorrect') THEN 'belief' ELSE 'none' END AS belief,
        CAST(SUM(incorrect) AS DOUBLE) AS wrong, CAST(SUM(n) AS DOUBLE) AS n
    FROM cells
    GROUP BY model, checkpoint, checkpoint_epoch, is_finetuned, dataset, amendment_type,
        CASE WHEN prompt_type IN ('correct', 'incorrect') THEN 'belief' ELSE 'none' END
)
SELECT f.model, b.checkpoint AS base_checkpoint, f.checkpoint, f.checkpoint_epoch, f.dataset, f.amendment_type,
    f.belief, b.n AS n_base, f.n AS n_ft,
    100.0 * b.wrong / b.n AS base_error_pct, 100.0 * f.wrong / f.n AS ft_error_pct
FROM side f
JOIN side b ON f.model = b.model AND f.dataset = b.dataset AND f.amendment_type = b.amendment_type
    AND f.belief = b.belief
WHERE f.is_finetuned AND NOT b.is_finetuned AND f.n > 0 AND b.n > 0
ORDER BY f.model, f.checkpoint_epoch, f.checkpoint, f.dataset, f.amendment_type, f.belief
