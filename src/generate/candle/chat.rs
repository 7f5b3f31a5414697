//! The chat format of the local models: ChatML, with the default system prompt the model's
//! own template inserts when a conversation has none.
//!
//! SmolLM2's and Qwen2.5's templates (GGUF `tokenizer.chat_template`, `tokenizer_config.json`
//! `chat_template`) are Jinja programs that render ChatML and, when the first message is not a
//! system message, prepend a fixed one ("You are a helpful AI assistant named SmolLM, …").
//! Candor does not run Jinja: it recognises a ChatML template, keeps that literal default
//! system prompt, and renders ChatML itself, so prompts match what the model was tuned on.
//!
//! ```
//! use candor::generate::candle::chat::ChatTemplate;
//! let t = ChatTemplate::chatml(None);
//! assert_eq!(
//!     t.render(Some("Be brief."), "Hi?"),
//!     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
//! );
//! ```

use regex::Regex;

/// Opens a turn.
pub const IM_START: &str = "<|im_start|>";
/// Closes a turn; generation stops at it.
pub const IM_END: &str = "<|im_end|>";

/// A ChatML template and the system prompt it uses when a request has none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    pub default_system: Option<String>,
}

impl ChatTemplate {
    pub fn chatml(default_system: Option<String>) -> Self {
        ChatTemplate { default_system }
    }

    /// Reads a model's Jinja chat template; `None` (no template) is ChatML without a default
    /// system prompt. A template that is not ChatML is an error naming what was found.
    pub fn from_jinja(template: Option<&str>) -> Result<Self, String> {
        let Some(t) = template else { return Ok(ChatTemplate::chatml(None)) };
        if !t.contains(IM_START) || !t.contains(IM_END) {
            let head: String = t.chars().take(80).collect();
            return Err(format!("chat template is not ChatML (no {IM_START}/{IM_END}): `{head}…`"));
        }
        // The default system prompt is a string literal `'<|im_start|>system\n…<|im_end|>…'`
        // (the newline written as an escape or a real one); a system turn built from
        // `message['content']` is not a literal and does not match.
        let re = Regex::new(r"<\|im_start\|>system(?:\\n|\n)([^'\x22{}+]*?)<\|im_end\|>").expect("valid regex");
        let default_system = re.captures(t).map(|c| c[1].replace("\\n", "\n"));
        Ok(ChatTemplate::chatml(default_system))
    }

    /// The prompt text for one user turn, ending where the assistant's answer starts.
    pub fn render(&self, system: Option<&str>, user: &str) -> String {
        let mut out = String::new();
        if let Some(sys) = system.or(self.default_system.as_deref()) {
            out.push_str(&format!("{IM_START}system\n{sys}{IM_END}\n"));
        }
        out.push_str(&format!("{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // SmolLM2-135M-Instruct's template, as stored in its GGUF (real newlines inside literals).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_yields_its_default_system_prompt() {
        let t = ChatTemplate::from_jinja(Some(SMOLLM2)).unwrap();
        assert_eq!(
            t.default_system.as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        let p = t.render(None, "Q");
        assert!(p.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{p}");
        assert!(p.ends_with("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"), "{p}");
        // A request's own system prompt replaces the default.
        assert!(t.render(Some("S"), "Q").starts_with("<|im_start|>system\nS<|im_end|>\n"));
    }

    #[test]
    fn escaped_newlines_and_templates_without_default() {
        let escaped = SMOLLM2.replace('\n', "\\n");
        let t = ChatTemplate::from_jinja(Some(&escaped)).unwrap();
        assert_eq!(
            t.default_system.as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        let plain = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}";
        assert_eq!(ChatTemplate::from_jinja(Some(plain)).unwrap().default_system, None);
        assert_eq!(
            ChatTemplate::from_jinja(None).unwrap().render(None, "Q"),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_non_chatml_template_is_refused() {
        let err = ChatTemplate::from_jinja(Some("{{ bos_token }}[INST] {{ m }} [/INST]")).unwrap_err();
        assert!(err.contains("not ChatML"), "{err}");
    }
}
