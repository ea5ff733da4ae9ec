//! Moving frames over a byte stream: the only code that reads or writes frame
//! bytes on a socket.
//!
//! Reading validates the header before awaiting the rest; a tensor payload
//! goes into the buffer it will live in (the bytes that came with the header's
//! read are copied once, the rest is read there directly). Writing sends header,
//! metadata and payload buffers in vectored writes, never copying the payload.
//! Every read and write that is part of a frame must make progress within the
//! stall timeout, so a peer that stops mid-frame costs only its own connection.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::sync::lock;

use tensorlink_protocol::{
    EncodedFrame, Frame, FrameHeader, Limits, Message, ProtocolError, HEADER_LEN,
};

/// How a connection ended or failed.
#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("peer stalled: no progress on {0} for {1:?}")]
    Stalled(&'static str, Duration),
    #[error("peer was idle for {0:?}")]
    Idle(Duration),
    #[error("peer closed the connection in the middle of a frame")]
    TruncatedStream,
}

/// Bytes moved on a connection, both ways. A health check stuck behind a large
/// tensor is not a dead link: the link is judged by whether bytes still move.
pub type Progress = Arc<AtomicU64>;

/// Reads whole frames from a stream.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    limits: Limits,
    stall: Duration,
    progress: Progress,
    pool: Arc<PayloadPool>,
}

/// Large payload buffers, recycled across the process's connections. A fresh
/// multi-megabyte buffer costs a page fault per 4 KiB as the socket fills it —
/// measured, a third of the throughput of a 64 MiB transfer, and half at 256 MiB
/// in a process that has run a while; a recycled one is already mapped. A
/// payload's buffer comes back when the last `Bytes` view of it drops, so the
/// engine may keep a tensor as long as it likes. Retention is bounded: a node
/// that once received a huge tensor does not keep gigabytes for ever.
#[derive(Default)]
struct PayloadPool {
    spare: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// Buffers kept: enough to double-buffer two links.
const POOL_BUFFERS: usize = 4;
/// Bytes kept in all, at most.
const POOL_BYTES: usize = 768 << 20;
/// The most a new payload buffer reserves before its bytes arrive.
const FIRST_RESERVE: usize = 8 << 20;

static POOL: std::sync::OnceLock<Arc<PayloadPool>> = std::sync::OnceLock::new();

impl PayloadPool {
    fn shared() -> Arc<PayloadPool> {
        POOL.get_or_init(Default::default).clone()
    }

    /// An empty buffer with room for `len` bytes: the smallest spare that fits.
    /// An empty buffer for a payload of `len` bytes: a spare that fits without
    /// being more than twice too big (a small tensor a consumer keeps must not
    /// pin a huge buffer), else a new one of at most `FIRST_RESERVE` bytes that
    /// grows as data arrives, so a header that lies about its length costs
    /// nothing until the bytes come.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut spare = lock(&self.spare);
        let best = (0..spare.len())
            .filter(|&i| spare[i].capacity() >= len && spare[i].capacity() <= len.saturating_mul(2))
            .min_by_key(|&i| spare[i].capacity());
        match best {
            Some(i) => spare.swap_remove(i),
            None => Vec::with_capacity(len.min(FIRST_RESERVE)),
        }
    }

    /// Keeps the most recently returned buffers, within both bounds: the pool
    /// follows the sizes the links carry now, not the largest ever seen.
    fn put(&self, mut buf: Vec<u8>) {
        if buf.capacity() > POOL_BYTES {
            return;
        }
        buf.clear();
        let mut spare = lock(&self.spare);
        spare.push(buf);
        let mut total: usize = spare.iter().map(Vec::capacity).sum();
        while spare.len() > POOL_BUFFERS || total > POOL_BYTES {
            total -= spare.remove(0).capacity();
        }
    }
}

/// A payload buffer on loan from a pool, returned when dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<PayloadPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

/// Bytes asked of the socket per read while not inside a payload.
const READ_CHUNK: usize = 64 << 10;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `leftover` holds bytes that arrived with the handshake.
    pub fn new(inner: R, leftover: BytesMut, limits: Limits, stall: Duration) -> Self {
        FrameReader {
            inner,
            buf: leftover,
            limits,
            stall,
            progress: Progress::default(),
            pool: PayloadPool::shared(),
        }
    }

    /// Counts every byte read into `progress`.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// Reads the next frame. `Ok(None)` is a clean close between frames. `idle`
    /// bounds the wait for the first byte of a frame; once a frame has begun,
    /// every read must make progress within the stall timeout.
    pub async fn read_frame(
        &mut self,
        idle: Option<Duration>,
    ) -> Result<Option<Frame>, ConnectionError> {
        if self.buf.is_empty() {
            reserve(&mut self.buf);
            let read = self.inner.read_buf(&mut self.buf);
            let n = match idle {
                Some(t) => tokio::time::timeout(t, read)
                    .await
                    .map_err(|_| ConnectionError::Idle(t))??,
                None => read.await?,
            };
            if n == 0 {
                return Ok(None);
            }
            self.progress.fetch_add(n as u64, Ordering::Relaxed);
        }
        self.fill(HEADER_LEN, "frame header").await?;
        let head: [u8; HEADER_LEN] = self.buf[..HEADER_LEN]
            .try_into()
            .map_err(|_| ProtocolError::Truncated("frame header"))?;
        let header = FrameHeader::decode(&head, &self.limits)?;
        self.buf.advance(HEADER_LEN);

        self.fill(header.meta_len as usize, "frame metadata")
            .await?;
        let meta = self.buf.split_to(header.meta_len as usize);

        let payload = self.read_payload(header.payload_len as usize).await?;
        let message = Message::decode(header.frame_type, &meta, payload)?;
        Ok(Some(Frame {
            request_id: header.request_id,
            message,
        }))
    }

    /// Reads until at least `n` bytes are buffered.
    async fn fill(&mut self, n: usize, what: &'static str) -> Result<(), ConnectionError> {
        while self.buf.len() < n {
            reserve(&mut self.buf);
            let read = self.inner.read_buf(&mut self.buf);
            let got = tokio::time::timeout(self.stall, read)
                .await
                .map_err(|_| ConnectionError::Stalled(what, self.stall))??;
            if got == 0 {
                return Err(ConnectionError::TruncatedStream);
            }
            self.progress.fetch_add(got as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Moves what is already buffered, then reads the rest of the payload from the
    /// socket directly into its final buffer. The length was checked against the
    /// limit by the header decode; the buffer's pages are only touched as data arrives.
    async fn read_payload(&mut self, len: usize) -> Result<Bytes, ConnectionError> {
        let buffered = self.buf.len().min(len);
        if buffered == len {
            return Ok(self.buf.split_to(len).freeze());
        }
        let mut payload = self.pool.take(len);
        payload.extend_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        while payload.len() < len {
            let remaining = len - payload.len();
            if payload.capacity() == payload.len() {
                // Grow by doubling as the bytes actually arrive (see `take`).
                payload.reserve(payload.len().max(FIRST_RESERVE).min(remaining));
            }
            let mut window = (&mut payload).limit(remaining);
            let read = self.inner.read_buf(&mut window);
            let got = tokio::time::timeout(self.stall, read)
                .await
                .map_err(|_| ConnectionError::Stalled("frame payload", self.stall))??;
            if got == 0 {
                return Err(ConnectionError::TruncatedStream);
            }
            self.progress.fetch_add(got as u64, Ordering::Relaxed);
        }
        Ok(Bytes::from_owner(Pooled {
            buf: payload,
            pool: self.pool.clone(),
        }))
    }
}

/// Makes room for one more read without letting the buffer grow past a chunk
/// unless a frame needs it.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Writes one frame as vectored writes of its header and payload buffers.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    out: &mut W,
    frame: &EncodedFrame,
    stall: Duration,
    progress: &AtomicU64,
) -> Result<(), ConnectionError> {
    let mut slices: Vec<IoSlice<'_>> = std::iter::once(&frame.head)
        .chain(frame.payload.iter())
        .filter(|b| !b.is_empty())
        .map(|b| IoSlice::new(b))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = tokio::time::timeout(stall, out.write_vectored(rest))
            .await
            .map_err(|_| ConnectionError::Stalled("write", stall))??;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero).into());
        }
        progress.fetch_add(n as u64, Ordering::Relaxed);
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Drains a queue of frames onto a stream until the queue closes, a write fails,
/// or `stop` fires. The task owning the write half, so frames from concurrent
/// requests never interleave.
pub async fn run_writer<W: AsyncWrite + Unpin>(
    mut out: W,
    mut queue: mpsc::Receiver<EncodedFrame>,
    stall: Duration,
    stop: CancellationToken,
    progress: Progress,
) -> Result<(), ConnectionError> {
    let result = loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            frame = queue.recv() => match frame {
                Some(f) => f,
                None => break Ok(()),
            },
        };
        if let Err(e) = write_frame(&mut out, &frame, stall, &progress).await {
            break Err(e);
        }
    };
    let _ = out.shutdown().await;
    stop.cancel();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_reuses_buffers_that_fit_and_stays_bounded() {
        let pool = PayloadPool::default();
        let big = pool.take(64 << 20);
        assert!(
            big.capacity() <= FIRST_RESERVE,
            "nothing reserved before the bytes arrive"
        );
        pool.put(Vec::with_capacity(64 << 20));
        // A payload of similar size gets the recycled buffer…
        assert!(pool.take(40 << 20).capacity() >= 64 << 20);
        pool.put(Vec::with_capacity(64 << 20));
        // …a small one does not pin it.
        assert!(pool.take(64 << 10).capacity() < 1 << 20);
        // Retention: the most recent POOL_BUFFERS buffers within POOL_BYTES; an
        // oversized buffer is dropped without evicting the others.
        for _ in 0..6 {
            pool.put(Vec::with_capacity(1 << 20));
        }
        pool.put(Vec::with_capacity(POOL_BYTES + 1));
        {
            let spare = pool.spare.lock().unwrap();
            assert_eq!(spare.len(), POOL_BUFFERS);
            assert!(
                spare.iter().all(|b| b.capacity() == 1 << 20),
                "the newest were kept"
            );
        }
        // After large transfers, the sizes now in use still get recycled buffers.
        for _ in 0..POOL_BUFFERS {
            pool.put(Vec::with_capacity(256 << 20));
        }
        pool.put(Vec::with_capacity(4 << 20));
        assert_eq!(pool.take(4 << 20).capacity(), 4 << 20);
        let total: usize = pool.spare.lock().unwrap().iter().map(Vec::capacity).sum();
        assert!(total <= POOL_BYTES);
    }
}
