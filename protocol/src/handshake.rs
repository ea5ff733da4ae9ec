//! The first exchange on every connection: who is speaking, which version, and
//! the limits each side will enforce.
//!
//! The 12-byte preamble is frozen across versions so that a node of any version
//! can read a peer's `Reject` and say why the link was refused, instead of
//! misparsing bytes it cannot understand.

use super::codec::{Reader, Writer};
use super::frame::{Limits, MIN_MAX_META};
use super::{ErrorCode, ProtocolError};
use crate::capabilities::{DeviceCapabilities, Flops};

pub const MAGIC: [u8; 4] = *b"TLNK";
pub const VERSION: u16 = 1;
pub const PREAMBLE_LEN: usize = 12;
/// A hello is small; anything bigger is not a hello.
pub const MAX_HELLO_BODY: u32 = 64 * 1024;
/// Node ids are names people type in peer files; bound them.
pub const MAX_NODE_ID: usize = 255;

const KIND_HELLO: u8 = 1;
const KIND_REJECT: u8 = 2;

/// A node's introduction. The dialer sends it first; the acceptor answers with
/// its own, or with a [`Reject`].
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub node_id: String,
    /// The node the dialer means to reach, as its peer file names it; empty from
    /// the acceptor. Lets the acceptor refuse a misdirected link itself, so the
    /// mistake is reported on both Macs before either considers the link open.
    pub expected_peer: String,
    /// What this node accepts; the peer must not send frames beyond it.
    pub limits: Limits,
    pub capabilities: DeviceCapabilities,
}

/// A refusal: the connection is closed right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HelloMessage {
    Hello(Hello),
    Reject(Reject),
}

impl HelloMessage {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body) = match self {
            HelloMessage::Hello(h) => (KIND_HELLO, encode_hello_body(h)),
            HelloMessage::Reject(r) => {
                let mut w = Writer::default();
                w.u16(r.code as u16);
                w.str(&r.message);
                (KIND_REJECT, w.buf)
            }
        };
        let mut w = Writer::with_prefix(&MAGIC);
        w.u16(VERSION);
        w.u8(kind);
        w.u8(0);
        w.count(body.len());
        w.buf.extend_from_slice(&body);
        w.buf
    }

    /// Decodes a hello from the start of `buf`. `Ok(None)` means more bytes are
    /// needed; `Ok(Some((msg, n)))` means the first `n` bytes were the message.
    /// The preamble is validated before the body is waited for.
    pub fn decode(buf: &[u8]) -> Result<Option<(HelloMessage, usize)>, ProtocolError> {
        if buf.len() < PREAMBLE_LEN {
            // Reject a wrong magic as soon as its bytes are here, not after 12.
            let n = buf.len().min(MAGIC.len());
            if buf[..n] != MAGIC[..n] {
                let mut got = [0u8; 4];
                got[..n].copy_from_slice(&buf[..n]);
                return Err(ProtocolError::BadMagic(got));
            }
            return Ok(None);
        }
        let mut r = Reader::new(&buf[..PREAMBLE_LEN]);
        let magic = [
            r.u8("magic")?,
            r.u8("magic")?,
            r.u8("magic")?,
            r.u8("magic")?,
        ];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = r.u16("version")?;
        let kind = r.u8("hello kind")?;
        let _reserved = r.u8("hello reserved")?;
        let body_len = r.u32("hello length")?;
        // Version before size: a future version may send a larger hello, and
        // the reason to report is the version.
        match kind {
            KIND_HELLO if version != VERSION => {
                return Err(ProtocolError::VersionMismatch {
                    ours: VERSION,
                    theirs: version,
                })
            }
            KIND_HELLO | KIND_REJECT => {}
            other => return Err(ProtocolError::UnknownHelloKind(other)),
        }
        if body_len > MAX_HELLO_BODY {
            return Err(ProtocolError::TooLarge {
                what: "hello",
                len: body_len as u64,
                limit: MAX_HELLO_BODY as u64,
            });
        }
        let total = PREAMBLE_LEN + body_len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let body = &buf[PREAMBLE_LEN..total];
        let msg = if kind == KIND_HELLO {
            HelloMessage::Hello(decode_hello_body(body)?)
        } else {
            let mut r = Reader::new(body);
            let code = ErrorCode::from_u16(r.u16("reject code")?);
            let message = r.str("reject message")?;
            // Bytes after the message are ignored: later versions may append
            // fields to a Reject, and every version must still read why.
            HelloMessage::Reject(Reject { code, message })
        };
        Ok(Some((msg, total)))
    }
}

fn encode_hello_body(h: &Hello) -> Vec<u8> {
    let mut w = Writer::default();
    w.str(&h.node_id);
    w.str(&h.expected_peer);
    w.u32(h.limits.max_meta);
    w.u64(h.limits.max_payload);
    write_capabilities(&mut w, &h.capabilities);
    w.buf
}

fn decode_hello_body(body: &[u8]) -> Result<Hello, ProtocolError> {
    let mut r = Reader::new(body);
    let node_id = r.str("node id")?;
    if node_id.is_empty() || node_id.len() > MAX_NODE_ID {
        return Err(ProtocolError::Malformed("node id (must be 1 to 255 bytes)"));
    }
    let expected_peer = r.str("expected peer")?;
    if expected_peer.len() > MAX_NODE_ID {
        return Err(ProtocolError::Malformed(
            "expected peer (must be at most 255 bytes)",
        ));
    }
    let limits = Limits {
        max_meta: r.u32("max meta")?,
        max_payload: r.u64("max payload")?,
    };
    if limits.max_meta < MIN_MAX_META {
        return Err(ProtocolError::Malformed(
            "max meta (must be at least 4096 bytes, so that an Error always fits)",
        ));
    }
    let capabilities = read_capabilities(&mut r)?;
    r.finish("hello")?;
    Ok(Hello {
        node_id,
        expected_peer,
        limits,
        capabilities,
    })
}

pub(crate) fn write_capabilities(w: &mut Writer, c: &DeviceCapabilities) {
    w.str(&c.model);
    w.str(&c.chip);
    w.u64(c.memory);
    w.f32(c.flops.fp32);
    w.f32(c.flops.fp16);
    w.f32(c.flops.int8);
}

pub(crate) fn read_capabilities(r: &mut Reader<'_>) -> Result<DeviceCapabilities, ProtocolError> {
    Ok(DeviceCapabilities {
        model: r.str("capabilities model")?,
        chip: r.str("capabilities chip")?,
        memory: r.u64("capabilities memory")?,
        flops: Flops {
            fp32: r.f32("flops fp32")?,
            fp16: r.f32("flops fp16")?,
            int8: r.f32("flops int8")?,
        },
    })
}
