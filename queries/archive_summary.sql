-- One row about the whole archive, from the maintained `cells`: answers, answers in the
-- statistics, answers excluded (refusals outside disinfo, unparseable verdicts, judge errors),
-- models and checkpoints.
SELECT SUM(responses) AS responses, SUM(n) AS n, SUM(excluded) AS excluded,
    COUNT(DISTINCT model) AS models, COUNT(DISTINCT checkpoint) AS checkpoints
FROM cells
