//! Distributed inference: a GGUF model (llama, qwen2, qwen3, gemma3) split by
//! layers across the ring.
//!
//! Reading order: [`gguf`] (the model file, mapped) with its [`config`],
//! [`tensor_types`] and [`fingerprint`], [`model`] (one shard's forward pass)
//! with its [`cache`] and what both cost in [`memory`], [`tokenizer`] and [`chat`] (text in and
//! out), [`sampler`] with its [`logprobs`], [`partition`] (who runs which
//! layers), [`ring`] (what inference needs of the cluster), [`runtime`] (a
//! node's part: answering the steps peers send) and [`generate`] (the origin's
//! loop that drives a request around the ring).
//!
//! One generation step on the wire: the origin sends the new token ids to the
//! first shard as `SendTensor` (i32 `[1, n]`); each shard runs its layers and
//! sends the hidden states (f32 `[1, n, hidden]`) on with `SendTensor`; the last
//! shard samples and answers with the token, and that answer travels back
//! along the requests that led to it. Every hop is a request that waits for its
//! answer, so a node that vanishes fails the step on the spot, with the name of
//! the link that broke, instead of leaving a token that never comes.

pub mod attend;
pub mod blocked;
pub mod cache;
pub mod chat;
pub mod config;
pub mod dots;
pub mod fingerprint;
pub mod generate;
pub mod gguf;
pub mod logprobs;
pub mod memory;
pub mod model;
pub mod models_dir;
pub mod partition;
pub mod ring;
pub mod runtime;
pub mod sampler;
pub mod spm;
pub mod tensor_types;
pub mod tokenizer;

use std::path::PathBuf;

use crate::protocol::ErrorCode;

pub use generate::{FinishReason, GenerateRequest, Generation, StreamEvent};
pub use ring::Ring;
pub use runtime::{Inference, LoadOptions, StepAnswer};
pub use sampler::SamplingParams;

#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot use {path} as a model: {why}")]
    BadModel { path: PathBuf, why: String },
    #[error("{what}: {source}")]
    Candle {
        what: String,
        source: candle_core::Error,
    },
    #[error("bad shard: {0}")]
    BadShard(String),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] chat::TemplateError),
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    /// The request does not fit the model (too long, empty, …).
    #[error("{0}")]
    BadRequest(String),
    /// A node has no room for the request now (too many requests, or no
    /// memory for its cache); its message names the node.
    #[error("{0}")]
    Busy(String),
    /// The nodes do not hold the same model file.
    #[error("{0}")]
    WrongModel(String),
    /// A node of the ring is missing, unreachable, or left mid-request.
    #[error("{0}")]
    Unavailable(String),
    /// Another node refused or failed a step; its message names it.
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
    /// This node failed on a valid request (a forward pass or a layer load
    /// panicked): a fault here, not in what the peer sent.
    #[error("{0}")]
    Internal(String),
}

impl InferenceError {
    /// The protocol's code for this error when a peer asked for the step.
    pub fn code(&self) -> ErrorCode {
        match self {
            InferenceError::WrongModel(_) => ErrorCode::WrongModel,
            InferenceError::Unavailable(_) => ErrorCode::Unavailable,
            InferenceError::Remote { code, .. } => *code,
            InferenceError::Busy(_) => ErrorCode::Busy,
            InferenceError::BadShard(_)
            | InferenceError::BadRequest(_)
            | InferenceError::Cache(_) => ErrorCode::Malformed,
            _ => ErrorCode::Internal,
        }
    }
}

fn candle(what: impl Into<String>) -> impl FnOnce(candle_core::Error) -> InferenceError {
    let what = what.into();
    move |source| InferenceError::Candle { what, source }
}
