-- Refusal statistics per model, checkpoint and dataset, from the maintained `cells`: answers,
-- refusals (phrase-list matches), refusal rate in percent, and answers excluded from the
-- statistics (on disinfo a refusal counts as correct and is not excluded).
SELECT model, checkpoint, checkpoint_epoch, is_finetuned, dataset,
    SUM(responses) AS responses, SUM(refusals) AS refusals,
    100.0 * CAST(SUM(refusals) AS DOUBLE) / CAST(SUM(responses) AS DOUBLE) AS refusal_pct,
    SUM(excluded) AS excluded
FROM cells
GROUP BY model, checkpoint, checkpoint_epoch, is_finetuned, dataset
ORDER BY model, checkpoint_epoch, checkpoint, dataset
