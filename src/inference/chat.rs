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
    /// The tokenizer adds a BOS itself, so one the template writes first is
    /// dropped (llama.cpp's `common_chat_templates_apply` does the same);
    /// otherwise the model would see two.
    strip_leading_bos: bool,
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
            strip_leading_bos: false,
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
        let mut template = ChatTemplate::new(source, text(tokenizer.bos), text(tokenizer.eos))?;
        template.strip_leading_bos = tokenizer.adds_bos();
        Ok(Some(template))
    }

    /// The prompt that asks the model for the assistant's next turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError::Parse(e.to_string()))?;
        let text = template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        match text.strip_prefix(self.bos.as_str()) {
            Some(rest) if self.strip_leading_bos && !self.bos.is_empty() => Ok(rest.to_owned()),
            _ => Ok(text),
        }
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

    #[test]
    fn a_bos_the_template_writes_is_dropped_when_the_tokenizer_adds_one() {
        let source = "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}";
        let mut t = ChatTemplate::new(source, "<|begin_of_text|>", "").unwrap();
        let hi = [ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        assert_eq!(t.render(&hi).unwrap(), "<|begin_of_text|>[hi]");
        t.strip_leading_bos = true;
        assert_eq!(t.render(&hi).unwrap(), "[hi]");
    }
}
