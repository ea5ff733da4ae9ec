//! The hello exchange over a live stream, with its deadline.
//!
//! The dialer speaks first; the acceptor answers with its own hello or a reject.
//! Either side that refuses tells the other why before closing, so a version or
//! identity mismatch reads the same in the logs of both Macs.

use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tensorlink_protocol::{ErrorCode, Hello, HelloMessage, ProtocolError, Reject};

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("i/o error during handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake not completed within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("peer refused the link ({code}): {message}")]
    Rejected { code: ErrorCode, message: String },
    #[error("peer answered as node `{actual}`, but the peer file names it `{expected}`")]
    WrongNode { expected: String, actual: String },
    #[error("node `{dialer}` dialed this node expecting `{expected}`, but this is `{actual}`: its peer file points at the wrong port")]
    Misdirected {
        dialer: String,
        expected: String,
        actual: String,
    },
    #[error("peer closed the connection during the handshake")]
    Closed,
}

/// Dialer's side: send our hello naming the node we mean, read the answer.
/// The acceptor refuses a hello meant for another node, so both sides log the
/// mismatch; the answer's id is checked again here. Returns the peer's hello
/// and any bytes that arrived after it.
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    ours: &Hello,
    expected_id: &str,
    timeout: Duration,
) -> Result<(Hello, BytesMut), HandshakeError> {
    let exchange = async {
        let hello = Hello {
            expected_peer: expected_id.to_owned(),
            ..ours.clone()
        };
        stream
            .write_all(&HelloMessage::Hello(hello).encode())
            .await?;
        let mut buf = BytesMut::new();
        match read_hello(stream, &mut buf).await? {
            HelloMessage::Reject(r) => Err(HandshakeError::Rejected {
                code: r.code,
                message: r.message,
            }),
            HelloMessage::Hello(theirs) if theirs.node_id != expected_id => {
                let err = HandshakeError::WrongNode {
                    expected: expected_id.to_owned(),
                    actual: theirs.node_id,
                };
                reject(stream, ErrorCode::WrongNode, &err.to_string()).await;
                Err(err)
            }
            HelloMessage::Hello(theirs) => Ok((theirs, buf)),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
}

/// Acceptor's side: read the dialer's hello, answer with ours or a reject.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    ours: &Hello,
    timeout: Duration,
) -> Result<(Hello, BytesMut), HandshakeError> {
    let exchange = async {
        let mut buf = BytesMut::new();
        let theirs = match read_hello(stream, &mut buf).await {
            Ok(HelloMessage::Hello(h)) => h,
            Ok(HelloMessage::Reject(r)) => {
                return Err(HandshakeError::Rejected {
                    code: r.code,
                    message: r.message,
                })
            }
            Err(HandshakeError::Protocol(e)) => {
                reject(stream, e.code(), &e.to_string()).await;
                return Err(e.into());
            }
            Err(e) => return Err(e),
        };
        if !theirs.expected_peer.is_empty() && theirs.expected_peer != ours.node_id {
            let err = HandshakeError::Misdirected {
                dialer: theirs.node_id,
                expected: theirs.expected_peer,
                actual: ours.node_id.clone(),
            };
            reject(stream, ErrorCode::WrongNode, &err.to_string()).await;
            return Err(err);
        }
        let answer = Hello {
            expected_peer: String::new(),
            ..ours.clone()
        };
        stream
            .write_all(&HelloMessage::Hello(answer).encode())
            .await?;
        Ok((theirs, buf))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
}

async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<HelloMessage, HandshakeError> {
    loop {
        if let Some((msg, used)) = HelloMessage::decode(buf)? {
            let _ = buf.split_to(used);
            return Ok(msg);
        }
        // `decode` refuses a preamble announcing more than MAX_HELLO_BODY, so the
        // buffer never grows past one hello plus one read.
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

/// Best effort: the peer may already be gone, and we are closing either way.
async fn reject<S: AsyncWrite + Unpin>(stream: &mut S, code: ErrorCode, message: &str) {
    let msg = HelloMessage::Reject(Reject {
        code,
        message: message.to_owned(),
    });
    let _ = stream.write_all(&msg.encode()).await;
    let _ = stream.shutdown().await;
}
