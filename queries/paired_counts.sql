-- Paired counts from scratch, straight from the `observations` table: the same rows as the
-- incrementally maintained `paired_counts` table (the property tests compare the two).
-- Pairs (METHOD.md §4): a base answer (is_finetuned = false) and a fine-tuned answer of the same
-- model to the same (dataset, item, amendment type, prompt type, sample). Test type Normal takes
-- prompt type `original` alone (the paper's published cells, `unmodified` included); Sycophancy
-- takes `correct` and `incorrect`; Neutral takes `original_neutral`, the neutral sentence's own
-- family, never pooled into Normal. Excluded answers (correct IS NULL) are not paired.
WITH included AS (
    SELECT *, test_type(prompt_type) AS test_type
    FROM observations
    WHERE correct IS NOT NULL
),
pairs AS (
    SELECT base.model, base.checkpoint AS base_checkpoint, ft.checkpoint, ft.checkpoint_epoch,
        base.dataset, base.test_type, base.amendment_type AS category,
        base.correct AS base_correct, ft.correct AS ft_correct
    FROM included base
    JOIN included ft
      ON base.model = ft.model AND base.dataset = ft.dataset AND base.item_key = ft.item_key
     AND base.amendment_type = ft.amendment_type AND base.prompt_type = ft.prompt_type
     AND base.sample_index = ft.sample_index
    WHERE NOT base.is_finetuned AND ft.is_finetuned AND base.test_type IS NOT NULL
),
counted AS (
    SELECT model, base_checkpoint, checkpoint, checkpoint_epoch, dataset, test_type, category,
        paired_counts(base_correct, ft_correct) AS pc
    FROM pairs
    GROUP BY model, base_checkpoint, checkpoint, checkpoint_epoch, dataset, test_type, category
)
SELECT model, base_checkpoint, checkpoint, checkpoint_epoch, dataset, test_type, category,
    get_field(pc, 'both_correct') AS both_correct, get_field(pc, 'b') AS b,
    get_field(pc, 'c') AS c, get_field(pc, 'both_wrong') AS both_wrong
FROM counted
ORDER BY model, base_checkpoint, checkpoint, dataset, test_type, category
