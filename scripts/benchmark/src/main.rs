//! `tensorlink-bench`: tensorlink's transport beside raw TCP, tonic gRPC and a
//! real ssh tunnel, measured in one run on this machine (driven by `scripts/bench`).
//!
//! `run` is the orchestrator: it starts each system's server as a separate
//! process (`serve`), drives it from this process, starts an sshd on 127.0.0.1
//! with throw-away keys and a tunnel with the installer's own ssh arguments,
//! and reports every figure beside raw TCP's, as ratios.

mod chaos;
mod fetch;
mod grpc;
mod infer;
mod models;
mod raw;
mod report;
mod ssh;
mod tl;
mod workload;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "tensorlink-bench",
    about = "tensorlink's transport beside raw TCP, tonic gRPC and an ssh tunnel"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every system and figure; print the table and write results.json.
    Run {
        /// Fewer samples and bytes (well under a minute): checks the benchmark still works.
        #[arg(long)]
        quick: bool,
        /// Where to write the results.
        #[arg(long, default_value = "target/bench/results.json")]
        out: PathBuf,
    },
    /// Faults through a real ssh tunnel: kill -9 ssh and the far node, restart sshd, a stale -R port.
    Chaos {
        /// Trials per fault (sshd restarts: a quarter as many).
        #[arg(long, default_value_t = 20)]
        trials: usize,
        #[arg(long, default_value = "target/chaos/results.json")]
        out: PathBuf,
    },
    /// Checksummed round trips of random sizes (1 B – 16 MiB) through a real ssh tunnel.
    Soak {
        #[arg(long, default_value_t = 100_000)]
        round_trips: u64,
        #[arg(long, default_value = "target/soak/results.json")]
        out: PathBuf,
    },
    /// Inference: prefill and decode tokens/s on 1 node, 2 on loopback and 2 through
    /// ssh; the split's cost per token beside the hop; decode beside llama.cpp.
    Infer {
        #[arg(long)]
        quick: bool,
        /// Threads per node (and for llama.cpp).
        #[arg(long, default_value_t = 2)]
        threads: u16,
        /// Skip llama.cpp (building it from source takes ~9 minutes on 2 cores).
        #[arg(long)]
        without_llama_cpp: bool,
        /// Skip the other quantizations and shapes (`models`): the test model on 1 and 2 nodes only
        #[arg(long)]
        without_models: bool,
        #[arg(long, default_value = "target/bench/inference.json")]
        out: PathBuf,
    },
    /// Each quantization and shape beside llama.cpp on the same file (part of a full
    /// `infer`): prefill, decode, decode at position ~2000, start to first token, peak RSS.
    Models {
        /// Files of scripts/bench-models [default: all].
        #[arg(long = "only", value_name = "NAME")]
        only: Vec<String>,
        #[arg(long, default_value_t = 2)]
        threads: u16,
        /// Tokens decoded after the short prompt.
        #[arg(long, default_value_t = 128)]
        decode: u32,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long, default_value = "target/bench/models.json")]
        out: PathBuf,
    },
    /// A node fetching the model from a peer through the installer's ssh tunnel,
    /// beside raw TCP downloading as many bytes through the same sshd.
    Fetch {
        /// The 93 MB test model, once (else Gemma 3 270M, 240 MB).
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long, default_value = "target/bench/fetch.json")]
        out: PathBuf,
    },
    /// Serve one system on 127.0.0.1:PORT until killed (started by `run`).
    Serve {
        #[arg(long, value_enum)]
        system: System,
        #[arg(long)]
        port: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum System {
    Raw,
    Tensorlink,
    Tonic,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Run { quick, out } => workload::run(quick, &out),
        Cmd::Fetch {
            quick,
            repeats,
            out,
        } => fetch::fetch(quick, if quick { 1 } else { repeats }, &out),
        Cmd::Chaos { trials, out } => chaos::chaos(trials, &out),
        Cmd::Soak { round_trips, out } => chaos::soak(round_trips, &out),
        Cmd::Infer {
            quick,
            threads,
            without_llama_cpp,
            without_models,
            out,
        } => infer::infer(quick, threads, !without_llama_cpp, !without_models, &out),
        Cmd::Models {
            only,
            threads,
            decode,
            repeats,
            out,
        } => {
            let results = models::models(&only, threads, decode, repeats)?;
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&out, serde_json::to_string_pretty(&results)?)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Serve { system, port } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                match system {
                    System::Raw => raw::serve(port).await,
                    System::Tensorlink => tl::serve(port).await,
                    System::Tonic => grpc::serve(port).await,
                }
            })
        }
    }
}

#[path = "../../../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;
