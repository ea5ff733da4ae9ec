//! Golden tests of the plan: the seed's cluster yields exactly the seed's tunnel
//! and peer files; the three-Mac cluster has goldens for every node; every plist
//! reads back as the model it was written from. `UPDATE_GOLDEN=1 cargo test`
//! rewrites the golden files after an intended change (review the diff).

use std::path::{Path, PathBuf};

use tensorlink_installer::cluster::Cluster;
use tensorlink_installer::plan::{Mode, Plan};

mod common;
use tensorlink_launchd::LaunchAgent;

const HOME: &str = "/Users/me";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load(example: &str) -> Cluster {
    let path = repo().join("examples").join(example);
    Cluster::parse(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
}

fn plan_for(cluster: &Cluster, id: &str) -> Plan {
    common::plan_in(cluster, id, Path::new(HOME), Path::new("/"), Mode::Agents)
}

/// Compares `actual` with the golden file, or rewrites it with UPDATE_GOLDEN=1.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing golden file {}; run with UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert_eq!(actual, expected, "{name} differs from its golden file");
}

/// The seed's own peer files, verbatim from bidirectional-ssh-tunnel-setup.md.
const SEED_MAC1_PEERS: &str = r#"{"peers": {"mac2": {"address": "127.0.0.1:50052", "device_capabilities": {"model": "Mac #2", "chip": "Apple Silicon", "memory": 32768, "flops": {"fp32": 10.0, "fp16": 20.0, "int8": 40.0}}}}}"#;
const SEED_MAC2_PEERS: &str = r#"{"peers": {"mac1": {"address": "127.0.0.1:50060", "device_capabilities": {"model": "Mac #1", "chip": "Apple Silicon", "memory": 32768, "flops": {"fp32": 10.0, "fp16": 20.0, "int8": 40.0}}}}}"#;

/// Each peer's id and address. The node's own parser reads these files in
/// end_to_end.rs; here they are compared as the JSON the seed wrote.
fn addresses(json: &str) -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["peers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, p)| (id.clone(), p["address"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn seed_cluster_gives_the_seed_tunnel_and_peer_files() {
    let cluster = load("seed-cluster.toml");
    let mac1 = plan_for(&cluster, "mac1");
    let mac2 = plan_for(&cluster, "mac2");

    // Only mac1 opens the tunnel, and its core is the seed's command.
    assert_eq!(mac1.tunnels.len(), 1);
    assert!(mac2.tunnels.is_empty());
    let args = &mac1.tunnels[0].agent.agent.program_arguments;
    let joined = args.join(" ");
    assert!(
        joined.starts_with(
            "/usr/bin/ssh -tt -e none -L 50052:localhost:50051 -R 50060:localhost:50060 "
        ),
        "{joined}"
    );
    assert!(
        joined.ends_with(" remoteuser@192.168.2.1 exec sleep 2147483647"),
        "{joined}"
    );
    golden("seed-mac1-tunnel-args.txt", &(args.join("\n") + "\n"));

    // The derived peer files point where the seed's hand-written ones do.
    assert_eq!(addresses(&mac1.peer_file), addresses(SEED_MAC1_PEERS));
    assert_eq!(addresses(&mac2.peer_file), addresses(SEED_MAC2_PEERS));
    golden("seed-mac1-peers.json", &mac1.peer_file);
    golden("seed-mac2-peers.json", &mac2.peer_file);

    // The node agent runs the seed's exo command line.
    let node = mac1.node_agent.agent.program_arguments[1..].join(" ");
    assert_eq!(
        node,
        "--node-id mac1 --node-port 50060 --chatgpt-api-port 52416 --discovery-module manual \
         --discovery-config-path /Users/me/Library/Application Support/tensorlink/peers.json --disable-tui \
         --log-dir /Users/me/Library/Logs/tensorlink \
         --models-dir /Users/me/Library/Application Support/tensorlink/models"
    );
    for p in [&mac1, &mac2] {
        for a in p.agents() {
            golden(
                &format!("seed-{}-{}.plist", p.node.id, a.label),
                &String::from_utf8(a.agent.to_xml().unwrap()).unwrap(),
            );
        }
    }
}

#[test]
fn system_mode_gives_launch_daemons_that_run_as_the_user() {
    let cluster = load("seed-cluster.toml");
    let p = common::plan_in(
        &cluster,
        "mac1",
        Path::new(HOME),
        Path::new("/"),
        Mode::Daemons,
    );
    assert_eq!(p.domain.to_string(), "system");
    for a in p.agents() {
        assert!(
            a.plist_path.starts_with("/Library/LaunchDaemons"),
            "{}",
            a.plist_path.display()
        );
        assert_eq!(a.agent.user_name.as_deref(), Some("me"));
        golden(
            &format!("seed-mac1-system-{}.plist", a.label),
            &String::from_utf8(a.agent.to_xml().unwrap()).unwrap(),
        );
    }
    // The same jobs otherwise: only where they live and whom they run as differ.
    let agents = plan_for(&cluster, "mac1");
    let mut daemon = p.node_agent.agent.clone();
    daemon.user_name = None;
    daemon.environment_variables.remove("HOME");
    assert_eq!(daemon, agents.node_agent.agent);
}

#[test]
fn three_mac_cluster_has_goldens_for_every_node() {
    let cluster = load("three-macs.toml");
    for id in ["mac1", "mac2", "mac3"] {
        let p = plan_for(&cluster, id);
        golden(&format!("three-{id}-peers.json"), &p.peer_file);
        for a in p.agents() {
            golden(
                &format!("three-{id}-{}.plist", a.label),
                &String::from_utf8(a.agent.to_xml().unwrap()).unwrap(),
            );
        }
        let ports: Vec<String> = p
            .ports
            .iter()
            .map(|u| format!("{} {}", u.port, u.what))
            .collect();
        golden(&format!("three-{id}-ports.txt"), &(ports.join("\n") + "\n"));
    }
    // Both ends of every link agree: what one side forwards, the other's peer file uses.
    let mac1 = plan_for(&cluster, "mac1");
    let mac3 = plan_for(&cluster, "mac3");
    assert_eq!(
        addresses(&mac1.peer_file),
        vec![
            ("mac2".into(), "127.0.0.1:50052".into()),
            ("mac3".into(), "127.0.0.1:50071".into())
        ]
    );
    assert_eq!(
        addresses(&mac3.peer_file),
        vec![
            ("mac1".into(), "127.0.0.1:50061".into()),
            ("mac2".into(), "127.0.0.1:50053".into())
        ]
    );
}

#[test]
fn every_plist_reads_back_as_its_model() {
    for (example, ids) in [
        ("seed-cluster.toml", &["mac1", "mac2"][..]),
        ("three-macs.toml", &["mac1", "mac2", "mac3"][..]),
    ] {
        let cluster = load(example);
        for id in ids {
            for a in plan_for(&cluster, id).agents() {
                let xml = a.agent.to_xml().unwrap();
                assert_eq!(
                    LaunchAgent::from_bytes(&xml).unwrap(),
                    a.agent,
                    "{example} {id} {}",
                    a.label
                );
                // Absolute paths only: launchd searches no PATH.
                assert!(a.agent.program_arguments[0].starts_with('/'));
                assert!(a.plist_path.starts_with("/Users/me/Library/LaunchAgents"));
            }
        }
    }
}

#[test]
fn the_clusters_model_reaches_every_node_agent() {
    let arguments =
        |cluster: &Cluster, id: &str| plan_for(cluster, id).node_agent.agent.program_arguments;
    let after = |args: &[String], flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].clone())
    };
    // A path from the home directory, and its sha256 lowercased as the node
    // prints its own.
    let three = load("three-macs.toml");
    for id in ["mac1", "mac2", "mac3"] {
        let args = arguments(&three, id);
        assert_eq!(
            after(&args, "--model").as_deref(),
            Some("/Users/me/Models/Llama-3.3-70B-Instruct-Q4_K_M.gguf"),
            "{id}"
        );
        let sha = after(&args, "--model-sha256").unwrap();
        assert!(sha.starts_with("9f2c5b6e") && sha.len() == 64, "{sha}");
    }
    // A name is found in the models folder, which every node agent states.
    let text = format!(
        "[model]\nfile = \"Qwen2.5-7B-Instruct-Q8_0.gguf\"\n{}",
        common::SEED_CLUSTER
    );
    let named = Cluster::parse(&text, Path::new("cluster.toml")).unwrap();
    let args = arguments(&named, "mac2");
    let models = "/Users/me/Library/Application Support/tensorlink/models";
    assert_eq!(after(&args, "--models-dir").as_deref(), Some(models));
    assert_eq!(
        after(&args, "--model"),
        Some(format!("{models}/Qwen2.5-7B-Instruct-Q8_0.gguf"))
    );
    assert_eq!(after(&args, "--model-sha256"), None);
    // Without [model], no --model: the node serves the folder's lone file.
    let seed = load("seed-cluster.toml");
    assert_eq!(after(&arguments(&seed, "mac1"), "--model"), None);
}
