//! What inference needs of the cluster: who is there, and a way to send a step
//! to a linked node. The node gives it its [`crate::cluster::Cluster`]; tests
//! give it a fake ring of in-process nodes, so the origin's loop and a
//! shard's forwarding run without sockets.

use std::future::Future;
use std::pin::Pin;

use crate::net::client::RequestError;
use crate::protocol::Message;
use crate::topology::Topology;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Ring: Send + Sync + 'static {
    /// The cluster as this node sees it now: its nodes, the model each holds,
    /// and the links between them. The ring for a request is planned on it.
    fn topology(&self) -> BoxFuture<'_, Topology>;

    /// Sends `message` over the link to node `to` and waits for its answer;
    /// `None` when there is no link to `to` up.
    fn send(
        &self,
        to: &str,
        message: Message,
    ) -> Option<BoxFuture<'static, Result<Message, RequestError>>>;
}
