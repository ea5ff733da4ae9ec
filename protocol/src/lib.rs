//! The tensorlink wire protocol, sans-IO: bytes in, messages out.
//!
//! Nothing in this crate touches a socket, so every rule of the format can be
//! exercised with plain byte slices, property tests and fuzzers. The byte-level
//! specification is `docs/PROTOCOL.md`; the files here follow it in reading order:
//!
//! - [`handshake`]: the hello each side sends first (magic, version, node id,
//!   limits, device capabilities) and the reject that refuses a link;
//! - [`frame`]: the fixed 24-byte frame header, the limits checked before any
//!   allocation, and a streaming [`Decoder`];
//! - [`message`]: every operation and its metadata layout;
//! - [`ring`]: the ring context a request's first step carries;
//! - [`tensor`]: dtypes, shapes, and how tensor bytes sit in the payload;
//! - `codec`: the primitive field encoding all of the above share;
//! - [`capabilities`] and [`topology`]: the values a hello and a topology
//!   answer carry.
//!
//! Its own crate so that whatever only speaks the protocol (the installer's
//! link check, a second implementation's tests) builds without the model stack.

pub mod capabilities;
mod codec;
mod error;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod ring;
pub mod tensor;
pub mod topology;

pub use error::{ErrorCode, ProtocolError};
pub use frame::{
    Decoder, EncodedFrame, Frame, FrameHeader, FrameType, Limits, Oversize, HEADER_LEN,
};
pub use handshake::{Hello, HelloMessage, Reject};
pub use message::{InferenceState, Message, Shard};
pub use ring::{Assignment, RingContext, SamplingParams};
pub use tensor::{DType, Tensor};
