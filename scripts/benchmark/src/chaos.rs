//! Faults and soak through the real thing: an sshd on 127.0.0.1, the
//! installer's tunnel command, a far node (the node's real server and request
//! path, with an echo engine so every byte can be checked), and a real
//! `tensorlink-node` on the near side, linked to it through the tunnel (its
//! `-R` end reaching back to the near node's own port).
//!
//! `chaos`: kill -9 the ssh client, kill -9 the far node, restart sshd, and hold
//! the far `-R` port (the stale-session case); everything killed is restarted the
//! way launchd's KeepAlive does, after the agents' ThrottleInterval. The tensor
//! traffic is a client of this process dialing the tunnel's `-L` end; the near
//! node shows the link's own recovery. `soak`: many checksummed round trips of
//! random sizes through the tunnel.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde_json::json;
use tensorlink::net::client::Client;
use tensorlink::protocol::Message;
use tensorlink_installer::plan::THROTTLE_INTERVAL;

use crate::common::sshd::{Sshd, Tunnel};
use crate::common::{free_port, write_peer_file, NodeProc};
use crate::workload::{scratch, Server};
use crate::{ssh, tl, System};

const THROTTLE: Duration = Duration::from_secs(THROTTLE_INTERVAL as u64);
/// Longest a fault may take to heal before the trial counts as not recovered.
const HEAL_LIMIT: Duration = Duration::from_secs(30);
/// Longest a request in flight at a fault may take to end before it counts as hung.
const INFLIGHT_LIMIT: Duration = Duration::from_secs(20);

struct Rig {
    home: PathBuf,
    sshd: Sshd,
    /// None while killed.
    far: Option<Server>,
    far_port: u16,
    tunnel_args: Vec<String>,
    local_port: u16,
    remote_port: u16,
    tunnel: Option<Tunnel>,
    near: NodeProc,
    /// Random bytes the checked payloads are cut from.
    pool: Bytes,
    corrupted: u64,
    /// Last, so it is removed after every process above has been killed.
    _scratch: tempfile::TempDir,
}

impl Rig {
    fn start() -> Result<Rig> {
        let scratch = scratch()?;
        let dir = scratch.path().to_owned();
        let home = dir.join("home with space");
        let sshd = Sshd::start(&dir);
        let far_port = free_port();
        let far = Some(Server::start_on(System::Tensorlink, far_port)?);
        // The near node's port is the one the tunnel's -R end reaches.
        let near_port = free_port();
        let (tunnel_args, local_port, remote_port) =
            ssh::tunnel_command(&sshd, &home, near_port, far_port)?;
        let tunnel = Some(ssh::start_tunnel(&home, &tunnel_args, local_port));
        let peers = dir.join("near_peers.json");
        write_peer_file(
            &peers,
            &[("bench-server", format!("127.0.0.1:{local_port}"))],
        );
        let near = NodeProc::start(&dir, "near", near_port, free_port(), &peers);
        let mut data = vec![0u8; 17 << 20];
        fastrand::Rng::with_seed(11).fill(&mut data);
        Ok(Rig {
            home,
            sshd,
            far,
            far_port,
            tunnel_args,
            local_port,
            remote_port,
            tunnel,
            near,
            pool: Bytes::from(data),
            corrupted: 0,
            _scratch: scratch,
        })
    }

    /// A payload of `len` checked bytes.
    fn payload(&self, len: usize, rng: &mut fastrand::Rng) -> Bytes {
        let start = rng.usize(..=self.pool.len() - len);
        self.pool.slice(start..start + len)
    }

    /// One echo round trip, checked byte for byte.
    async fn round_trip(&mut self, client: &Client, payload: Bytes) -> Result<()> {
        let request = tl::request(&payload, &[payload.len() as u64], true)?;
        match client.request(&request).await? {
            Message::TensorResult(Some(t)) if *t.data() == payload => Ok(()),
            Message::TensorResult(Some(_)) => {
                self.corrupted += 1;
                anyhow::bail!("echo differs from what was sent")
            }
            other => anyhow::bail!("unexpected answer {:?}", other.frame_type()),
        }
    }

    /// Healthy: a fresh client gets a checked echo through the tunnel, and the
    /// near node's link to the far node is up.
    async fn healthy(&mut self, rng: &mut fastrand::Rng) -> bool {
        let Ok(client) =
            tokio::time::timeout(Duration::from_secs(2), tl::connect(self.local_port)).await
        else {
            return false;
        };
        let Ok(client) = client else { return false };
        let payload = self.payload(4096, rng);
        self.round_trip(&client, payload).await.is_ok() && self.near.peer_up("bench-server")
    }

    /// Restarts whatever has exited, after ThrottleInterval (launchd's
    /// KeepAlive), until healthy; the time from `since` to healthy.
    async fn heal(&mut self, since: Instant, rng: &mut fastrand::Rng) -> Option<Duration> {
        while since.elapsed() < HEAL_LIMIT {
            if self.tunnel.as_mut().is_none_or(|t| !t.is_running()) {
                tokio::time::sleep(THROTTLE).await;
                self.tunnel = Some(Tunnel::start(&self.home, &self.tunnel_args[1..]));
            }
            if self.healthy(rng).await {
                return Some(since.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

struct Trials {
    fault: &'static str,
    heal: Vec<Duration>,
    failed: u64,
    inflight_fail: Vec<Duration>,
    /// The distinct errors requests in flight failed with.
    errors: BTreeSet<String>,
    inflight_hung: u64,
    inflight_ok: u64,
}

impl Trials {
    fn new(fault: &'static str) -> Self {
        Trials {
            fault,
            heal: Vec::new(),
            failed: 0,
            inflight_fail: Vec::new(),
            errors: BTreeSet::new(),
            inflight_hung: 0,
            inflight_ok: 0,
        }
    }

    fn report(&mut self) -> serde_json::Value {
        self.heal.sort();
        let ms = |d: Option<&Duration>| d.map(|d| (d.as_secs_f64() * 1000.0).round());
        let trials = self.heal.len() as u64 + self.failed;
        let inflight_max = self.inflight_fail.iter().max();
        println!(
            "{:<20} recovered {:>2}/{:<2}  healthy again p50 {:>6} ms  max {:>6} ms  in flight: {} failed (slowest {} ms), {} hung, {} completed",
            self.fault,
            self.heal.len(),
            trials,
            ms(self.heal.get(self.heal.len() / 2)).unwrap_or(f64::NAN),
            ms(self.heal.last()).unwrap_or(f64::NAN),
            self.inflight_fail.len(),
            ms(inflight_max).unwrap_or(0.0),
            self.inflight_hung,
            self.inflight_ok,
        );
        for e in &self.errors {
            println!("{:<20}   in-flight error: {e}", "");
        }
        json!({
            "fault": self.fault, "trials": trials, "recovered": self.heal.len(),
            "heal_p50_ms": ms(self.heal.get(self.heal.len() / 2)), "heal_max_ms": ms(self.heal.last()),
            "inflight_failed": self.inflight_fail.len(), "inflight_fail_max_ms": ms(inflight_max),
            "inflight_errors": self.errors, "inflight_hung": self.inflight_hung, "inflight_completed": self.inflight_ok,
        })
    }
}

pub fn chaos(trials: usize, out: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rig = Rig::start()?;
    let mut rng = fastrand::Rng::with_seed(5);
    let mut results = Vec::new();
    rt.block_on(async {
        anyhow::ensure!(
            rig.heal(Instant::now(), &mut rng).await.is_some(),
            "the rig never became healthy"
        );
        for fault in ["kill -9 ssh client", "kill -9 far node", "restart sshd"] {
            let mut t = Trials::new(fault);
            let n = if fault == "restart sshd" {
                trials.div_ceil(4)
            } else {
                trials
            };
            for _ in 0..n {
                // A large request in flight when the fault hits: the fault comes
                // once its bytes are moving.
                let client = tl::connect(rig.local_port).await?;
                let watcher = client.clone();
                let request = tl::request(&rig.payload(16 << 20, &mut rng), &[16 << 20], true)?;
                let inflight = tokio::spawn(async move {
                    let r = client.request(&request).await;
                    (r.map(|_| ()).map_err(|e| e.to_string()), Instant::now())
                });
                while watcher.progress() == 0 {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                let hit = Instant::now();
                // Dropping a process handle kills it with SIGKILL.
                match fault {
                    "kill -9 ssh client" => rig.tunnel = None,
                    "kill -9 far node" => rig.far = None,
                    _ => rig.sshd.restart(),
                }
                let abort = inflight.abort_handle();
                match tokio::time::timeout(INFLIGHT_LIMIT, inflight).await {
                    Ok(Ok((Err(e), at))) => {
                        t.inflight_fail.push(at.duration_since(hit));
                        t.errors.insert(e);
                    }
                    Ok(Ok((Ok(()), _))) => t.inflight_ok += 1,
                    _ => {
                        abort.abort();
                        t.inflight_hung += 1;
                    }
                }
                if rig.far.is_none() {
                    // launchd brings the node back after ThrottleInterval.
                    tokio::time::sleep(THROTTLE).await;
                    rig.far = Some(Server::start_on(System::Tensorlink, rig.far_port)?);
                }
                match rig.heal(hit, &mut rng).await {
                    Some(d) => t.heal.push(d),
                    None => t.failed += 1,
                }
            }
            results.push(t.report());
        }

        // The stale -R port: the far side still holds it when ssh comes back.
        let mut t = Trials::new("stale -R port");
        rig.tunnel = None;
        // The killed session may itself hold the port a moment: take it as soon
        // as it is free (both loopbacks, as a stale session does).
        let mut held = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while held.is_empty() && Instant::now() < deadline {
            match std::net::TcpListener::bind(("127.0.0.1", rig.remote_port)) {
                Ok(l) => {
                    held.push(l);
                    held.extend(std::net::TcpListener::bind(("::1", rig.remote_port)).ok());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        anyhow::ensure!(
            !held.is_empty(),
            "could not take the -R port to make it stale"
        );
        rig.tunnel = Some(Tunnel::start(&rig.home, &rig.tunnel_args[1..]));
        let gave_up = Instant::now();
        while rig.tunnel.as_mut().is_some_and(|t| t.is_running())
            && gave_up.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::ensure!(
            !rig.tunnel.as_mut().is_some_and(|t| t.is_running()),
            "ssh kept running without its -R forward"
        );
        tokio::time::sleep(Duration::from_secs(3)).await; // the old session "still closing"
        drop(held);
        let freed = Instant::now();
        match rig.heal(freed, &mut rng).await {
            Some(d) => t.heal.push(d),
            None => t.failed += 1,
        }
        results.push(t.report());
        anyhow::Ok(())
    })?;
    println!("corrupted round trips: {}", rig.corrupted);
    let healed = results
        .iter()
        .all(|r| r["recovered"] == r["trials"] && r["inflight_hung"] == 0);
    let doc = json!({"trials": trials, "throttle_interval_s": THROTTLE_INTERVAL, "faults": results, "corrupted": rig.corrupted});
    write(out, &doc)?;
    anyhow::ensure!(rig.corrupted == 0, "corrupted round trips");
    anyhow::ensure!(
        healed,
        "a fault did not heal, or a request in flight hung (see above)"
    );
    Ok(())
}

pub fn soak(round_trips: u64, out: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rig = Rig::start()?;
    let mut rng = fastrand::Rng::with_seed(9);
    let start = Instant::now();
    let far_rss = |rig: &Rig| {
        rig.far
            .as_ref()
            .context("far node not running")?
            .rss_kib("VmRSS")
    };
    let (rss_far_start, rss_near_start) = (far_rss(&rig)?, proc_rss(&rig.near)?);
    let (mut lost, mut bytes) = (0u64, 0u64);
    rt.block_on(async {
        let client = tl::connect(rig.local_port).await?;
        for i in 0..round_trips {
            // Sizes log-uniform from 1 B to 16 MiB: most small, some large.
            let len = 1usize << rng.u32(0..=24);
            let len = rng.usize(len / 2 + 1..=len);
            let payload = rig.payload(len, &mut rng);
            if rig.round_trip(&client, payload).await.is_err() {
                lost += 1;
            }
            bytes += 2 * len as u64;
            if i > 0 && i % 10_000 == 0 {
                eprintln!(
                    "soak: {i} round trips, {lost} lost, {} corrupted",
                    rig.corrupted
                );
            }
        }
        anyhow::Ok(())
    })?;
    let (rss_far_end, rss_near_end) = (far_rss(&rig)?, proc_rss(&rig.near)?);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "soak: {round_trips} round trips ({:.1} GB through the tunnel) in {secs:.0} s: {lost} lost, {} corrupted; \
         far node RSS {} → {} MiB, near node RSS {} → {} MiB",
        bytes as f64 / 1e9,
        rig.corrupted,
        rss_far_start / 1024,
        rss_far_end / 1024,
        rss_near_start / 1024,
        rss_near_end / 1024
    );
    let doc = json!({
        "round_trips": round_trips, "bytes": bytes, "seconds": secs, "lost": lost, "corrupted": rig.corrupted,
        "far_rss_mib": [rss_far_start / 1024, rss_far_end / 1024], "near_rss_mib": [rss_near_start / 1024, rss_near_end / 1024],
    });
    write(out, &doc)?;
    anyhow::ensure!(
        lost == 0 && rig.corrupted == 0,
        "{lost} lost, {} corrupted",
        rig.corrupted
    );
    Ok(())
}

fn proc_rss(node: &NodeProc) -> Result<u64> {
    let pid = node.pid().context("near node not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed")?
        .parse()?)
}

fn write(out: &Path, doc: &serde_json::Value) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(doc)? + "\n")?;
    println!("wrote {}", out.display());
    Ok(())
}
