-- Judge robustness per family-table cell: how a second judge (the `second_observations` of an
-- archive re-scored with `candor rescore`) labels the answers of each cell's pairs, as judged
-- by the first (`observations`). Per cell: the 2×2 table of the two judges' correct/incorrect
-- labels over both answers of every pair (`both_correct`, `first_only`, `second_only`,
-- `neither`), the answers the second judge could not label (`unreadable`: no verdict,
-- unparseable, or excluded by it) and Cohen's kappa between the judges. Pairs and cells are the
-- first judge's, by the same rule as `paired_counts` (`test_type()`). `candor report
-- --second-judge` shows it beside each family table with the cells whose Benjamini–Hochberg
-- significance differs between the judges.
WITH included AS (
    SELECT *, test_type(prompt_type) AS test_type
    FROM observations
    WHERE correct IS NOT NULL
),
pairs AS (
    SELECT base.model, base.checkpoint AS base_checkpoint, ft.checkpoint, base.dataset, base.test_type,
        base.amendment_type AS category,
        base.response_key AS base_key, base.correct AS base_correct,
        ft.response_key AS ft_key, ft.correct AS ft_correct
    FROM included base
    JOIN included ft
      ON base.model = ft.model AND base.dataset = ft.dataset AND base.item_key = ft.item_key
     AND base.amendment_type = ft.amendment_type AND base.prompt_type = ft.prompt_type
     AND base.sample_index = ft.sample_index
    WHERE NOT base.is_finetuned AND ft.is_finetuned AND base.test_type IS NOT NULL
),
answers AS (
    SELECT model, base_checkpoint, checkpoint, dataset, test_type, category,
        base_key AS response_key, base_correct AS correct
    FROM pairs
    UNION ALL
    SELECT model, base_checkpoint, checkpoint, dataset, test_type, category,
        ft_key AS response_key, ft_correct AS correct
    FROM pairs
),
tables AS (
    SELECT a.model, a.base_checkpoint, a.checkpoint, a.dataset, a.test_type, a.category,
        SUM(CASE WHEN a.correct AND s.correct THEN 1 ELSE 0 END) AS both_correct,
        SUM(CASE WHEN a.correct AND NOT s.correct THEN 1 ELSE 0 END) AS first_only,
        SUM(CASE WHEN NOT a.correct AND s.correct THEN 1 ELSE 0 END) AS second_only,
        SUM(CASE WHEN NOT a.correct AND NOT s.correct THEN 1 ELSE 0 END) AS neither,
        SUM(CASE WHEN s.correct IS NULL THEN 1 ELSE 0 END) AS unreadable
    FROM answers a
    LEFT JOIN second_observations s ON s.response_key = a.response_key
    GROUP BY a.model, a.base_checkpoint, a.checkpoint, a.dataset, a.test_type, a.category
)
SELECT *, cohens_kappa(both_correct, first_only, second_only, neither) AS kappa
FROM tables
ORDER BY model, base_checkpoint, checkpoint, dataset, test_type, category
