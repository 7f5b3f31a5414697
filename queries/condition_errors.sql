-- Errors per checkpoint, amendment type and prompt type, pooled over models and datasets, from
-- the maintained `cells`: every condition of the design, `candor report`'s condition table.
SELECT checkpoint, checkpoint_epoch, amendment_type, prompt_type,
    SUM(incorrect) AS incorrect, SUM(n) AS n,
    100.0 * CAST(SUM(incorrect) AS DOUBLE) / CAST(NULLIF(SUM(n), 0) AS DOUBLE) AS error_pct
FROM cells
GROUP BY checkpoint, checkpoint_epoch, amendment_type, prompt_type
ORDER BY checkpoint_epoch, checkpoint, amendment_type, prompt_type
