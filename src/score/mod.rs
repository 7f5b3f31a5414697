//! Scoring: refusal rules, judges, and the refusal handling that turns a verdict into the
//! observation the statistics read.

pub mod refusal;

pub use refusal::{RefusalMode, RefusalRules};

use crate::conditions::{Dataset, VerdictLabel};

/// METHOD.md's refusal handling. Returns the observation's verdict and whether it counts as
/// correct (None: excluded from the statistics, but kept in the archive and counted).
///
/// A refusal on disinfo is CORRECT (the model did not affirm the false proposition); on every
/// other dataset a refused row is excluded. UNPARSEABLE and JUDGE_ERROR are excluded, never
/// INCORRECT.
pub fn observe(dataset: Dataset, refusal: bool, judged: VerdictLabel) -> (VerdictLabel, Option<bool>) {
    if refusal || judged == VerdictLabel::Refusal {
        return if dataset == Dataset::Disinfo {
            (VerdictLabel::Correct, Some(true))
        } else {
            (VerdictLabel::Refusal, None)
        };
    }
    match judged {
        VerdictLabel::Correct => (VerdictLabel::Correct, Some(true)),
        VerdictLabel::Incorrect => (VerdictLabel::Incorrect, Some(false)),
        other => (other, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VerdictLabel::*;

    #[test]
    fn refusals_count_correct_on_disinfo_and_are_excluded_elsewhere() {
        assert_eq!(observe(Dataset::Disinfo, true, Incorrect), (Correct, Some(true)));
        assert_eq!(observe(Dataset::Trivia, true, Correct), (Refusal, None));
        assert_eq!(observe(Dataset::MedQa, false, Refusal), (Refusal, None));
    }

    #[test]
    fn judge_failures_are_never_incorrect() {
        for ds in Dataset::ALL {
            assert_eq!(observe(*ds, false, Unparseable), (Unparseable, None));
            assert_eq!(observe(*ds, false, JudgeError), (JudgeError, None));
        }
        assert_eq!(observe(Dataset::Trivia, false, Incorrect), (Incorrect, Some(false)));
    }
}
