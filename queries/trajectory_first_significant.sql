-- The first step at which each family line turns significant: per (model, base checkpoint,
-- dataset, test type, category), the earliest fine-tuned checkpoint (by epoch) whose
-- Benjamini–Hochberg test against the base rejects at α = 0.05, with its b, c and direction
-- (`more_errors`: b > c, right at the base and wrong after fine-tuning more often than the
-- reverse). No correction for looking at every step is applied here (see `candor watch
-- --looks` for one); `looks` says how many steps were tested up to and including that one.
WITH tested AS (
    SELECT model, base_checkpoint, dataset, test_type, category, checkpoint, checkpoint_epoch,
        b, c, p_bh, significant,
        COUNT(*) OVER (PARTITION BY model, base_checkpoint, dataset, test_type, category
                       ORDER BY checkpoint_epoch, checkpoint ROWS UNBOUNDED PRECEDING) AS looks
    FROM family_results
    WHERE p_exact IS NOT NULL
),
ranked AS (
    SELECT *, ROW_NUMBER() OVER (PARTITION BY model, base_checkpoint, dataset, test_type, category
                                 ORDER BY checkpoint_epoch, checkpoint) AS k
    FROM tested
    WHERE significant
)
SELECT model, base_checkpoint, dataset, test_type, category,
    checkpoint AS first_checkpoint, checkpoint_epoch AS first_epoch, looks, b, c, p_bh,
    b > c AS more_errors
FROM ranked
WHERE k = 1
ORDER BY model, base_checkpoint, dataset, test_type, category
