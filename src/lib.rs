//! tensorlink: one LLM across several cabled Macs.
//!
//! The library behind the `tensorlink-node` service. Reading order for a newcomer:
//! [`protocol`] (the wire format, sans-IO), [`net`] (sockets and connections),
//! [`peers`] (the peer file, dialing and health), [`topology`], [`api`] (HTTP),
//! and [`node`], which ties them into the running service.

pub mod capabilities;
pub mod cli;
pub mod net;
pub mod peers;
mod platform;
pub mod protocol;
pub mod topology;
pub mod api;
pub mod engine;
pub mod node;
pub mod server;
pub mod telemetry;
