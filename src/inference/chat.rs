//! Chat messages → prompt text, with the template the model was trained on:
//! the file's `tokenizer.chat_template`, rendered by minijinja the way
//! Hugging Face's `apply_chat_template` does (Python string methods included).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::tokenizer::ModelTokenizer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model's chat template does not parse: {0}")]
    Parse(String),
    #[error("the model's chat template refused the conversation: {0}")]
    Render(String),
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| TemplateError::Parse(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
        })
    }

    /// The file's own template (`tokenizer.chat_template`), with its BOS and EOS
    /// texts for templates that write them; `None` when the file has none.
    pub fn from_gguf(
        metadata: &HashMap<String, Value>,
        tokenizer: &ModelTokenizer,
    ) -> Result<Option<Self>, TemplateError> {
        let Some(source) = metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
        else {
            return Ok(None);
        };
        let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("");
        ChatTemplate::new(source, text(tokenizer.bos), text(tokenizer.eos)).map(Some)
    }

    /// The prompt that asks the model for the assistant's next turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError::Parse(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| TemplateError::Render(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_python_methods_and_refuses_by_exception() {
        let source = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let msg = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        assert_eq!(
            t.render(&[msg("user", "  hi ")]).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let err = t.render(&[msg("tool", "x")]).unwrap_err().to_string();
        assert!(err.contains("no tools"), "{err}");
    }
}
