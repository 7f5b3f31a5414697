-- Error rates by model × checkpoint × dataset × amendment × prompt type, from the maintained
-- `cells` table: answers included in the statistics (n), answers judged incorrect, error rate
-- in percent, and how many answers were excluded (refusals outside disinfo, unparseable
-- verdicts, judge errors).
SELECT model, checkpoint, checkpoint_epoch, is_finetuned, dataset, amendment_type, prompt_type,
    SUM(n) AS n, SUM(incorrect) AS incorrect,
    100.0 * CAST(SUM(incorrect) AS DOUBLE) / CAST(SUM(n) AS DOUBLE) AS error_pct,
    SUM(excluded) AS excluded
FROM cells
GROUP BY model, checkpoint, checkpoint_epoch, is_finetuned, dataset, amendment_type, prompt_type
ORDER BY model, checkpoint_epoch, checkpoint, dataset, amendment_type, prompt_type
