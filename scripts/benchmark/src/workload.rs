//! What is measured, in what order, with how many samples.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;

use crate::common::sshd::Sshd;
use crate::common::{free_port, port_open, wait_until};
use crate::report::{Report, Stats};
use crate::{grpc, raw, ssh, tl, System};

/// Sample counts and volumes; `quick` keeps the whole run well under a minute.
struct Plan {
    rtt_samples: usize,
    warmup: usize,
    bytes_per_size: u64,
    repeats: usize,
    hop_samples: usize,
}

const SIZES: [(&str, usize, usize); 3] = [
    // (figure, tensor bytes, requests in flight)
    ("throughput_1m_gbps", 1 << 20, 8),
    ("throughput_64m_gbps", 64 << 20, 2),
    ("throughput_256m_gbps", 256 << 20, 2),
];

/// Hidden states of a 4096-wide model in f16: one token, and a 512-token prompt.
const HOPS: [(&str, u64, u64); 2] = [
    ("hop_1x4096_f16_us", 1, 4096),
    ("hop_512x4096_f16_us", 512, 4096),
];

pub fn run(quick: bool, out: &Path) -> Result<()> {
    let plan = if quick {
        Plan {
            rtt_samples: 2_000,
            warmup: 200,
            bytes_per_size: 256 << 20,
            repeats: 1,
            hop_samples: 200,
        }
    } else {
        Plan {
            rtt_samples: 20_000,
            warmup: 2_000,
            bytes_per_size: 2_000_000_000,
            repeats: 3,
            hop_samples: 2_000,
        }
    };
    let scratch = scratch()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut report = Report::new(quick);
    let started = Instant::now();

    for (system, key) in [
        (System::Raw, "raw_tcp"),
        (System::Tensorlink, "tensorlink"),
        (System::Tonic, "tonic"),
    ] {
        let server = Server::start(system)?;
        eprintln!("bench: {key}");
        rt.block_on(measure(system, key, server.port, &plan, true, &mut report))?;
    }

    eprintln!("bench: tensorlink receiver RSS with one 256 MiB tensor");
    let server = Server::start(System::Tensorlink)?;
    let before = server.rss_kib("VmRSS")?;
    rt.block_on(async {
        let client = tl::connect(server.port).await?;
        tl::transfer(&client, &Bytes::from(vec![7u8; 256 << 20]), 0, 1, 1).await
    })?;
    let peak = server.rss_kib("VmHWM")?;
    report.set("rss_256m_mib", "tensorlink", peak as f64 / 1024.0);
    report.set("rss_idle_mib", "tensorlink", before as f64 / 1024.0);
    drop(server);

    eprintln!("bench: through a real ssh tunnel");
    let sshd = Sshd::start(scratch.path());
    let dir = scratch.path().to_owned();
    for (system, key) in [
        (System::Raw, "raw_tcp_ssh"),
        (System::Tensorlink, "tensorlink_ssh"),
    ] {
        let server = Server::start(system)?;
        let fwd = ssh::forward(&sshd, &dir.join(format!("home {key}")), server.port)?;
        report.note("ssh_command", &fwd.args.join(" "));
        eprintln!("bench: {key}");
        rt.block_on(measure(
            system,
            key,
            fwd.local_port,
            &plan,
            false,
            &mut report,
        ))?;
    }

    report.note(
        "duration_s",
        &format!("{:.0}", started.elapsed().as_secs_f64()),
    );
    report.finish(out)
}

async fn measure(
    system: System,
    key: &str,
    port: u16,
    plan: &Plan,
    hops: bool,
    report: &mut Report,
) -> Result<()> {
    let rtt = round_trips(
        system,
        port,
        8 << 10,
        &[8 << 10],
        plan.warmup,
        plan.rtt_samples,
    )
    .await?;
    report.set("rtt_8k_p50_us", key, rtt.p50_us());
    report.set("rtt_8k_p99_us", key, rtt.p99_us());
    for (figure, size, window) in SIZES {
        let count = (plan.bytes_per_size.div_ceil(size as u64) as usize).max(2);
        let payload = Bytes::from(vec![0x5au8; size]);
        // Steady state: two windows' worth first, pipelined, on the same
        // connection, so every system has its receive buffers mapped before the
        // clock starts (the first touch of fresh memory is a page fault per 4 KiB).
        // Each figure is the median of `repeats` runs: on two cores the other
        // processes (ssh, sshd) make single runs vary by several percent.
        let mut rates = Vec::new();
        for _ in 0..plan.repeats {
            let secs = match system {
                System::Raw => raw::transfer(port, &payload, 2 * window, count, window).await?,
                System::Tensorlink => {
                    tl::transfer(
                        &tl::connect(port).await?,
                        &payload,
                        2 * window,
                        count,
                        window,
                    )
                    .await?
                }
                System::Tonic => {
                    grpc::transfer(
                        &grpc::connect(port).await?,
                        &payload,
                        2 * window,
                        count,
                        window,
                    )
                    .await?
                }
            };
            rates.push((count * size) as f64 / secs / 1e9);
        }
        rates.sort_by(f64::total_cmp);
        report.set(figure, key, rates[rates.len() / 2]);
    }
    if hops {
        for (figure, rows, cols) in HOPS {
            let bytes = (rows * cols * 2) as usize;
            let s = round_trips(
                system,
                port,
                bytes,
                &[rows, cols],
                plan.warmup / 10,
                plan.hop_samples,
            )
            .await?;
            report.set(figure, key, s.p50_us());
        }
    }
    Ok(())
}

/// `samples` request/response round trips of `bytes` each way, after `warmup`.
async fn round_trips(
    system: System,
    port: u16,
    bytes: usize,
    shape: &[u64],
    warmup: usize,
    samples: usize,
) -> Result<Stats> {
    let payload = Bytes::from(vec![0x33u8; bytes]);
    let mut times = Vec::with_capacity(samples);
    match system {
        System::Raw => {
            let mut c = raw::Client::connect(port).await?;
            for i in 0..warmup + samples {
                let t = Instant::now();
                c.send(&payload, true).await?;
                anyhow::ensure!(c.receive().await? == bytes, "short echo");
                if i >= warmup {
                    times.push(t.elapsed());
                }
            }
        }
        System::Tensorlink => {
            let c = tl::connect(port).await?;
            let msg = tl::request(&payload, shape, true)?;
            for i in 0..warmup + samples {
                let t = Instant::now();
                tl::round_trip(&c, &msg).await?;
                if i >= warmup {
                    times.push(t.elapsed());
                }
            }
        }
        System::Tonic => {
            let mut c = grpc::connect(port).await?;
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            let req = grpc::request(&payload, &shape, true);
            for i in 0..warmup + samples {
                let t = Instant::now();
                grpc::round_trip(&mut c, &req).await?;
                if i >= warmup {
                    times.push(t.elapsed());
                }
            }
        }
    }
    Ok(Stats::new(times))
}

/// A `serve` child of this same binary, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(system: System) -> Result<Server> {
        Server::start_on(system, free_port())
    }

    pub fn start_on(system: System, port: u16) -> Result<Server> {
        let name = match system {
            System::Raw => "raw",
            System::Tensorlink => "tensorlink",
            System::Tonic => "tonic",
        };
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", "--system", name, "--port", &port.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .context("starting a benchmark server")?;
        let server = Server { child, port };
        wait_until(
            Duration::from_secs(10),
            "the benchmark server to listen",
            || port_open(port),
        );
        Ok(server)
    }

    /// A field of /proc/PID/status in KiB (VmRSS now, VmHWM the peak).
    pub fn rss_kib(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .context("no such status field")?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("malformed status")?
            .parse()?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment variable that gives `serve` processes their scratch directory.
pub const SCRATCH_ENV: &str = "TENSORLINK_BENCH_SCRATCH";

/// A temporary directory for this run (removed when dropped, also on failure),
/// which the servers this run starts write into too.
pub fn scratch() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("tensorlink-bench-")
        .tempdir()?;
    // SAFETY of intent: set once, before any server or thread is started.
    std::env::set_var(SCRATCH_ENV, dir.path());
    Ok(dir)
}

pub type Figures = BTreeMap<String, BTreeMap<String, f64>>;

/// Runs `count` requests made by `send`, keeping at most `window` in flight.
pub async fn windowed<F, Fut>(count: usize, window: usize, send: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut in_flight = tokio::task::JoinSet::new();
    for _ in 0..count {
        if in_flight.len() >= window {
            in_flight.join_next().await.context("join")???;
        }
        in_flight.spawn(send());
    }
    while let Some(r) = in_flight.join_next().await {
        r??;
    }
    Ok(())
}
