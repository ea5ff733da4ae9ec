//! `install --check`: the seed's Verification and Troubleshooting sections as
//! one command. Each finding says what was looked at, what was seen, and for a
//! failure the likely cause and its fix.

use std::path::Path;
use std::time::Duration;

use tensorlink::capabilities::DeviceCapabilities;
use tensorlink::net::{handshake, socket};
use tensorlink::protocol::{Hello, Limits};

use crate::cluster::Cluster;
use crate::install::Loader;
use crate::plan::{Plan, Tunnel};
use crate::ports;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub subject: String,
    pub detail: String,
    pub fix: Option<String>,
}

impl Finding {
    fn ok(subject: impl Into<String>, detail: impl Into<String>) -> Self {
        Finding {
            ok: true,
            subject: subject.into(),
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(subject: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            ok: false,
            subject: subject.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        write!(f, "[{mark}] {}: {}", self.subject, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n       fix: {fix}")?;
        }
        Ok(())
    }
}

pub fn run(plan: &Plan, cluster: &Cluster, loader: Loader<'_>) -> Vec<Finding> {
    let mut findings = Vec::new();
    if let Some((launchctl, domain)) = loader {
        for a in plan.agents() {
            let log = a.agent.standard_error_path.as_deref().map(Path::new);
            findings.push(match launchctl.print(domain, &a.label) {
                Ok(Some(s)) if s.is_running() => Finding::ok(
                    format!("agent {}", a.label),
                    format!(
                        "running, pid {}, {} start(s), last exit {}",
                        s.pid.unwrap_or(0),
                        s.runs.unwrap_or(0),
                        s.last_exit.as_deref().unwrap_or("none")
                    ),
                ),
                Ok(Some(s)) => Finding::bad(
                    format!("agent {}", a.label),
                    format!(
                        "{} after {} start(s), last exit {}{}",
                        s.state,
                        s.runs.unwrap_or(0),
                        s.last_exit.as_deref().unwrap_or("none"),
                        log_excerpt(log)
                    ),
                    diagnose(log).map(|(_, fix)| fix).unwrap_or_else(|| {
                        "read the log above; the agent restarts by itself every 2 s".into()
                    }),
                ),
                Ok(None) => Finding::bad(
                    format!("agent {}", a.label),
                    "not loaded",
                    "run the installer again to load it",
                ),
                Err(e) => Finding::bad(
                    format!("agent {}", a.label),
                    e.to_string(),
                    "run the installer again",
                ),
            });
        }
    }

    let api = plan.node.api_port as u16;
    findings.push(match http_json(api, "/healthcheck") {
        Some(_) => Finding::ok(format!("node {}", plan.node.id), format!("API answers on 127.0.0.1:{api}")),
        None => {
            let log = plan.node_agent.agent.standard_error_path.as_deref().map(Path::new);
            Finding::bad(
                format!("node {}", plan.node.id),
                format!("no answer on 127.0.0.1:{api}{}", held_by(api).unwrap_or_default() + &log_excerpt(log)),
                "check the node agent above; if another program holds the port, stop it or change api_port in cluster.toml",
            )
        }
    });

    for t in &plan.tunnels {
        findings.push(check_forward(t));
        findings.push(check_handshake(plan, t));
    }

    findings.push(match http_json(api, "/topology") {
        Some(topology) => {
            let missing: Vec<&str> = cluster
                .nodes
                .iter()
                .map(|n| n.id.as_str())
                .filter(|id| topology["nodes"].get(*id).is_none())
                .collect();
            if missing.is_empty() {
                Finding::ok(
                    "topology",
                    format!("lists all {} nodes", cluster.nodes.len()),
                )
            } else {
                Finding::bad(
                    "topology",
                    format!("missing {}", missing.join(", ")),
                    "check the tunnels and the far nodes above; run --check on the missing Macs",
                )
            }
        }
        None => Finding::bad("topology", "the API did not answer", "start the node first"),
    });
    findings
}

fn check_forward(t: &Tunnel) -> Finding {
    let port = t.link.local_port;
    let subject = format!("tunnel to {}", t.to.id);
    let log = t.agent.agent.standard_error_path.as_deref().map(Path::new);
    if !ports::is_listening(port) {
        let (problem, fix) = diagnose(log).unwrap_or_else(|| {
            (
                "nothing listens on it".into(),
                "the tunnel agent is down; see its state above".into(),
            )
        });
        return Finding::bad(
            subject,
            format!(
                "forwarded port {port} is down: {problem}{}",
                log_excerpt(log)
            ),
            fix,
        );
    }
    match ports::listener(port) {
        Some(l) if l.command != "ssh" => Finding::bad(
            subject,
            format!("port {port} is held by {l}, not by ssh"),
            format!(
                "stop {} (pid {}) or set local_port for the link {}→{} in cluster.toml",
                l.command, l.pid, t.link.from, t.link.to
            ),
        ),
        Some(l) => Finding::ok(subject, format!("port {port} forwarded by {l}")),
        None => Finding::ok(
            subject,
            format!("port {port} listening (owner not visible to lsof/ss)"),
        ),
    }
}

fn check_handshake(plan: &Plan, t: &Tunnel) -> Finding {
    let port = t.link.local_port;
    let subject = format!("link to {}", t.to.id);
    let hello = Hello {
        node_id: format!("{}-check", plan.node.id),
        expected_peer: String::new(),
        limits: Limits::default(),
        capabilities: DeviceCapabilities::unknown("install --check"),
    };
    let attempt = async {
        let mut stream = socket::connect(([127, 0, 0, 1], port).into(), Duration::from_secs(3))
            .await
            .map_err(|e| e.to_string())?;
        handshake::dial(&mut stream, &hello, &t.to.id, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(attempt));
    match result {
        Ok((theirs, _)) => Finding::ok(
            subject,
            format!(
                "{} answered a handshake through 127.0.0.1:{port} ({})",
                theirs.node_id, theirs.capabilities.chip
            ),
        ),
        Err(e) => Finding::bad(
            subject,
            format!("no handshake through 127.0.0.1:{port}: {e}"),
            format!(
                "make sure the node runs on {} (`install --check` there) and listens on port {}",
                t.to.id, t.to.node_port
            ),
        ),
    }
}

fn http_json(port: u16, path: &str) -> Option<serde_json::Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    agent
        .get(&format!("http://127.0.0.1:{port}{path}"))
        .call()
        .ok()?
        .body_mut()
        .read_json()
        .ok()
}

fn held_by(port: u16) -> Option<String> {
    ports::listener(port).map(|l| format!(" (port held by {l})"))
}

fn tail(path: &Path, lines: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

fn log_excerpt(log: Option<&Path>) -> String {
    let Some(log) = log else { return String::new() };
    let lines = tail(log, 5);
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\n       last lines of {}:\n         {}",
        log.display(),
        lines.join("\n         ")
    )
}

/// Recognizes the usual ssh failures in a tunnel log: (problem, fix).
pub fn diagnose(log: Option<&Path>) -> Option<(String, String)> {
    let text = tail(log?, 20).join("\n");
    diagnose_text(&text)
}

pub fn diagnose_text(text: &str) -> Option<(String, String)> {
    let has = |s: &str| text.contains(s);
    if has("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || has("Host key verification failed")
        || has("No ED25519 host key is known")
    {
        return Some((
            "the far Mac's host key changed or is not pinned".into(),
            "if that Mac was reinstalled, check its fingerprint, then `ssh-keygen -R <address>`, log in once with ssh to record the new key, and run the installer again".into(),
        ));
    }
    if has("Permission denied (publickey") {
        return Some((
            "ssh authentication fails".into(),
            "copy your key to the far Mac: `ssh-copy-id -i ~/.ssh/id_ed25519.pub user@address`, and turn on Remote Login there (System Settings > General > Sharing)".into(),
        ));
    }
    if has("remote port forwarding failed") {
        return Some((
            "the -R port is taken on the far Mac (usually the previous session, still closing)".into(),
            "launchd retries every 2 s and this clears when the old session ends; if it persists, see who holds it on the far Mac with `lsof -i :PORT`".into(),
        ));
    }
    if has("Address already in use") || has("cannot listen to port") {
        return Some((
            "the -L port is taken on this Mac".into(),
            "see `install --check` for the port's owner; stop it or set local_port in cluster.toml"
                .into(),
        ));
    }
    if has("Connection refused")
        || has("Connection timed out")
        || has("No route to host")
        || has("Operation timed out")
    {
        return Some((
            "the far Mac does not answer ssh".into(),
            "check the cable and the address, and that Remote Login is on there".into(),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_failures_are_named() {
        for (log, expected) in [
            (
                "root@127.0.0.1: Permission denied (publickey).",
                "authentication",
            ),
            (
                "@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @",
                "host key",
            ),
            ("Host key verification failed.", "host key"),
            (
                "Error: remote port forwarding failed for listen port 50060",
                "-R port",
            ),
            ("bind [127.0.0.1]:50052: Address already in use", "-L port"),
            (
                "ssh: connect to host 192.168.2.1 port 22: Connection refused",
                "does not answer",
            ),
        ] {
            let (problem, _) =
                diagnose_text(log).unwrap_or_else(|| panic!("no diagnosis for {log}"));
            assert!(problem.contains(expected), "{log}: {problem}");
        }
        assert_eq!(diagnose_text("all good"), None);
    }
}
