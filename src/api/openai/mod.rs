//! OpenAI's API, so stock clients (the `openai` package, curl, chat UIs) talk
//! to the cluster unchanged: `/v1/models`, `/v1/chat/completions` ([`chat`])
//! and the legacy `/v1/completions` for base models ([`completions`]),
//! streamed as server-sent events or answered whole, errors in OpenAI's
//! shape. Responses carry one extra key, `tensorlink` (ring, token ids,
//! timings), which clients ignore and tests and benchmarks read.

mod chat;
mod completions;
mod logprobs;

pub use chat::chat_completions;
pub use completions::completions;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{AppState, Shared};
use crate::inference::generate::Summary;
use crate::inference::logprobs::TokenLogprobs;
use crate::inference::{
    GenerateRequest, Inference, InferenceError, Ring, SamplingParams, StreamEvent,
};
use crate::protocol::ErrorCode;

pub async fn models(State(app): Shared) -> Json<Value> {
    let data: Vec<Value> = app
        .inference()
        .iter()
        .map(|i| {
            json!({
                "id": i.info().name,
                "object": "model",
                "created": 0,
                "owned_by": "tensorlink",
                "sha256": i.info().sha256,
                "n_layers": i.info().n_layers,
                "context_length": i.context_length(),
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// What chat and text completions share: the model, length, sampling, stop
/// strings and streaming.
#[derive(Debug, Deserialize)]
struct Options {
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    stream_options: Option<StreamOptions>,
    /// Chat: `true` or `false`; completions: the number of alternatives.
    logprobs: Option<Value>,
    /// Chat only: the number of alternatives.
    top_logprobs: Option<Value>,
    /// Asked for but not done here: refused rather than silently ignored.
    n: Option<u64>,
}

impl Options {
    /// What a request may ask that we do not do, named, so a client is never
    /// answered as if it had been done.
    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request(
                "`n` other than 1 is not supported: one request runs one generation",
                Some("n"),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
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
            // Tokenizing a request's text fails only on the text (a byte the
            // vocabulary cannot spell): the model loaded with this tokenizer.
            InferenceError::Tokenizer(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
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
            InferenceError::Busy(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "busy"),
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

/// The request body, parsed by hand rather than by axum's extractor: OpenAI
/// answers bad JSON with a 400 in its own error shape, and so do we.
fn parse<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            format!("the request body is not a valid {what} request: {e}"),
            None,
        )
    })
}

/// Templating and tokenizing a long prompt is CPU work: off the async threads,
/// which serve every other request meanwhile.
async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| InferenceError::Internal(format!("preparing the prompt failed: {e}")))?
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The model this node runs, if the request names it (or names none).
fn model_asked<'a>(app: &'a AppState, asked: Option<&str>) -> Result<&'a Inference, ApiError> {
    let inference = app.inference().ok_or_else(|| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "service_unavailable",
        code: "model_not_loaded",
        message: app.no_model(),
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

/// Sampling, length and stop strings, checked as OpenAI checks them; at most
/// `default_max_tokens` when the request does not say.
fn generate_request(
    request: &Options,
    prompt: Vec<u32>,
    default_max_tokens: usize,
    kind: Kind,
) -> Result<GenerateRequest, ApiError> {
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
        None => default_max_tokens,
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
        top_logprobs: logprobs::asked(request, kind)?,
    })
}

/// Whether `asked` names this model: its name, its file name, or its sha256.
fn names_model(inference: &Inference, asked: &str) -> bool {
    let info = inference.info();
    asked == info.name
        || asked.strip_suffix(".gguf") == Some(info.name.as_str())
        || asked == info.sha256
}

/// Which of OpenAI's two answer shapes a response takes.
#[derive(Clone, Copy)]
enum Kind {
    /// `chat.completion`: a message, streamed as deltas after a role chunk.
    Chat,
    /// `text_completion`: text, streamed as pieces of it.
    Text,
}

/// Generates `prompt` on the ring and answers in `kind`'s shape, streamed when
/// the request asks.
async fn respond(
    app: &AppState,
    inference: &Inference,
    options: &Options,
    prompt: Vec<u32>,
    default_max_tokens: usize,
    kind: Kind,
) -> Result<Response, ApiError> {
    options.refuse_unsupported()?;
    let generate = generate_request(options, prompt, default_max_tokens, kind)?;
    let with_logprobs = generate.top_logprobs.is_some();
    let ring: std::sync::Arc<dyn Ring> = app.cluster.clone();
    let generation = inference.generate(ring, generate).await?;
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Text => "cmpl",
    };
    let meta = Meta {
        kind,
        id: format!("{prefix}-{:024x}", fastrand::u128(..) >> 32),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: inference.info().name.clone(),
        ring: serde_json::to_value(&generation.ring).unwrap_or(Value::Null),
        logprobs: with_logprobs.then(|| inference.clone()),
    };
    if options.stream {
        let include_usage = options
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        // A request the ring refuses at its first step (a node without room
        // for its cache: 429) is answered with that status, as a client
        // that retries on 429 expects, not with a 200 and an error event.
        let mut events = generation.events;
        let first = match events.recv().await {
            Some(StreamEvent::Failed(e)) => return Err(e.into()),
            first => first,
        };
        Ok(stream_response(meta, first, events, include_usage))
    } else {
        whole_response(meta, generation.events).await
    }
}

struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    ring: Value,
    /// Present when the request asked for log-probabilities: the model whose
    /// tokenizer spells the tokens.
    logprobs: Option<Inference>,
}

enum Piece<'a> {
    /// Chat's opening chunk, which names the role.
    Role,
    Text(&'a str),
    None,
}

impl Meta {
    /// `logprobs` of a choice for these tokens: null when the request did not
    /// ask. `offset` is where they start in the text (completions' shape).
    fn logprobs(&self, tokens: &[TokenLogprobs], offset: &mut usize) -> Value {
        let Some(inference) = &self.logprobs else {
            return Value::Null;
        };
        let tokenizer = inference.tokenizer();
        match self.kind {
            Kind::Chat => logprobs::chat(tokenizer, tokens),
            Kind::Text => logprobs::text(tokenizer, tokens, offset),
        }
    }

    /// One streamed chunk: new text (or chat's opening role) with its
    /// `logprobs`, or nothing but the finish reason.
    fn chunk(&self, piece: Piece, logprobs: Value, finish: Option<&str>) -> Value {
        let (object, choice) = match self.kind {
            Kind::Chat => {
                let delta = match piece {
                    Piece::Role => json!({"role": "assistant", "content": ""}),
                    Piece::Text(text) => json!({ "content": text }),
                    Piece::None => json!({}),
                };
                let choice = json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish});
                ("chat.completion.chunk", choice)
            }
            Kind::Text => {
                let text = match piece {
                    Piece::Text(text) => text,
                    Piece::Role | Piece::None => "",
                };
                let choice = json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish});
                ("text_completion", choice)
            }
        };
        self.envelope(object, choice)
    }

    fn envelope(&self, object: &str, choice: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// The whole answer, once generation has ended.
    fn whole(&self, content: String, tokens: &[TokenLogprobs], summary: &Summary) -> Value {
        let finish = summary.finish.as_str();
        let logprobs = self.logprobs(tokens, &mut 0);
        let (object, choice) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
            ),
            Kind::Text => (
                "text_completion",
                json!({"index": 0, "text": content, "logprobs": logprobs, "finish_reason": finish}),
            ),
        };
        let mut body = self.envelope(object, choice);
        body["usage"] = self.usage(summary);
        body["tensorlink"] = self.extension(summary);
        body
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

/// Server-sent events: a role chunk (chat only), a chunk per piece of text, a
/// final chunk with the finish reason, optionally usage, and `[DONE]`. An error after the
/// stream began goes out as an `error` event, as OpenAI does. When the client
/// goes away, the stream and its receiver are dropped, which cancels the
/// request on every node.
/// The answer as server-sent events, beginning with `first`, the event
/// already taken from `events`.
fn stream_response(
    meta: Meta,
    first: Option<StreamEvent>,
    events: tokio::sync::mpsc::Receiver<StreamEvent>,
    include_usage: bool,
) -> Response {
    enum Phase {
        Start,
        Running,
        Finished,
    }
    let data = |v: Value| Ok::<_, std::convert::Infallible>(Event::default().data(v.to_string()));
    // Where the next token starts in the text (completions' `text_offset`).
    let offset = 0usize;
    let state = (meta, events, first, Phase::Start, offset);
    let stream = stream::unfold(
        state,
        move |(meta, mut events, mut first, phase, mut offset)| async move {
            match phase {
                Phase::Start => {
                    let opening = match meta.kind {
                        Kind::Chat => vec![data(meta.chunk(Piece::Role, Value::Null, None))],
                        Kind::Text => Vec::new(),
                    };
                    Some((opening, (meta, events, first, Phase::Running, offset)))
                }
                Phase::Finished => None,
                Phase::Running => match next_event(&mut first, &mut events).await {
                    Some(StreamEvent::Text { text, logprobs }) => {
                        let logprobs = meta.logprobs(&logprobs, &mut offset);
                        let chunk = meta.chunk(Piece::Text(&text), logprobs, None);
                        Some((
                            vec![data(chunk)],
                            (meta, events, first, Phase::Running, offset),
                        ))
                    }
                    Some(StreamEvent::Done(summary)) => {
                        let mut last =
                            meta.chunk(Piece::None, Value::Null, Some(summary.finish.as_str()));
                        last["tensorlink"] = meta.extension(&summary);
                        let mut out = vec![data(last)];
                        if include_usage {
                            let mut usage = meta.chunk(Piece::None, Value::Null, None);
                            usage["choices"] = json!([]);
                            usage["usage"] = meta.usage(&summary);
                            out.push(data(usage));
                        }
                        out.push(Ok(Event::default().data("[DONE]")));
                        Some((out, (meta, events, first, Phase::Finished, offset)))
                    }
                    Some(StreamEvent::Failed(e)) => {
                        let body = ApiError::from(e).body();
                        Some((
                            vec![data(body)],
                            (meta, events, first, Phase::Finished, offset),
                        ))
                    }
                    None => None,
                },
            }
        },
    );
    let flat = futures_util::StreamExt::flat_map(stream, stream::iter);
    Sse::new(flat).into_response()
}

/// `first` while it holds the event taken early, then the rest.
async fn next_event(
    first: &mut Option<StreamEvent>,
    events: &mut tokio::sync::mpsc::Receiver<StreamEvent>,
) -> Option<StreamEvent> {
    match first.take() {
        Some(event) => Some(event),
        None => events.recv().await,
    }
}

async fn whole_response(
    meta: Meta,
    mut events: tokio::sync::mpsc::Receiver<StreamEvent>,
) -> Result<Response, ApiError> {
    let mut content = String::new();
    let mut tokens = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            StreamEvent::Text { text, logprobs } => {
                content.push_str(&text);
                tokens.extend(logprobs);
            }
            StreamEvent::Failed(e) => return Err(e.into()),
            StreamEvent::Done(summary) => {
                return Ok(Json(meta.whole(content, &tokens, &summary)).into_response());
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
