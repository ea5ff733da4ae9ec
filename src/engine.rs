//! What answers a node's inference requests.
//!
//! A node runs a GGUF model ([`Backend::Model`]), or none, when every
//! SendPrompt, SendTensor and SendExample gets a typed `no_model_loaded`
//! error rather than a made-up result. Tests and benchmarks plug in an
//! [`Engine`] of their own to drive the request path end to end.

use std::sync::Arc;

pub use crate::inference::ring::BoxFuture;
use crate::inference::Inference;
use crate::protocol::Message;

/// A stand-in for the model.
pub trait Engine: Send + Sync + 'static {
    /// Answers an inference request (`SendPrompt`, `SendTensor`,
    /// `SendExample`) with its response message or an `Error` message.
    fn infer(&self, request: Message) -> BoxFuture<'static, Message>;

    /// A `SendOpaqueStatus` from a peer (e.g. the end of a request).
    fn status(&self, _request_id: &str, _status: &str) {}
}

pub enum Backend {
    NoModel,
    Model(Inference),
    Engine(Arc<dyn Engine>),
}

impl Backend {
    pub fn inference(&self) -> Option<&Inference> {
        match self {
            Backend::Model(inference) => Some(inference),
            _ => None,
        }
    }
}
