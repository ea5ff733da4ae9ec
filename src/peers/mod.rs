//! Manual discovery: the peers come from a file (the ssh tunnel's loopback
//! ports), are dialed and health-checked, and follow edits to the file.
//!
//! - [`file`]: the seed's peer JSON, parsed and validated;
//! - [`watch`]: polling the file for edits, keeping the last good set;
//! - [`registry`]: the live set and its link states;
//! - `link`: one dial/handshake/health/redial task per peer;
//! - [`backoff`]: capped, jittered redial delays.

pub mod backoff;
pub mod file;
mod link;
pub mod registry;
pub mod watch;

pub use file::{PeerSet, PeerSpec};
pub use link::LinkTiming;
pub use registry::{LinkState, LinkedPeer, PeerView, Peers};
