//! What can be wrong with bytes from a peer, and the codes that travel back.

use thiserror::Error;

/// A violation of the wire format. Each variant met while decoding ends the
/// connection (`BadShard` is only raised by `Shard::validate`, per request): after a
/// bad frame the two sides no longer agree where the next one starts.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("bad magic {0:02x?}: the peer does not speak the tensorlink protocol")]
    BadMagic([u8; 4]),
    #[error(
        "protocol version mismatch: this node speaks version {ours}, the peer version {theirs}"
    )]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("unknown handshake kind {0}")]
    UnknownHelloKind(u8),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    #[error("frame flags 0x{0:02x} are not defined in this protocol version")]
    BadFlags(u8),
    #[error("{what} of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("{0} is followed by unexpected bytes")]
    TrailingBytes(&'static str),
    #[error("unknown tensor dtype code {0}")]
    UnknownDType(u8),
    #[error("tensor has {0} dimensions, more than the protocol allows")]
    TooManyDims(usize),
    #[error("tensor shape overflows a 64-bit byte count")]
    ShapeOverflow,
    #[error(
        "tensor bytes do not match its shape: shape needs {expected} bytes, frame carries {actual}"
    )]
    ShapeMismatch { expected: u64, actual: u64 },
    #[error("shard layers {start}..={end} do not fit a model of {count} layers")]
    BadShard { start: u32, end: u32, count: u32 },
}

impl ProtocolError {
    /// The code a peer is told when its frame or hello is refused.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::BadMagic(_) => ErrorCode::BadMagic,
            ProtocolError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            ProtocolError::UnknownFrameType(_) | ProtocolError::UnknownHelloKind(_) => {
                ErrorCode::UnknownType
            }
            ProtocolError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtocolError::ShapeMismatch { .. }
            | ProtocolError::ShapeOverflow
            | ProtocolError::TooManyDims(_) => ErrorCode::ShapeMismatch,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Error codes carried by `Error` frames and `Reject` hellos. Codes are stable
/// across versions; a receiver maps codes it does not know to [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    Unknown = 0,
    Malformed = 1,
    UnknownType = 2,
    TooLarge = 3,
    ShapeMismatch = 4,
    BadMagic = 5,
    VersionMismatch = 6,
    WrongNode = 7,
    NoModelLoaded = 8,
    Unavailable = 9,
    Internal = 10,
    Busy = 11,
    /// The request names a model (by its sha256) other than the one this node holds.
    WrongModel = 12,
}

impl ErrorCode {
    pub fn from_u16(code: u16) -> Self {
        use ErrorCode::*;
        [
            Malformed,
            UnknownType,
            TooLarge,
            ShapeMismatch,
            BadMagic,
            VersionMismatch,
            WrongNode,
            NoModelLoaded,
            Unavailable,
            Internal,
            Busy,
            WrongModel,
        ]
        .into_iter()
        .find(|c| *c as u16 == code)
        .unwrap_or(Unknown)
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Unknown => "unknown",
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::ShapeMismatch => "shape_mismatch",
            ErrorCode::BadMagic => "bad_magic",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::WrongNode => "wrong_node",
            ErrorCode::NoModelLoaded => "no_model_loaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Busy => "busy",
            ErrorCode::WrongModel => "wrong_model",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
