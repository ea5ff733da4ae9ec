//! Model fetch throughput: a node copying the model from a peer through the
//! installer's ssh tunnel (docs/PROTOCOL.md §9.9), beside raw TCP streaming
//! as many bytes through the same sshd and the same tunnel command, in the
//! same run. The fetch writes to disk and hashes what it writes; raw TCP
//! throws the bytes away, so the ratio is what all of the node's work costs.
//! A second baseline does what any verified copy must: raw TCP whose bytes
//! are written to a new file and hashed as they come (as `scp` then `shasum`
//! would, in one pass), so its ratio is what the protocol itself costs.
//! Beside them, in the same run, the two other floors of a fetch: writing as
//! many bytes to a new file in the same folder, and hashing them.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tensorlink::inference::fingerprint::sha256_file;

use crate::common::model::{cluster_view, gemma3_model, test_model};
use crate::common::sshd::Sshd;
use crate::common::{free_port, wait_until, write_peer_file, NodeProc};
use crate::workload::{scratch, Server};
use crate::{raw, ssh, System};

/// What the issue asks of a fetch: at least this share of raw TCP's rate.
const TARGET: f64 = 0.9;

pub fn fetch(quick: bool, repeats: usize, out: &Path) -> Result<()> {
    let model = if quick { test_model() } else { gemma3_model() };
    let size = std::fs::metadata(&model)?.len();
    let sha256 = sha256_file(&model)?;
    let name = model
        .file_name()
        .and_then(|n| n.to_str())
        .context("model name")?
        .to_owned();
    let scratch = scratch()?;
    let dir = scratch.path();
    let sshd = Sshd::start(dir);

    let far_peers = dir.join("far_peers.json");
    write_peer_file(&far_peers, &[]);
    let far_port = free_port();
    let model_flag = model.to_str().context("model path")?;
    let _far = NodeProc::start_with(
        dir,
        "far",
        far_port,
        free_port(),
        &far_peers,
        &["--model", model_flag],
    );
    let to_far = ssh::forward(&sshd, &dir.join("home fetch"), far_port)?;
    let raw_server = Server::start(System::Raw)?;
    let to_raw = ssh::forward(&sshd, &dir.join("home raw"), raw_server.port)?;
    let rt = tokio::runtime::Runtime::new()?;

    eprintln!(
        "bench: fetching {name} ({} MiB), {repeats} times each through ssh and on loopback, \
         beside raw TCP",
        size >> 20
    );
    let mut legs = serde_json::Map::new();
    let mut summary = Vec::new();
    for (leg, far, raw_port) in [
        ("ssh", to_far.local_port, to_raw.local_port),
        ("loopback", far_port, raw_server.port),
    ] {
        let (mut fetched, mut raw_rates, mut copies) = (Vec::new(), Vec::new(), Vec::new());
        let (mut fetch_busy, mut raw_busy) = (Vec::new(), Vec::new());
        for i in 0..repeats {
            let before = CpuTimes::now()?;
            let secs = rt.block_on(raw::download(raw_port, size, |_| Ok(())))?;
            raw_busy.push(CpuTimes::now()?.busy_since(&before));
            raw_rates.push(size as f64 / secs);
            copies.push(
                size as f64
                    / verified_copy(
                        &rt,
                        raw_port,
                        size,
                        &dir.join(format!("copy-{leg}-{i}.bin")),
                    )?,
            );
            // The floor's file, written and removed, leaves its pages to the
            // fetch: both then write to memory this machine has used before.
            let floor = dir.join(format!("floor-{leg}-{i}.bin"));
            write_file(&floor, size)?;
            let (rate, busy) = fetch_once(dir, &format!("{leg}-{i}"), &name, &sha256, far)?;
            fetched.push(rate);
            fetch_busy.push(busy);
        }
        let (f, r, c) = (median(&fetched), median(&raw_rates), median(&copies));
        summary.push(format!(
            "{leg}: fetch {:.0} MB/s, raw TCP {:.0} MB/s, ratio {:.2}; raw TCP written and hashed \
             {:.0} MB/s, ratio {:.2}; both cores busy {:.0}% during the fetch, {:.0}% during raw TCP",
            f / 1e6,
            r / 1e6,
            f / r,
            c / 1e6,
            f / c,
            median(&fetch_busy) * 100.0,
            median(&raw_busy) * 100.0
        ));
        legs.insert(
            leg.into(),
            json!({
                "fetch_mb_s": fetched.iter().map(|v| v / 1e6).collect::<Vec<_>>(),
                "raw_tcp_mb_s": raw_rates.iter().map(|v| v / 1e6).collect::<Vec<_>>(),
                "ratio_of_medians": f / r,
                "raw_tcp_written_and_hashed_mb_s": copies.iter().map(|v| v / 1e6).collect::<Vec<_>>(),
                "ratio_to_written_and_hashed": f / c,
                "cpu_busy_fetch": fetch_busy,
                "cpu_busy_raw_tcp": raw_busy,
            }),
        );
    }
    // The other floors: a new file of the same size in the same folder (what
    // the fetch's writes cost, page cache included), and sha256 over as many
    // bytes in memory.
    let (mut disk, mut hash) = (Vec::new(), Vec::new());
    for i in 0..repeats {
        disk.push(size as f64 / write_file(&dir.join(format!("floor-{i}.bin")), size)?);
        hash.push(size as f64 / hash_bytes(size)?);
    }
    let (disk, hash) = (median(&disk), median(&hash));
    summary.push(format!(
        "floors on this machine: a new {} MiB file written {:.0} MB/s, sha256 {:.0} MB/s \
         (both in turn: {:.0} MB/s)",
        size >> 20,
        disk / 1e6,
        hash / 1e6,
        1.0 / (1.0 / disk + 1.0 / hash) / 1e6
    ));
    legs.insert(
        "floors".into(),
        json!({"write_new_file_mb_s": disk / 1e6, "sha256_mb_s": hash / 1e6}),
    );
    let ratio = legs["ssh"]["ratio_of_medians"].as_f64().unwrap_or(0.0);
    println!(
        "\nmodel fetch of {} MiB, median of {repeats}:\n  {}\n  through ssh: target ≥ {TARGET} {}",
        size >> 20,
        summary.join("\n  "),
        if ratio >= TARGET { "met" } else { "missed" }
    );
    let report = json!({
        "file": name,
        "bytes": size,
        "repeats": repeats,
        "legs": legs,
        "target": TARGET,
        "met": ratio >= TARGET,
        "ssh_command": to_far.args.join(" "),
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// One fetch by a fresh node into an empty models folder: the rate it
/// reports over its copy (from the first read to the last byte written) and
/// how busy the machine's cores were while it copied.
fn fetch_once(dir: &Path, run: &str, name: &str, sha256: &str, far: u16) -> Result<(f64, f64)> {
    let models = dir.join(format!("models-{run}"));
    std::fs::create_dir_all(&models)?;
    let peers = dir.join(format!("near_peers_{run}.json"));
    write_peer_file(&peers, &[("far", format!("127.0.0.1:{far}"))]);
    let models_flag = models.to_str().context("models path")?;
    let near = NodeProc::start_with(
        dir,
        "near",
        free_port(),
        free_port(),
        &peers,
        &[
            "--models-dir",
            models_flag,
            "--model",
            name,
            "--model-sha256",
            sha256,
        ],
    );
    let state = || {
        cluster_view(&near)["fetch"]["state"]
            .as_str()
            .map(String::from)
    };
    wait_until(Duration::from_secs(600), "the fetch to start", || {
        matches!(state().as_deref(), Some("fetching" | "loading" | "done"))
    });
    let before = CpuTimes::now()?;
    wait_until(Duration::from_secs(600), "the fetch to finish", || {
        matches!(state().as_deref(), Some("loading" | "done"))
    });
    let busy = CpuTimes::now()?.busy_since(&before);
    let view = cluster_view(&near);
    let rate = view["fetch"]["rate"]
        .as_f64()
        .with_context(|| format!("no rate in {view}"))?;
    drop(near);
    std::fs::remove_dir_all(&models)?;
    Ok((rate, busy))
}

/// The machine's CPU time so far, from /proc/stat: (busy, all) in ticks.
struct CpuTimes(u64, u64);

impl CpuTimes {
    fn now() -> Result<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|t| t.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal …: idle and iowait are not busy.
        let all: u64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        Ok(CpuTimes(all - idle, all))
    }

    /// The share of every core's time spent busy since `before`.
    fn busy_since(&self, before: &CpuTimes) -> f64 {
        let all = self.1.saturating_sub(before.1).max(1);
        self.0.saturating_sub(before.0) as f64 / all as f64
    }
}

/// Seconds to write `size` bytes to a new file at `path` from one 4 MiB
/// buffer, as a fetch writes (without its final flush); the file is removed.
fn write_file(path: &Path, size: u64) -> Result<f64> {
    use std::io::Write;
    let start = std::time::Instant::now();
    let mut file = std::fs::File::create(path)?;
    in_chunks(size, |chunk| Ok(file.write_all(chunk)?))?;
    let secs = start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(path)?;
    Ok(secs)
}

/// Seconds for raw TCP to bring `size` bytes into a new file at `path`,
/// hashing them as they come: the least any verified copy does. The file is
/// removed.
fn verified_copy(rt: &tokio::runtime::Runtime, port: u16, size: u64, path: &Path) -> Result<f64> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let mut hasher = Sha256::new();
    let secs = rt.block_on(raw::download(port, size, |bytes| {
        file.write_all(bytes)?;
        hasher.update(bytes);
        Ok(())
    }))?;
    std::hint::black_box(hasher.finalize());
    drop(file);
    std::fs::remove_file(path)?;
    Ok(secs)
}

/// Seconds to sha256 `size` bytes held in memory, 4 MiB at a time.
fn hash_bytes(size: u64) -> Result<f64> {
    use sha2::{Digest, Sha256};
    let start = std::time::Instant::now();
    let mut hasher = Sha256::new();
    in_chunks(size, |chunk| {
        hasher.update(chunk);
        Ok(())
    })?;
    std::hint::black_box(hasher.finalize());
    Ok(start.elapsed().as_secs_f64())
}

/// Calls `each` with `size` bytes in all, 4 MiB at a time, from one buffer.
fn in_chunks(size: u64, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let chunk = vec![0x3cu8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        each(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
