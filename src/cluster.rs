//! The cluster as this node reaches it: its own hello and model, and its links.
//!
//! Both the protocol handler (a peer's `CollectTopology`) and the HTTP API
//! (`/topology`, `/cluster`, a chat request planning its ring) ask the cluster
//! through this one value, and inference sends its steps through it as its
//! [`Ring`], so none of them needs the node that composes them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::ModelSlot;
use crate::inference::ring::{BoxFuture, Ring};
use crate::net::client::RequestError;
use crate::peers::Peers;
use crate::protocol::{Hello, Message};
use crate::topology::{Edge, Topology};

/// How deep `/topology` asks through the cluster, as exo does.
pub const TOPOLOGY_DEPTH: u32 = 4;
/// How long a peer may take to report its part of the topology, per hop it has
/// left to ask: deeper asks get strictly less time than the ask that contains
/// them, so one slow node far away costs only its own branch.
const TOPOLOGY_HOP_TIMEOUT: Duration = Duration::from_millis(750);

pub struct Cluster {
    hello: Hello,
    peers: Arc<Peers>,
    model: ModelSlot,
}

impl Cluster {
    pub fn new(hello: Hello, peers: Arc<Peers>, model: ModelSlot) -> Self {
        Cluster {
            hello,
            peers,
            model,
        }
    }

    pub fn id(&self) -> &str {
        &self.hello.node_id
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// This node, its linked peers, and what those peers see in turn, down to
    /// `max_depth` hops; nodes in `visited` are not asked again.
    pub async fn collect_topology(&self, visited: BTreeSet<String>, max_depth: u32) -> Topology {
        let mut topo = Topology::default();
        topo.add_node(self.id(), self.hello.capabilities.clone());
        topo.active_node_id = Some(self.id().to_owned());
        if let Some(inference) = self.model.get() {
            topo.models
                .insert(self.id().to_owned(), inference.info().clone());
        }
        let linked = self.peers.linked();
        for p in &linked {
            topo.add_node(&p.id, p.client.peer().capabilities.clone());
            topo.add_edge(Edge {
                from_id: self.id().to_owned(),
                to_id: p.id.clone(),
                description: format!("tensorlink tcp via {}", p.address),
            });
        }
        if max_depth == 0 {
            return topo;
        }
        let mut next_visited = visited.clone();
        next_visited.insert(self.id().to_owned());
        next_visited.extend(linked.iter().map(|p| p.id.clone()));
        let request = Message::CollectTopology {
            visited: next_visited.into_iter().collect(),
            max_depth: max_depth - 1,
        };
        // Ask every peer at once: one slow peer costs the timeout once, not per peer.
        let timeout = TOPOLOGY_HOP_TIMEOUT * max_depth;
        let mut asks = tokio::task::JoinSet::new();
        for p in linked.into_iter().filter(|p| !visited.contains(&p.id)) {
            let request = request.clone();
            asks.spawn(async move {
                let answer = tokio::time::timeout(timeout, p.client.request(&request)).await;
                (p.id, answer)
            });
        }
        let own_id = self.id().to_owned();
        while let Some(joined) = asks.join_next().await {
            let Ok((peer, answer)) = joined else { continue };
            match answer {
                Ok(Ok(Message::Topology(theirs))) => topo.merge(&own_id, theirs),
                Ok(Ok(other)) => {
                    tracing::warn!(target: "tensorlink::topology", %peer, "unexpected answer to CollectTopology: {:?}", other.frame_type())
                }
                Ok(Err(e)) => {
                    tracing::debug!(target: "tensorlink::topology", %peer, "topology not collected: {e}")
                }
                Err(_) => {
                    tracing::debug!(target: "tensorlink::topology", %peer, "topology not collected within {timeout:?}")
                }
            }
        }
        topo
    }
}

impl Ring for Cluster {
    fn topology(&self) -> BoxFuture<'_, Topology> {
        Box::pin(self.collect_topology(BTreeSet::new(), TOPOLOGY_DEPTH))
    }

    fn send(
        &self,
        to: &str,
        message: Message,
    ) -> Option<BoxFuture<'static, Result<Message, RequestError>>> {
        let client = self.peers.linked_to(to)?.client;
        Some(Box::pin(async move { client.request(&message).await }))
    }
}
