//! The seam between the node and whatever runs the model.
//!
//! The node routes SendPrompt, SendTensor and SendExample here. Until a model is
//! loaded the answer is a typed `no_model_loaded` error, never a made-up result;
//! tests plug in their own engine to exercise the request path end to end.

use std::future::Future;
use std::pin::Pin;

use crate::protocol::{ErrorCode, Message};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub trait Engine: Send + Sync + 'static {
    /// Answers an inference request (`SendPrompt`, `SendTensor`, `SendExample`)
    /// with its response message or an `Error` message.
    fn infer(&self, request: Message) -> BoxFuture<Message>;
}

/// The engine of a node without a model.
pub struct NoModel {
    pub node_id: String,
}

impl Engine for NoModel {
    fn infer(&self, request: Message) -> BoxFuture<Message> {
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
