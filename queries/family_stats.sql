-- The paper's per-family McNemar table (METHOD.md §4), computed from the maintained
-- `paired_counts` table: one row per category (amendment type) of a family, a family being one
-- (model, base checkpoint, candidate checkpoint, dataset, test type). Accuracies in percent,
-- raw difference in percentage points (fine-tuned minus base), the paper's g and the textbook
-- Cohen's g, odds ratio b/c, exact McNemar p (NULL when b + c = 0: no test, and outside BH) and
-- Benjamini–Hochberg over the tested categories of the family at α = 0.05. Beside the paper's
-- statistics (docs/statistics.md): Wilson 95% intervals of each accuracy, Newcombe's paired 95%
-- interval of the difference, the mid-p McNemar value, and the family's minimum detectable
-- difference at 80% power (NULL: no difference is detectable at this size).
-- The engine runs it on the families an update touched only.
WITH tested AS (
    SELECT *,
        both_correct + b + c + both_wrong AS n,
        mcnemar_exact(b, c) AS p_exact
    FROM paired_counts
)
SELECT
    model, base_checkpoint, checkpoint, checkpoint_epoch, dataset, test_type, category,
    n, both_correct, b, c, both_wrong,
    100.0 * CAST(both_correct + b AS DOUBLE) / CAST(n AS DOUBLE) AS acc_base_pct,
    100.0 * CAST(both_correct + c AS DOUBLE) / CAST(n AS DOUBLE) AS acc_ft_pct,
    100.0 * CAST(both_correct + c AS DOUBLE) / CAST(n AS DOUBLE)
        - 100.0 * CAST(both_correct + b AS DOUBLE) / CAST(n AS DOUBLE) AS diff_pp,
    paper_g(b, c) AS paper_g,
    cohens_g(b, c) AS cohens_g,
    odds_ratio(b, c) AS odds_ratio,
    p_exact,
    bh_adjust(p_exact) OVER (PARTITION BY model, base_checkpoint, checkpoint, dataset, test_type) AS p_bh,
    bh_reject(p_exact, 0.05) OVER (PARTITION BY model, base_checkpoint, checkpoint, dataset, test_type) AS significant,
    mcnemar_midp(b, c) AS p_midp,
    100.0 * wilson_low(both_correct + b, n) AS acc_base_ci_low,
    100.0 * wilson_high(both_correct + b, n) AS acc_base_ci_high,
    100.0 * wilson_low(both_correct + c, n) AS acc_ft_ci_low,
    100.0 * wilson_high(both_correct + c, n) AS acc_ft_ci_high,
    100.0 * newcombe_low(both_correct, b, c, both_wrong) AS diff_ci_low,
    100.0 * newcombe_high(both_correct, b, c, both_wrong) AS diff_ci_high,
    100.0 * mcnemar_mdd(n, b + c) OVER (PARTITION BY model, base_checkpoint, checkpoint, dataset, test_type) AS mdd_pp
FROM tested
