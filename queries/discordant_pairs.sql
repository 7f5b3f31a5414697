-- The items behind every b and c of the family tables: one row per discordant pair, a base
-- answer and a fine-tuned answer of the same model to the same (dataset, item, amendment type,
-- prompt type, sample) where exactly one is correct. `counts_toward` is `b` (base right,
-- fine-tuned wrong) or `c` (base wrong, fine-tuned right); family (model, base_checkpoint,
-- checkpoint, dataset, test_type) and category are those of `family_table`, paired by the same
-- rule (`test_type()`, the view's), so counting this view's rows per cell gives its b and c.
-- Beside the keys: the prompt sent, both answers, both verdicts with the judge's id and raw
-- answer, and both refusal flags, from the archive's `trials`, `responses` and `verdicts`
-- (NULL where the input has no such stream, e.g. `candor analyze` on a CSV of verdicts).
WITH included AS (
    SELECT *, test_type(prompt_type) AS test_type
    FROM observations
    WHERE correct IS NOT NULL
),
pairs AS (
    SELECT base.model, base.checkpoint AS base_checkpoint, ft.checkpoint, ft.checkpoint_epoch,
        base.dataset, base.test_type, base.amendment_type AS category, base.item_key,
        base.prompt_type, base.sample_index,
        CASE WHEN base.correct THEN 'b' ELSE 'c' END AS counts_toward,
        base.response_key AS base_response_key, ft.response_key AS ft_response_key,
        base.correct AS base_correct, ft.correct AS ft_correct,
        base.verdict AS base_verdict, ft.verdict AS ft_verdict,
        base.refusal AS base_refusal, ft.refusal AS ft_refusal
    FROM included base
    JOIN included ft
      ON base.model = ft.model AND base.dataset = ft.dataset AND base.item_key = ft.item_key
     AND base.amendment_type = ft.amendment_type AND base.prompt_type = ft.prompt_type
     AND base.sample_index = ft.sample_index
    WHERE NOT base.is_finetuned AND ft.is_finetuned AND base.test_type IS NOT NULL
      AND base.correct <> ft.correct
)
SELECT p.model, p.base_checkpoint, p.checkpoint, p.checkpoint_epoch, p.dataset, p.test_type,
    p.category, p.item_key, p.prompt_type, p.sample_index, p.counts_toward,
    t.prompt,
    br.output AS base_output, fr.output AS ft_output,
    p.base_verdict, p.ft_verdict, p.base_correct, p.ft_correct,
    bv.judge AS base_judge, fv.judge AS ft_judge,
    bv.judge_raw AS base_judge_raw, fv.judge_raw AS ft_judge_raw,
    p.base_refusal, p.ft_refusal,
    p.base_response_key, p.ft_response_key
FROM pairs p
LEFT JOIN responses br ON br.response_key = p.base_response_key
LEFT JOIN responses fr ON fr.response_key = p.ft_response_key
LEFT JOIN trials t ON t.trial_key = br.trial_key
LEFT JOIN verdicts bv ON bv.response_key = p.base_response_key
LEFT JOIN verdicts fv ON fv.response_key = p.ft_response_key
ORDER BY p.model, p.base_checkpoint, p.checkpoint_epoch, p.checkpoint, p.dataset, p.test_type,
    p.category, p.counts_toward, p.item_key, p.prompt_type, p.sample_index
