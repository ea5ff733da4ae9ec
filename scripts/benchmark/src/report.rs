//! Figures, ratios to the raw TCP baseline measured in the same run, the
//! targets, the printed table and results.json.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::workload::Figures;

pub struct Stats {
    sorted: Vec<Duration>,
}

impl Stats {
    pub fn new(mut times: Vec<Duration>) -> Stats {
        times.sort_unstable();
        Stats { sorted: times }
    }

    fn quantile_us(&self, q: f64) -> f64 {
        let i = ((self.sorted.len() as f64 - 1.0) * q).round() as usize;
        self.sorted
            .get(i)
            .map(|d| d.as_secs_f64() * 1e6)
            .unwrap_or(f64::NAN)
    }

    pub fn p50_us(&self) -> f64 {
        self.quantile_us(0.50)
    }

    pub fn p99_us(&self) -> f64 {
        self.quantile_us(0.99)
    }
}

pub struct Report {
    quick: bool,
    figures: Figures,
    notes: BTreeMap<String, String>,
}

const SYSTEMS: [&str; 5] = [
    "raw_tcp",
    "tensorlink",
    "tonic",
    "raw_tcp_ssh",
    "tensorlink_ssh",
];

impl Report {
    pub fn new(quick: bool) -> Report {
        Report {
            quick,
            figures: Figures::new(),
            notes: BTreeMap::new(),
        }
    }

    pub fn set(&mut self, figure: &str, system: &str, value: f64) {
        self.figures
            .entry(figure.into())
            .or_default()
            .insert(system.into(), value);
    }

    pub fn note(&mut self, key: &str, value: &str) {
        self.notes.insert(key.into(), value.into());
    }

    fn get(&self, figure: &str, system: &str) -> Option<f64> {
        self.figures.get(figure)?.get(system).copied()
    }

    /// The baseline a system is compared with: raw TCP over the same path.
    fn baseline(system: &str) -> &'static str {
        if system.ends_with("_ssh") {
            "raw_tcp_ssh"
        } else {
            "raw_tcp"
        }
    }

    fn targets(&self) -> Vec<Value> {
        let ratio = |f: &str, a: &str, b: &str| Some(self.get(f, a)? / self.get(f, b)?);
        let mut out = Vec::new();
        let mut target = |name: &str, value: Option<f64>, limit: f64, at_least: bool| {
            if let Some(v) = value {
                let met = if at_least { v >= limit } else { v <= limit };
                out.push(json!({"target": name, "value": v, "limit": limit, "at_least": at_least, "met": met}));
            }
        };
        target(
            "64 MiB throughput, tensorlink / raw_tcp ≥ 0.95",
            ratio("throughput_64m_gbps", "tensorlink", "raw_tcp"),
            0.95,
            true,
        );
        target(
            "64 MiB throughput, tensorlink / tonic ≥ 3",
            ratio("throughput_64m_gbps", "tensorlink", "tonic"),
            3.0,
            true,
        );
        target(
            "8 KiB p50, tensorlink / raw_tcp ≤ 1.15",
            ratio("rtt_8k_p50_us", "tensorlink", "raw_tcp"),
            1.15,
            false,
        );
        target(
            "8 KiB p50, tensorlink / tonic ≤ 0.4",
            ratio("rtt_8k_p50_us", "tensorlink", "tonic"),
            0.4,
            false,
        );
        target(
            "64 MiB via ssh, tensorlink_ssh / raw_tcp_ssh ≥ 0.95",
            ratio("throughput_64m_gbps", "tensorlink_ssh", "raw_tcp_ssh"),
            0.95,
            true,
        );
        let ssh_tail = self
            .get("rtt_8k_p99_us", "tensorlink_ssh")
            .zip(self.get("rtt_8k_p50_us", "tensorlink_ssh"));
        target(
            "8 KiB via ssh, tensorlink_ssh p99 / p50 ≤ 2 (no Nagle stalls)",
            ssh_tail.map(|(a, b)| a / b),
            2.0,
            false,
        );
        let rss_limit = 1.1 * 256.0 + 32.0;
        target(
            "receiver RSS with one 256 MiB tensor ≤ 1.1 × payload + 32 MiB",
            self.get("rss_256m_mib", "tensorlink"),
            rss_limit,
            false,
        );
        out
    }

    pub fn finish(&self, out: &Path) -> Result<()> {
        println!(
            "\n{:<22}{}",
            "figure",
            SYSTEMS
                .iter()
                .map(|s| format!("{s:>22}"))
                .collect::<String>()
        );
        for (figure, values) in &self.figures {
            let mut line = format!("{figure:<22}");
            for system in SYSTEMS {
                let cell = match values.get(system) {
                    Some(v) => match self.get(figure, Self::baseline(system)) {
                        Some(base) if system != Self::baseline(system) && base > 0.0 => {
                            format!("{v:.2} ({:.2}×)", v / base)
                        }
                        _ => format!("{v:.2}"),
                    },
                    None => "-".into(),
                };
                line.push_str(&format!("{cell:>22}"));
            }
            println!("{line}");
        }
        println!("\n(ratios: to raw_tcp, or to raw_tcp_ssh for the ssh systems; µs lower is better, GB/s higher)");
        let targets = self.targets();
        println!("\ntargets:");
        for t in &targets {
            let mark = if t["met"].as_bool() == Some(true) {
                "met   "
            } else {
                "MISSED"
            };
            println!(
                "  [{mark}] {}: {:.3}",
                t["target"].as_str().unwrap_or(""),
                t["value"].as_f64().unwrap_or(f64::NAN)
            );
        }
        let caps = tensorlink::capabilities::detect();
        let ssh_version = std::process::Command::new("ssh")
            .arg("-V")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
            .unwrap_or_default();
        let mut doc = json!({
            "quick": self.quick,
            "machine": {"chip": caps.chip, "memory_mib": caps.memory, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "os": std::env::consts::OS, "ssh": ssh_version},
            "targets": targets,
            "notes": self.notes,
        });
        for (figure, values) in &self.figures {
            doc[figure] = json!(values);
        }
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, serde_json::to_string_pretty(&doc)? + "\n")?;
        println!("\nwrote {}", out.display());
        Ok(())
    }
}
