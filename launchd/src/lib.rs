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

/// Where a job's log goes when the node rotates it: `node.log` → `node.log.1`.
/// launchd never rotates what it appends to a job's `StandardErrorPath`; the
/// node does, and the installer's uninstall removes both files.
pub fn rotated_log(log: &std::path::Path) -> std::path::PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    std::path::PathBuf::from(name)
}
