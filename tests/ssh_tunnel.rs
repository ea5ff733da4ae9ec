//! The seed's layout for real: two nodes that reach each other only through an
//! `ssh -N -L … -R …` tunnel to an sshd started on 127.0.0.1 with throw-away
//! keys. On one machine the `-R` port cannot equal mac1's own node port, so
//! every port is shifted to a free one; the shape is the seed's.

mod common;

use std::time::{Duration, Instant};

use common::sshd::Sshd;
use common::{figure, free_port, wait_until, write_peer_file, NodeProc};

#[test]
fn two_nodes_link_through_a_real_ssh_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path());
    // Seed: mac1 node 50060, mac2 node 50051, -L 50052:localhost:50051, -R 50060:localhost:50060.
    let (p1, p2, l1, r1) = (free_port(), free_port(), free_port(), free_port());
    let (f1, f2) = (
        dir.path().join("mac1_peers.json"),
        dir.path().join("mac2_peers.json"),
    );
    write_peer_file(&f1, &[("mac2", format!("127.0.0.1:{l1}"))]);
    write_peer_file(&f2, &[("mac1", format!("127.0.0.1:{r1}"))]);

    let tunnel = sshd.seed_tunnel(dir.path(), (p1, p2), (l1, r1));

    let start = Instant::now();
    let mac1 = NodeProc::start(dir.path(), "mac1", p1, free_port(), &f1);
    let mut mac2 = NodeProc::start(dir.path(), "mac2", p2, free_port(), &f2);
    let both = |n: &NodeProc| n.topology_nodes() == ["mac1", "mac2"];
    wait_until(
        Duration::from_secs(3),
        "both /topology to list both through the tunnel",
        || both(&mac1) && both(&mac2),
    );
    figure(&format!(
        "ssh tunnel: both /topology list both {:?} after start",
        start.elapsed()
    ));
    assert!(mac1.peer("mac2").unwrap()["address"]
        .as_str()
        .unwrap()
        .ends_with(&l1.to_string()));

    // The far node dies: ssh closes the forwarded connection, mac1 notices.
    mac2.kill();
    let lost = wait_until(Duration::from_secs(3), "mac1 to drop mac2", || {
        !mac1.peer_up("mac2")
    });
    figure(&format!(
        "ssh tunnel: mac1 dropped mac2 {lost:?} after kill -9"
    ));
    mac2.launch(&[]);
    let back = wait_until(Duration::from_secs(2), "relink through the tunnel", || {
        mac1.peer_up("mac2") && mac2.peer_up("mac1")
    });
    figure(&format!(
        "ssh tunnel: linked again {back:?} after mac2's listener was back"
    ));

    // The tunnel itself dies and is restarted, as launchd's KeepAlive would.
    drop(tunnel);
    wait_until(
        Duration::from_secs(3),
        "both links to drop with the tunnel",
        || !mac1.peer_up("mac2") && !mac2.peer_up("mac1"),
    );
    let restarted = Instant::now();
    let mut tunnel = sshd.seed_tunnel(dir.path(), (p1, p2), (l1, r1));
    wait_until(
        Duration::from_secs(10),
        "both links back over the new tunnel",
        || {
            assert!(tunnel.is_running(), "ssh exited; see its log");
            mac1.peer_up("mac2") && mac2.peer_up("mac1")
        },
    );
    figure(&format!(
        "ssh tunnel: linked again {:?} after the ssh client was restarted",
        restarted.elapsed()
    ));
    assert!(both(&mac1) && both(&mac2));
}
