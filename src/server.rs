//! The node's protocol listener: accepts peers, handshakes, and answers their
//! requests concurrently on each connection.
//!
//! Shaped like mini-redis's server: a semaphore bounds connections (excess ones
//! are closed at once rather than queued, so a flood cannot starve a real peer
//! reconnecting), accept errors back off, and every connection runs in its own
//! task. A misbehaving connection is closed with a rate-limited log line and
//! affects no other.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use futures_util::FutureExt;

use crate::net::connection::{run_writer, ConnectionError, FrameReader};
use crate::net::handshake::{self, HandshakeError};
use crate::net::socket;
use crate::net::sync::lock;
use crate::protocol::{EncodedFrame, ErrorCode, FrameType, Hello, Limits, Message};
use crate::telemetry::Throttle;

/// What answers the requests the server reads.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request from a peer with its response or an `Error`.
    ///
    /// The server polls the returned future once on the connection's read
    /// loop, with a no-op waker, before it gives the request a task of its own:
    /// most answers (health, a leaf's topology) are ready at once and so cost
    /// no task and no wake-up on the latency path. Everything the future does
    /// before its first await therefore holds up the connection's next frame:
    /// keep that part to bookkeeping, and move heavy work (tokenizing a long
    /// prompt, a forward pass) to `spawn_blocking`.
    ///
    /// A panic while answering is caught and answered as an `internal` error.
    fn handle(&self, request: Message) -> impl Future<Output = Message> + Send + '_;
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_connections: usize,
    /// Requests answered concurrently on one connection; more wait their turn.
    pub max_in_flight: usize,
    pub handshake_timeout: Duration,
    pub stall_timeout: Duration,
    /// A connection that sends no frame for this long is closed once nothing of
    /// it is in flight (docs/PROTOCOL.md §8.5: between one and two of these
    /// after its last frame). Linked peers health-check every half second, so
    /// only dead or idle strangers hit it.
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(3),
            stall_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

static REFUSED_LOG: Throttle = Throttle::new(Duration::from_secs(1));
static CLOSED_LOG: Throttle = Throttle::new(Duration::from_secs(1));

pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    hello: Hello,
    config: ServerConfig,
    stop: CancellationToken,
) {
    let hello = Arc::new(hello);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let connections = TaskTracker::new();
    let mut accept_backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(a) => {
                accept_backoff = Duration::from_millis(1);
                a
            }
            Err(e) => {
                // Usually EMFILE: wait for connections to end instead of spinning.
                tracing::warn!(target: "tensorlink::server", "accept failed: {e}; retrying in {accept_backoff:?}");
                tokio::time::sleep(accept_backoff).await;
                accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(suppressed) = REFUSED_LOG.allow() {
                tracing::warn!(target: "tensorlink::server", peer = %addr, suppressed, "connection limit of {} reached; closing new connection", config.max_connections);
            }
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let hello = hello.clone();
        let config = config.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            if let Err(e) = serve_connection(stream, addr, handler, &hello, &config, stop).await {
                if let Some(suppressed) = CLOSED_LOG.allow() {
                    tracing::warn!(target: "tensorlink::server", peer = %addr, suppressed, "closed connection: {e}");
                }
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    Connection(#[from] ConnectionError),
    #[error("socket setup failed: {0}")]
    Socket(#[from] std::io::Error),
    #[error("peer sent a {0:?} response frame as a request")]
    ResponseAsRequest(FrameType),
    #[error("request id 0 is reserved for connection-level errors; number requests from 1")]
    ReservedId,
    #[error("request id {0} is already in flight on this connection")]
    DuplicateId(u64),
}

async fn serve_connection<H: Handler>(
    mut stream: TcpStream,
    addr: SocketAddr,
    handler: Arc<H>,
    hello: &Hello,
    config: &ServerConfig,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    socket::tune_stream(&stream)?;
    let (peer, leftover) = handshake::accept(&mut stream, hello, config.handshake_timeout).await?;
    tracing::debug!(target: "tensorlink::server", peer = %peer.node_id, %addr, "inbound link established");

    let (read, write) = stream.into_split();
    let (queue, rx) = mpsc::channel(config.max_in_flight);
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(run_writer(
        write,
        rx,
        config.stall_timeout,
        writer_stop.clone(),
        Default::default(),
    ));
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
    let ids = Arc::new(Mutex::new(HashSet::new()));
    let requests = TaskTracker::new();
    let mut reader = FrameReader::new(read, leftover, hello.limits, config.stall_timeout);

    let result = loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = writer_stop.cancelled() => break Ok(()),
            next = reader.read_frame(Some(config.idle_timeout)) => next,
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            // Silence is only suspicious while we owe the peer nothing; the
            // idle wait is cancel-safe, so waiting again loses no bytes.
            Err(ConnectionError::Idle(_)) if !requests.is_empty() => continue,
            Err(e) => {
                // Tell the peer why before closing, if the bytes were ours to judge.
                if let ConnectionError::Protocol(p) = &e {
                    let _ = queue.try_send(Message::error(p.code(), p.to_string()).encode(0));
                }
                break Err(e.into());
            }
        };
        let frame_type = frame.message.frame_type();
        if !frame_type.is_request() {
            let _ = queue.try_send(
                Message::error(ErrorCode::UnknownType, "response frame sent as a request")
                    .encode(0),
            );
            break Err(ServeError::ResponseAsRequest(frame_type));
        }
        // An answer is matched to its request by id alone, and id 0 marks a
        // connection-level Error: an id the peer cannot tell apart is a
        // violation of the stream, not of one request.
        let violation = match frame.request_id {
            0 => Some(ServeError::ReservedId),
            id if !lock(&ids).insert(id) => Some(ServeError::DuplicateId(id)),
            _ => None,
        };
        if let Some(e) = violation {
            let _ = queue.try_send(Message::error(ErrorCode::Malformed, e.to_string()).encode(0));
            break Err(e);
        }
        let answering = Answering {
            ids: ids.clone(),
            id: frame.request_id,
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break Ok(());
        };
        let handler = handler.clone();
        let peer_limits = peer.limits;
        let mut answer = Box::pin(async move {
            // The call itself inside the caught future: a handler may panic
            // before it returns its future as well as in it.
            let answer =
                std::panic::AssertUnwindSafe(async move { handler.handle(frame.message).await });
            answer.catch_unwind().await.unwrap_or_else(|panic| {
                let why = panic_message(&*panic);
                tracing::error!(target: "tensorlink::server", "answering a request panicked: {why}");
                Message::error(ErrorCode::Internal, format!("the node failed answering: {why}"))
            })
        });
        // Most answers are ready at once (health, topology of a leaf, an engine
        // that answers synchronously): answer those here, saving a task and its
        // wake-up on the latency path. Only work that must wait gets its own task,
        // which polls the future again with a real waker.
        let polled = answer
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        match polled {
            std::task::Poll::Ready(answer) => {
                let _ = queue
                    .send(fit_to_limits(answer, frame.request_id, &peer_limits))
                    .await;
                drop((answering, permit));
            }
            std::task::Poll::Pending => {
                let queue = queue.clone();
                requests.spawn(async move {
                    let answer = answer.await;
                    let _ = queue
                        .send(fit_to_limits(answer, frame.request_id, &peer_limits))
                        .await;
                    drop((answering, permit));
                });
            }
        }
    };
    // Answer what was already asked, then close: the writer ends when the last
    // queue handle (ours and the request tasks') is gone.
    requests.close();
    requests.wait().await;
    drop(queue);
    let _ = writer.await;
    result
}

/// A request's id, held while it is being answered; given back once its
/// answer is queued, so that the id may be used again.
struct Answering {
    ids: Arc<Mutex<HashSet<u64>>>,
    id: u64,
}

impl Drop for Answering {
    fn drop(&mut self) {
        lock(&self.ids).remove(&self.id);
    }
}

/// An answer beyond the limits the peer announced would make it close the link
/// and fail its other requests; send an error for this one request instead.
fn fit_to_limits(answer: Message, request_id: u64, limits: &Limits) -> EncodedFrame {
    let frame = answer.encode(request_id);
    match limits.admits(&frame) {
        Ok(()) => frame,
        Err(o) => Message::error(
            ErrorCode::TooLarge,
            format!(
                "the answer's {} of {} bytes exceeds the limit of {} you announced",
                o.what, o.len, o.limit
            ),
        )
        .encode(request_id),
    }
}

/// What a panic said, when it said it with a string (as `panic!` does).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}
