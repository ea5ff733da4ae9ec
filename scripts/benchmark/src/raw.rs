//! Raw TCP: the limit on this machine. The same socket options as tensorlink
//! (its own `socket` module), a 16-byte header (length, echo flag) and the
//! payload written with one vectored write and read with `read_exact` into a
//! reused buffer. No framing checks, no task hops: the floor to measure against.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use tensorlink::net::connection::write_frame;
use tensorlink::net::socket;
use tensorlink::protocol::EncodedFrame;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const HEADER: usize = 16;
/// The flag that asks for `len` bytes back rather than sending them: a
/// download, as a model fetch is one.
const STREAM: u8 = 2;
/// How much of a download is written at a time.
const STREAM_CHUNK: usize = 4 << 20;
const STALL: Duration = Duration::from_secs(60);

fn header(len: u64, echo: bool) -> Bytes {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&len.to_le_bytes());
    h[8] = echo as u8;
    Bytes::copy_from_slice(&h)
}

pub async fn serve(port: u16) -> Result<()> {
    let listener = socket::listen(([127, 0, 0, 1], port).into(), 128)?;
    loop {
        let (stream, _) = listener.accept().await?;
        socket::tune_stream(&stream)?;
        tokio::spawn(async move {
            let _ = serve_conn(stream).await;
        });
    }
}

async fn serve_conn(mut stream: TcpStream) -> Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut h = [0u8; HEADER];
        if stream.read_exact(&mut h).await.is_err() {
            return Ok(());
        }
        let len = u64::from_le_bytes(h[..8].try_into()?) as usize;
        if h[8] == STREAM {
            stream_bytes(&mut stream, len as u64).await?;
            continue;
        }
        buf.resize(len, 0);
        stream.read_exact(&mut buf).await?;
        // Answer straight from the reused buffer: no copy, one vectored write.
        let (head, body): (Bytes, &[u8]) = if h[8] == 1 {
            (header(len as u64, false), &buf)
        } else {
            (header(0, false), &[])
        };
        write_all_vectored(&mut stream, &head, body).await?;
    }
}

async fn write_all_vectored(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> Result<()> {
    use std::io::IoSlice;
    use tokio::io::AsyncWriteExt;
    let mut slices = [IoSlice::new(head), IoSlice::new(body)];
    let mut rest = &mut slices[..];
    while rest.iter().any(|s| !s.is_empty()) {
        let n = stream.write_vectored(rest).await?;
        anyhow::ensure!(n > 0, "connection closed");
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Writes `len` bytes after their header, a chunk at a time from one buffer.
async fn stream_bytes(stream: &mut TcpStream, len: u64) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    stream.write_all(&header(len, false)).await?;
    let chunk = vec![0xa5u8; STREAM_CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(STREAM_CHUNK as u64) as usize;
        stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Downloads `len` bytes in one stream, handing each read to `each` (which
/// may discard it): the floor a fetch of a `len`-byte file is measured
/// against. The seconds it took, from the request to the last byte handled.
pub async fn download(
    port: u16,
    len: u64,
    mut each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<f64> {
    use tokio::io::AsyncWriteExt;
    let mut stream = socket::connect(([127, 0, 0, 1], port).into(), Duration::from_secs(5))
        .await
        .context("raw connect")?;
    let start = std::time::Instant::now();
    let mut ask = [0u8; HEADER];
    ask[..8].copy_from_slice(&len.to_le_bytes());
    ask[8] = STREAM;
    stream.write_all(&ask).await?;
    let mut h = [0u8; HEADER];
    stream.read_exact(&mut h).await?;
    anyhow::ensure!(
        u64::from_le_bytes(h[..8].try_into()?) == len,
        "short download"
    );
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut left = len;
    while left > 0 {
        let n = stream
            .read(&mut buf[..left.min(STREAM_CHUNK as u64) as usize])
            .await?;
        anyhow::ensure!(n > 0, "the raw server closed mid-download");
        each(&buf[..n])?;
        left -= n as u64;
    }
    Ok(start.elapsed().as_secs_f64())
}

pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    progress: std::sync::atomic::AtomicU64,
}

impl Client {
    pub async fn connect(port: u16) -> Result<Client> {
        let stream = socket::connect(([127, 0, 0, 1], port).into(), Duration::from_secs(5))
            .await
            .context("raw connect")?;
        Ok(Client {
            stream,
            buf: Vec::new(),
            progress: Default::default(),
        })
    }

    pub async fn send(&mut self, payload: &Bytes, echo: bool) -> Result<()> {
        let frame = EncodedFrame {
            head: header(payload.len() as u64, echo),
            payload: vec![payload.clone()],
        };
        write_frame(&mut self.stream, &frame, STALL, &self.progress).await?;
        Ok(())
    }

    pub async fn receive(&mut self) -> Result<usize> {
        let mut h = [0u8; HEADER];
        self.stream.read_exact(&mut h).await?;
        let len = u64::from_le_bytes(h[..8].try_into()?) as usize;
        self.buf.resize(len, 0);
        self.stream.read_exact(&mut self.buf).await?;
        Ok(len)
    }

    /// Splits for pipelined transfers: sends on one task, acks on another.
    pub fn into_split(
        self,
    ) -> (
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::tcp::OwnedWriteHalf,
    ) {
        self.stream.into_split()
    }
}

/// One-way transfer of `warmup` then `count` payloads with at most `window`
/// unacknowledged; the seconds the `count` took.
pub async fn transfer(
    port: u16,
    payload: &Bytes,
    warmup: usize,
    count: usize,
    window: usize,
) -> Result<f64> {
    let (mut read, mut write) = Client::connect(port).await?.into_split();
    windowed(&mut read, &mut write, payload, warmup, window).await?;
    let start = std::time::Instant::now();
    windowed(&mut read, &mut write, payload, count, window).await?;
    Ok(start.elapsed().as_secs_f64())
}

async fn windowed(
    read: &mut tokio::net::tcp::OwnedReadHalf,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    payload: &Bytes,
    count: usize,
    window: usize,
) -> Result<()> {
    // Acks are read concurrently with the writes, as tensorlink's client does
    // with its reader task: a send never waits behind an ack it does not need.
    let permits = tokio::sync::Semaphore::new(window);
    let progress = Default::default();
    let send = async {
        for _ in 0..count {
            permits.acquire().await?.forget();
            let frame = EncodedFrame {
                head: header(payload.len() as u64, false),
                payload: vec![payload.clone()],
            };
            write_frame(write, &frame, STALL, &progress).await?;
        }
        anyhow::Ok(())
    };
    let acks = async {
        for _ in 0..count {
            let mut h = [0u8; HEADER];
            read.read_exact(&mut h).await?;
            permits.add_permits(1);
        }
        anyhow::Ok(())
    };
    tokio::try_join!(send, acks)?;
    Ok(())
}
