//! The running node: its identity, its peers, and the answers it gives.
//!
//! [`start`] binds both ports first (so a taken port is a clear error before
//! anything else happens), then starts the peer links, the peer file watcher,
//! the protocol server and the HTTP API. [`RunningNode::shutdown`] stops them in
//! that order and waits for in-flight work within a grace period.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::capabilities::DeviceCapabilities;
use crate::engine::Engine;
use crate::net::socket;
use crate::peers::{self, LinkTiming, Peers};
use crate::power::{self, KeepAwake, PowerStatus, Work};
use crate::protocol::{ErrorCode, Hello, Limits, Message, Shard, Tensor};
use crate::server::{self, ServerConfig};
use crate::topology::{Edge, Topology};

/// How deep `/topology` asks through the cluster, as exo does.
pub const TOPOLOGY_DEPTH: u32 = 4;
/// How long a peer may take to report its part of the topology, per hop it has
/// left to ask: deeper asks get strictly less time than the ask that contains
/// them, so one slow node far away costs only its own branch.
const TOPOLOGY_HOP_TIMEOUT: Duration = Duration::from_millis(750);

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    pub node_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub peer_file: PathBuf,
    pub capabilities: DeviceCapabilities,
    pub limits: Limits,
    pub server: ServerConfig,
    pub timing: LinkTiming,
    /// Never hold a "prevent idle sleep" assertion (`--allow-sleep`).
    pub allow_sleep: bool,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    PeerFile(#[from] peers::file::PeerFileError),
    #[error("cannot listen on {addr} for the {what}: {source}. {hint}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        hint: String,
        source: std::io::Error,
    },
}

/// Something that happened on this node that local consumers (the API, the
/// inference engine) follow: results and statuses sent to us by peers.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    Result {
        request_id: String,
        tokens: Vec<u32>,
        tensor: Option<Tensor>,
        finished: bool,
    },
    Status {
        request_id: String,
        status: String,
    },
}

pub struct Node {
    hello: Hello,
    peers: Arc<Peers>,
    engine: Arc<dyn Engine>,
    events: broadcast::Sender<NodeEvent>,
    stopping: AtomicBool,
    power: Arc<KeepAwake>,
}

impl Node {
    pub fn id(&self) -> &str {
        &self.hello.node_id
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Whether the node is keeping the Mac awake, and why.
    pub fn power(&self) -> PowerStatus {
        self.power.status()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// Answers one request from a peer.
    pub async fn handle(&self, request: Message) -> Message {
        match request {
            Message::HealthCheck if self.stopping.load(Ordering::Relaxed) => {
                Message::HealthStatus {
                    healthy: false,
                    status: "shutting down".into(),
                }
            }
            Message::HealthCheck => Message::HealthStatus {
                healthy: true,
                status: "ok".into(),
            },
            Message::CollectTopology { visited, max_depth } => {
                let visited = visited.into_iter().collect();
                Message::Topology(self.collect_topology(visited, max_depth).await)
            }
            Message::SendResult {
                request_id,
                tokens,
                tensor,
                finished,
            } => {
                let _ = self.events.send(NodeEvent::Result {
                    request_id,
                    tokens,
                    tensor,
                    finished,
                });
                Message::ResultAck
            }
            Message::SendOpaqueStatus { request_id, status } => {
                tracing::debug!(target: "tensorlink::node", %request_id, %status, "status from a peer");
                self.engine.status(&request_id, &status);
                let _ = self.events.send(NodeEvent::Status { request_id, status });
                Message::StatusAck
            }
            req @ (Message::SendPrompt { .. }
            | Message::SendTensor { .. }
            | Message::SendExample { .. }) => match shard_of(&req).map(Shard::validate) {
                Some(Err(e)) => Message::error(ErrorCode::Malformed, e.to_string()),
                _ => self.engine.infer(req, &self.peers).await,
            },
            other => Message::error(
                ErrorCode::UnknownType,
                format!("{:?} is a response, not a request", other.frame_type()),
            ),
        }
    }

    /// This node, its linked peers, and what those peers see in turn, down to
    /// `max_depth` hops; nodes in `visited` are not asked again.
    pub async fn collect_topology(&self, visited: BTreeSet<String>, max_depth: u32) -> Topology {
        let mut topo = Topology::default();
        topo.add_node(self.id(), self.hello.capabilities.clone());
        topo.active_node_id = Some(self.id().to_owned());
        if let Some(inference) = self.engine.inference() {
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

fn shard_of(request: &Message) -> Option<&Shard> {
    match request {
        Message::SendPrompt { shard, .. }
        | Message::SendTensor { shard, .. }
        | Message::SendExample { shard, .. } => Some(shard),
        _ => None,
    }
}

/// A started node and the handles to stop it.
pub struct RunningNode {
    pub node: Arc<Node>,
    pub node_addr: SocketAddr,
    pub api_addr: SocketAddr,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl RunningNode {
    /// Stops accepting, lets in-flight requests finish within `grace`, and
    /// reports whether everything ended in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.node.stopping.store(true, Ordering::Relaxed);
        self.stop.cancel();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

pub async fn start(config: NodeConfig, engine: Arc<dyn Engine>) -> Result<RunningNode, StartError> {
    let initial_bytes =
        std::fs::read(&config.peer_file).map_err(|source| peers::file::PeerFileError::Read {
            path: config.peer_file.clone(),
            source,
        })?;
    let initial = peers::file::parse(&initial_bytes, &config.peer_file, &config.node_id)?;

    let bind = |what: &'static str, flag: &str, addr: SocketAddr| {
        let error = |source: std::io::Error| StartError::Bind {
            what,
            addr,
            hint: if source.kind() == std::io::ErrorKind::AddrInUse {
                format!(
                    "Another process holds port {}: stop it or choose another with {flag}",
                    addr.port()
                )
            } else {
                format!("Check {flag} and the address it names")
            },
            source,
        };
        let listener = socket::listen(addr, 1024).map_err(error)?;
        // The bound address: a port of 0 becomes the one the kernel chose.
        let bound = listener.local_addr().map_err(error)?;
        Ok::<_, StartError>((listener, bound))
    };
    let (node_listener, node_addr) = bind("node protocol", "--node-port", config.node_addr)?;
    let (api_listener, api_addr) = bind("HTTP API", "--chatgpt-api-port", config.api_addr)?;

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let hello = Hello {
        node_id: config.node_id.clone(),
        expected_peer: String::new(),
        limits: config.limits,
        capabilities: config.capabilities.clone(),
    };
    let peers = Peers::new(
        hello.clone(),
        config.timing.clone(),
        stop.clone(),
        tracker.clone(),
    );
    let keep_awake = Arc::new(KeepAwake::new(
        power::system(),
        &config.node_id,
        config.allow_sleep,
    ));
    let node = Arc::new(Node {
        hello,
        peers: peers.clone(),
        engine,
        events: broadcast::channel(1024).0,
        stopping: AtomicBool::new(false),
        power: keep_awake.clone(),
    });
    let busy = node.clone();
    tracker.spawn(power::follow(
        keep_awake,
        move || Work {
            linked_peers: busy.peers.linked().len(),
            requests: busy.engine.inference().map_or(0, |i| i.active_requests()),
        },
        stop.clone(),
    ));

    tracing::info!(target: "tensorlink::node", node = %config.node_id, %node_addr, %api_addr, peers = initial.len(), "node listening");
    peers.apply(&initial);
    let (tx, mut rx) = watch::channel(initial);
    tracker.spawn(peers::watch::follow(
        config.peer_file.clone(),
        config.node_id.clone(),
        initial_bytes,
        tx,
        stop.clone(),
    ));
    let applier_stop = stop.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = applier_stop.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            let set = rx.borrow_and_update().clone();
            peers.apply(&set);
        }
    });
    tracker.spawn(server::serve(
        node_listener,
        node.clone(),
        config.server.clone(),
        stop.clone(),
    ));
    tracker.spawn(api::serve(api_listener, node.clone(), stop.clone()));

    Ok(RunningNode {
        node,
        node_addr,
        api_addr,
        stop,
        tracker,
    })
}
