-- The per-family table as printed and exported: the maintained `family_results` (rows of
-- family_stats.sql, kept per family and replaced when a family changes), in report order.
SELECT * FROM family_results
ORDER BY model, base_checkpoint, checkpoint_epoch, checkpoint, dataset, test_type, category
