//! A node whose model file is missing fetches it from a linked peer
//! (docs/PROTOCOL.md §9.8–9.9) and serves it without a restart: through the
//! seed's ssh tunnel from a real node, and from a peer in this process that
//! sends wrong bytes, stops answering, or goes away mid-fetch.

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::model::{cluster_view, test_model, wait_ring};
use common::sshd::Sshd;
use common::{free_port, post_json, wait_until, write_peer_file, NodeProc};
use serde_json::{json, Value};
use tensorlink::capabilities::DeviceCapabilities;
use tensorlink::inference::fingerprint::sha256_file;
use tensorlink::net::socket;
use tensorlink::protocol::{ErrorCode, Hello, Limits, Message};
use tensorlink::server::{self, Handler, ServerConfig};
use tensorlink::topology::Topology;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

fn chat(port: u16) -> Value {
    let (status, body) = post_json(
        port,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Name three colours."}],
                "temperature": 0, "max_tokens": 12}),
    );
    assert_eq!(status, 200, "{body}");
    body
}

fn sha256(path: &Path) -> String {
    sha256_file(path).unwrap()
}

#[test]
fn a_node_without_the_model_fetches_it_through_the_tunnel_and_answers_as_one_node_does() {
    let model = test_model();
    let want = sha256(&model);
    let name = model.file_name().unwrap().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(&dir.path().join("sshd"));
    let (mac1, mac2) = (free_port(), free_port());
    let (local, remote) = (free_port(), free_port());
    let _tunnel = sshd.seed_tunnel(dir.path(), (mac1, mac2), (local, remote));
    let (f1, f2) = (dir.path().join("p1.json"), dir.path().join("p2.json"));
    write_peer_file(&f1, &[("mac2", format!("127.0.0.1:{local}"))]);
    write_peer_file(&f2, &[("mac1", format!("127.0.0.1:{remote}"))]);
    let flags = ["--ctx-size", "256"];
    let node1 = NodeProc::start_with(
        dir.path(),
        "mac1",
        mac1,
        free_port(),
        &f1,
        &[&["--model", model.to_str().unwrap()], &flags[..]].concat(),
    );
    // Alone, mac1 runs every layer: the answer to compare with.
    let alone = chat(node1.api_port);
    assert_eq!(alone["tensorlink"]["ring"].as_array().unwrap().len(), 1);

    let models = dir.path().join("mac2-models");
    std::fs::create_dir(&models).unwrap();
    let node2 = NodeProc::start_with(
        dir.path(),
        "mac2",
        mac2,
        free_port(),
        &f2,
        &[
            &["--models-dir", models.to_str().unwrap(), "--model", name][..],
            &["--model-sha256", &want],
            &flags,
        ]
        .concat(),
    );
    let took = wait_until(
        Duration::from_secs(60),
        "mac2 to fetch and load the model",
        || cluster_view(&node2)["model"]["sha256"] == want.as_str(),
    );
    let fetched = models.join(name);
    assert_eq!(sha256(&fetched), want);
    assert!(!models.join(format!("{name}.partial")).exists());
    let view = cluster_view(&node2);
    let size = std::fs::metadata(&model).unwrap().len();
    assert_eq!(view["fetch"]["state"], "done", "{view}");
    assert_eq!(view["fetch"]["from"], "mac1", "{view}");
    assert_eq!(view["fetch"]["bytes"], size, "{view}");
    common::figure(&format!(
        "model fetch through the ssh tunnel: {} MiB in {took:.1?} (start to model loaded)",
        size >> 20
    ));

    let log = node2.log_text();
    assert!(
        log.contains("fetched ") && log.contains("from mac1") && log.contains("model ready"),
        "{log}"
    );

    // Served at once, no restart: the same answer, now over both nodes.
    let nodes = [node1, node2];
    wait_ring(&nodes);
    let split = chat(nodes[1].api_port);
    assert_eq!(
        split["tensorlink"]["ring"].as_array().unwrap().len(),
        2,
        "{split}"
    );
    assert_eq!(split["tensorlink"]["tokens"], alone["tensorlink"]["tokens"]);
}

/// A peer in this process that offers `bytes` as model `name` and can be
/// told to misbehave.
struct Fake {
    name: String,
    bytes: Arc<Vec<u8>>,
    /// The sha256 it states: that of `bytes`, whatever it sends.
    sha256: String,
    /// Sends this byte flipped.
    flip_at: Option<u64>,
    /// Reads from here on are never answered (until the fake stops).
    hang_from: Option<u64>,
    /// Stops serving, closing its links, once it has sent this many bytes.
    close_after: Option<u64>,
    /// The lowest offset asked for: where the fetch (re)started.
    first_asked: AtomicU64,
    sent: AtomicU64,
    stop: CancellationToken,
}

impl Fake {
    fn new(name: &str, bytes: Arc<Vec<u8>>, sha256: &str) -> Fake {
        Fake {
            name: name.into(),
            bytes,
            sha256: sha256.into(),
            flip_at: None,
            hang_from: None,
            close_after: None,
            first_asked: AtomicU64::new(u64::MAX),
            sent: AtomicU64::new(0),
            stop: CancellationToken::new(),
        }
    }

    async fn answer(&self, request: Message) -> Message {
        match request {
            Message::HealthCheck => Message::HealthStatus {
                healthy: true,
                status: "ok".into(),
            },
            Message::CollectTopology { .. } => Message::Topology(Topology::default()),
            Message::QueryModelFile { .. } => Message::ModelFileInfo {
                name: self.name.clone(),
                sha256: self.sha256.clone(),
                size: self.bytes.len() as u64,
            },
            Message::ReadModelFile { offset, len, .. } => {
                self.first_asked.fetch_min(offset, Ordering::Relaxed);
                if self.hang_from.is_some_and(|h| offset >= h) {
                    self.stop.cancelled().await;
                    return Message::error(ErrorCode::Unavailable, "stopped");
                }
                let end = offset + len as u64;
                let mut data = self.bytes[offset as usize..end as usize].to_vec();
                if let Some(at) = self.flip_at.filter(|at| (offset..end).contains(at)) {
                    data[(at - offset) as usize] ^= 0x01;
                }
                let sent = self.sent.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
                if self.close_after.is_some_and(|c| sent >= c) {
                    self.stop.cancel();
                }
                Message::ModelBytes {
                    offset,
                    data: data.into(),
                }
            }
            other => Message::error(
                ErrorCode::UnknownType,
                format!("the fake does not answer {:?}", other.frame_type()),
            ),
        }
    }
}

impl Handler for Fake {
    fn handle(&self, request: Message) -> impl Future<Output = Message> + Send + '_ {
        self.answer(request)
    }
}

/// Serves `fake` as node "mac1" on `port` until its stop token is cancelled.
fn serve(rt: &tokio::runtime::Runtime, port: u16, fake: Arc<Fake>) {
    let hello = Hello {
        node_id: "mac1".into(),
        expected_peer: String::new(),
        limits: Limits::default(),
        capabilities: DeviceCapabilities::unknown("mac1"),
    };
    let stop = fake.stop.clone();
    // The port of a fake that just stopped is free once its listener closes.
    let mut listener = None;
    wait_until(
        Duration::from_secs(10),
        "the fake's port to be free",
        || {
            listener = rt
                .block_on(async { socket::listen(([127, 0, 0, 1], port).into(), 16) })
                .ok();
            listener.is_some()
        },
    );
    let listener = listener.expect("listening");
    rt.spawn(server::serve(
        listener,
        fake,
        hello,
        ServerConfig::default(),
        stop,
    ));
}

/// The flags of a node that wants `name` (sha256 `want`) in `models`.
fn wanting(models: &Path, name: &str, want: &str) -> Vec<String> {
    ["--models-dir", models.to_str().unwrap(), "--model", name]
        .into_iter()
        .chain(["--model-sha256", want])
        .map(String::from)
        .collect()
}

/// A node "mac2" that wants `name` (sha256 `want`) in `models` and has the
/// fake on `port` as its one peer.
fn fetching_node(dir: &Path, models: &Path, name: &str, want: &str, port: u16) -> NodeProc {
    let peers = dir.join("mac2_peers.json");
    write_peer_file(&peers, &[("mac1", format!("127.0.0.1:{port}"))]);
    let flags = wanting(models, name, want);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    NodeProc::start_with(dir, "mac2", free_port(), free_port(), &peers, &flags)
}

/// An empty models folder in `dir`, and `len` seeded random bytes for a fake
/// to offer with their sha256 (as `sha256sum` would print it, from a file).
fn random_file(dir: &Path, seed: u64, len: u64) -> (PathBuf, Vec<u8>, String) {
    let models = dir.join("models");
    std::fs::create_dir(&models).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
    let truth = dir.join("truth.bin");
    std::fs::write(&truth, &bytes).unwrap();
    let want = sha256(&truth);
    (models, bytes, want)
}

fn fetch_view(node: &NodeProc) -> Value {
    cluster_view(node)["fetch"].clone()
}

#[test]
fn wrong_bytes_from_a_peer_are_caught_by_the_hash_and_nothing_takes_the_models_name() {
    let dir = tempfile::tempdir().unwrap();
    let (models, bytes, want) = random_file(dir.path(), 7, 24 * MIB);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let port = free_port();
    let fake = Arc::new(Fake {
        flip_at: Some(13 * MIB + 5),
        ..Fake::new("x.gguf", Arc::new(bytes), &want)
    });
    serve(&rt, port, fake.clone());
    let node = fetching_node(dir.path(), &models, "x.gguf", &want, port);
    // One view, taken while it waits to try again (the next try clears it).
    let mut view = Value::Null;
    wait_until(
        Duration::from_secs(30),
        "mac2 to find the wrong bytes",
        || {
            view = cluster_view(&node);
            view["fetch"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("sent wrong bytes"))
        },
    );
    let error = view["fetch"]["error"].as_str().unwrap_or_default();
    assert!(error.contains(&want) && error.contains("mac1"), "{view}");
    assert!(
        !models.join("x.gguf").exists(),
        "the bad copy took the model's name"
    );
    assert!(
        node.log_text().contains("the partial file was deleted"),
        "{}",
        node.log_text()
    );
    // It serves no model meanwhile, and says why.
    assert!(view["model"].is_null(), "{view}");
    assert!(
        view["problem"]
            .as_str()
            .is_some_and(|p| p.contains("x.gguf is missing")),
        "{view}"
    );
    fake.stop.cancel();
}

#[test]
fn a_fetch_resumes_after_a_restart_and_after_a_lost_link_and_then_serves() {
    let model = test_model();
    let bytes = Arc::new(std::fs::read(&model).unwrap());
    let size = bytes.len() as u64;
    let want = sha256(&model);
    let name = "smollm2.gguf";
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    let partial = models.join(format!("{name}.partial"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port = free_port();

    // 1. The peer answers the first 40 MiB and no more; the node is stopped
    //    there, as by a reboot.
    let first = Arc::new(Fake {
        hang_from: Some(40 * MIB),
        ..Fake::new(name, bytes.clone(), &want)
    });
    serve(&rt, port, first.clone());
    let mut node = fetching_node(dir.path(), &models, name, &want, port);
    wait_until(Duration::from_secs(30), "40 MiB on disk", || {
        fetch_view(&node)["bytes"] == 40 * MIB
    });
    let view = fetch_view(&node);
    assert_eq!(view["state"], "fetching", "{view}");
    assert_eq!(view["total"], size, "{view}");
    node.terminate();
    first.stop.cancel();
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 40 * MIB);
    assert_eq!(first.first_asked.load(Ordering::Relaxed), 0);

    // 2. Started again, it goes on from 40 MiB; the peer goes away after
    //    sending 16 MiB more (and the reads it had taken in by then).
    let second = Arc::new(Fake {
        close_after: Some(16 * MIB),
        ..Fake::new(name, bytes.clone(), &want)
    });
    serve(&rt, port, second.clone());
    let flags = wanting(&models, name, &want);
    node.launch(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    wait_until(Duration::from_secs(30), "the peer to go away", || {
        second.stop.is_cancelled()
    });
    assert_eq!(second.first_asked.load(Ordering::Relaxed), 40 * MIB);
    // The attempt has ended (it waits to try again); what it kept is on disk.
    wait_until(Duration::from_secs(30), "the attempt to end", || {
        fetch_view(&node)["error"].is_string()
    });
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept > 40 * MIB, "the second peer's bytes were kept: {kept}");

    // 3. Back, it is asked for the rest only, and the node serves the model.
    let third = Arc::new(Fake::new(name, bytes.clone(), &want));
    serve(&rt, port, third.clone());
    wait_until(
        Duration::from_secs(60),
        "the model to be fetched and loaded",
        || cluster_view(&node)["model"]["sha256"] == want.as_str(),
    );
    let resumed = third.first_asked.load(Ordering::Relaxed);
    assert_eq!(
        resumed, kept,
        "the third peer is asked from where the copy stopped"
    );
    assert_eq!(sha256(&models.join(name)), want);
    assert!(!partial.exists());
    // The fake runs no layers: once it is gone the node answers alone.
    third.stop.cancel();
    wait_until(
        Duration::from_secs(10),
        "the fake's link to go down",
        || !node.peer_up("mac1"),
    );
    let answer = chat(node.api_port);
    assert_eq!(answer["tensorlink"]["ring"].as_array().unwrap().len(), 1);
}

#[test]
fn a_partial_file_is_resumed_only_for_the_file_it_was_begun_for() {
    let dir = tempfile::tempdir().unwrap();
    let (models, bytes, want) = random_file(dir.path(), 11, 12 * MIB);
    let bytes = Arc::new(bytes);
    let (partial, claim) = (
        models.join("x.gguf.partial"),
        models.join("x.gguf.partial.sha256"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Begun for another file; then one longer than this file, said to be for it.
    for (junk, claimed) in [(8 * MIB, "0".repeat(64)), (13 * MIB, want.clone())] {
        std::fs::write(&partial, vec![0x77u8; junk as usize]).unwrap();
        std::fs::write(&claim, &claimed).unwrap();
        let port = free_port();
        let fake = Arc::new(Fake::new("x.gguf", bytes.clone(), &want));
        serve(&rt, port, fake.clone());
        let node = fetching_node(dir.path(), &models, "x.gguf", &want, port);
        // Random bytes are no GGUF: the copy is whole, then does not load.
        let mut view = Value::Null;
        wait_until(Duration::from_secs(30), "the copy to be whole", || {
            view = fetch_view(&node);
            view["state"] == "failed"
        });
        assert_eq!(view["bytes"], 12 * MIB, "{view}");
        assert_eq!(fake.first_asked.load(Ordering::Relaxed), 0, "{view}");
        assert_eq!(sha256(&models.join("x.gguf")), want);
        assert!(!partial.exists() && !claim.exists());
        std::fs::remove_file(models.join("x.gguf")).unwrap();
        drop(node);
        fake.stop.cancel();
    }
}
