//! OpenAI's chat API, so stock clients (the `openai` package, curl, chat UIs)
//! talk to the cluster unchanged: `/v1/models` and `/v1/chat/completions`,
//! streamed as server-sent events or answered whole, errors in OpenAI's shape.
//! Responses carry one extra key, `tensorlink` (ring, token ids, timings),
//! which clients ignore and tests and benchmarks read.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{AppState, Shared};
use crate::inference::chat::ChatMessage;
use crate::inference::generate::Summary;
use crate::inference::{
    GenerateRequest, Inference, InferenceError, Ring, SamplingParams, StreamEvent,
};
use crate::protocol::ErrorCode;

/// When a request does not say, it may fill the context up to this.
const DEFAULT_MAX_TOKENS: usize = 2048;

pub async fn models(State(app): Shared) -> Json<Value> {
    let data: Vec<Value> = app
        .inference
        .iter()
        .map(|i| {
            json!({
                "id": i.info().name,
                "object": "model",
                "created": 0,
                "owned_by": "tensorlink",
                "sha256": i.info().sha256,
                "n_layers": i.info().n_layers,
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: bool,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
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

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// An error in OpenAI's shape, with the status code that fits it.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "invalid_request",
            message: message.into(),
            param,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<InferenceError> for ApiError {
    fn from(e: InferenceError) -> Self {
        let (status, kind, code) = match &e {
            InferenceError::BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            InferenceError::Template(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "chat_template",
            ),
            InferenceError::WrongModel(_)
            | InferenceError::Remote {
                code: ErrorCode::WrongModel,
                ..
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "model_mismatch",
            ),
            InferenceError::Remote {
                code: ErrorCode::Busy,
                ..
            } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "busy"),
            InferenceError::Remote {
                code: ErrorCode::Internal | ErrorCode::Malformed,
                ..
            } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
            ),
            InferenceError::Unavailable(_) | InferenceError::Remote { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "node_unavailable",
            ),
            InferenceError::Cache(crate::inference::cache::CacheError::Full(_)) => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "busy")
            }
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
            ),
        };
        ApiError {
            status,
            kind,
            code,
            message: e.to_string(),
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

pub async fn chat_completions(State(app): Shared, body: Bytes) -> Response {
    match chat(&app, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn chat(app: &AppState, body: Bytes) -> Result<Response, ApiError> {
    // Parsed by hand, not by axum's extractor: OpenAI answers bad JSON with a
    // 400 in its own error shape, and so do we.
    let request: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            format!("the request body is not a valid chat request: {e}"),
            None,
        )
    })?;
    let inference = model_asked(app, request.model.as_deref())?;
    let messages = chat_messages(&request.messages)?;
    // Templating and tokenizing a long conversation is CPU work: off the
    // async threads, which serve every other request meanwhile.
    let prompt = {
        let inference = inference.clone();
        tokio::task::spawn_blocking(move || prompt_tokens(&inference, &messages))
            .await
            .map_err(|e| InferenceError::Internal(format!("preparing the prompt failed: {e}")))??
    };
    let generate = generate_request(&request, prompt)?;
    let ring: std::sync::Arc<dyn Ring> = app.cluster.clone();
    let generation = inference.generate(ring, generate).await?;
    let id = format!("chatcmpl-{:024x}", fastrand::u128(..) >> 32);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let meta = Meta {
        id,
        created,
        model: inference.info().name.clone(),
        ring: serde_json::to_value(&generation.ring).unwrap_or(Value::Null),
    };
    if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream_response(meta, generation.events, include_usage))
    } else {
        whole_response(meta, generation.events).await
    }
}

/// The model this node runs, if the request names it (or names none).
fn model_asked<'a>(app: &'a AppState, asked: Option<&str>) -> Result<&'a Inference, ApiError> {
    let inference = app.inference.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "service_unavailable",
        code: "model_not_loaded",
        message: format!(
            "node `{}` has no model loaded: start it with --model",
            app.cluster.id()
        ),
        param: None,
    })?;
    match asked {
        Some(asked) if !names_model(inference, asked) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: "model_not_found",
            message: format!(
                "the model `{asked}` does not exist here; this cluster serves `{}`",
                inference.info().name
            ),
            param: Some("model"),
        }),
        _ => Ok(inference),
    }
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
                "`{}` has no chat template (tokenizer.chat_template) in its file",
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

/// Sampling, length and stop strings, checked as OpenAI checks them.
fn generate_request(request: &ChatRequest, prompt: Vec<u32>) -> Result<GenerateRequest, ApiError> {
    let sampling = SamplingParams {
        temperature: request.temperature.unwrap_or(1.0),
        top_p: request.top_p.unwrap_or(1.0),
        seed: request.seed.unwrap_or_else(|| fastrand::u64(..)),
    };
    sampling
        .check()
        .map_err(|(param, why)| ApiError::bad_request(why, Some(param)))?;
    let max_tokens = match request.max_completion_tokens.or(request.max_tokens) {
        Some(0) => {
            return Err(ApiError::bad_request(
                "`max_tokens` must be at least 1",
                Some("max_tokens"),
            ))
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => DEFAULT_MAX_TOKENS,
    };
    let stop = match &request.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
        Some(Stop::Many(_)) => {
            return Err(ApiError::bad_request(
                "`stop` holds at most 4 strings",
                Some("stop"),
            ))
        }
    };
    Ok(GenerateRequest {
        prompt,
        max_tokens,
        sampling,
        stop,
    })
}

/// Whether `asked` names this model: its name, its file name, or its sha256.
fn names_model(inference: &Inference, asked: &str) -> bool {
    let info = inference.info();
    asked == info.name
        || asked.strip_suffix(".gguf") == Some(info.name.as_str())
        || asked == info.sha256
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    ring: Value,
}

impl Meta {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    }

    fn usage(&self, s: &Summary) -> Value {
        json!({
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens,
        })
    }

    fn extension(&self, s: &Summary) -> Value {
        json!({
            "ring": self.ring,
            "tokens": s.tokens,
            "prefill_ms": s.prefill.as_secs_f64() * 1e3,
            "decode_ms": s.decode.as_secs_f64() * 1e3,
        })
    }
}

/// Server-sent events: a role chunk, a chunk per piece of text, a final chunk
/// with the finish reason, optionally usage, and `[DONE]`. An error after the
/// stream began goes out as an `error` event, as OpenAI does. When the client
/// goes away, the stream and its receiver are dropped, which cancels the
/// request on every node.
fn stream_response(
    meta: Meta,
    events: tokio::sync::mpsc::Receiver<StreamEvent>,
    include_usage: bool,
) -> Response {
    enum Phase {
        Start,
        Running,
        Finished,
    }
    let data = |v: Value| Ok::<_, std::convert::Infallible>(Event::default().data(v.to_string()));
    let state = (meta, events, Phase::Start);
    let stream = stream::unfold(state, move |(meta, mut events, phase)| async move {
        match phase {
            Phase::Start => {
                let first = meta.chunk(json!({"role": "assistant", "content": ""}), None);
                Some((vec![data(first)], (meta, events, Phase::Running)))
            }
            Phase::Finished => None,
            Phase::Running => match events.recv().await {
                Some(StreamEvent::Text(text)) => {
                    let chunk = meta.chunk(json!({ "content": text }), None);
                    Some((vec![data(chunk)], (meta, events, Phase::Running)))
                }
                Some(StreamEvent::Done(summary)) => {
                    let mut last = meta.chunk(json!({}), Some(summary.finish.as_str()));
                    last["tensorlink"] = meta.extension(&summary);
                    let mut out = vec![data(last)];
                    if include_usage {
                        let mut usage = meta.chunk(json!({}), None);
                        usage["choices"] = json!([]);
                        usage["usage"] = meta.usage(&summary);
                        out.push(data(usage));
                    }
                    out.push(Ok(Event::default().data("[DONE]")));
                    Some((out, (meta, events, Phase::Finished)))
                }
                Some(StreamEvent::Failed(e)) => {
                    let body = ApiError::from(e).body();
                    Some((vec![data(body)], (meta, events, Phase::Finished)))
                }
                None => None,
            },
        }
    });
    let flat = futures_util::StreamExt::flat_map(stream, stream::iter);
    Sse::new(flat).into_response()
}

async fn whole_response(
    meta: Meta,
    mut events: tokio::sync::mpsc::Receiver<StreamEvent>,
) -> Result<Response, ApiError> {
    let mut content = String::new();
    while let Some(event) = events.recv().await {
        match event {
            StreamEvent::Text(t) => content.push_str(&t),
            StreamEvent::Failed(e) => return Err(e.into()),
            StreamEvent::Done(summary) => {
                let body = json!({
                    "id": meta.id,
                    "object": "chat.completion",
                    "created": meta.created,
                    "model": meta.model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": null,
                        "finish_reason": summary.finish.as_str(),
                    }],
                    "usage": meta.usage(&summary),
                    "tensorlink": meta.extension(&summary),
                });
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "server_error",
        code: "internal",
        message: "the request ended without an answer".into(),
        param: None,
    })
}
