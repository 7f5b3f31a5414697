//! The experimental conditions of the paper: datasets, amendment types (interpersonal
//! context), prompt types (user belief) and template styles, named in the paper's words.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The paper's templates as released (`data/templates/prompt_construction.json`): the
/// amendment statements, the friends sentence, the observed prompts and the refusal phrase
/// list. The amend stage and the refusal rules both read it.
pub(crate) const PAPER_TEMPLATES: &str = include_str!("../data/templates/prompt_construction.json");

/// Declares a closed set of names with `as_str`, `ALL`, `FromStr` (with an error listing the
/// allowed names), `Display` and serde as strings.
macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $( $(#[$vm:meta])* $variant:ident = $text:literal ),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $( $(#[$vm])* $variant ),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)*
                    _ => Err(format!(
                        concat!("unknown ", $what, " `{}` (expected one of: {})"),
                        s,
                        [$($text),*].join(", ")
                    )),
                }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> { s.serialize_str(self.as_str()) }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

named_enum! {
    /// An evaluation dataset.
    Dataset, "dataset" {
        Trivia = "trivia",
        TruthfulQa = "truthfulqa",
        MedQa = "medqa",
        Disinfo = "disinfo",
        Mmlu = "mmlu",
        Gsm8k = "gsm8k",
        AdvBench = "advbench",
    }
}

impl Dataset {
    /// The four open-ended sets the amendment × belief grid is run on.
    pub const MAIN: &'static [Dataset] = &[Dataset::Trivia, Dataset::TruthfulQa, Dataset::MedQa, Dataset::Disinfo];

    /// Whether the dataset takes the amendment × prompt-type grid (the capability and safety
    /// checks are asked as they are).
    pub fn is_open_ended(self) -> bool {
        Dataset::MAIN.contains(&self)
    }
}

named_enum! {
    /// Interpersonal context added before the question.
    AmendmentType, "amendment type" {
        Unmodified = "unmodified",
        EmotionAnger = "emotion:anger",
        EmotionHappy = "emotion:happy",
        EmotionSad = "emotion:sad",
        RelationClose = "relation:close",
        RelationHierarchicalDown = "relation:hierarchical_down",
        RelationHierarchicalUp = "relation:hierarchical_up",
        StakeHigh = "stake:high",
        StakeLow = "stake:low",
    }
}

/// The amendment group: the part of an amendment type before `:` (`emotion:sad` → `emotion`;
/// `unmodified` is its own group). It takes any text, so rows whose amendment type is not one
/// of [`AmendmentType`]'s (an imported file's) still group.
///
/// ```
/// use candor::conditions::{AmendmentType, amendment_group};
/// assert_eq!(amendment_group(AmendmentType::EmotionSad.as_str()), "emotion");
/// assert_eq!(amendment_group("unmodified"), "unmodified");
/// ```
pub fn amendment_group(amendment_type: &str) -> &str {
    amendment_type.split(':').next().unwrap_or("").trim()
}

impl AmendmentType {
    /// The part after `:`, which names the statement list (None for unmodified).
    pub fn subtype(self) -> Option<&'static str> {
        self.as_str().split_once(':').map(|(_, sub)| sub)
    }
}

named_enum! {
    /// What the user says about the answer.
    PromptType, "prompt type" {
        /// The question alone.
        Original = "original",
        /// The question after the neutral sentence about friends.
        OriginalNeutral = "original_neutral",
        /// The user doubts the correct answer.
        Correct = "correct",
        /// The user asserts a wrong answer.
        Incorrect = "incorrect",
    }
}

impl PromptType {
    /// `correct` and `incorrect` together are the "user belief" (sycophancy) family.
    pub fn has_belief(self) -> bool {
        matches!(self, PromptType::Correct | PromptType::Incorrect)
    }
}

named_enum! {
    /// How prompts are rendered.
    #[derive(Default)]
    TemplateStyle, "template style" {
        /// Byte for byte the prompts the paper sent, whitespace quirks included.
        Paper = "paper",
        /// Tidy text: single spaces, no doubled punctuation.
        #[default]
        Clean = "clean",
    }
}

named_enum! {
    /// A scored response's verdict. UNPARSEABLE and JUDGE_ERROR are never folded into INCORRECT.
    VerdictLabel, "verdict" {
        Correct = "CORRECT",
        Incorrect = "INCORRECT",
        Refusal = "REFUSAL",
        /// The judge answered, but its answer could not be read.
        Unparseable = "UNPARSEABLE",
        /// The judge call failed after its retries.
        JudgeError = "JUDGE_ERROR",
    }
}

impl VerdictLabel {
    /// Reads a label case-insensitively, as answer files spell it in many ways.
    pub fn parse_loose(s: &str) -> Option<VerdictLabel> {
        s.trim().to_ascii_uppercase().replace(' ', "_").parse().ok()
    }
}
