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
