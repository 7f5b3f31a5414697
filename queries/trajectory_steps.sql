-- Step against step: each fine-tuned checkpoint paired against the previous fine-tuned
-- checkpoint of its model, in epoch order (the order a training run saved them and Candor
-- evaluated them), per dataset, test type and category, straight from `observations` the way
-- paired_counts.sql pairs against the base (same pair key: dataset, item, amendment type,
-- prompt type, sample; same test types; excluded answers not paired). b = right at the
-- previous step and wrong at this one, c the reverse; the exact McNemar p and
-- Benjamini–Hochberg within each (model, previous step, step, dataset, test type) at α = 0.05.
-- The first fine-tuned checkpoint has no previous step: its comparison is the base one
-- (family_table). Computed at each statement, not maintained.
WITH included AS (
    SELECT *, test_type(prompt_type) AS test_type
    FROM observations
    WHERE correct IS NOT NULL
),
steps AS (
    SELECT model, checkpoint,
        LAG(checkpoint) OVER (PARTITION BY model ORDER BY checkpoint_epoch, checkpoint) AS previous_checkpoint
    FROM (SELECT DISTINCT model, checkpoint, checkpoint_epoch FROM observations WHERE is_finetuned) AS finetuned
),
pairs AS (
    SELECT cur.model, s.previous_checkpoint, cur.checkpoint, cur.checkpoint_epoch, cur.dataset,
        cur.test_type, cur.amendment_type AS category,
        prev.correct AS previous_correct, cur.correct AS current_correct
    FROM included cur
    JOIN steps s ON s.model = cur.model AND s.checkpoint = cur.checkpoint
    JOIN included prev
      ON prev.model = cur.model AND prev.checkpoint = s.previous_checkpoint
     AND prev.dataset = cur.dataset AND prev.item_key = cur.item_key
     AND prev.amendment_type = cur.amendment_type AND prev.prompt_type = cur.prompt_type
     AND prev.sample_index = cur.sample_index
    WHERE cur.is_finetuned AND cur.test_type IS NOT NULL
),
counted AS (
    SELECT model, previous_checkpoint, checkpoint, checkpoint_epoch, dataset, test_type, category,
        paired_counts(previous_correct, current_correct) AS pc
    FROM pairs
    GROUP BY model, previous_checkpoint, checkpoint, checkpoint_epoch, dataset, test_type, category
),
tested AS (
    SELECT model, previous_checkpoint, checkpoint, checkpoint_epoch, dataset, test_type, category,
        get_field(pc, 'both_correct') AS both_correct, get_field(pc, 'b') AS b,
        get_field(pc, 'c') AS c, get_field(pc, 'both_wrong') AS both_wrong,
        get_field(pc, 'both_correct') + get_field(pc, 'b') + get_field(pc, 'c') + get_field(pc, 'both_wrong') AS n,
        mcnemar_exact(get_field(pc, 'b'), get_field(pc, 'c')) AS p_exact
    FROM counted
)
SELECT model, previous_checkpoint, checkpoint, checkpoint_epoch, dataset, test_type, category,
    n, both_correct, b, c, both_wrong,
    100.0 * CAST(both_correct + b AS DOUBLE) / CAST(n AS DOUBLE) AS acc_previous_pct,
    100.0 * CAST(both_correct + c AS DOUBLE) / CAST(n AS DOUBLE) AS acc_pct,
    100.0 * CAST(c AS DOUBLE) / CAST(n AS DOUBLE) - 100.0 * CAST(b AS DOUBLE) / CAST(n AS DOUBLE) AS diff_pp,
    p_exact,
    bh_adjust(p_exact) OVER (PARTITION BY model, previous_checkpoint, checkpoint, dataset, test_type) AS p_bh,
    bh_reject(p_exact, 0.05) OVER (PARTITION BY model, previous_checkpoint, checkpoint, dataset, test_type) AS significant
FROM tested
ORDER BY model, checkpoint_epoch, checkpoint, dataset, test_type, category
