//! What answers a node's inference requests.
//!
//! A node runs a GGUF model ([`Backend::Model`]), or none, when every
//! SendPrompt, SendTensor and SendExample gets a typed `no_model_loaded`
//! error rather than a made-up result. The model may arrive after the node
//! started, once it has been fetched from a peer: its [`ModelSlot`] is empty
//! until then, and the node answers as one without a model. Tests and benchmarks plug in an
//! [`Engine`] of their own to drive the request path end to end.

use std::sync::{Arc, Mutex, OnceLock};

use crate::fetch::status::FetchStatus;
pub use crate::inference::ring::BoxFuture;
use crate::inference::Inference;
use crate::net::sync::lock;
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
    Model(ModelSlot),
    Engine(Arc<dyn Engine>),
}

impl Backend {
    /// A node that runs `inference` from the start.
    pub fn model(inference: Inference) -> Self {
        Backend::Model(ModelSlot::holding(inference))
    }

    pub fn inference(&self) -> Option<&Inference> {
        match self {
            Backend::Model(slot) => slot.get(),
            _ => None,
        }
    }

    /// The slot everyone reads the model from; an empty one that stays empty
    /// for a node without a model.
    pub fn slot(&self) -> ModelSlot {
        match self {
            Backend::Model(slot) => slot.clone(),
            _ => ModelSlot::default(),
        }
    }
}

/// The model a node runs, set once: at start, or when a fetch has brought
/// and loaded it. Until then it holds how that fetch stands. Cheap to clone;
/// the node, its cluster and its API share one.
#[derive(Clone, Default)]
pub struct ModelSlot {
    inner: Arc<Slot>,
}

#[derive(Default)]
struct Slot {
    model: OnceLock<Inference>,
    fetch: Mutex<Option<FetchStatus>>,
}

impl ModelSlot {
    pub fn holding(inference: Inference) -> Self {
        let slot = ModelSlot::default();
        slot.fill(inference);
        slot
    }

    pub fn get(&self) -> Option<&Inference> {
        self.inner.model.get()
    }

    /// Puts the model in; a slot already holding one keeps it.
    pub fn fill(&self, inference: Inference) {
        let _ = self.inner.model.set(inference);
    }

    /// The fetch's latest state, if the model was fetched or is being.
    pub fn fetch_status(&self) -> Option<FetchStatus> {
        lock(&self.inner.fetch).clone()
    }

    pub fn report(&self, status: FetchStatus) {
        *lock(&self.inner.fetch) = Some(status);
    }
}
