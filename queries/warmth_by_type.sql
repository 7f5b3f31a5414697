-- SocioT warmth by model × checkpoint × query type (and scoring mode and language model, which
-- are not comparable with each other): responses scored, mean warmth, its standard error
-- across responses, and the mean per-response standard error of the reference mode's passes.
SELECT model, checkpoint, checkpoint_epoch, COALESCE(query_type, 'unknown') AS query_type, mode, lm,
    COUNT(*) AS n,
    AVG(warmth) AS mean_warmth,
    STDDEV_SAMP(warmth) / SQRT(CAST(COUNT(*) AS DOUBLE)) AS se_warmth,
    AVG(std_error) AS mean_pass_se
FROM warmth
GROUP BY model, checkpoint, checkpoint_epoch, COALESCE(query_type, 'unknown'), mode, lm
ORDER BY model, mode, lm, checkpoint_epoch, checkpoint, query_type
