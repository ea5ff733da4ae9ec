//! The fixed frame header, limits, and the streaming decoder.
//!
//! Every frame after the handshake is a 24-byte header, a metadata block of
//! `meta_len` bytes, and a payload of `payload_len` bytes holding raw tensor
//! data. The header is validated against [`Limits`] before any of the rest is
//! awaited, so a hostile length is refused before it can size an allocation.

use bytes::{Bytes, BytesMut};

use super::codec::Reader;
use super::message::Message;
use super::ProtocolError;

pub const HEADER_LEN: usize = 24;

/// The least `max_meta` a Hello may announce. Every Error frame fits in it
/// (its message is at most [`crate::message::MAX_ERROR_MESSAGE`] bytes), so a
/// peer can always be told why.
pub const MIN_MAX_META: u32 = 4096;

/// Per-connection limits. Each side announces its own in the hello and enforces
/// them on what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest metadata block (prompts, shapes, topology).
    pub max_meta: u32,
    /// Largest payload (the sum of a frame's tensor bytes).
    pub max_payload: u64,
}

/// Which part of a frame is beyond a limit, by how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversize {
    /// `metadata` or `payload`.
    pub what: &'static str,
    pub len: u64,
    pub limit: u64,
}

impl Limits {
    /// Whether the receiver that announced these limits takes `frame`. Senders
    /// ask first: a receiver closes the link on a frame beyond its limits,
    /// failing every other request on it, where a sender can fail just this one.
    pub fn admits(&self, frame: &EncodedFrame) -> Result<(), Oversize> {
        let (meta, payload) = (frame.meta_len(), frame.payload_len());
        if meta > self.max_meta as u64 {
            return Err(Oversize {
                what: "metadata",
                len: meta,
                limit: self.max_meta as u64,
            });
        }
        if payload > self.max_payload {
            return Err(Oversize {
                what: "payload",
                len: payload,
                limit: self.max_payload,
            });
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_meta: 1 << 20,
            max_payload: 1 << 30,
        }
    }
}

/// Frame type codes. Responses are their request's code with the top bit set;
/// `Error` answers any request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    HealthCheck = 0x01,
    SendPrompt = 0x02,
    SendTensor = 0x03,
    SendExample = 0x04,
    CollectTopology = 0x05,
    SendResult = 0x06,
    SendOpaqueStatus = 0x07,
    QueryModelFile = 0x08,
    ReadModelFile = 0x09,
    HealthStatus = 0x81,
    PromptResult = 0x82,
    TensorResult = 0x83,
    Loss = 0x84,
    Topology = 0x85,
    ResultAck = 0x86,
    StatusAck = 0x87,
    ModelFileInfo = 0x88,
    ModelBytes = 0x89,
    Error = 0xFF,
}

impl FrameType {
    pub const ALL: [FrameType; 19] = [
        FrameType::HealthCheck,
        FrameType::SendPrompt,
        FrameType::SendTensor,
        FrameType::SendExample,
        FrameType::CollectTopology,
        FrameType::SendResult,
        FrameType::SendOpaqueStatus,
        FrameType::QueryModelFile,
        FrameType::ReadModelFile,
        FrameType::HealthStatus,
        FrameType::PromptResult,
        FrameType::TensorResult,
        FrameType::Loss,
        FrameType::Topology,
        FrameType::ResultAck,
        FrameType::StatusAck,
        FrameType::ModelFileInfo,
        FrameType::ModelBytes,
        FrameType::Error,
    ];

    pub fn from_code(code: u8) -> Result<Self, ProtocolError> {
        FrameType::ALL
            .into_iter()
            .find(|t| *t as u8 == code)
            .ok_or(ProtocolError::UnknownFrameType(code))
    }

    pub fn is_request(self) -> bool {
        (self as u8) & 0x80 == 0
    }

    /// The frame that answers this request when it succeeds: its code with the
    /// top bit set. None for a response (an `Error` may answer anything).
    pub fn response(self) -> Option<FrameType> {
        if !self.is_request() {
            return None;
        }
        FrameType::from_code(self as u8 | 0x80).ok()
    }
}

/// A decoded and validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_type: FrameType,
    pub request_id: u64,
    pub meta_len: u32,
    pub payload_len: u64,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.frame_type as u8;
        // out[1] flags and out[2..4] reserved stay zero in version 1.
        out[4..8].copy_from_slice(&self.meta_len.to_le_bytes());
        out[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// Decodes and validates a header against the receiver's limits.
    pub fn decode(buf: &[u8; HEADER_LEN], limits: &Limits) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(buf);
        let frame_type = FrameType::from_code(r.u8("frame type")?)?;
        let flags = r.u8("frame flags")?;
        let reserved = r.u16("frame reserved")?;
        if flags != 0 {
            return Err(ProtocolError::BadFlags(flags));
        }
        if reserved != 0 {
            return Err(ProtocolError::Malformed(
                "frame header (reserved bytes must be zero)",
            ));
        }
        let meta_len = r.u32("meta length")?;
        let request_id = r.u64("request id")?;
        let payload_len = r.u64("payload length")?;
        if meta_len > limits.max_meta {
            return Err(ProtocolError::TooLarge {
                what: "frame metadata",
                len: meta_len as u64,
                limit: limits.max_meta as u64,
            });
        }
        if payload_len > limits.max_payload {
            return Err(ProtocolError::TooLarge {
                what: "frame payload",
                len: payload_len,
                limit: limits.max_payload,
            });
        }
        Ok(FrameHeader {
            frame_type,
            request_id,
            meta_len,
            payload_len,
        })
    }
}

/// A whole frame: which request it belongs to and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub request_id: u64,
    pub message: Message,
}

/// A frame ready to write: header and metadata in one small buffer, the tensor
/// payloads as the caller's own buffers, for one vectored write without copies.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    pub head: Bytes,
    pub payload: Vec<Bytes>,
}

impl EncodedFrame {
    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.payload.iter().map(|p| p.len() as u64).sum::<u64>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The metadata block's length, as the header's `meta_len` says.
    pub fn meta_len(&self) -> u64 {
        (self.head.len() - HEADER_LEN) as u64
    }

    /// The payload's length, as the header's `payload_len` says.
    pub fn payload_len(&self) -> u64 {
        self.payload.iter().map(|p| p.len() as u64).sum()
    }

    /// All bytes in one buffer; for tests and fuzzing, not the tensor path.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = self.head.to_vec();
        for p in &self.payload {
            out.extend_from_slice(p);
        }
        out
    }
}

/// Streaming decoder for byte buffers, in the shape of tokio-util's `Decoder`:
/// feed it whatever has arrived, take out whole frames. The socket path uses the
/// same header and body functions but reads payloads straight into their buffer.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    header: Option<FrameHeader>,
}

impl Decoder {
    pub fn new(limits: Limits) -> Self {
        Decoder {
            limits,
            header: None,
        }
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        let header = match self.header {
            Some(h) => h,
            None => {
                let Some(head) = buf.get(..HEADER_LEN) else {
                    return Ok(None);
                };
                let head: &[u8; HEADER_LEN] = head
                    .try_into()
                    .map_err(|_| ProtocolError::Truncated("frame header"))?;
                let h = FrameHeader::decode(head, &self.limits)?;
                let _ = buf.split_to(HEADER_LEN);
                self.header = Some(h);
                h
            }
        };
        let body_len = header.meta_len as u64 + header.payload_len;
        if (buf.len() as u64) < body_len {
            return Ok(None);
        }
        self.header = None;
        let meta = buf.split_to(header.meta_len as usize);
        let payload = buf.split_to(header.payload_len as usize).freeze();
        let message = Message::decode(header.frame_type, &meta, payload)?;
        Ok(Some(Frame {
            request_id: header.request_id,
            message,
        }))
    }
}
