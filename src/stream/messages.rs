//! The messages `candor stream` reads, checked field by field: a message either parses into
//! an [`Announcement`] or an [`Answer`], or is rejected with a [`Reject`] that names what is
//! wrong, so it can go to the dead-letter topic with its original bytes. Formats:
//! `schemas/kafka/*.json`.

use serde_json::{Map, Value};

use crate::conditions::{AmendmentType, Dataset, PromptType, TemplateStyle, VerdictLabel, amendment_group};
use crate::records::{Response, Trial};

/// The schema version of every message Candor reads and writes on Kafka.
pub const SCHEMA_VERSION: u64 = 1;

/// Checkpoint variants an announcement may name (the paper's conditions).
pub const VARIANTS: &[&str] = &["original", "warm", "cold"];

/// Why a message was sent to the dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// A stable code, one per kind of fault.
    pub kind: &'static str,
    /// What exactly is wrong, naming the field.
    pub reason: String,
}

impl Reject {
    pub fn new(kind: &'static str, reason: impl Into<String>) -> Self {
        Reject { kind, reason: reason.into() }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.reason)
    }
}

/// Every kind of [`Reject`], for documentation and tests.
pub const REJECT_KINDS: &[&str] = &[
    "empty_message",
    "oversize",
    "not_utf8",
    "malformed_json",
    "not_an_object",
    "missing_schema_version",
    "wrong_schema_version",
    "missing_field",
    "wrong_type",
    "empty_field",
    "unknown_field",
    "unknown_dataset",
    "unknown_amendment_type",
    "unknown_prompt_type",
    "unknown_verdict",
    "bad_sample_index",
    "unknown_variant",
    "bad_answer_count",
    "conflicting_announcement",
    "conflicting_answer",
    "late_answer",
    "unknown_model",
];

/// A checkpoint announcement: "this checkpoint exists; evaluate it once its answers are in".
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Announcement {
    pub model: String,
    pub checkpoint: String,
    pub finetuned: bool,
    /// original, warm or cold.
    pub variant: Option<String>,
    /// The training epoch the checkpoint was saved at.
    pub training_epoch: Option<f64>,
    /// Where the weights are, or the endpoint serving them (recorded, not fetched).
    pub path: Option<String>,
    pub endpoint: Option<String>,
    /// How many answer records belong to the checkpoint: it is complete when all have arrived.
    /// Absent: Candor generates the answers itself, over the experiment's trial grid with the
    /// experiment's backend for `model`.
    pub answers: Option<u64>,
}

/// One answer record: a model's output for one prompt, produced elsewhere.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    pub model: String,
    pub checkpoint: String,
    pub dataset: String,
    pub item_key: String,
    pub amendment_type: String,
    pub prompt_type: String,
    pub sample_index: u32,
    pub prompt: String,
    pub output: String,
    /// A judge's label, when the producer has one.
    pub verdict: Option<String>,
}

impl Answer {
    pub fn trial_key(&self) -> String {
        Trial::key(&self.dataset, &self.item_key, &self.amendment_type, &self.prompt_type)
    }

    pub fn response_key(&self) -> String {
        Response::key(&self.model, &self.checkpoint, &self.trial_key(), self.sample_index)
    }

    /// The trial this answer answers (made from the message, as an import makes it from a row).
    pub fn trial(&self) -> Trial {
        let amendment: AmendmentType = self.amendment_type.parse().expect("checked when parsed");
        Trial {
            trial_key: self.trial_key(),
            dataset: self.dataset.clone(),
            item_key: self.item_key.clone(),
            amendment_type: self.amendment_type.clone(),
            amendment_group: amendment_group(amendment.as_str()).to_string(),
            statement_id: None,
            statement: None,
            prompt_type: self.prompt_type.clone(),
            belief_answer: None,
            prompt: self.prompt.clone(),
            template_style: TemplateStyle::Paper.to_string(),
            seed: 0,
        }
    }

    /// The response row, at the checkpoint's epoch. `response_key` is [`Self::response_key`],
    /// which the caller has already (the pending answers are keyed by it).
    pub fn response(&self, response_key: String, epoch: u64, is_finetuned: bool, source: &str) -> Response {
        debug_assert_eq!(response_key, self.response_key());
        Response {
            response_key,
            trial_key: self.trial_key(),
            dataset: self.dataset.clone(),
            model: self.model.clone(),
            checkpoint: self.checkpoint.clone(),
            checkpoint_epoch: epoch,
            is_finetuned,
            sample_index: self.sample_index,
            output: self.output.clone(),
            finish_reason: None,
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: None,
            generator: source.to_string(),
            decoding: None,
        }
    }
}

/// Parses the bytes into a JSON object carrying the right schema version.
fn object(bytes: Option<&[u8]>, max_bytes: usize) -> Result<Map<String, Value>, Reject> {
    let bytes = match bytes {
        None | Some([]) => return Err(Reject::new("empty_message", "the message has no payload")),
        Some(b) => b,
    };
    if bytes.len() > max_bytes {
        return Err(Reject::new("oversize", format!("{} bytes, the limit is {max_bytes}", bytes.len())));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Reject::new("not_utf8", format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
    let value: Value = serde_json::from_str(text).map_err(|e| Reject::new("malformed_json", e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(Reject::new("not_an_object", "expected a JSON object"));
    };
    match obj.get("schema_version") {
        None => return Err(Reject::new("missing_schema_version", "field `schema_version` is missing")),
        Some(v) if v.as_u64() == Some(SCHEMA_VERSION) => {}
        Some(v) => {
            return Err(Reject::new(
                "wrong_schema_version",
                format!("`schema_version` is {v}; this Candor reads version {SCHEMA_VERSION}"),
            ));
        }
    }
    Ok(obj)
}

fn check_fields(obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), Reject> {
    for k in obj.keys() {
        if k != "schema_version" && !allowed.contains(&k.as_str()) {
            return Err(Reject::new("unknown_field", format!("field `{k}` is not part of the format")));
        }
    }
    Ok(())
}

fn opt_str(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, Reject> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(Reject::new("empty_field", format!("field `{name}` is empty")))
        }
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(other) => Err(Reject::new("wrong_type", format!("field `{name}` should be a string, found {other}"))),
    }
}

fn req_str(obj: &Map<String, Value>, name: &str) -> Result<String, Reject> {
    opt_str(obj, name)?.ok_or_else(|| Reject::new("missing_field", format!("field `{name}` is missing")))
}

/// Parses a message from the announcement topic.
pub fn parse_announcement(bytes: Option<&[u8]>, max_bytes: usize) -> Result<Announcement, Reject> {
    let obj = object(bytes, max_bytes)?;
    check_fields(
        &obj,
        &["model", "checkpoint", "finetuned", "variant", "training_epoch", "path", "endpoint", "answers"],
    )?;
    let model = req_str(&obj, "model")?;
    let checkpoint = req_str(&obj, "checkpoint")?;
    let finetuned = match obj.get("finetuned") {
        None => return Err(Reject::new("missing_field", "field `finetuned` is missing")),
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(Reject::new("wrong_type", format!("field `finetuned` should be a boolean, found {other}")));
        }
    };
    let variant = opt_str(&obj, "variant")?;
    if let Some(v) = &variant
        && !VARIANTS.contains(&v.as_str())
    {
        return Err(Reject::new("unknown_variant", format!("`{v}` (expected one of: {})", VARIANTS.join(", "))));
    }
    let training_epoch = match obj.get("training_epoch") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(other) => {
            return Err(Reject::new("wrong_type", format!("field `training_epoch` should be a number, found {other}")));
        }
    };
    let answers = match obj.get("answers") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=10_000_000).contains(&n) => Some(n),
            _ => return Err(Reject::new("bad_answer_count", format!("`answers` is {v}; expected 1 to 10000000"))),
        },
    };
    Ok(Announcement {
        model,
        checkpoint,
        finetuned,
        variant,
        training_epoch,
        path: opt_str(&obj, "path")?,
        endpoint: opt_str(&obj, "endpoint")?,
        answers,
    })
}

/// Parses a message from the answer-record topic.
///
/// Well-formed records take a typed fast path (no JSON tree, strings borrowed where they
/// have no escapes); anything the fast path does not accept outright is parsed again field
/// by field, so every rejection names its reason exactly as before.
pub fn parse_answer(bytes: Option<&[u8]>, max_bytes: usize) -> Result<Answer, Reject> {
    if let Some(b) = bytes
        && b.len() <= max_bytes
        && let Some(a) = fast_answer(b)
    {
        return Ok(a);
    }
    parse_answer_checked(bytes, max_bytes)
}

/// The fast path of [`parse_answer`]: `Some` only for a record the checked parse accepts, with
/// the same result.
pub(super) fn fast_answer(bytes: &[u8]) -> Option<Answer> {
    use std::borrow::Cow;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw<'a> {
        schema_version: u64,
        #[serde(borrow)]
        model: Cow<'a, str>,
        #[serde(borrow)]
        checkpoint: Cow<'a, str>,
        #[serde(borrow)]
        dataset: Cow<'a, str>,
        #[serde(borrow)]
        item_key: Cow<'a, str>,
        #[serde(borrow, default)]
        amendment_type: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        prompt_type: Option<Cow<'a, str>>,
        #[serde(default)]
        sample_index: Option<u32>,
        #[serde(borrow)]
        prompt: Cow<'a, str>,
        #[serde(borrow)]
        output: Cow<'a, str>,
        #[serde(borrow, default)]
        verdict: Option<Cow<'a, str>>,
    }
    let raw: Raw<'_> = serde_json::from_str(std::str::from_utf8(bytes).ok()?).ok()?;
    if raw.schema_version != SCHEMA_VERSION {
        return None;
    }
    // The checked parse trims strings and rejects empty ones.
    let text = |s: &str| Some(s.trim()).filter(|t| !t.is_empty()).map(str::to_string);
    let opt = |s: &Option<Cow<'_, str>>| match s {
        None => Some(None),
        Some(s) => text(s).map(Some),
    };
    let dataset: Dataset = text(&raw.dataset)?.parse().ok()?;
    let amendment: AmendmentType = match opt(&raw.amendment_type)? {
        Some(s) => s.parse().ok()?,
        None => AmendmentType::Unmodified,
    };
    let prompt_type: PromptType = match opt(&raw.prompt_type)? {
        Some(s) => s.parse().ok()?,
        None => PromptType::Original,
    };
    let verdict = opt(&raw.verdict)?;
    if let Some(v) = &verdict {
        VerdictLabel::parse_loose(v)?;
    }
    Some(Answer {
        model: text(&raw.model)?,
        checkpoint: text(&raw.checkpoint)?,
        dataset: dataset.to_string(),
        item_key: text(&raw.item_key)?,
        amendment_type: amendment.to_string(),
        prompt_type: prompt_type.to_string(),
        sample_index: raw.sample_index.unwrap_or(0),
        prompt: text(&raw.prompt)?,
        output: raw.output.into_owned(),
        verdict,
    })
}

/// [`parse_answer`] field by field, naming the first fault.
pub(super) fn parse_answer_checked(bytes: Option<&[u8]>, max_bytes: usize) -> Result<Answer, Reject> {
    let obj = object(bytes, max_bytes)?;
    check_fields(
        &obj,
        &[
            "model",
            "checkpoint",
            "dataset",
            "item_key",
            "amendment_type",
            "prompt_type",
            "sample_index",
            "prompt",
            "output",
            "verdict",
        ],
    )?;
    let dataset = req_str(&obj, "dataset")?;
    let dataset: Dataset = dataset.parse().map_err(|m: String| Reject::new("unknown_dataset", m))?;
    let amendment: AmendmentType = match opt_str(&obj, "amendment_type")? {
        Some(s) => s.parse().map_err(|m: String| Reject::new("unknown_amendment_type", m))?,
        None => AmendmentType::Unmodified,
    };
    let prompt_type: PromptType = match opt_str(&obj, "prompt_type")? {
        Some(s) => s.parse().map_err(|m: String| Reject::new("unknown_prompt_type", m))?,
        None => PromptType::Original,
    };
    let verdict = opt_str(&obj, "verdict")?;
    if let Some(v) = &verdict
        && VerdictLabel::parse_loose(v).is_none()
    {
        return Err(Reject::new(
            "unknown_verdict",
            format!("`{v}` (expected CORRECT, INCORRECT, REFUSAL, UNPARSEABLE or JUDGE_ERROR)"),
        ));
    }
    let sample_index = match obj.get("sample_index") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
            Reject::new("bad_sample_index", format!("`sample_index` is {v}; expected a whole number"))
        })?,
    };
    // The output may legitimately be empty (a model can answer nothing); the prompt may not.
    let output = match obj.get("output") {
        None | Some(Value::Null) => return Err(Reject::new("missing_field", "field `output` is missing")),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(Reject::new("wrong_type", format!("field `output` should be a string, found {other}")));
        }
    };
    Ok(Answer {
        model: req_str(&obj, "model")?,
        checkpoint: req_str(&obj, "checkpoint")?,
        dataset: dataset.to_string(),
        item_key: req_str(&obj, "item_key")?,
        amendment_type: amendment.to_string(),
        prompt_type: prompt_type.to_string(),
        sample_index,
        prompt: req_str(&obj, "prompt")?,
        output,
        verdict,
    })
}

/// A well-formed answer record with `extra` fields appended (for the corpus below).
pub fn corpus_answer(extra: &str) -> String {
    format!(
        r#"{{"schema_version":1,"model":"m","checkpoint":"c","dataset":"trivia","item_key":"q1","prompt":"Q?","output":"A."{extra}}}"#
    )
}

/// The malformed answer corpus: one message per kind of fault a message can have on its
/// own, each with the kind it must be rejected as (unit tests parse it; the integration test
/// sends it through a broker).
pub fn malformed_corpus(max_bytes: usize) -> Vec<(&'static str, Vec<u8>)> {
    let answer = corpus_answer;
    vec![
        ("empty_message", Vec::new()),
        ("oversize", answer(&format!(r#","verdict":"CORRECT","pad":"{}""#, "x".repeat(max_bytes))).into_bytes()),
        ("not_utf8", b"{\"schema_version\":1,\"model\":\"\xff\xfe\"}".to_vec()),
        ("malformed_json", b"{\"schema_version\":1,".to_vec()),
        ("not_an_object", b"[1,2,3]".to_vec()),
        ("missing_schema_version", br#"{"model":"m"}"#.to_vec()),
        ("wrong_schema_version", answer("").replace(r#""schema_version":1"#, r#""schema_version":2"#).into_bytes()),
        ("missing_field", answer("").replace(r#","prompt":"Q?""#, "").into_bytes()),
        ("wrong_type", answer("").replace(r#""item_key":"q1""#, r#""item_key":7"#).into_bytes()),
        ("empty_field", answer("").replace(r#""model":"m""#, r#""model":"  ""#).into_bytes()),
        ("unknown_field", answer(r#","temperature":0.7"#).into_bytes()),
        ("unknown_dataset", answer("").replace("trivia", "imagenet").into_bytes()),
        ("unknown_amendment_type", answer(r#","amendment_type":"grumpy""#).into_bytes()),
        ("unknown_prompt_type", answer(r#","prompt_type":"sarcastic""#).into_bytes()),
        ("unknown_verdict", answer(r#","verdict":"MAYBE""#).into_bytes()),
        ("bad_sample_index", answer(r#","sample_index":-1"#).into_bytes()),
    ]
}

/// Standard base64 (with padding), for original bytes inside a JSON dead letter.
pub fn base64(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}
