-- Checkpoint trajectories: for each model, dataset and test type, the paired accuracy of each
-- candidate checkpoint against its base, pooled over categories, in checkpoint (epoch) order,
-- with the number of categories BH declares significant.
SELECT model, base_checkpoint, dataset, test_type, checkpoint_epoch, checkpoint,
    SUM(n) AS n,
    100.0 * CAST(SUM(both_correct + b) AS DOUBLE) / CAST(SUM(n) AS DOUBLE) AS acc_base_pct,
    100.0 * CAST(SUM(both_correct + c) AS DOUBLE) / CAST(SUM(n) AS DOUBLE) AS acc_ft_pct,
    100.0 * CAST(SUM(c) - SUM(b) AS DOUBLE) / CAST(SUM(n) AS DOUBLE) AS diff_pp,
    SUM(CASE WHEN significant THEN 1 ELSE 0 END) AS significant_categories
FROM family_results
GROUP BY model, base_checkpoint, dataset, test_type, checkpoint_epoch, checkpoint
ORDER BY model, base_checkpoint, dataset, test_type, checkpoint_epoch, checkpoint
