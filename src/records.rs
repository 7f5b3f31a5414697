//! The rows of each stream, as Rust types. Columns and their meaning are documented in
//! `schemas/<stream>.json`; [`crate::schema::validate_all`] checks the two agree.

crate::record! {
    /// One evaluation question with its reference fields (`schemas/item.json`).
    pub struct Item in "item" {
        pub dataset: String,
        pub item_key: String,
        pub source_row: u64,
        pub question: String,
        pub question_converted: Option<String>,
        pub correct_answer: Option<String>,
        pub correct_answers: Vec<String>,
        pub incorrect_answer: Option<String>,
        pub incorrect_answers: Vec<String>,
        pub options: Vec<String>,
        pub answer_letter: Option<String>,
        pub ground_truth: Option<String>,
        pub ground_false: Option<String>,
        pub proposition: Option<String>,
        pub category: Option<String>,
    }
}

crate::record! {
    /// One rendered prompt (`schemas/trial.json`).
    pub struct Trial in "trial" {
        pub trial_key: String,
        pub dataset: String,
        pub item_key: String,
        pub amendment_type: String,
        pub amendment_group: String,
        pub statement_id: Option<String>,
        pub statement: Option<String>,
        pub prompt_type: String,
        pub belief_answer: Option<String>,
        pub prompt: String,
        pub template_style: String,
        pub seed: u64,
    }
}

crate::record! {
    /// One model answer at one checkpoint (`schemas/response.json`).
    pub struct Response in "response" {
        pub response_key: String,
        pub trial_key: String,
        pub dataset: String,
        pub model: String,
        pub checkpoint: String,
        pub checkpoint_epoch: u64,
        pub is_finetuned: bool,
        pub sample_index: u32,
        pub output: String,
        pub finish_reason: Option<String>,
        pub prompt_tokens: Option<u32>,
        pub completion_tokens: Option<u32>,
        pub latency_ms: Option<f64>,
        pub generator: String,
        pub decoding: Option<String>,
    }
}

crate::record! {
    /// The score of one response (`schemas/verdict.json`).
    pub struct Verdict in "verdict" {
        pub response_key: String,
        pub trial_key: String,
        pub model: String,
        pub checkpoint: String,
        pub checkpoint_epoch: u64,
        pub sample_index: u32,
        pub refusal: bool,
        pub refusal_phrase: Option<String>,
        pub verdict: String,
        pub judge: String,
        pub judge_raw: Option<String>,
    }
}

crate::record! {
    /// The row the statistics read (`schemas/observation.json`).
    pub struct Observation in "observation" {
        pub response_key: String,
        pub model: String,
        pub checkpoint: String,
        pub checkpoint_epoch: u64,
        pub is_finetuned: bool,
        pub dataset: String,
        pub item_key: String,
        pub amendment_type: String,
        pub amendment_group: String,
        pub prompt_type: String,
        pub sample_index: u32,
        pub refusal: bool,
        pub verdict: String,
        pub correct: Option<bool>,
    }
}

crate::record! {
    /// One answer of the generation store (`schemas/generation.json`).
    pub struct StoredGeneration in "generation" {
        pub key: String,
        pub fingerprint: String,
        pub system_prompt: Option<String>,
        pub prompt: String,
        pub decoding: String,
        pub sample_index: u32,
        pub output: String,
        pub finish_reason: String,
        pub prompt_tokens: u32,
        pub completion_tokens: u32,
        pub latency_ms: f64,
    }
}

crate::record! {
    /// SocioT warmth of one response (`schemas/warmth.json`).
    pub struct WarmthScore in "warmth" {
        pub response_key: String,
        pub model: String,
        pub checkpoint: String,
        pub checkpoint_epoch: u64,
        pub query_type: Option<String>,
        pub mode: String,
        pub warmth: f64,
        pub warm_loglik: f64,
        pub cold_loglik: f64,
        pub std_error: Option<f64>,
        pub passes: u32,
        pub text_chars: u32,
        pub lm: String,
    }
}

crate::record! {
    /// A checkpoint the archive knows, with the epoch (logical time) it was given
    /// (`schemas/checkpoint.json`).
    pub struct CheckpointEntry in "checkpoint" {
        pub epoch: u64,
        pub model: String,
        pub checkpoint: String,
        pub is_finetuned: bool,
        pub variant: Option<String>,
    }
}

impl CheckpointEntry {
    /// The checkpoint's identity.
    pub fn id(&self) -> crate::identity::CheckpointRef {
        crate::identity::CheckpointRef::new(&self.model, &self.checkpoint)
    }
}

impl Trial {
    /// The stable key of a trial: its structured key (dataset, item, amendment, prompt type)
    /// as one reversible string ([`crate::identity::key`]).
    pub fn key(dataset: &str, item_key: &str, amendment_type: &str, prompt_type: &str) -> String {
        crate::identity::key(&[dataset, item_key, amendment_type, prompt_type])
    }
}

impl Response {
    /// The stable key of a response: (model, checkpoint, trial, sample) as one reversible
    /// string. The trial key is already escaped, so it goes in as it is.
    pub fn key(model: &str, checkpoint: &str, trial_key: &str, sample_index: u32) -> String {
        format!("{}/{trial_key}/{sample_index}", crate::identity::key(&[model, checkpoint]))
    }
}
