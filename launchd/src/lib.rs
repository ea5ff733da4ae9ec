//! launchd for tensorlink: the LaunchAgent plist model ([`agent`]) and the
//! `launchctl` commands that load and inspect agents ([`launchctl`]).
//!
//! Plists are plain files, so the model is tested on any platform. launchctl is
//! a trait: [`launchctl::System`] runs `/bin/launchctl` on macOS, and
//! [`fake::Recording`] stands in for it in tests, recording every command.

pub mod agent;
pub mod fake;
pub mod launchctl;

pub use agent::{KeepAlive, LaunchAgent, PlistError, ProcessType};
pub use launchctl::{Domain, LastDeath, Launchctl, LaunchctlError, ServiceStatus};
