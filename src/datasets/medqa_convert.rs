//! MedQA's exam vignette → the first-person question the paper's belief and neutral prompts
//! used ("A 52-year-old woman presents to …" → "My wife, 52, to …").
//!
//! The paper's converter was not published; these rules were inferred from its public sample
//! (`medqa_first_person_conversion_inferred` in `data/templates/prompt_construction.json`) and
//! live in the one table [`RULES`] so they can be changed in one place:
//! 1. Opening: "A|An {N}-year-old \[descriptors\] {noun} …". The patient phrase is the words after
//!    "-year-old" up to the first boundary word (at most `max_subject_words`, a word ending in
//!    "," closes it); its head is the last word of it found in `nouns`. Without a head the
//!    opening is left alone.
//! 2. The phrase becomes "My {relative}, {N}," with the relative from `relatives` by age band
//!    and sex; `child_nouns` (boy, girl, child) always take the youngest band. Sex comes from the first
//!    sexed word of the phrase, else the first sexed pronoun in the vignette, else
//!    `unknown_sex`.
//! 3. When the head directly follows "-year-old", a following word in `dropped_verbs` is
//!    dropped ("is brought" → "brought"); with descriptors the phrase goes and the verb stays
//!    ("A 33-year-old G2P1 woman presents" → "My wife, 33, presents").
//! 4. Everywhere, including unconverted vignettes, each `stem` pair is replaced ("Which of
//!    the following" → "what").
//!
//! Vignettes without such an opening (258 of the 1,273 US test vignettes: infants aged in months,
//! "A previously healthy 30-year-old …", occupations such as "nurse" or "truck driver", research scenarios, one opening written in look-alike
//! Cyrillic letters) keep their text apart from rule 4; [`count_unconverted`] counts them.

/// A patient's sex as the vignette states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sex {
    Male,
    Female,
    Unknown,
}

/// Relatives for patients from `min_age` up (the next band's `min_age` ends a band).
#[derive(Clone, Copy, Debug)]
pub struct Band {
    pub min_age: u32,
    pub male: &'static str,
    pub female: &'static str,
}

/// Every rule of the conversion (see the module doc for how they apply).
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub nouns: &'static [(&'static str, Sex)],
    pub child_nouns: &'static [&'static str],
    pub relatives: &'static [Band],
    pub unknown_sex: Sex,
    pub dropped_verbs: &'static [&'static str],
    pub boundary_words: &'static [&'static str],
    pub max_subject_words: usize,
    pub male_pronouns: &'static [&'static str],
    pub female_pronouns: &'static [&'static str],
    pub stem: &'static [(&'static str, &'static str)],
}

/// The rules in force. Observed: 2 boy → son; 21 college student (he) → brother; 22 woman →
/// sister; 25-58 woman/man → wife/husband; 63 patient (he), 67 and 78 man → father. The band
/// edges 18, 25 and 60 are inferred; an unknown sex defaults to male because both observed
/// cases were men.
pub const RULES: Rules = Rules {
    nouns: &[
        ("man", Sex::Male),
        ("woman", Sex::Female),
        ("boy", Sex::Male),
        ("girl", Sex::Female),
        ("male", Sex::Male),
        ("female", Sex::Female),
        ("gentleman", Sex::Male),
        ("lady", Sex::Female),
        ("primigravida", Sex::Female),
        ("patient", Sex::Unknown),
        ("student", Sex::Unknown),
        ("teenager", Sex::Unknown),
        ("child", Sex::Unknown),
    ],
    child_nouns: &["boy", "girl", "child"],
    relatives: &[
        Band { min_age: 0, male: "son", female: "daughter" },
        Band { min_age: 18, male: "brother", female: "sister" },
        Band { min_age: 25, male: "husband", female: "wife" },
        Band { min_age: 60, male: "father", female: "mother" },
    ],
    unknown_sex: Sex::Male,
    dropped_verbs: &["presents", "comes", "is", "arrives"],
    boundary_words: &[
        "a", "an", "the", "with", "who", "whose", "and", "in", "at", "of", "on", "from", "for", "to", "was", "has",
        "had", "his", "her", "their", "presents", "comes", "is", "arrives",
    ],
    max_subject_words: 4,
    male_pronouns: &["he", "his", "him", "himself"],
    female_pronouns: &["she", "her", "hers", "herself"],
    stem: &[("Which of the following", "what"), ("which of the following", "what")],
};

/// A vignette in first person, and whether its opening could be converted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    pub text: String,
    pub opening_converted: bool,
}

/// Converts a vignette with [`RULES`].
pub fn convert(vignette: &str) -> Converted {
    convert_with(&RULES, vignette)
}

/// How many of `vignettes` keep their exam opening (no "A N-year-old {noun}" to convert).
pub fn count_unconverted<'a>(vignettes: impl IntoIterator<Item = &'a str>) -> usize {
    vignettes.into_iter().filter(|v| !convert(v).opening_converted).count()
}

/// Converts a vignette with the given rules.
pub fn convert_with(rules: &Rules, vignette: &str) -> Converted {
    let (text, opening_converted) = match convert_opening(rules, vignette) {
        Some(text) => (text, true),
        None => (vignette.to_string(), false),
    };
    Converted { text: apply_stem(rules, &text), opening_converted }
}

fn apply_stem(rules: &Rules, text: &str) -> String {
    rules.stem.iter().fold(text.to_string(), |acc, (from, to)| acc.replace(from, to))
}

/// "{age}" and the text after "-year-old " when the vignette opens with "A|An {age}-year-old".
fn split_opening(vignette: &str) -> Option<(u32, &str)> {
    let rest = vignette.strip_prefix("A ").or_else(|| vignette.strip_prefix("An "))?;
    let (age, rest) = rest.split_once("-year-old ")?;
    if age.is_empty() || !age.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((age.parse().ok()?, rest))
}

fn convert_opening(rules: &Rules, vignette: &str) -> Option<String> {
    let (age, rest) = split_opening(vignette)?;
    let words = leading_words(rest, rules.max_subject_words + 1);
    let mut phrase: Vec<(&str, usize)> = Vec::new();
    for &(word, end) in &words {
        let bare = word.trim_end_matches(',');
        if phrase.len() == rules.max_subject_words || rules.boundary_words.contains(&bare.to_lowercase().as_str()) {
            break;
        }
        phrase.push((word, end));
        if word.ends_with(',') {
            break;
        }
    }
    let head = phrase.iter().rposition(|(w, _)| noun_sex(rules, w).is_some())?;
    let (head_word, head_end) = phrase[head];
    let head_bare = head_word.trim_end_matches(',').to_lowercase();

    let mut sex = phrase[..=head]
        .iter()
        .filter_map(|(w, _)| noun_sex(rules, w))
        .find(|s| *s != Sex::Unknown)
        .unwrap_or(Sex::Unknown);
    if sex == Sex::Unknown {
        sex = pronoun_sex(rules, vignette).unwrap_or(rules.unknown_sex);
    }
    let child = rules.child_nouns.contains(&head_bare.as_str());
    let relative = relative(rules, if child { 0 } else { age }, sex)?;

    let mut tail = rest[head_end..].trim_start();
    if head == 0
        && let Some((first, after)) = tail.split_once(' ')
        && rules.dropped_verbs.contains(&first)
    {
        tail = after.trim_start();
    }
    Some(format!("My {relative}, {age}, {tail}"))
}

/// The first `n` words of `text`, each with the byte offset just past it.
fn leading_words(text: &str, n: usize) -> Vec<(&str, usize)> {
    let mut words = Vec::new();
    let mut offset = 0;
    for word in text.split(' ') {
        let end = offset + word.len();
        if !word.is_empty() {
            words.push((word, end));
            if words.len() == n {
                break;
            }
        }
        offset = end + 1;
    }
    words
}

fn noun_sex(rules: &Rules, word: &str) -> Option<Sex> {
    let bare = word.trim_end_matches(',').to_lowercase();
    rules.nouns.iter().find(|(noun, _)| *noun == bare).map(|(_, sex)| *sex)
}

fn pronoun_sex(rules: &Rules, vignette: &str) -> Option<Sex> {
    vignette.split(|c: char| !c.is_alphabetic()).map(str::to_lowercase).find_map(|w| {
        if rules.male_pronouns.contains(&w.as_str()) {
            Some(Sex::Male)
        } else if rules.female_pronouns.contains(&w.as_str()) {
            Some(Sex::Female)
        } else {
            None
        }
    })
}

fn relative(rules: &Rules, age: u32, sex: Sex) -> Option<&'static str> {
    let band = rules.relatives.iter().rev().find(|b| age >= b.min_age)?;
    Some(match sex {
        Sex::Female => band.female,
        Sex::Male | Sex::Unknown => band.male,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every observed (vignette prefix, converted prefix) pair of the paper's sample.
    #[test]
    fn reproduces_every_observed_example() {
        let path = crate::datasets::data_dir().join("templates/prompt_construction.json");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let examples = json["medqa_first_person_conversion_inferred"]["examples"].as_array().unwrap();
        assert_eq!(examples.len(), 13);
        for pair in examples {
            let (from, to) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
            assert_eq!(convert(from).text, to, "converting {from:?}");
        }
    }

    #[test]
    fn sex_of_an_unmarked_patient_comes_from_pronouns() {
        assert_eq!(
            convert("A 70-year-old patient presents with pain in her hip.").text,
            "My mother, 70, with pain in her hip."
        );
        assert_eq!(
            convert("A 19-year-old female college student presents with a rash.").text,
            "My sister, 19, presents with a rash."
        );
        assert_eq!(
            convert("A 16-year-old girl is brought in. Which of the following is true?").text,
            "My daughter, 16, brought in. what is true?"
        );
        assert_eq!(
            convert("A 33-year-old woman, gravida 2, para 1, comes in.").text,
            "My wife, 33, gravida 2, para 1, comes in."
        );
    }

    #[test]
    fn openings_without_an_age_in_years_keep_their_text_but_not_the_stem() {
        let infant = "A 3-month-old boy is brought in. Which of the following is the cause?";
        let converted = convert(infant);
        assert!(!converted.opening_converted);
        assert_eq!(converted.text, "A 3-month-old boy is brought in. what is the cause?");
        assert!(!convert("A previously healthy 30-year-old woman comes in.").opening_converted);
        assert!(!convert("A 45-year-old presents with a cough.").opening_converted);
    }
}
