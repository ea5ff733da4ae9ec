//! The dialing side of a link: many requests in flight on one connection,
//! answers matched to callers by request id, in whatever order they come.
//!
//! A reader task routes responses to the waiting callers; a writer task owns the
//! write half. When the connection ends, every caller still waiting gets an
//! error at once, so nothing in flight hangs on a dead peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::connection::{run_writer, ConnectionError, FrameReader, Progress};
use crate::sync::lock;
use tensorlink_protocol::{ErrorCode, Hello, Limits, Message};

/// Frames queued for the writer; small, so a slow link pushes back on callers.
const WRITE_QUEUE: usize = 64;

#[derive(Debug, Error, Clone)]
pub enum RequestError {
    #[error("the link to the peer is closed: {0}")]
    Closed(String),
    #[error("peer answered with an error ({code}): {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("the request's {what} of {len} bytes exceeds the peer's limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("peer answered {0:?} frame to a {1:?} request")]
    UnexpectedResponse(
        tensorlink_protocol::FrameType,
        tensorlink_protocol::FrameType,
    ),
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Message, RequestError>>>>;

struct Inner {
    queue: mpsc::Sender<tensorlink_protocol::EncodedFrame>,
    pending: Pending,
    next_id: AtomicU64,
    closed: CancellationToken,
    close_reason: Mutex<Option<String>>,
    peer: Hello,
    progress: Progress,
}

/// A handle to one established outbound link; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Starts the reader and writer tasks over a stream whose handshake is done.
    pub fn start(
        stream: TcpStream,
        leftover: BytesMut,
        peer: Hello,
        our_limits: Limits,
        stall: Duration,
    ) -> Client {
        let (read, write) = stream.into_split();
        let (queue, rx) = mpsc::channel(WRITE_QUEUE);
        let closed = CancellationToken::new();
        let inner = Arc::new(Inner {
            queue,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: closed.clone(),
            close_reason: Mutex::new(None),
            peer,
            progress: Progress::default(),
        });
        let writer_inner = inner.clone();
        let progress = inner.progress.clone();
        tokio::spawn(async move {
            if let Err(e) = run_writer(write, rx, stall, closed, progress).await {
                writer_inner.close(format!("write failed: {e}"));
            }
        });
        let reader = FrameReader::new(read, leftover, our_limits, stall)
            .with_progress(inner.progress.clone());
        tokio::spawn(read_responses(reader, inner.clone()));
        Client { inner }
    }

    pub fn peer(&self) -> &Hello {
        &self.inner.peer
    }

    /// Bytes moved on this link so far, both ways.
    pub fn progress(&self) -> u64 {
        self.inner.progress.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Resolves when the link has ended, with the reason.
    pub async fn closed(&self) -> String {
        self.inner.closed.cancelled().await;
        self.inner.reason()
    }

    pub fn close(&self, reason: &str) {
        self.inner.close(reason.to_owned());
    }

    /// Sends a request and waits for its answer. An `Error` frame comes back as
    /// [`RequestError::Remote`]. Dropping the future forgets the request; a late
    /// answer is then discarded.
    pub async fn request(&self, msg: &Message) -> Result<Message, RequestError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = msg.encode(id);
        // The peer closes the link on a frame beyond its limits, which would
        // fail every other request in flight; refuse this one alone instead.
        if let Err(o) = self.inner.peer.limits.admits(&frame) {
            return Err(RequestError::TooLarge {
                what: o.what,
                len: o.len,
                limit: o.limit,
            });
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(id, tx);
        let guard = PendingGuard {
            inner: &self.inner,
            id,
        };
        if self.inner.queue.send(frame).await.is_err() || self.is_closed() {
            return Err(RequestError::Closed(self.inner.reason()));
        }
        let answer = rx
            .await
            .map_err(|_| RequestError::Closed(self.inner.reason()))?;
        drop(guard);
        let answer = answer?;
        let expected = msg.frame_type();
        match answer {
            Message::Error { code, message } => Err(RequestError::Remote { code, message }),
            other if Some(other.frame_type()) == expected.response() => Ok(other),
            other => Err(RequestError::UnexpectedResponse(
                other.frame_type(),
                expected,
            )),
        }
    }
}

impl Inner {
    fn close(&self, reason: String) {
        {
            let mut r = lock(&self.close_reason);
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.closed.cancel();
        let reason = self.reason();
        for (_, tx) in lock(&self.pending).drain() {
            let _ = tx.send(Err(RequestError::Closed(reason.clone())));
        }
    }

    fn reason(&self) -> String {
        lock(&self.close_reason)
            .clone()
            .unwrap_or_else(|| "connection closed".to_owned())
    }
}

/// Removes a request's slot when its caller stops waiting.
struct PendingGuard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.inner.pending).remove(&self.id);
    }
}

async fn read_responses(
    mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    inner: Arc<Inner>,
) {
    let reason = loop {
        let next = tokio::select! {
            _ = inner.closed.cancelled() => break inner.reason(),
            next = reader.read_frame(None) => next,
        };
        match next {
            Ok(Some(frame)) if frame.message.frame_type().is_request() => {
                break format!(
                    "peer sent a {:?} request on our outbound link",
                    frame.message.frame_type()
                );
            }
            Ok(Some(frame)) => {
                let waiter = lock(&inner.pending).remove(&frame.request_id);
                if let Some(tx) = waiter {
                    let _ = tx.send(Ok(frame.message));
                } else if let (0, Message::Error { code, message }) =
                    (frame.request_id, &frame.message)
                {
                    // Id 0 is never a request's: it is the peer's reason for closing.
                    break format!("peer closed the link ({code}): {message}");
                } else {
                    tracing::debug!(
                        request_id = frame.request_id,
                        "answer to a request nobody waits for any more"
                    );
                }
            }
            Ok(None) => break "peer closed the connection".to_owned(),
            Err(ConnectionError::Io(e)) => break format!("connection lost: {e}"),
            Err(e) => break e.to_string(),
        }
    };
    inner.close(reason);
}
