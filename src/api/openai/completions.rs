//! `/v1/completions`: OpenAI's legacy text completions, as llama.cpp's server
//! and Ollama serve them. The prompt is continued as it is, with no template:
//! how a base model (one without a chat template) is used, and how a client
//! that renders its own template talks to an instruct model.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{model_asked, off_thread, parse, respond, ApiError, Kind, Options};
use crate::api::{AppState, Shared};
use crate::inference::{Inference, InferenceError};

/// OpenAI's default for this endpoint: a completion is a short continuation
/// unless the request asks for more.
const DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    /// Not done here; refused rather than silently ignored.
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<u64>,
    #[serde(flatten)]
    options: Options,
}

/// OpenAI's four forms of a prompt: text, token ids, or a batch of either. A
/// batch of one is taken; larger batches are refused, as one request runs one
/// generation here.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// The one prompt a request runs.
enum One {
    Text(String),
    Tokens(Vec<u32>),
}

pub async fn completions(State(app): Shared, body: Bytes) -> Response {
    complete(&app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn complete(app: &AppState, body: Bytes) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse(&body, "completion")?;
    let inference = model_asked(app, request.options.model.as_deref())?;
    for (asked, param) in [
        (request.echo == Some(true), "echo"),
        (request.suffix.is_some(), "suffix"),
        (request.best_of.is_some_and(|n| n != 1), "best_of"),
    ] {
        if asked {
            return Err(ApiError::bad_request(
                format!("`{param}` is not supported"),
                Some(param),
            ));
        }
    }
    let prompt = match request.prompt {
        Prompt::Text(text) => One::Text(text),
        Prompt::Tokens(ids) => One::Tokens(ids),
        Prompt::Texts(mut texts) if texts.len() == 1 => One::Text(texts.remove(0)),
        Prompt::TokenLists(mut lists) if lists.len() == 1 => One::Tokens(lists.remove(0)),
        Prompt::Texts(_) | Prompt::TokenLists(_) => {
            return Err(ApiError::bad_request(
                "`prompt` holds several prompts; send one per request",
                Some("prompt"),
            ))
        }
    };
    let prompt = {
        let inference = inference.clone();
        off_thread(move || prompt_tokens(&inference, prompt)).await?
    };
    respond(
        app,
        inference,
        &request.options,
        prompt,
        DEFAULT_MAX_TOKENS,
        Kind::Text,
    )
    .await
}

/// Text is tokenized as llama.cpp's server does (BOS if the file asks,
/// special tokens parsed); token ids are taken as they are, once checked.
fn prompt_tokens(inference: &Inference, prompt: One) -> Result<Vec<u32>, ApiError> {
    let tokenizer = inference.tokenizer();
    let tokens = match prompt {
        One::Text(text) => tokenizer.encode(&text).map_err(InferenceError::from)?,
        One::Tokens(ids) => {
            if let Some(bad) = ids
                .iter()
                .find(|&&id| id as usize >= tokenizer.vocab_size())
            {
                return Err(ApiError::bad_request(
                    format!(
                        "token id {bad} is not in the vocabulary of `{}` ({} tokens)",
                        inference.info().name,
                        tokenizer.vocab_size()
                    ),
                    Some("prompt"),
                ));
            }
            ids
        }
    };
    if tokens.is_empty() {
        return Err(ApiError::bad_request(
            "`prompt` is empty (and the model adds no BOS): there is nothing to continue",
            Some("prompt"),
        ));
    }
    Ok(tokens)
}
