//! TCP sockets tuned for moving tensors between Macs, every option with its reason.
//!
//! Dialed and accepted sockets get the same treatment so both directions of a
//! link behave alike; the listener additionally reuses its address so a node
//! restarted by launchd binds again at once.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Kernel send/receive buffer we ask for where the kernel does not size buffers
/// itself. 4 MiB holds several milliseconds of a Thunderbolt bridge's bandwidth,
/// so a large tensor streams without the window closing between our writes.
const SOCKET_BUFFER: usize = 4 << 20;

/// Unsent bytes the kernel keeps before reporting the socket writable. Keeps the
/// queue short so a health check or small tensor queued behind a large one is not
/// stuck behind megabytes of buffered data, while still leaving enough queued to
/// keep the link busy.
const NOTSENT_LOWAT: u32 = 256 << 10;

/// Keepalive notices a peer that vanished without a FIN (a Mac that slept, a
/// pulled cable) on connections that are otherwise quiet: first probe after 10 s
/// idle, then every 2 s, dead after 3 unanswered.
fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(2))
        .with_retries(3)
}

/// Options every connected socket gets, dialed or accepted.
pub fn tune_stream(stream: &TcpStream) -> io::Result<()> {
    let sock = SockRef::from(stream);
    // Frames are written whole (header and payload in one vectored write), so
    // Nagle can only delay them: a small request would wait for the ACK of the
    // previous one, which the peer delays up to 40 ms.
    sock.set_tcp_nodelay(true)?;
    sock.set_tcp_keepalive(&keepalive())?;
    set_notsent_lowat(&sock)?;
    Ok(())
}

/// Buffers must be sized before connect/listen for the window scale to cover them.
fn size_buffers(sock: &Socket) -> io::Result<()> {
    // Linux autotunes both buffers up to tcp_rmem/tcp_wmem (6 MiB and 4 MiB by
    // default); setting SO_RCVBUF would lock the size and cap it at rmem_max,
    // typically 208 KiB, which is far worse. Elsewhere (macOS) ask explicitly.
    if cfg!(any(target_os = "linux", target_os = "android")) {
        return Ok(());
    }
    sock.set_send_buffer_size(SOCKET_BUFFER)?;
    sock.set_recv_buffer_size(SOCKET_BUFFER)?;
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_notsent_lowat(sock: &SockRef<'_>) -> io::Result<()> {
    sock.set_tcp_notsent_lowat(NOTSENT_LOWAT)
}

#[cfg(target_vendor = "apple")]
fn set_notsent_lowat(sock: &SockRef<'_>) -> io::Result<()> {
    crate::apple::set_tcp_notsent_lowat(sock, NOTSENT_LOWAT)
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
fn set_notsent_lowat(_sock: &SockRef<'_>) -> io::Result<()> {
    let _ = NOTSENT_LOWAT;
    Ok(())
}

/// Binds a listener. SO_REUSEADDR lets a restarted node bind while connections
/// of its previous life sit in TIME_WAIT.
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    size_buffers(&sock)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(sock.into())
}

/// Dials `addr`, giving up after `timeout`, and tunes the connected stream.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    size_buffers(&sock)?;
    let sock = TcpSocket::from_std_stream(sock.into());
    let stream = tokio::time::timeout(timeout, sock.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            )
        })??;
    tune_stream(&stream)?;
    Ok(stream)
}
