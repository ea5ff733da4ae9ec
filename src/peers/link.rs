//! One task per configured peer: dial, handshake, health-check, and redial.
//!
//! A link is `up` from a completed handshake until a health check fails or the
//! connection ends; then it is redialed with capped backoff. Up and down are
//! logged once per change; repeated identical dial failures only at debug level.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::file::PeerSpec;
use super::registry::Peers;
use crate::net::client::Client;
use crate::net::handshake::{self, HandshakeError};
use crate::net::socket;
use crate::protocol::Message;

/// Timing of the link life cycle.
#[derive(Debug, Clone)]
pub struct LinkTiming {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Longest a frame may stall part-way.
    pub stall_timeout: Duration,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl Default for LinkTiming {
    fn default() -> Self {
        LinkTiming {
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(3),
            stall_timeout: Duration::from_secs(10),
            health_interval: Duration::from_millis(500),
            health_timeout: Duration::from_millis(1500),
            backoff_base: Duration::from_millis(25),
            backoff_cap: Duration::from_millis(400),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
}

impl DialError {
    /// A refusal by a live peer is worth an error in the log; an absent peer is
    /// the normal state of a cluster being brought up.
    fn is_refusal(&self) -> bool {
        matches!(
            self,
            DialError::Handshake(
                HandshakeError::WrongNode { .. }
                    | HandshakeError::Rejected { .. }
                    | HandshakeError::Protocol(_)
            )
        )
    }
}

pub(super) async fn run(peers: Arc<Peers>, spec: PeerSpec, cancel: CancellationToken) {
    let timing = peers.timing().clone();
    let mut backoff = Backoff::new(timing.backoff_base, timing.backoff_cap);
    let mut last_failure: Option<String> = None;
    let address = spec.address();
    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            r = dial(&peers, &spec) => r,
        };
        match attempt {
            Ok(client) => {
                backoff.reset();
                last_failure = None;
                tracing::info!(target: "tensorlink::peers", peer = %spec.id, %address, chip = %client.peer().capabilities.chip, "peer up");
                peers.set_up(&spec.id, client.clone());
                let reason = tokio::select! {
                    _ = cancel.cancelled() => {
                        client.close("peer removed from the peer file");
                        return;
                    }
                    reason = keep_alive(&client, &timing) => reason,
                };
                tracing::warn!(target: "tensorlink::peers", peer = %spec.id, %address, %reason, "peer down");
                peers.set_down(&spec.id, reason);
            }
            Err(err) => {
                let text = err.to_string();
                if last_failure.as_deref() != Some(text.as_str()) {
                    if err.is_refusal() {
                        tracing::error!(target: "tensorlink::peers", peer = %spec.id, %address, "refusing link: {text}");
                    } else if last_failure.is_none() {
                        tracing::info!(target: "tensorlink::peers", peer = %spec.id, %address, "peer not reachable yet: {text}");
                    } else {
                        tracing::debug!(target: "tensorlink::peers", peer = %spec.id, %address, "dial failed: {text}");
                    }
                }
                peers.set_failed(&spec.id, text.clone(), err.is_refusal());
                last_failure = Some(text);
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

async fn dial(peers: &Peers, spec: &PeerSpec) -> Result<Client, DialError> {
    let timing = peers.timing();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((spec.host.as_str(), spec.port))
        .await
        .map_err(|e| DialError::Resolve(spec.address(), e))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match socket::connect(addr, timing.connect_timeout).await {
            Ok(mut stream) => {
                let hello = peers.hello();
                let (theirs, leftover) =
                    handshake::dial(&mut stream, hello, &spec.id, timing.handshake_timeout).await?;
                return Ok(Client::start(
                    stream,
                    leftover,
                    theirs,
                    hello.limits,
                    timing.stall_timeout,
                ));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(DialError::Connect(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
    })))
}

/// Health-checks at a fixed cadence until the link fails; returns why.
async fn keep_alive(client: &Client, timing: &super::LinkTiming) -> String {
    let mut ticker = tokio::time::interval(timing.health_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            reason = client.closed() => return reason,
            _ = ticker.tick() => {}
        }
        if let Err(reason) = health_check(client, timing.health_timeout).await {
            client.close(&reason);
            return reason;
        }
    }
}

/// One health check. An answer late because a large tensor is on the wire in
/// either direction is not a failure: the wait is extended for as long as bytes
/// keep moving on the link, and only a link silent for `timeout` fails.
async fn health_check(client: &Client, timeout: Duration) -> Result<(), String> {
    let request = client.request(&Message::HealthCheck);
    tokio::pin!(request);
    // The check's own frame moves bytes too; only more than that shows life.
    let own = Message::HealthCheck.encode(0).len();
    let mut seen = client.progress();
    loop {
        tokio::select! {
            answer = &mut request => return match answer {
                Ok(Message::HealthStatus { healthy: true, .. }) => Ok(()),
                Ok(Message::HealthStatus { status, .. }) => Err(format!("peer reports unhealthy: {status}")),
                Ok(other) => Err(format!("unexpected answer to a health check: {:?}", other.frame_type())),
                Err(e) => Err(e.to_string()),
            },
            _ = tokio::time::sleep(timeout) => {
                let now = client.progress();
                if now <= seen + own {
                    return Err(format!("health check not answered and no data moved for {timeout:?}"));
                }
                seen = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::capabilities::DeviceCapabilities;
    use crate::engine::{Backend, BoxFuture, Engine};
    use crate::node::{self, NodeConfig};
    use crate::protocol::{DType, Hello, Limits, Shard, Tensor};
    use crate::server::ServerConfig;

    struct Echo;

    impl Engine for Echo {
        fn infer(&self, request: Message) -> BoxFuture<'static, Message> {
            let answer = match request {
                Message::SendTensor { tensor, .. } => Message::TensorResult(Some(tensor)),
                _ => Message::TensorResult(None),
            };
            Box::pin(std::future::ready(answer))
        }
    }

    fn hello(id: &str) -> Hello {
        Hello {
            node_id: id.into(),
            expected_peer: String::new(),
            limits: Limits::default(),
            capabilities: DeviceCapabilities::unknown(id),
        }
    }

    async fn dial(addr: SocketAddr, expected: &str) -> Client {
        let mut stream = socket::connect(addr, Duration::from_secs(2)).await.unwrap();
        let ours = hello("checker");
        let (theirs, leftover) =
            handshake::dial(&mut stream, &ours, expected, Duration::from_secs(2))
                .await
                .unwrap();
        Client::start(
            stream,
            leftover,
            theirs,
            ours.limits,
            Duration::from_secs(10),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_behind_a_large_tensor_waits_while_bytes_move() {
        let dir = tempfile::tempdir().unwrap();
        let peer_file = dir.path().join("peers.json");
        std::fs::write(&peer_file, r#"{"peers": {}}"#).unwrap();
        let config = NodeConfig {
            node_id: "echo".into(),
            node_addr: "127.0.0.1:0".parse().unwrap(),
            api_addr: "127.0.0.1:0".parse().unwrap(),
            peer_file,
            capabilities: DeviceCapabilities::unknown("echo"),
            limits: Limits::default(),
            server: ServerConfig::default(),
            timing: LinkTiming::default(),
            allow_sleep: false,
        };
        let running = node::start(config, Backend::Engine(Arc::new(Echo)))
            .await
            .unwrap();
        let client = dial(running.node_addr, "echo").await;
        // 512 MiB there and back takes far longer than the check's timeout.
        let big = Message::SendTensor {
            shard: Shard {
                model_sha256: "m".into(),
                start_layer: 0,
                end_layer: 0,
                n_layers: 1,
            },
            tensor: Tensor::new(DType::U8, vec![512 << 20], vec![1u8; 512 << 20]).unwrap(),
            request_id: "big".into(),
            inference_state: None,
        };
        let transfer = {
            let client = client.clone();
            tokio::spawn(async move { client.request(&big).await.map(|_| ()) })
        };
        while client.progress() == 0 {
            tokio::task::yield_now().await;
        }
        let started = std::time::Instant::now();
        // 100 ms: well under the transfer's time, well over the pauses of a
        // receive buffer growing as the tensor arrives.
        health_check(&client, Duration::from_millis(100))
            .await
            .unwrap();
        assert!(
            started.elapsed() > Duration::from_millis(100),
            "the check really waited behind the tensor"
        );
        transfer.await.unwrap().unwrap();
        running.shutdown(Duration::from_secs(2)).await;
    }

    #[tokio::test]
    async fn a_check_on_a_silent_link_fails() {
        // A peer that completes the handshake, then neither reads nor answers.
        let listener = socket::listen("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            handshake::accept(&mut stream, &hello("mute"), Duration::from_secs(2))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let client = dial(addr, "mute").await;
        let err = health_check(&client, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.contains("no data moved"), "{err}");
        silent.abort();
    }
}
