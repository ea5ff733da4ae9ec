//! `/v1/chat/completions`: a conversation through the model's own chat
//! template.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{model_asked, off_thread, parse, respond, ApiError, Kind, Options};
use crate::api::{AppState, Shared};
use crate::inference::chat::ChatMessage;
use crate::inference::{Inference, InferenceError};

/// When a chat request does not say, the answer may fill the context up to
/// this: a chat ends at the model's end of turn.
const DEFAULT_MAX_TOKENS: usize = 2048;

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<InMessage>,
    #[serde(flatten)]
    options: Options,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    content: Content,
}

/// A plain string, or OpenAI's list of parts of which we take the text ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

pub async fn chat_completions(State(app): Shared, body: Bytes) -> Response {
    chat(&app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat(app: &AppState, body: Bytes) -> Result<Response, ApiError> {
    let request: ChatRequest = parse(&body, "chat")?;
    let inference = model_asked(app, request.options.model.as_deref())?;
    let messages = chat_messages(&request.messages)?;
    let prompt = {
        let inference = inference.clone();
        off_thread(move || prompt_tokens(&inference, &messages)).await?
    };
    respond(
        app,
        inference,
        &request.options,
        prompt,
        DEFAULT_MAX_TOKENS,
        Kind::Chat,
    )
    .await
}

/// The conversation as text: a message's parts must all be text.
fn chat_messages(messages: &[InMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "`messages` is empty",
            Some("messages"),
        ));
    }
    messages
        .iter()
        .map(|m| {
            let content = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => parts
                    .iter()
                    .map(|p| match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => Ok(t.as_str()),
                        (kind, _) => Err(ApiError::bad_request(
                            format!("message parts of type `{kind}` are not supported; send text"),
                            Some("messages"),
                        )),
                    })
                    .collect::<Result<String, _>>()?,
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
            })
        })
        .collect()
}

/// The conversation through the model's chat template, as token ids.
fn prompt_tokens(inference: &Inference, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
    let template = inference.template().ok_or_else(|| {
        ApiError::bad_request(
            format!(
                "`{}` has no chat template (tokenizer.chat_template) in its file: \
                 it is a base model; send the text to continue to /v1/completions",
                inference.info().name
            ),
            None,
        )
    })?;
    let prompt = template.render(messages).map_err(InferenceError::from)?;
    Ok(inference
        .tokenizer()
        .encode(&prompt)
        .map_err(InferenceError::from)?)
}
