//! Helpers for tests that start real `tensorlink-node` processes: free ports,
//! peer files in the seed's format, readiness by health endpoint, and processes
//! killed when the test ends however it ends.

#![allow(dead_code)]

pub mod model;
pub mod netns;
pub mod sshd;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `tensorlink-node` binary: cargo names it for the root package's tests;
/// other packages' tests (the installer's, in target/debug/deps) and the
/// benchmark tools (in target/release) find it in the target directory,
/// building it first if this run has not.
pub fn node_bin() -> std::path::PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_tensorlink-node") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("executable directory");
    let candidates = [
        dir.join("tensorlink-node"),
        dir.parent().unwrap_or(dir).join("tensorlink-node"),
    ];
    if let Some(bin) = candidates.iter().find(|p| p.is_file()) {
        return bin.clone();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", "tensorlink", "--bin", "tensorlink-node"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building tensorlink-node failed");
    candidates[1].clone()
}

/// A port the kernel just handed out on loopback, released for the test to
/// bind; never the same one twice in this process (the kernel may well hand a
/// released port out again, and two of a test's servers would then clash).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port on 127.0.0.1");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A finished command's stdout then stderr, for assertions and their messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `check` every 10 ms until it holds; returns how long that took.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn get_json(port: u16, path: &str) -> Option<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
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

/// An HTTP client for API requests that may run a model: statuses are
/// answers, not errors, and a generation may take a while.
pub fn api_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// POSTs JSON to the API; the status and the JSON body, whatever the status.
pub fn post_json(port: u16, path: &str, body: &Value) -> (u16, Value) {
    let mut response = api_agent()
        .post(&format!("http://127.0.0.1:{port}{path}"))
        .send_json(body)
        .expect("the API answers");
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().unwrap_or(Value::Null),
    )
}

/// Writes a peer file in the seed's format; `peers` are (id, "host:port").
/// Written to a temporary name and renamed, as an editor would save it.
pub fn write_peer_file(path: &Path, peers: &[(&str, String)]) {
    let mut map = serde_json::Map::new();
    for (id, address) in peers {
        map.insert(
            id.to_string(),
            serde_json::json!({
                "address": address,
                "device_capabilities": {
                    "model": format!("{id} from the peer file"),
                    "chip": "Apple Silicon",
                    "memory": 32768,
                    "flops": {"fp32": 10.0, "fp16": 20.0, "int8": 40.0}
                }
            }),
        );
    }
    let text = serde_json::to_string_pretty(&serde_json::json!({ "peers": map })).unwrap();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A `tensorlink-node` child process, killed on drop.
pub struct NodeProc {
    pub id: String,
    pub node_port: u16,
    pub api_port: u16,
    pub peer_file: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl NodeProc {
    /// Starts a node with the seed's exo flags and waits until its API answers.
    pub fn start(
        dir: &Path,
        id: &str,
        node_port: u16,
        api_port: u16,
        peer_file: &Path,
    ) -> NodeProc {
        Self::start_with(dir, id, node_port, api_port, peer_file, &[])
    }

    /// As [`NodeProc::start`], with more flags.
    pub fn start_with(
        dir: &Path,
        id: &str,
        node_port: u16,
        api_port: u16,
        peer_file: &Path,
        extra: &[&str],
    ) -> NodeProc {
        let mut node = NodeProc {
            id: id.to_owned(),
            node_port,
            api_port,
            peer_file: peer_file.to_owned(),
            log: dir.join(format!("{id}.log")),
            child: None,
        };
        node.launch(extra);
        node
    }

    pub fn launch(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "{} is already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(node_bin())
            .args(["--node-id", &self.id])
            .args(["--node-port", &self.node_port.to_string()])
            .args(["--chatgpt-api-port", &self.api_port.to_string()])
            .args(["--discovery-module", "manual"])
            .arg("--discovery-config-path")
            .arg(&self.peer_file)
            .arg("--disable-tui")
            .args(extra)
            .env("TENSORLINK_LOG", "info")
            .env("NO_COLOR", "1")
            // The sha256 records go beside the test's files, not in the home.
            .env(
                "TENSORLINK_HASH_RECORDS",
                self.log
                    .parent()
                    .expect("the log is in the test's directory"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tensorlink-node");
        self.child = Some(child);
        let (port, id) = (self.api_port, self.id.clone());
        let child = self.child.as_mut().expect("just started");
        wait_until(
            Duration::from_secs(10),
            &format!("{id} to answer /healthcheck"),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("{id} exited ({status}) before answering /healthcheck");
                }
                get_json(port, "/healthcheck").is_some()
            },
        );
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as launchd's bootout sends, and the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("node not running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "node did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn topology(&self) -> Value {
        get_json(self.api_port, "/topology").unwrap_or(Value::Null)
    }

    pub fn peers(&self) -> Value {
        get_json(self.api_port, "/peers").unwrap_or(Value::Null)
    }

    /// The ids `/topology` lists.
    pub fn topology_nodes(&self) -> Vec<String> {
        self.topology()["nodes"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The `/peers` entry for `id`, if configured.
    pub fn peer(&self, id: &str) -> Option<Value> {
        self.peers()
            .as_array()?
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
    }

    pub fn peer_up(&self, id: &str) -> bool {
        self.peer(id).is_some_and(|p| p["state"] == "up")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.id, self.log_text());
        }
    }
}

/// Two nodes, mac1 (with `mac1_flags`) and mac2, each in the other's peer file,
/// returned once both links are up.
pub fn linked_pair(dir: &Path, mac1_flags: &[&str]) -> (NodeProc, NodeProc) {
    linked_pair_with(dir, mac1_flags, &[])
}

/// As [`linked_pair`], with flags for each node.
pub fn linked_pair_with(
    dir: &Path,
    mac1_flags: &[&str],
    mac2_flags: &[&str],
) -> (NodeProc, NodeProc) {
    let (p1, p2) = (free_port(), free_port());
    let (f1, f2) = (dir.join("mac1_peers.json"), dir.join("mac2_peers.json"));
    write_peer_file(&f1, &[("mac2", format!("127.0.0.1:{p2}"))]);
    write_peer_file(&f2, &[("mac1", format!("127.0.0.1:{p1}"))]);
    let mac1 = NodeProc::start_with(dir, "mac1", p1, free_port(), &f1, mac1_flags);
    let mac2 = NodeProc::start_with(dir, "mac2", p2, free_port(), &f2, mac2_flags);
    wait_until(
        Duration::from_secs(3),
        "the link between mac1 and mac2",
        || mac1.peer_up("mac2") && mac2.peer_up("mac1"),
    );
    (mac1, mac2)
}

/// Best-effort flush for messages printed as test figures.
pub fn figure(line: &str) {
    println!("FIGURE {line}");
    let _ = std::io::stdout().flush();
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}
