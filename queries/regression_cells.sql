-- Input of the regressions M1–M4 (METHOD.md §4): answer counts per (model, dataset, amendment,
-- prompt type, fine-tuned), taking each model's base checkpoint(s) and its latest fine-tuned
-- checkpoint (highest epoch), as the paper compared base and final warm models.
WITH latest AS (
    SELECT model, MAX(checkpoint_epoch) AS epoch
    FROM cells WHERE is_finetuned GROUP BY model
)
SELECT c.model, c.dataset, c.amendment_type, c.prompt_type, c.is_finetuned,
    SUM(c.incorrect) AS incorrect, SUM(c.n) AS n
FROM cells c LEFT JOIN latest l ON c.model = l.model
WHERE NOT c.is_finetuned OR c.checkpoint_epoch = l.epoch
GROUP BY c.model, c.dataset, c.amendment_type, c.prompt_type, c.is_finetuned
ORDER BY c.model, c.dataset, c.amendment_type, c.prompt_type, c.is_finetuned
