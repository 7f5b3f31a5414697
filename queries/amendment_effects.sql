-- Error-rate difference (fine-tuned − original, percentage points) per test type and category
-- (amendment type), pooled over models and datasets at each model's latest fine-tuned
-- checkpoint, from the maintained `family_results`: the paired difference (b − c)/n with the
-- Wald interval for paired proportions, ± 1.96 · √(b + c − (b − c)²/n) / n. The rows of
-- `candor report`'s forest plot.
WITH latest AS (
    SELECT model, MAX(checkpoint_epoch) AS epoch FROM family_results GROUP BY model
), pooled AS (
    SELECT f.test_type, f.category, CAST(SUM(f.b) AS DOUBLE) AS b, CAST(SUM(f.c) AS DOUBLE) AS c,
        CAST(SUM(f.n) AS DOUBLE) AS n
    FROM family_results f JOIN latest l ON f.model = l.model AND f.checkpoint_epoch = l.epoch
    GROUP BY f.test_type, f.category
)
SELECT test_type, category, n, b, c,
    100.0 * (b - c) / n AS diff_pp,
    100.0 * ((b - c) / n - 1.96 * sqrt(greatest(b + c - (b - c) * (b - c) / n, 0.0)) / n) AS ci_low_pp,
    100.0 * ((b - c) / n + 1.96 * sqrt(greatest(b + c - (b - c) * (b - c) / n, 0.0)) / n) AS ci_high_pp
FROM pooled
WHERE n > 0
ORDER BY test_type, category
