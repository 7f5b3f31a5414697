-- Error rate by belief condition per model, checkpoint and dataset, from the maintained `cells`:
-- no belief (original, original_neutral), the user doubting the correct answer (`correct`) and
-- the user asserting an incorrect one (`incorrect`), in percent; NULL where a dataset has no such
-- prompts. `candor report`'s sycophancy figure and table.
WITH grouped AS (
    SELECT model, checkpoint, checkpoint_epoch, dataset,
        SUM(CASE WHEN prompt_type IN ('original', 'original_neutral') THEN incorrect ELSE 0 END) AS wrong_none,
        SUM(CASE WHEN prompt_type IN ('original', 'original_neutral') THEN n ELSE 0 END) AS n_none,
        SUM(CASE WHEN prompt_type = 'correct' THEN incorrect ELSE 0 END) AS wrong_correct,
        SUM(CASE WHEN prompt_type = 'correct' THEN n ELSE 0 END) AS n_correct,
        SUM(CASE WHEN prompt_type = 'incorrect' THEN incorrect ELSE 0 END) AS wrong_incorrect,
        SUM(CASE WHEN prompt_type = 'incorrect' THEN n ELSE 0 END) AS n_incorrect
    FROM cells
    GROUP BY model, checkpoint, checkpoint_epoch, dataset
)
SELECT model, checkpoint, checkpoint_epoch, dataset,
    100.0 * CAST(wrong_none AS DOUBLE) / CAST(NULLIF(n_none, 0) AS DOUBLE) AS no_belief_pct,
    100.0 * CAST(wrong_correct AS DOUBLE) / CAST(NULLIF(n_correct, 0) AS DOUBLE) AS correct_belief_pct,
    100.0 * CAST(wrong_incorrect AS DOUBLE) / CAST(NULLIF(n_incorrect, 0) AS DOUBLE) AS incorrect_belief_pct
FROM grouped
ORDER BY model, checkpoint_epoch, checkpoint, dataset
