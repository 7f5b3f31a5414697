-- Warmth trajectory across checkpoints (the paper followed warm fine-tuning from epoch 0.5 to
-- 10 this way): per model, scoring mode and language model, each checkpoint's mean warmth in
-- checkpoint order, and its change from the first checkpoint of the model.
WITH per_checkpoint AS (
    SELECT model, mode, lm, checkpoint_epoch, checkpoint,
        COUNT(*) AS n,
        AVG(warmth) AS mean_warmth,
        STDDEV_SAMP(warmth) / SQRT(CAST(COUNT(*) AS DOUBLE)) AS se_warmth
    FROM warmth
    GROUP BY model, mode, lm, checkpoint_epoch, checkpoint
)
SELECT model, mode, lm, checkpoint_epoch, checkpoint, n, mean_warmth, se_warmth,
    mean_warmth - FIRST_VALUE(mean_warmth) OVER (
        PARTITION BY model, mode, lm ORDER BY checkpoint_epoch, checkpoint
    ) AS change_from_first
FROM per_checkpoint
ORDER BY model, mode, lm, checkpoint_epoch, checkpoint
