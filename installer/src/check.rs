//! `install --check`: the seed's Verification and Troubleshooting sections as
//! one command. Each finding says what was looked at, what was seen, and for a
//! failure the likely cause and its fix. Findings that can only turn green once
//! another Mac is up are marked, so an install of the first Mac is not failed
//! for the second not being there yet.

use std::path::Path;
use std::time::Duration;

use tensorlink_net::{handshake, socket};
use tensorlink_protocol::capabilities::DeviceCapabilities;
use tensorlink_protocol::{Hello, Limits};

use tensorlink_launchd::{LastDeath, LaunchctlError, ServiceStatus};

use crate::cluster::{Cluster, Node};
use crate::install::Loader;
use crate::plan::{host_pattern, Mode, Plan, PlannedModel, Tunnel, THROTTLE_INTERVAL};
use crate::ports;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    /// A failure that another Mac's state explains (its node or its tunnel).
    pub needs_peer: bool,
    pub subject: String,
    pub detail: String,
    pub fix: Option<String>,
}

impl Finding {
    fn ok(subject: impl Into<String>, detail: impl Into<String>) -> Self {
        Finding {
            ok: true,
            needs_peer: false,
            subject: subject.into(),
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(subject: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            ok: false,
            needs_peer: false,
            subject: subject.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn waiting_on_peer(mut self) -> Self {
        self.needs_peer = !self.ok;
        self
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = match (self.ok, self.needs_peer) {
            (true, _) => "ok  ",
            (false, true) => "WAIT",
            (false, false) => "FAIL",
        };
        write!(f, "[{mark}] {}: {}", self.subject, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n       fix: {fix}")?;
        }
        Ok(())
    }
}

/// How this Mac reaches one peer: through a tunnel it opens (`-L` here), or one
/// the peer opens (`-R` landing here).
enum Route<'a> {
    Forward(&'a Tunnel),
    Reverse { peer: String, port: u16 },
}

impl Route<'_> {
    fn peer(&self) -> &str {
        match self {
            Route::Forward(t) => &t.to.id,
            Route::Reverse { peer, .. } => peer,
        }
    }

    fn port(&self) -> u16 {
        match self {
            Route::Forward(t) => t.link.local_port.get(),
            Route::Reverse { port, .. } => *port,
        }
    }
}

pub fn run(plan: &Plan, cluster: &Cluster, loader: Loader<'_>) -> Vec<Finding> {
    let mut findings = Vec::new();
    if let Some(launchctl) = loader {
        for a in plan.agents() {
            let status = launchctl.print(plan.domain, &a.label);
            let log = a.agent.standard_error_path.as_deref().map(Path::new);
            let age = |pid| ports::process_age(pid);
            findings.push(job_finding(a, plan.mode, status, log, age));
        }
    }

    if let Some(model) = &plan.model {
        findings.push(model_finding(model));
    }

    let api = plan.node.api_port.get();
    findings.push(match http_json(api, "/healthcheck") {
        Some(_) => Finding::ok(format!("node {}", plan.node.id), format!("API answers on 127.0.0.1:{api}")),
        None => {
            let log = plan.node_agent.agent.standard_error_path.as_deref().map(Path::new);
            Finding::bad(
                format!("node {}", plan.node.id),
                format!("no answer on 127.0.0.1:{api}{}{}", held_by(api).unwrap_or_default(), log_excerpt(log)),
                "check the node agent above; if another program holds the port, stop it or change api_port in cluster.toml",
            )
        }
    });

    let mut routes: Vec<Route<'_>> = plan.tunnels.iter().map(Route::Forward).collect();
    for l in cluster
        .resolved_links()
        .into_iter()
        .filter(|l| l.to == plan.node.id)
    {
        routes.push(Route::Reverse {
            peer: l.from,
            port: l.remote_port.get(),
        });
    }
    for route in &routes {
        findings.push(check_port(plan, route));
        findings.push(check_handshake(plan, route).waiting_on_peer());
    }

    findings.push(
        match http_json(api, "/topology") {
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
                        "check the links above; run --check on the missing Macs",
                    )
                }
            }
            None => Finding::bad("topology", "the API did not answer", "start the node first"),
        }
        .waiting_on_peer(),
    );
    findings
}

/// Whether cluster.toml's model is where this Mac's node looks for it. Its
/// sha256 the node checks itself at start (its log, in the node finding).
pub fn model_finding(model: &PlannedModel) -> Finding {
    let path = &model.path;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Finding::ok(
            "model",
            format!("{} ({:.1} GB)", path.display(), m.len() as f64 / 1e9),
        ),
        Ok(_) => Finding::bad(
            "model",
            format!("{} is not a file", path.display()),
            "put the model file itself there, or point [model] file in cluster.toml at it",
        ),
        // Not a fault: the node copies it from a linked peer that has it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Finding::bad(
            "model",
            format!(
                "{} is not on this Mac yet: the node copies it from a linked peer that has it (progress in /cluster and the web UI)",
                path.display()
            ),
            format!(
                "put {name} on one Mac of the cluster, or correct [model] file in cluster.toml"
            ),
        )
        .waiting_on_peer(),
        Err(e) => Finding::bad(
            "model",
            format!("{} cannot be read: {e}", path.display()),
            format!("let this user read {name}, or correct [model] file in cluster.toml"),
        ),
    }
}

/// A job runs for at least this long before a restart counts as recovered
/// rather than part of a crash loop.
const STEADY: Duration = Duration::from_secs(60);

/// What launchd says of one job. A crash loop is a job launchd keeps
/// restarting (three starts or more) whose last run ended badly — a failing
/// exit, or a signal (SIGKILL from memory pressure, SIGABRT from a GPU fault),
/// which `launchctl print` reports as `last terminating signal`, not as an
/// exit code — and that has not stayed up for a minute since.
pub fn job_finding(
    agent: &crate::plan::Agent,
    mode: crate::plan::Mode,
    status: Result<Option<ServiceStatus>, LaunchctlError>,
    log: Option<&Path>,
    age: impl Fn(u32) -> Option<Duration>,
) -> Finding {
    let subject = format!("{} {}", mode.job(), agent.label);
    let s = match status {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Finding::bad(subject, "not loaded", "run the installer again to load it")
        }
        Err(e) => return Finding::bad(subject, e.to_string(), "run the installer again"),
    };
    let death = s.last_death();
    let runs = s.runs.unwrap_or(0);
    let steady = s.is_running() && s.pid.and_then(&age).is_some_and(|a| a >= STEADY);
    let crash_loop = runs >= 3 && death != LastDeath::Clean && !steady;
    let mut detail = format!("{}, pid {}, {runs} start(s)", s.state, s.pid.unwrap_or(0));
    if death != LastDeath::Clean {
        detail.push_str(&format!(", last run {death}"));
    }
    if s.is_running() && !crash_loop {
        return Finding::ok(subject, detail);
    }
    let problem = if crash_loop { "crash-looping: " } else { "" };
    let why = match death {
        LastDeath::Signal { number: Some(9), .. } => format!(
            "SIGKILL usually means macOS ended it under memory pressure (a model too big for this Mac's share: \
             look for `jetsam` in `log show --last 1h --predicate 'process == \"kernel\"'`); launchd restarts it every {THROTTLE_INTERVAL} s"
        ),
        LastDeath::Signal { number: Some(6), .. } => format!(
            "SIGABRT: it aborted, which for the node is often a GPU (Metal) fault; read the log lines above; \
             launchd restarts it every {THROTTLE_INTERVAL} s"
        ),
        _ => format!("read the log lines above; launchd restarts it every {THROTTLE_INTERVAL} s"),
    };
    Finding::bad(
        subject,
        format!("{problem}{detail}{}", log_excerpt(log)),
        why,
    )
}

/// The route's port on this Mac: listening, and held by the right program.
fn check_port(plan: &Plan, route: &Route<'_>) -> Finding {
    let port = route.port();
    match route {
        Route::Forward(t) => {
            let subject = format!("tunnel to {}", t.to.id);
            let log = t.agent.agent.standard_error_path.as_deref().map(Path::new);
            if !ports::is_listening(port) {
                let reachable = || ports::answers(&t.to.address, t.to.ssh_port.get());
                let (problem, fix) = diagnose(log, &plan.identity_file, t, plan.mode, reachable)
                    .unwrap_or_else(|| {
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
        Route::Reverse { peer, .. } => {
            let subject = format!("tunnel from {peer}");
            if !ports::is_listening(port) {
                return Finding::bad(
                    subject,
                    format!("port {port} (its -R end on this Mac) is not listening"),
                    format!("{peer} opens this tunnel: run `install --check` on {peer}"),
                )
                .waiting_on_peer();
            }
            match ports::listener(port) {
                Some(l) if !l.command.starts_with("sshd") => Finding::bad(
                    subject,
                    format!("port {port} is held by {l}, not by sshd, so {peer}'s tunnel cannot bind it"),
                    format!("stop {} (pid {}) or set remote_port for the link from {peer} in cluster.toml", l.command, l.pid),
                ),
                Some(l) => Finding::ok(subject, format!("port {port} forwarded by {l}")),
                None => Finding::ok(subject, format!("port {port} listening (owner not visible to lsof/ss)")),
            }
        }
    }
}

/// A tensorlink handshake with the peer through the route's port.
fn check_handshake(plan: &Plan, route: &Route<'_>) -> Finding {
    let (peer, port) = (route.peer().to_owned(), route.port());
    let subject = format!("link to {peer}");
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
        handshake::dial(&mut stream, &hello, &peer, Duration::from_secs(5))
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
                "make sure tensorlink is installed and running on {peer} (`install --check` there)"
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

/// The last lines of a job's log, or of its rotated copy when the node has
/// just rotated it (the running job writes there until it restarts).
fn tail(path: &Path, lines: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path)
        .or_else(|_| std::fs::read_to_string(tensorlink_launchd::rotated_log(path)))
        .unwrap_or_default();
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

/// Recognizes the usual ssh failures in a tunnel's log: (problem, fix).
/// "No route to host" is told apart: when the far Mac's sshd answers from
/// here (`reachable`: this program, run from Terminal or ssh, which Local
/// Network privacy exempts) but not from the job, macOS is blocking the job.
fn diagnose(
    log: Option<&Path>,
    identity: &Path,
    tunnel: &Tunnel,
    mode: Mode,
    reachable: impl FnOnce() -> bool,
) -> Option<(String, String)> {
    let text = tail(log?, 20).join("\n");
    if let Some(d) = local_network_privacy(&text, tunnel, mode, reachable) {
        return Some(d);
    }
    diagnose_text(&text, identity, tunnel)
}

/// macOS 15's Local Network privacy, seen from a tunnel's log (TN3179: a
/// LaunchAgent's connection to a local address fails with EHOSTUNREACH while
/// the same command from Terminal goes through).
pub fn local_network_privacy(
    log: &str,
    tunnel: &Tunnel,
    mode: Mode,
    reachable: impl FnOnce() -> bool,
) -> Option<(String, String)> {
    // Only the last attempt counts: an old line from before a fix is history.
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("ssh:") || l.contains("No route to host"))?;
    if !last.contains("No route to host") || !reachable() {
        return None;
    }
    let to = &tunnel.to;
    let problem = format!(
        "the tunnel's ssh gets \"No route to host\" for {}:{}, which answers from this Terminal: \
         macOS's Local Network privacy is blocking the {}",
        to.address,
        to.ssh_port,
        mode.job()
    );
    let fix = match mode {
        Mode::Agents => "allow it in System Settings > Privacy & Security > Local Network (turn on the entry for ssh), \
             or install with --system: LaunchDaemons are exempt from Local Network privacy"
            .to_owned(),
        Mode::Daemons => "this macOS applies Local Network privacy to a LaunchDaemon run as a user too: allow ssh in \
             System Settings > Privacy & Security > Local Network, and tell us (this is undocumented)"
            .to_owned(),
    };
    Some((problem, fix))
}

/// Recognizes the usual ssh failures in what ssh printed: (problem, fix), the
/// fix with this tunnel's own key, account, address and ports.
pub fn diagnose_text(text: &str, identity: &Path, tunnel: &Tunnel) -> Option<(String, String)> {
    let has = |s: &str| text.contains(s);
    let to = &tunnel.to;
    if has("remote port forwarding failed") {
        return Some((
            format!("the -R port {} is taken on {} (usually the previous session, still closing)", tunnel.link.remote_port, to.id),
            format!("launchd retries every {THROTTLE_INTERVAL} s and this clears when the old session ends; if it persists, see who holds it on {} with `lsof -i :{}`", to.id, tunnel.link.remote_port),
        ));
    }
    if has("Address already in use") || has("cannot listen to port") {
        return Some((
            format!("the -L port {} is taken on this Mac", tunnel.link.local_port),
            format!("find the program with `lsof -i :{}` and stop it, or set local_port in cluster.toml", tunnel.link.local_port),
        ));
    }
    diagnose_login(text, identity, to)
}

/// The failures of logging in to `to` at all, as any ssh to it meets them
/// (a tunnel, or `install --all`): (problem, fix).
pub fn diagnose_login(text: &str, identity: &Path, to: &Node) -> Option<(String, String)> {
    let has = |s: &str| text.contains(s);
    let id = identity.display();
    let login = format!("{}@{}", to.ssh_user, to.address);
    if has("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || has("Host key verification failed")
        || has("No ED25519 host key is known")
    {
        return Some((
            format!("{}'s host key changed or is not pinned", to.id),
            format!("if {} was reinstalled, check its fingerprint, then `ssh-keygen -R {}`, log in once with `ssh {login}` to record the new key, and run the installer again", to.id, host_pattern(to)),
        ));
    }
    if has("UNPROTECTED PRIVATE KEY FILE") {
        return Some((
            "ssh refuses a private key others can read".into(),
            format!("chmod 600 {id}"),
        ));
    }
    if has("Permission denied (publickey") {
        return Some((
            "ssh authentication fails".into(),
            format!("copy the key to {}: `ssh-copy-id -i {id}.pub {login}`, and turn on Remote Login there (System Settings > General > Sharing); a key with a passphrase cannot be used by launchd", to.id),
        ));
    }
    if has("Connection refused")
        || has("Connection timed out")
        || has("No route to host")
        || has("Operation timed out")
    {
        return Some((
            format!("{} does not answer ssh at {}", to.id, to.address),
            format!(
                "check the cable and the address, and that Remote Login is on on {}",
                to.id
            ),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;

    #[test]
    fn ssh_failures_are_named_with_the_exact_fix() {
        let plan = seed_plan();
        let (identity, t) = (&plan.identity_file, &plan.tunnels[0]);
        for (log, expected, fix) in [
            (
                "remoteuser@192.168.2.1: Permission denied (publickey).",
                "authentication",
                "ssh-copy-id -i /Users/me/.ssh/id_ed25519.pub remoteuser@192.168.2.1",
            ),
            (
                "@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @",
                "host key",
                "ssh-keygen -R 192.168.2.1",
            ),
            (
                "Host key verification failed.",
                "host key",
                "ssh remoteuser@192.168.2.1",
            ),
            (
                "Error: remote port forwarding failed for listen port 50060",
                "-R port 50060",
                "lsof -i :50060",
            ),
            (
                "bind [127.0.0.1]:50052: Address already in use",
                "-L port 50052",
                "lsof -i :50052",
            ),
            (
                "ssh: connect to host 192.168.2.1 port 22: Connection refused",
                "does not answer",
                "Remote Login",
            ),
            (
                "WARNING: UNPROTECTED PRIVATE KEY FILE!",
                "others can read",
                "chmod 600 /Users/me/.ssh/id_ed25519",
            ),
        ] {
            let (problem, how) =
                diagnose_text(log, identity, t).unwrap_or_else(|| panic!("no diagnosis for {log}"));
            assert!(problem.contains(expected), "{log}: {problem}");
            assert!(how.contains(fix), "{log}: {how}");
        }
        assert_eq!(diagnose_text("all good", identity, t), None);
    }

    fn seed_plan() -> Plan {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/seed-cluster.toml"
        ))
        .unwrap();
        let cluster = Cluster::parse(&text, Path::new("seed-cluster.toml")).unwrap();
        let account = crate::plan::Account {
            name: "me".into(),
            uid: 501,
            gid: 20,
        };
        let paths = crate::plan::Paths::new(Path::new("/Users/me"));
        crate::plan::plan(&cluster, "mac1", &paths, &account, Mode::Agents).unwrap()
    }

    #[test]
    fn the_model_finding_names_the_path_and_waits_for_the_fetch_when_it_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Llama-3.2-1B-Instruct-Q4_K_M.gguf");
        let model = PlannedModel {
            path: path.clone(),
            sha256: None,
        };
        let missing = model_finding(&model);
        assert!(!missing.ok && missing.needs_peer, "{missing}");
        assert!(
            missing.detail.contains(&path.display().to_string())
                && missing.detail.contains("copies it from a linked peer"),
            "{missing}"
        );
        let fix = missing.fix.unwrap();
        assert!(
            fix.contains("put Llama-3.2-1B-Instruct-Q4_K_M.gguf on one Mac of the cluster"),
            "{fix}"
        );
        std::fs::create_dir(&path).unwrap();
        assert!(!model_finding(&model).ok);
        std::fs::remove_dir(&path).unwrap();
        std::fs::write(&path, vec![0u8; 1_500_000]).unwrap();
        let present = model_finding(&model);
        assert!(
            present.ok && present.detail.ends_with("(0.0 GB)"),
            "{present}"
        );
    }

    /// `launchctl print` as macOS words it, for a job in each state.
    fn printed(text: &str) -> Result<Option<ServiceStatus>, LaunchctlError> {
        Ok(Some(tensorlink_launchd::launchctl::parse_print(text)))
    }

    #[test]
    fn crash_loops_and_signal_deaths_are_named_for_every_job() {
        let plan = seed_plan();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node.log");
        std::fs::write(&log, "loading model\nallocating 38 GiB\n").unwrap();
        let young = |_| Some(Duration::from_secs(4));
        let old = |_| Some(Duration::from_secs(3600));

        // Killed by SIGKILL (memory pressure), restarted again and again.
        let killed = "system/dev.tensorlink.node = {\n\tstate = running\n\tpid = 812\n\truns = 9\n\tlast terminating signal = Killed: 9\n}\n";
        let f = job_finding(
            &plan.node_agent,
            Mode::Agents,
            printed(killed),
            Some(log.as_path()),
            young,
        );
        assert!(!f.ok, "{f}");
        assert!(f.detail.starts_with("crash-looping: "), "{f}");
        assert!(f.detail.contains("killed by signal (Killed: 9)"), "{f}");
        assert!(
            f.detail.contains("allocating 38 GiB"),
            "the log's last lines: {f}"
        );
        assert!(f.fix.as_deref().unwrap().contains("memory pressure"), "{f}");

        // A tunnel waiting to be respawned after ssh exits 255 each time.
        let tunnel = &plan.tunnels[0].agent;
        let looping = "x = {\n\tstate = spawn scheduled\n\truns = 14\n\tlast exit code = 255\n}\n";
        let f = job_finding(tunnel, Mode::Agents, printed(looping), None, young);
        assert!(
            !f.ok && f.detail.contains("crash-looping") && f.detail.contains("exit status 255"),
            "{f}"
        );

        // SIGABRT (a GPU fault) names that.
        let aborted = "x = {\n\tstate = not running\n\truns = 3\n\tlast terminating signal = Abort trap: 6\n}\n";
        let f = job_finding(
            &plan.node_agent,
            Mode::Daemons,
            printed(aborted),
            None,
            young,
        );
        assert!(f.subject.starts_with("LaunchDaemon"), "{f}");
        assert!(f.fix.as_deref().unwrap().contains("GPU"), "{f}");

        // Up for an hour since its last crash: recovered, and still says what happened.
        let recovered = "x = {\n\tstate = running\n\tpid = 900\n\truns = 4\n\tlast terminating signal = Killed: 9\n}\n";
        let f = job_finding(
            &plan.node_agent,
            Mode::Agents,
            printed(recovered),
            None,
            old,
        );
        assert!(f.ok && f.detail.contains("Killed: 9"), "{f}");

        // A fresh, healthy job.
        let fresh = "x = {\n\tstate = running\n\tpid = 901\n\truns = 1\n\tlast exit code = (never exited)\n}\n";
        assert!(job_finding(tunnel, Mode::Agents, printed(fresh), None, young).ok);
        assert!(!job_finding(tunnel, Mode::Agents, Ok(None), None, young).ok);
    }

    #[test]
    fn no_route_to_host_that_terminal_reaches_is_local_network_privacy() {
        let plan = seed_plan();
        let t = &plan.tunnels[0];
        let log = "ssh: connect to host 192.168.2.1 port 22: No route to host";
        let (problem, fix) = local_network_privacy(log, t, Mode::Agents, || true).unwrap();
        assert!(
            problem.contains("Local Network privacy") && problem.contains("192.168.2.1:22"),
            "{problem}"
        );
        assert!(
            fix.contains("Privacy & Security > Local Network") && fix.contains("--system"),
            "{fix}"
        );
        // Unreachable from here too: a cable or address problem, as before.
        assert_eq!(local_network_privacy(log, t, Mode::Agents, || false), None);
        let (problem, _) = diagnose_text(log, &plan.identity_file, t).unwrap();
        assert!(problem.contains("does not answer"), "{problem}");
        // Only the last attempt counts.
        let fixed = format!("{log}\nssh: connect to host 192.168.2.1 port 22: Connection refused");
        assert_eq!(
            local_network_privacy(&fixed, t, Mode::Agents, || true),
            None
        );
        let (_, fix) = local_network_privacy(log, t, Mode::Daemons, || true).unwrap();
        assert!(fix.contains("LaunchDaemon"), "{fix}");
    }
}
