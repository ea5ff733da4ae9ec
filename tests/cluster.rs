//! Real `tensorlink-node` processes on loopback, wired by peer files in the
//! seed's format: linking, losing and regaining a peer, following peer file
//! edits, and the command line's promises.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    figure, free_port, get_json, linked_pair_with, wait_until, write_peer_file, NodeProc,
};

fn node() -> Command {
    Command::new(common::node_bin())
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

#[test]
fn two_nodes_link_drop_and_relink() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let (fa, fb) = (
        dir.path().join("mac1_peers.json"),
        dir.path().join("mac2_peers.json"),
    );
    write_peer_file(&fa, &[("mac2", addr(pb))]);
    write_peer_file(&fb, &[("mac1", addr(pa))]);

    let started = Instant::now();
    let a = NodeProc::start(dir.path(), "mac1", pa, free_port(), &fa);
    let mut b = NodeProc::start(dir.path(), "mac2", pb, free_port(), &fb);
    let both = |n: &NodeProc| {
        let ids = n.topology_nodes();
        ids.contains(&"mac1".to_owned()) && ids.contains(&"mac2".to_owned())
    };
    wait_until(
        Duration::from_secs(2),
        "both /topology to list both nodes",
        || both(&a) && both(&b),
    );
    let linked = started.elapsed();
    figure(&format!(
        "link: both /topology list both {linked:?} after the first process was spawned"
    ));
    assert!(linked <= Duration::from_secs(2));

    // Capabilities travel in the handshake: each node shows the other's own figures.
    let topo = a.topology();
    assert_eq!(topo["active_node_id"], "mac1");
    assert_ne!(topo["nodes"]["mac2"]["model"], "mac2 from the peer file");
    assert_eq!(topo["peer_graph"]["mac1"][0]["to_id"], "mac2");
    assert_eq!(a.peer("mac2").unwrap()["capabilities_from"], "handshake");

    b.kill();
    let lost = wait_until(
        Duration::from_secs(3),
        "mac1 to drop the link to mac2",
        || !a.topology_nodes().contains(&"mac2".to_owned()),
    );
    figure(&format!(
        "lost peer: mac1 dropped mac2 {lost:?} after kill -9"
    ));
    assert_eq!(a.peer("mac2").unwrap()["state"], "connecting");

    b.launch(&[]); // returns once mac2's API answers; its node listener is bound before that
    let back = Instant::now();
    wait_until(Duration::from_secs(1), "both links up again", || {
        a.peer_up("mac2") && b.peer_up("mac1")
    });
    let relinked = back.elapsed();
    figure(&format!(
        "returning peer: linked again {relinked:?} after mac2's listener was back"
    ));
    assert_eq!(a.peer("mac2").unwrap()["links"], 2);
    let log = a.log_text();
    assert_eq!(
        log.matches("peer down").count(),
        1,
        "one down line per event:\n{log}"
    );
    assert_eq!(
        log.matches("peer up").count(),
        2,
        "one up line per event:\n{log}"
    );
}

#[test]
fn peer_file_edits_are_followed_and_broken_edits_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let (fa, fb, fc) = (
        dir.path().join("a.json"),
        dir.path().join("b.json"),
        dir.path().join("c.json"),
    );
    write_peer_file(&fa, &[("b", addr(pb))]);
    write_peer_file(&fb, &[("a", addr(pa))]);
    write_peer_file(&fc, &[]);
    let a = NodeProc::start(dir.path(), "a", pa, free_port(), &fa);
    let _b = NodeProc::start(dir.path(), "b", pb, free_port(), &fb);
    let c = NodeProc::start(dir.path(), "c", pc, free_port(), &fc);
    wait_until(Duration::from_secs(2), "a linked to b", || a.peer_up("b"));

    write_peer_file(&fa, &[("b", addr(pb)), ("c", addr(pc))]);
    let seen = wait_until(
        Duration::from_secs(1),
        "a to link to the added node c",
        || a.peer_up("c"),
    );
    figure(&format!(
        "peer file: added node linked {seen:?} after the edit"
    ));
    // c does not list a, but a's topology shows the whole cluster it can see.
    assert!(a.topology_nodes().contains(&"c".to_owned()));
    assert!(!c.topology_nodes().contains(&"a".to_owned()));

    // A broken edit: the last good set stays, and one error names file and problem.
    std::fs::write(&fa, r#"{"peers": {"b": {"address": "127.0.0.1:"#).unwrap();
    wait_until(
        Duration::from_secs(2),
        "the error about the broken file",
        || a.log_text().contains("keeping the last good set"),
    );
    std::fs::write(&fa, r#"{"peers": {"b": {"address": "127.0.0.1:99999"}}}"#).unwrap();
    wait_until(
        Duration::from_secs(2),
        "the error about the bad port",
        || a.log_text().contains("port 99999 is out of range"),
    );
    assert!(
        a.peer_up("b") && a.peer_up("c"),
        "last good set kept: {}",
        a.peers()
    );

    // A good edit afterwards: c removed, b kept (its link untouched).
    write_peer_file(&fa, &[("b", addr(pb))]);
    wait_until(Duration::from_secs(1), "c to be removed", || {
        a.peer("c").is_none()
    });
    assert_eq!(
        a.peer("b").unwrap()["links"],
        1,
        "b's link was not disturbed"
    );
    let log = a.log_text();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 2, "one error per broken edit:\n{log}");
    assert!(
        errors[0].contains("a.json") && errors[0].contains("not valid JSON"),
        "{}",
        errors[0]
    );
    assert!(errors[1].contains("peer `b`"), "{}", errors[1]);

    // Deleting the file is a broken edit too, and so is one that cannot be read
    // (here a directory in its place: root reads any file).
    std::fs::remove_file(&fa).unwrap();
    wait_until(
        Duration::from_secs(2),
        "the error about the missing file",
        || a.log_text().contains("cannot read peer file"),
    );
    std::fs::create_dir(&fa).unwrap();
    wait_until(
        Duration::from_secs(2),
        "the error about the unreadable file",
        || {
            a.log_text()
                .lines()
                .filter(|l| l.contains("cannot read peer file"))
                .count()
                == 2
        },
    );
    assert!(a.peer_up("b"), "last good set kept: {}", a.peers());
    // (A half-written file is the broken JSON above: what a reader sees mid-write.)
    let errors = a.log_text().lines().filter(|l| l.contains("ERROR")).count();
    assert_eq!(
        errors,
        4,
        "one error per fault, none for the good edits:\n{}",
        a.log_text()
    );
}

#[test]
fn listens_on_loopback_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.json");
    write_peer_file(&f, &[]);
    let (np, ap) = (free_port(), free_port());
    let _n = NodeProc::start(dir.path(), "solo", np, ap, &f);
    let listening = listening_addresses();
    for port in [np, ap] {
        let local: Vec<_> = listening.iter().filter(|(_, p)| *p == port).collect();
        assert!(!local.is_empty(), "port {port} not listening");
        assert!(
            local.iter().all(|(ip, _)| ip == "0100007F"),
            "port {port} bound beyond loopback: {local:?}"
        );
    }
}

/// Listening IPv4 sockets from /proc/net/tcp as (hex address, port).
fn listening_addresses() -> Vec<(String, u16)> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(&"0A")) = (cols.get(1), cols.get(3)) else {
            continue;
        };
        let Some((ip, port)) = local.split_once(':') else {
            continue;
        };
        if let Ok(port) = u16::from_str_radix(port, 16) {
            out.push((ip.to_owned(), port));
        }
    }
    out
}

#[test]
fn command_line_errors_are_clear() {
    let help = node().arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--node-id",
        "--node-port",
        "--chatgpt-api-port",
        "--discovery-module",
        "--discovery-config-path",
        "--disable-tui",
        "--node-host",
        "--api-host",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}");
    }

    let udp = node()
        .args(["--discovery-module", "udp", "--discovery-config-path", "x"])
        .output()
        .unwrap();
    assert_eq!(udp.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&udp.stderr).contains("only `manual` discovery is supported"));

    let bad = node()
        .args(["--node-port", "seventy", "--discovery-config-path", "x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));

    let dir = tempfile::tempdir().unwrap();
    let missing = node()
        .args(["--discovery-config-path"])
        .arg(dir.path().join("nope.json"))
        .args([
            "--node-port",
            &free_port().to_string(),
            "--chatgpt-api-port",
            &free_port().to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.json"));

    // A port already in use: named, with the flag that moves it.
    let f = dir.path().join("p.json");
    write_peer_file(&f, &[]);
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port();
    let clash = node()
        .arg("--discovery-config-path")
        .arg(&f)
        .args([
            "--node-port",
            &taken.to_string(),
            "--chatgpt-api-port",
            &free_port().to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(clash.status.code(), Some(1));
    let err = String::from_utf8_lossy(&clash.stderr);
    assert!(
        err.contains(&format!("port {taken}")) && err.contains("--node-port"),
        "{err}"
    );
}

#[test]
fn sigterm_stops_the_node_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.json");
    write_peer_file(&f, &[("ghost", addr(free_port()))]);
    let mut n = NodeProc::start(dir.path(), "solo", free_port(), free_port(), &f);
    let status = n.terminate();
    assert_eq!(status.code(), Some(0), "{}", n.log_text());
    assert!(n.log_text().contains("stopped cleanly"));
}

#[test]
fn a_peer_file_pointing_at_the_wrong_node_is_refused_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pc) = (free_port(), free_port());
    let (fa, fc) = (dir.path().join("a.json"), dir.path().join("c.json"));
    // a believes node b listens where c actually does.
    write_peer_file(&fa, &[("b", addr(pc))]);
    write_peer_file(&fc, &[]);
    let a = NodeProc::start(dir.path(), "a", pa, free_port(), &fa);
    let c = NodeProc::start(dir.path(), "c", pc, free_port(), &fc);
    wait_until(Duration::from_secs(3), "a to mark b refused", || {
        a.peer("b").is_some_and(|p| p["state"] == "refused")
    });
    let why = a.peer("b").unwrap()["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        why.contains("wrong_node") && why.contains("this is `c`"),
        "{why}"
    );
    wait_until(
        Duration::from_secs(3),
        "c to log the misdirected dial",
        || {
            c.log_text()
                .contains("dialed this node expecting `b`, but this is `c`")
        },
    );
    let log = a.log_text();
    assert_eq!(
        log.matches("refusing link").count(),
        1,
        "logged once, not per retry:\n{log}"
    );
    assert!(c.topology_nodes() == ["c"] && a.topology_nodes() == ["a"]);
}

#[test]
fn the_log_folder_is_kept_bounded_and_the_node_follows_its_own_log() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path();
    // What launchd left: a tunnel failing for days, and the node's own log
    // (NodeProc appends the node's stderr to <logs>/mac1.log, as launchd does).
    let tunnel = logs.join("tunnel-mac2.log");
    std::fs::write(&tunnel, vec![b'x'; 5000]).unwrap();
    std::fs::write(logs.join("mac1.log"), vec![b'y'; 5000]).unwrap();
    let dir_arg = logs.to_str().unwrap();
    let (a, mut b) = linked_pair_with(
        logs,
        &["--log-dir", dir_arg, "--log-max-bytes", "4096"],
        &["--allow-sleep"],
    );
    let rotated = |name: &str| logs.join(format!("{name}.1"));
    wait_until(
        Duration::from_secs(5),
        "both large logs to be rotated",
        || rotated("tunnel-mac2.log").exists() && rotated("mac1.log").exists(),
    );
    assert_eq!(
        std::fs::read(rotated("tunnel-mac2.log")).unwrap().len(),
        5000
    );
    assert!(
        !tunnel.exists(),
        "the tunnel's next start opens a fresh file"
    );

    // The sleep policy, as /cluster shows it (Linux has no power assertions).
    wait_until(
        Duration::from_secs(5),
        "mac1 to count its linked peer",
        || {
            get_json(a.api_port, "/cluster").is_some_and(|c| {
                c["power"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("1 linked peer(s)"))
            })
        },
    );
    let power = &get_json(a.api_port, "/cluster").unwrap()["power"];
    assert_eq!(power["preventing_sleep"], false);
    assert_eq!(power["allow_sleep"], false);
    assert!(
        power["error"]
            .as_str()
            .unwrap_or("")
            .contains("not available"),
        "{power}"
    );
    let theirs = &get_json(b.api_port, "/cluster").unwrap()["power"];
    assert_eq!(theirs["allow_sleep"], true);
    assert!(
        theirs["reason"].as_str().unwrap().contains("--allow-sleep"),
        "{theirs}"
    );

    // After the rotation the node writes to a new mac1.log, not the old one.
    b.kill();
    wait_until(Duration::from_secs(5), "mac1 to log the lost peer", || {
        a.log_text().contains("peer down")
    });
    let old = std::fs::read_to_string(rotated("mac1.log")).unwrap();
    assert!(!old.contains("peer down"), "{old}");
    assert!(a.log_text().len() < 4096);
}
