//! The running node: the answers it gives its peers ([`Node`], the server's
//! handler), and [`start`], which composes the cluster, the protocol server
//! and the HTTP API; none of them knows the node.
//!
//! [`start`] binds both ports first (so a taken port is a clear error before
//! anything else happens), then starts the peer links, the peer file watcher,
//! the protocol server and the HTTP API. [`RunningNode::shutdown`] stops them in
//! that order and waits for in-flight work within a grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::capabilities::DeviceCapabilities;
use crate::cluster::Cluster;
use crate::engine::Backend;
use crate::inference::{Inference, Ring};
use crate::net::socket;
use crate::peers::{self, LinkTiming, Peers};
use crate::power::{self, KeepAwake, Work};
use crate::protocol::{ErrorCode, Hello, Limits, Message, Shard};
use crate::server::{self, Handler, ServerConfig};

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

/// The node's answers to its peers: the protocol server's [`Handler`].
pub struct Node {
    cluster: Arc<Cluster>,
    backend: Backend,
    stopping: AtomicBool,
}

impl Node {
    pub fn id(&self) -> &str {
        self.cluster.id()
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    pub fn inference(&self) -> Option<&Inference> {
        self.backend.inference()
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
                Message::Topology(self.cluster.collect_topology(visited, max_depth).await)
            }
            // Nothing here sends SendResult (every step waits for its answer);
            // a peer that does is acknowledged, as the protocol says.
            Message::SendResult { request_id, .. } => {
                tracing::debug!(target: "tensorlink::node", %request_id, "result from a peer");
                Message::ResultAck
            }
            Message::SendOpaqueStatus { request_id, status } => {
                tracing::debug!(target: "tensorlink::node", %request_id, %status, "status from a peer");
                match &self.backend {
                    Backend::Model(slot) => {
                        if let Some(inference) = slot.get() {
                            inference.status(&request_id, &status)
                        }
                    }
                    Backend::Engine(engine) => engine.status(&request_id, &status),
                    Backend::NoModel => {}
                }
                Message::StatusAck
            }
            req @ (Message::SendPrompt { .. }
            | Message::SendTensor { .. }
            | Message::SendExample { .. }) => {
                if let Some(Err(e)) = shard_of(&req).map(Shard::validate) {
                    return Message::error(ErrorCode::Malformed, e.to_string());
                }
                match (&self.backend, self.inference()) {
                    (_, Some(inference)) => {
                        let ring: Arc<dyn Ring> = self.cluster.clone();
                        inference.answer(req, ring).await
                    }
                    (Backend::Engine(engine), None) => engine.infer(req).await,
                    _ => self.no_model(&req),
                }
            }
            req @ (Message::QueryModelFile { .. } | Message::ReadModelFile { .. }) => {
                match self.inference() {
                    Some(inference) => inference.served_file().answer(req, self.id()),
                    None => self.no_model(&req),
                }
            }
            other => Message::error(
                ErrorCode::UnknownType,
                format!("{:?} is a response, not a request", other.frame_type()),
            ),
        }
    }
}

impl Node {
    fn no_model(&self, request: &Message) -> Message {
        let why = match &self.backend {
            Backend::Model(slot) => slot
                .fetch_status()
                .map(|f| format!(": {}", f.describe()))
                .unwrap_or_default(),
            _ => String::new(),
        };
        Message::error(
            ErrorCode::NoModelLoaded,
            format!(
                "node `{}` has no model loaded and cannot answer {:?}{why}",
                self.id(),
                request.frame_type()
            ),
        )
    }
}

impl Handler for Node {
    fn handle(&self, request: Message) -> impl Future<Output = Message> + Send + '_ {
        Node::handle(self, request)
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

pub async fn start(config: NodeConfig, backend: Backend) -> Result<RunningNode, StartError> {
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
    let model = backend.slot();
    let cluster = Arc::new(Cluster::new(hello, peers.clone(), model.clone()));
    let node = Arc::new(Node {
        cluster: cluster.clone(),
        backend,
        stopping: AtomicBool::new(false),
    });
    let busy = node.clone();
    tracker.spawn(power::follow(
        keep_awake.clone(),
        move || Work {
            linked_peers: busy.cluster.peers().linked().len(),
            requests: busy.inference().map_or(0, |i| i.active_requests()),
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
        cluster.hello().clone(),
        config.server.clone(),
        stop.clone(),
    ));
    let app = AppState {
        cluster,
        model,
        power: keep_awake,
    };
    tracker.spawn(api::serve(api_listener, Arc::new(app), stop.clone()));

    Ok(RunningNode {
        node,
        node_addr,
        api_addr,
        stop,
        tracker,
    })
}
