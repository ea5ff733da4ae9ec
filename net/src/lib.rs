//! Sockets and connections: everything between the sans-IO protocol
//! (`tensorlink-protocol`) and the node's logic.
//!
//! - [`socket`]: socket2 tuning for dialed, accepted and listening sockets;
//! - [`connection`]: frames in and out of a stream, with stall timeouts;
//! - [`handshake`]: the hello exchange with its deadline;
//! - [`client`]: the multiplexed request/response side of an outbound link;
//! - [`sync`]: the mutex helper every crate of the node shares.

pub mod client;
pub mod connection;
pub mod handshake;
pub mod socket;
pub mod sync;

#[cfg(target_vendor = "apple")]
mod apple;
