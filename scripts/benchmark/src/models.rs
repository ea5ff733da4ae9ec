//! Each quantization and shape users run, tensorlink beside llama.cpp on the
//! same file, the same prompt ids and the same threads (scripts/bench-models
//! makes the files): prefill and decode of a short prompt, decode after a
//! ~2000-token prompt (where attention over the cache dominates), the time
//! from starting a node to its first token (first start, and a restart that
//! finds its sha256 remembered), and the node's peak RSS beside what its
//! tensors and caches account for. Then the ~1B file split over two nodes,
//! each shard's peak RSS against the same budget.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tensorlink::inference::gguf::ModelFile;
use tensorlink::inference::memory::Footprint;
use tensorlink::inference::tokenizer::ModelTokenizer;

use crate::common::model::{start_ring, Wiring};
use crate::common::{free_port, write_peer_file, NodeProc};

const TEXT: &str = "The lighthouse keeper climbed the stairs at dusk, as he had for thirty years, \
counting the steps, listening to the sea against the rocks below and to the wind in the glass. ";
/// Positions of the long prompt: where attention's share of a step is large.
const LONG: usize = 2000;
/// Each request's room: the long prompt and what it decodes.
const CTX: &str = "4096";
/// What the issue allows a shard beyond its tensors and KV caches.
const RSS_SLACK_MIB: f64 = 64.0;

pub struct Measured {
    pub prefill_tps: f64,
    pub decode_tps: f64,
}

/// `names` from scripts/bench-models (all when empty); `decode` tokens after
/// the short prompt, 32 after the long one; best of `repeats`.
pub fn models(names: &[String], threads: u16, decode: u32, repeats: usize) -> Result<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let files = bench_models(&root, names)?;
    let python = llama_python(&root)?;
    let scratch = crate::workload::scratch()?;
    let mut results = serde_json::Map::new();
    println!(
        "models: 1 node, {threads} threads, short prompt + {decode} decoded, {LONG}-token prompt + 32 decoded, best of {repeats}"
    );
    println!(
        "  {:<18} {:>22} {:>22} {:>22} {:>14} {:>18}",
        "file (tl / llama.cpp)",
        "prefill tok/s",
        "decode tok/s",
        "decode @2000 tok/s",
        "first token s",
        "peak RSS MiB"
    );
    for (name, path) in &files {
        let dir = scratch.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let file = ModelFile::open(path)?;
        let tokenizer = ModelTokenizer::from_gguf(file.metadata())?;
        let (short, long) = prompts(&tokenizer)?;
        let flags = node_flags(path, threads)?;
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

        // Start to first token: a node's first start hashes the file, a
        // restart finds the sha256 remembered (the scratch dir's cache).
        let peers = dir.join("peers.json");
        write_peer_file(&peers, &[]);
        let (api, node_port) = (free_port(), free_port());
        let (mut node, cold) = first_token(&dir, node_port, api, &peers, &flags, &short)?;
        node.kill();
        let (node, warm) = first_token(&dir, node_port, api, &peers, &flags, &short)?;

        let ours_short = ours(&node, &short, decode, repeats)?;
        let ours_long = ours(&node, &long, 32, repeats)?;
        let rss = peak_rss_mib(&node)?;
        drop(node);
        let footprint = Footprint::of(&file, 0, file.config().n_layers - 1);
        let budget = budget_mib(&footprint, long.len() + 32);
        let (theirs_short, _) = llama_cpp(&python, path, threads, &short, decode, repeats)?;
        let (theirs_long, _) = llama_cpp(&python, path, threads, &long, 32, repeats)?;

        let pair = |a: f64, b: f64| format!("{a:>6.1}/{b:<6.1}{:>5.2}×", a / b);
        println!(
            "  {name:<18} {} {} {} {:>6.2}/{:<6.2} {:>7.0} ≤ {:<7.0}",
            pair(ours_short.prefill_tps, theirs_short.prefill_tps),
            pair(ours_short.decode_tps, theirs_short.decode_tps),
            pair(ours_long.decode_tps, theirs_long.decode_tps),
            cold,
            warm,
            rss,
            budget
        );
        results.insert(
            name.clone(),
            json!({
                "file": path,
                "prompt_tokens": {"short": short.len(), "long": long.len()},
                "tensorlink": {
                    "prefill_tokens_per_s": ours_short.prefill_tps,
                    "decode_tokens_per_s": ours_short.decode_tps,
                    "long_prefill_tokens_per_s": ours_long.prefill_tps,
                    "long_decode_tokens_per_s": ours_long.decode_tps,
                    "start_to_first_token_s": {"first_start": cold, "restart": warm},
                    "peak_rss_mib": rss,
                    "rss_budget_mib": budget,
                },
                "llama_cpp": {
                    "prefill_tokens_per_s": theirs_short.prefill_tps,
                    "decode_tokens_per_s": theirs_short.decode_tps,
                    "long_prefill_tokens_per_s": theirs_long.prefill_tps,
                    "long_decode_tokens_per_s": theirs_long.decode_tps,
                },
                "ratio": {
                    "prefill": ours_short.prefill_tps / theirs_short.prefill_tps,
                    "decode": ours_short.decode_tps / theirs_short.decode_tps,
                    "long_prefill": ours_long.prefill_tps / theirs_long.prefill_tps,
                    "long_decode": ours_long.decode_tps / theirs_long.decode_tps,
                },
            }),
        );
    }
    if let Some((name, path)) = files.iter().find(|(n, _)| n == "llama3-1b-Q4_K_M") {
        results.insert("split".into(), split_rss(name, path, threads, &scratch)?);
    }
    Ok(Value::Object(results))
}

/// A node of the run: the model, the threads, room for the long prompt.
fn node_flags(path: &Path, threads: u16) -> Result<Vec<String>> {
    let model = path.to_str().context("model path")?;
    Ok([
        "--model",
        model,
        "--threads",
        &threads.to_string(),
        "--ctx-size",
        CTX,
    ]
    .map(str::to_owned)
    .to_vec())
}

/// The short prompt (the text once) and the long one ([`LONG`] ids of it
/// repeated), as the file's tokenizer writes them, BOS included: the ids
/// both engines are given.
fn prompts(tokenizer: &ModelTokenizer) -> Result<(Vec<u32>, Vec<u32>)> {
    let short = tokenizer.encode(TEXT)?;
    let mut long = tokenizer.encode(&TEXT.repeat(LONG / 30))?;
    if long.len() < LONG {
        bail!("the long prompt is only {} tokens", long.len());
    }
    long.truncate(LONG);
    Ok((short, long))
}

/// Starts a node and asks it for one token; seconds from the spawn to the
/// answer, which includes hashing (or not) and loading the layers.
fn first_token(
    dir: &Path,
    node_port: u16,
    api: u16,
    peers: &Path,
    flags: &[&str],
    prompt: &[u32],
) -> Result<(NodeProc, f64)> {
    let began = Instant::now();
    let node = NodeProc::start_with(dir, "solo", node_port, api, peers, flags);
    complete(api, prompt, 1)?;
    Ok((node, began.elapsed().as_secs_f64()))
}

fn complete(port: u16, prompt: &[u32], max_tokens: u32) -> Result<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(900)))
        .build()
        .into();
    let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": max_tokens});
    Ok(agent
        .post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .send_json(&body)?
        .body_mut()
        .read_json()?)
}

/// Best of `repeats` (by decode rate), from the origin's own clock.
fn ours(node: &NodeProc, prompt: &[u32], decode: u32, repeats: usize) -> Result<Measured> {
    let mut best: Option<Measured> = None;
    for _ in 0..repeats {
        let speed = crate::infer::Speed::of(&complete(node.api_port, prompt, decode)?)?;
        let m = Measured {
            prefill_tps: speed.prefill_tps,
            decode_tps: speed.decode_tps,
        };
        if best.as_ref().is_none_or(|b| m.decode_tps > b.decode_tps) {
            best = Some(m);
        }
    }
    best.context("no repeats")
}

/// What a shard may hold: its tensors, one request's KV cache of
/// `positions`, and the 64 MiB for everything else.
fn budget_mib(footprint: &Footprint, positions: usize) -> f64 {
    (footprint.weights + footprint.kv(positions)) as f64 / (1 << 20) as f64 + RSS_SLACK_MIB
}

/// VmHWM: the most resident memory the node process ever had.
fn peak_rss_mib(node: &NodeProc) -> Result<f64> {
    let pid = node.pid().context("the node is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

/// The ~1B file over two nodes on loopback: each shard's peak RSS after a
/// long request, against its own tensors + that request's cache + 64 MiB.
fn split_rss(name: &str, path: &Path, threads: u16, scratch: &tempfile::TempDir) -> Result<Value> {
    let file = ModelFile::open(path)?;
    let tokenizer = ModelTokenizer::from_gguf(file.metadata())?;
    let (_, long) = prompts(&tokenizer)?;
    let flags = node_flags(path, threads)?;
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let nodes = start_ring(
        &scratch.path().join("split"),
        &["mac1", "mac2"],
        &Wiring::loopback(2),
        &flags,
    );
    let r = complete(nodes[0].api_port, &long, 32)?;
    let ring = r["tensorlink"]["ring"].as_array().context("ring")?.clone();
    let mut shards = Vec::new();
    for hop in &ring {
        let (start, end) = (
            hop["start_layer"].as_u64().context("start_layer")? as usize,
            hop["end_layer"].as_u64().context("end_layer")? as usize,
        );
        let id = hop["node_id"].as_str().context("node_id")?;
        let node = nodes
            .iter()
            .find(|n| n.id == id)
            .context("a ring entry names no node of the run")?;
        let rss = peak_rss_mib(node)?;
        let budget = budget_mib(&Footprint::of(&file, start, end), long.len() + 32);
        println!(
            "  {name} split, {id} layers {start}–{end}: peak RSS {rss:.0} MiB, budget {budget:.0} MiB: {}",
            if rss <= budget { "met" } else { "MISSED" }
        );
        shards.push(json!({"node": id, "layers": [start, end], "peak_rss_mib": rss, "rss_budget_mib": budget}));
    }
    Ok(json!({ "file": name, "shards": shards }))
}

fn bench_models(root: &Path, names: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new(root.join("scripts/bench-models"))
        .args(names)
        .stderr(Stdio::inherit())
        .output()
        .context("run scripts/bench-models")?;
    if !out.status.success() {
        bail!("scripts/bench-models failed");
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| {
            let (name, path) = l.split_once(' ').context("NAME PATH")?;
            Ok((name.to_owned(), PathBuf::from(path)))
        })
        .collect()
}

pub fn llama_python(root: &Path) -> Result<String> {
    let venv = Command::new(root.join("scripts/llamacpp-venv"))
        .stderr(Stdio::inherit())
        .output()
        .context("run scripts/llamacpp-venv")?;
    if !venv.status.success() {
        bail!("scripts/llamacpp-venv failed");
    }
    Ok(String::from_utf8(venv.stdout)?.trim().to_owned())
}

/// llama.cpp's own loop on the same ids (scripts/llamacpp_reference.py's
/// bench: its defaults for attention and KV type, llama.cpp at its best),
/// and llama-cpp-python's version.
pub fn llama_cpp(
    python: &str,
    model: &Path,
    threads: u16,
    prompt: &[u32],
    decode: u32,
    repeats: usize,
) -> Result<(Measured, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let request = json!({
        "model": model, "threads": threads, "n_predict": 1, "n_ctx": 4096, "cases": [],
        "bench": {"prompt_tokens": prompt, "n_decode": decode, "repeats": repeats},
    });
    let mut child = Command::new(python)
        .arg(root.join("scripts/llamacpp_reference.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("run scripts/llamacpp_reference.py")?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("stdin")?,
        request.to_string().as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "scripts/llamacpp_reference.py failed on {}",
            model.display()
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let measured = Measured {
        prefill_tps: v["bench"]["prefill_tokens_per_s"]
            .as_f64()
            .context("prefill")?,
        decode_tps: v["bench"]["decode_tokens_per_s"]
            .as_f64()
            .context("decode")?,
    };
    let version = v["llama_cpp_version"].as_str().unwrap_or("?").to_owned();
    Ok((measured, version))
}
