//! tensorlink: one LLM across several cabled Macs.
//!
//! The library behind the `tensorlink-node` service. Reading order for a newcomer:
//! [`protocol`] (the wire format, sans-IO) and [`net`] (sockets and
//! connections), crates of their own; [`peers`] (the peer file, dialing and
//! health); [`cluster`] (the cluster as this node reaches it); [`server`] (the
//! protocol listener, over a handler); [`inference`] (the model split across
//! the ring, which it drives through a `Ring`); [`fetch`] (copying the model
//! from a peer that runs it, and giving it to one); [`api`] (HTTP and the web UI,
//! over an application state); and [`node`], which composes them into the
//! running service. Nothing below `node` imports it.

pub mod api;
pub mod capabilities;
pub mod cli;
pub mod cluster;
pub mod engine;
pub mod fetch;
pub mod inference;
pub mod logfiles;
pub mod node;
pub mod peers;
pub mod power;
pub mod server;
pub mod telemetry;

// The wire format and its sockets are crates of their own (the installer uses
// them without the model stack); the node's code names them as before.
pub use tensorlink_net as net;
pub use tensorlink_protocol as protocol;
pub use tensorlink_protocol::topology;
