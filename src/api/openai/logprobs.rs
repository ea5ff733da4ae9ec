//! `logprobs` in OpenAI's two shapes: chat's list of tokens, each with its
//! bytes and alternatives, and legacy completions' parallel arrays. Tokens
//! are shown as the bytes they stand for ([`ModelTokenizer::piece`]), so the
//! tokens of an answer join to its text.

use serde_json::{json, Map, Value};

use super::{ApiError, Kind, Options};
use crate::inference::logprobs::{TokenLogprobs, MAX_TOP};
use crate::inference::tokenizer::ModelTokenizer;

/// What the request asks: `None`, or the log-probabilities of each token with
/// this many alternatives. Chat takes `logprobs: true` and `top_logprobs`;
/// completions take `logprobs: n`.
pub(super) fn asked(options: &Options, kind: Kind) -> Result<Option<usize>, ApiError> {
    fn present(v: &Option<Value>) -> Option<&Value> {
        v.as_ref().filter(|v| !v.is_null())
    }
    let count = |v: &Value, param: &'static str| {
        v.as_u64()
            .filter(|&n| n <= MAX_TOP as u64)
            .map(|n| n as usize)
            .ok_or_else(|| {
                ApiError::bad_request(
                    format!("`{param}` must be a whole number from 0 to {MAX_TOP}, not {v}"),
                    Some(param),
                )
            })
    };
    match kind {
        Kind::Chat => {
            let on = match present(&options.logprobs) {
                None => false,
                Some(Value::Bool(on)) => *on,
                Some(v) => {
                    return Err(ApiError::bad_request(
                        format!("`logprobs` is true or false here, not {v}"),
                        Some("logprobs"),
                    ))
                }
            };
            let top = present(&options.top_logprobs)
                .map(|v| count(v, "top_logprobs"))
                .transpose()?;
            match (on, top) {
                (true, top) => Ok(Some(top.unwrap_or(0))),
                (false, None) => Ok(None),
                (false, Some(_)) => Err(ApiError::bad_request(
                    "`top_logprobs` needs `logprobs: true`",
                    Some("top_logprobs"),
                )),
            }
        }
        Kind::Text => {
            if present(&options.top_logprobs).is_some() {
                return Err(ApiError::bad_request(
                    "/v1/completions takes the number of alternatives as `logprobs`; \
                     `top_logprobs` is chat's",
                    Some("top_logprobs"),
                ));
            }
            present(&options.logprobs)
                .map(|v| count(v, "logprobs"))
                .transpose()
        }
    }
}

/// Chat's `{"content": [...]}` for these tokens.
pub(super) fn chat(tokenizer: &ModelTokenizer, tokens: &[TokenLogprobs]) -> Value {
    let entry = |(id, logprob): (u32, f32)| {
        let bytes = tokenizer.piece(id);
        json!({
            "token": String::from_utf8_lossy(&bytes),
            "logprob": finite(logprob),
            "bytes": bytes,
        })
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.token);
            e["top_logprobs"] = t.top.iter().map(|&alt| entry(alt)).collect();
            e
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// Completions' parallel arrays for these tokens; `offset` is where the first
/// one starts in the answer's text, in characters (as OpenAI's and vLLM's
/// count, so a client can slice the text by it), and moves past the last. A
/// character split across tokens counts at the token holding its first byte.
pub(super) fn text(
    tokenizer: &ModelTokenizer,
    tokens: &[TokenLogprobs],
    offset: &mut usize,
) -> Value {
    let mut strings = Vec::new();
    let mut logprobs = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for t in tokens {
        let bytes = tokenizer.piece(t.token.0);
        strings.push(Value::from(String::from_utf8_lossy(&bytes)));
        logprobs.push(Value::from(finite(t.token.1)));
        // A map by token text, as OpenAI's: alternatives that print alike share a key.
        let mut top = Map::new();
        for &(id, lp) in &t.top {
            let text = String::from_utf8_lossy(&tokenizer.piece(id)).into_owned();
            top.entry(text).or_insert(Value::from(finite(lp)));
        }
        tops.push(Value::Object(top));
        offsets.push(Value::from(*offset));
        *offset += bytes.iter().filter(|&&b| b & 0xC0 != 0x80).count();
    }
    json!({
        "tokens": strings,
        "token_logprobs": logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

/// A token the model rules out has a log-probability of −∞, which JSON cannot
/// carry (it would print as `null` where clients expect a number): such a
/// token is reported at -9999, far below any log-probability a model gives.
fn finite(logprob: f32) -> f32 {
    logprob.max(-9999.0)
}
