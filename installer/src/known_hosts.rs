//! The host keys the tunnels trust, pinned in tensorlink's own known_hosts file.
//!
//! Keys come from the user's `~/.ssh/known_hosts`, where a first `ssh` to the
//! other Mac put them after the user checked the fingerprint. Taking a key on
//! first contact over the network is only done when asked (`--trust-new-host-keys`).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::cluster::Node;
use crate::plan::{host_pattern, Plan};

#[derive(Debug, thiserror::Error)]
pub enum KnownHostsError {
    #[error("no host key for {pattern} in {file}. Log in once by hand to check and record it: `ssh{port} {user}@{address}` (or rerun with --trust-new-host-keys to accept it unchecked)")]
    Missing {
        pattern: String,
        file: String,
        user: String,
        address: String,
        port: String,
    },
    #[error("could not run {0}: {1}")]
    Tool(&'static str, std::io::Error),
    #[error("ssh-keyscan found no host key at {0}: is Remote Login on and the address right?")]
    ScanFailed(String),
}

/// The pinned known_hosts contents for every tunnel of `plan`.
pub fn pin(
    plan: &Plan,
    user_known_hosts: &Path,
    trust_new: bool,
) -> Result<String, KnownHostsError> {
    plan.tunnels
        .iter()
        .map(|t| pin_node(&t.to, user_known_hosts, trust_new))
        .collect()
}

/// The known_hosts lines that pin `node`'s host key.
pub fn pin_node(
    node: &Node,
    user_known_hosts: &Path,
    trust_new: bool,
) -> Result<String, KnownHostsError> {
    let pattern = host_pattern(node);
    let mut lines = lookup(&pattern, user_known_hosts)?;
    if lines.is_empty() && trust_new {
        lines = scan(&node.address, node.ssh_port.get())?;
    }
    if lines.is_empty() {
        return Err(KnownHostsError::Missing {
            pattern,
            file: user_known_hosts.display().to_string(),
            user: node.ssh_user.clone(),
            address: node.address.clone(),
            port: if node.ssh_port.get() == 22 {
                String::new()
            } else {
                format!(" -p {}", node.ssh_port)
            },
        });
    }
    Ok(lines.iter().map(|l| format!("{l}\n")).collect())
}

/// `ssh-keygen -F`: finds hashed entries too.
fn lookup(pattern: &str, file: &Path) -> Result<Vec<String>, KnownHostsError> {
    if !file.exists() {
        return Ok(Vec::new());
    }
    let out = Command::new("ssh-keygen")
        .arg("-F")
        .arg(pattern)
        .arg("-f")
        .arg(file)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| KnownHostsError::Tool("ssh-keygen", e))?;
    Ok(keep_key_lines(&String::from_utf8_lossy(&out.stdout)))
}

fn scan(address: &str, port: u16) -> Result<Vec<String>, KnownHostsError> {
    let out = Command::new("ssh-keyscan")
        .args(["-T", "5", "-p", &port.to_string(), address])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| KnownHostsError::Tool("ssh-keyscan", e))?;
    let lines = keep_key_lines(&String::from_utf8_lossy(&out.stdout));
    if lines.is_empty() {
        return Err(KnownHostsError::ScanFailed(format!(
            "{address} port {port}"
        )));
    }
    Ok(lines)
}

fn keep_key_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}
