//! The tensorlink installer: one `cluster.toml` → this Mac's LaunchAgents.
//!
//! Reading order: [`cluster`] (the file and its validation), [`identify`]
//! (which node this Mac is), [`plan`] (every file and agent, a pure function),
//! [`known_hosts`] and [`preflight`] (what is checked before writing),
//! [`install`] (the plan as steps: executed, or described by `--dry-run`;
//! receipt; uninstall), and [`check`] (the
//! seed's Verification section as a command).

pub mod check;
pub mod cluster;
pub mod identify;
pub mod install;
pub mod known_hosts;
pub mod plan;
pub mod platform;
pub mod ports;
pub mod preflight;
pub mod remote;
