//! tensorlink: one LLM across several cabled Macs.
//!
//! The library behind the `tensorlink-node` service. Reading order for a newcomer:
//! [`protocol`] (the wire format, sans-IO), [`net`] (sockets and connections),
//! [`peers`] (the peer file, dialing and health), [`topology`], [`inference`]
//! (the model split across the ring), [`api`] (HTTP and the web UI), and
//! [`node`], which ties them into the running service.

pub mod api;
pub mod capabilities;
pub mod cli;
pub mod engine;
pub mod inference;
pub mod logfiles;
pub mod net;
pub mod node;
pub mod peers;
mod platform;
pub mod power;
pub mod protocol;
pub mod server;
pub mod telemetry;
pub mod topology;
