//! The seam between the node and whatever runs the model.
//!
//! The node routes SendPrompt, SendTensor and SendExample here. Until a model is
//! loaded the answer is a typed `no_model_loaded` error, never a made-up result;
//! tests plug in their own engine to exercise the request path end to end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::inference::Inference;
use crate::peers::Peers;
use crate::protocol::{ErrorCode, Message};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub trait Engine: Send + Sync + 'static {
    /// Answers an inference request (`SendPrompt`, `SendTensor`, `SendExample`)
    /// with its response message or an `Error` message. `peers` are this
    /// node's links, for an engine that passes work on to the next node.
    fn infer(&self, request: Message, peers: &Arc<Peers>) -> BoxFuture<Message>;

    /// A `SendOpaqueStatus` from a peer (e.g. the end of a request).
    fn status(&self, _request_id: &str, _status: &str) {}

    /// The model runtime, when this engine runs a model: the HTTP API's chat
    /// endpoint and the topology's model entry come from it.
    fn inference(&self) -> Option<Inference> {
        None
    }
}

/// The engine of a node without a model.
pub struct NoModel {
    pub node_id: String,
}

impl Engine for NoModel {
    fn infer(&self, request: Message, _peers: &Arc<Peers>) -> BoxFuture<Message> {
        let answer = Message::error(
            ErrorCode::NoModelLoaded,
            format!(
                "node `{}` has no model loaded and cannot answer {:?}",
                self.node_id,
                request.frame_type()
            ),
        );
        Box::pin(std::future::ready(answer))
    }
}
