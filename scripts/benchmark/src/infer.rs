//! Inference figures: prefill and decode tokens/s of the test model on one
//! node, split across two on loopback, and across two through the installer's
//! ssh tunnel; the split's cost per token beside the hop's round trip measured
//! in the same run; and decode speed beside llama.cpp (built from source by
//! scripts/llamacpp-venv) with the same thread count, on the same prompt ids.

use std::path::Path;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tensorlink::capabilities::DeviceCapabilities;
use tensorlink::inference::chat::{ChatMessage, ChatTemplate};
use tensorlink::inference::gguf::ModelFile;
use tensorlink::inference::tokenizer::ModelTokenizer;
use tensorlink::net::client::Client;
use tensorlink::net::{handshake, socket};
use tensorlink::protocol::{DType, Hello, Limits, Message, Shard, Tensor};

use crate::common::model::{start_ring, test_model, Wiring};
use crate::common::sshd::Sshd;
use crate::common::{free_port, NodeProc};
use crate::report::Stats;
use crate::ssh;
use crate::workload::scratch;

const PROMPT: &str =
    "Tell me a very long story about a lighthouse keeper who finds a message in a bottle, \
with many details about the sea, the weather, the village and the people in it.";

pub struct Speed {
    prompt_tokens: f64,
    pub prefill_tps: f64,
    pub decode_tps: f64,
    decode_ms_per_token: f64,
    decoded: f64,
}

impl Speed {
    /// A greedy answer's speed, from the origin's own clock in its
    /// `tensorlink` extension (the first token ends the prefill).
    pub fn of(answer: &Value) -> Result<Speed> {
        let prompt = answer["usage"]["prompt_tokens"].as_f64().context("usage")?;
        let completion = answer["usage"]["completion_tokens"]
            .as_f64()
            .context("usage")?;
        let prefill_ms = answer["tensorlink"]["prefill_ms"]
            .as_f64()
            .context("prefill_ms")?;
        let decode_ms = answer["tensorlink"]["decode_ms"]
            .as_f64()
            .context("decode_ms")?;
        if completion < 2.0 {
            bail!("the model answered with {completion} tokens; nothing to time");
        }
        Ok(Speed {
            prompt_tokens: prompt,
            prefill_tps: prompt / (prefill_ms / 1e3),
            decode_tps: (completion - 1.0) / (decode_ms / 1e3),
            decode_ms_per_token: decode_ms / (completion - 1.0),
            decoded: completion - 1.0,
        })
    }
}

pub fn infer(
    quick: bool,
    threads: u16,
    with_llama_cpp: bool,
    with_models: bool,
    out: &Path,
) -> Result<()> {
    let model = test_model();
    let scratch = scratch()?;
    let dir = scratch.path();
    let (decode, repeats, hops) = if quick { (16, 1, 200) } else { (128, 3, 2000) };
    let threads_flag = threads.to_string();
    let flags = [
        "--model",
        model.to_str().context("model path")?,
        "--threads",
        &threads_flag,
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    println!("inference: SmolLM2-135M-Instruct Q4_1, {threads} threads per node, up to {decode} tokens, best of {repeats}");
    let one = {
        let nodes = start_ring(&dir.join("one"), &["solo"], &Wiring::loopback(1), &flags);
        measure(&nodes[0], decode, repeats)?
    };
    // The idle hops wait as long as one node's token takes.
    let token_gap = Duration::from_secs_f64(one.decode_ms_per_token / 1e3);
    let idle_hops = if quick { 50 } else { 200 };
    let (two, (hop_loopback, idle_loopback)) = {
        let nodes = start_ring(
            &dir.join("two"),
            &["mac1", "mac2"],
            &Wiring::loopback(2),
            &flags,
        );
        let speed = measure(&nodes[0], decode, repeats)?;
        let hop = rt.block_on(hop_rtt(nodes[1].node_port, "mac2", hops, Duration::ZERO))?;
        let idle = rt.block_on(hop_rtt(nodes[1].node_port, "mac2", idle_hops, token_gap))?;
        (speed, (hop, idle))
    };
    let (ssh, (hop_ssh, idle_ssh)) = {
        let sshd = Sshd::start(dir);
        let home = dir.join("home");
        let (p1, p2) = (free_port(), free_port());
        let (args, local, remote) = ssh::tunnel_command(&sshd, &home, p1, p2)?;
        let _tunnel = ssh::start_tunnel(&home, &args, local);
        let wiring = Wiring {
            ports: vec![p1, p2],
            addresses: vec![
                vec![String::new(), format!("127.0.0.1:{local}")],
                vec![format!("127.0.0.1:{remote}"), String::new()],
            ],
        };
        let nodes = start_ring(&dir.join("ssh"), &["mac1", "mac2"], &wiring, &flags);
        let speed = measure(&nodes[0], decode, repeats)?;
        let hop = rt.block_on(hop_rtt(local, "mac2", hops, Duration::ZERO))?;
        let idle = rt.block_on(hop_rtt(local, "mac2", idle_hops, token_gap))?;
        (speed, (hop, idle))
    };
    let llama = if with_llama_cpp {
        Some(llama_cpp(&model, threads, decode, repeats)?)
    } else {
        None
    };
    // Every quantization and shape beside llama.cpp: a full run only.
    let models = if with_llama_cpp && with_models && !quick {
        Some(crate::models::models(&[], threads, decode, repeats)?)
    } else {
        None
    };

    let row = |name: &str, s: &Speed| {
        println!(
            "  {name:<22} prefill {:>7.1} tok/s ({:.0} tokens)   decode {:>6.1} tok/s   {:>6.2} ms/token ({:.0} tokens)",
            s.prefill_tps, s.prompt_tokens, s.decode_tps, s.decode_ms_per_token, s.decoded
        )
    };
    row("1 node", &one);
    row("2 nodes, loopback", &two);
    row("2 nodes, ssh tunnel", &ssh);
    if let Some(llama) = &llama {
        println!(
            "  {:<22} prefill {:>7.1} tok/s   decode {:>6.1} tok/s   ({})",
            "llama.cpp, 1 process", llama.0, llama.1, llama.2
        );
    }
    let overhead = |s: &Speed| s.decode_ms_per_token - one.decode_ms_per_token;
    let budget = |hop_us: f64| 2.0 * hop_us / 1e3 + 1.0;
    for (name, s, hop, idle) in [
        ("loopback", &two, hop_loopback, idle_loopback),
        ("ssh", &ssh, hop_ssh, idle_ssh),
    ] {
        let (o, b) = (overhead(s), budget(hop));
        println!(
            "  split overhead, {name:<8} {o:>6.3} ms/token; hop round trip p50 {:.1} µs back to back, \
             {:.1} µs after {:.1} ms idle (a token's compute); target ≤ 2 × hop + 1 ms = {b:.3} ms: {}",
            hop,
            idle,
            token_gap.as_secs_f64() * 1e3,
            if o <= b { "met" } else { "MISSED" }
        );
    }
    match &llama {
        Some(llama) => println!(
            "  decode vs llama.cpp (1 node, {threads} threads): {:.2}×, prefill {:.2}×",
            one.decode_tps / llama.1,
            one.prefill_tps / llama.0
        ),
        None => println!("  llama.cpp not run (--without-llama-cpp)"),
    }

    let speed = |s: &Speed| {
        json!({"prompt_tokens": s.prompt_tokens, "prefill_tokens_per_s": s.prefill_tps,
               "decode_tokens_per_s": s.decode_tps, "decode_ms_per_token": s.decode_ms_per_token,
               "decoded_tokens": s.decoded})
    };
    let results = json!({
        "quick": quick,
        "threads": threads,
        "one_node": speed(&one),
        "two_nodes_loopback": speed(&two),
        "two_nodes_ssh": speed(&ssh),
        "hop_round_trip_p50_us": {"loopback": hop_loopback, "ssh": hop_ssh},
        "hop_round_trip_after_idle_p50_us": {"loopback": idle_loopback, "ssh": idle_ssh,
                                             "idle_ms": token_gap.as_secs_f64() * 1e3},
        "split_overhead_ms_per_token": {"loopback": overhead(&two), "ssh": overhead(&ssh)},
        "split_overhead_budget_ms": {"loopback": budget(hop_loopback), "ssh": budget(hop_ssh)},
        "llama_cpp": llama.as_ref().map(|l| json!({"prefill_tokens_per_s": l.0, "decode_tokens_per_s": l.1, "version": l.2})),
        "decode_ratio_vs_llama_cpp": llama.as_ref().map(|l| one.decode_tps / l.1),
        "prefill_ratio_vs_llama_cpp": llama.as_ref().map(|l| one.prefill_tps / l.0),
        "models": models,
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&results)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn chat(port: u16, max_tokens: u32) -> Result<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into();
    let body = json!({
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": max_tokens,
    });
    Ok(agent
        .post(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .send_json(&body)?
        .body_mut()
        .read_json()?)
}

/// Best of `repeats` after one warm-up request (which loads the shards).
fn measure(node: &NodeProc, decode: u32, repeats: usize) -> Result<Speed> {
    chat(node.api_port, 2)?;
    let mut best: Option<Speed> = None;
    for _ in 0..repeats {
        let s = Speed::of(&chat(node.api_port, decode)?)?;
        if best.as_ref().is_none_or(|b| s.decode_tps > b.decode_tps) {
            best = Some(s);
        }
    }
    best.context("no repeats")
}

/// p50 of a step-sized request (one token's hidden states, f32 [1, 1, 576])
/// to node `id` at `port` and its (small) answer: what one hop of a decode
/// step costs on the wire.
/// p50 of `count` step-sized round trips to node `id` at `port`, each after
/// `gap` with the link idle. Back to back (`gap` zero), every process on the
/// path stays awake. In decode a hop comes once per token's compute, after
/// each of them has gone idle, and waking an idle process (a halted vCPU
/// here) costs time that the back-to-back figure never shows.
async fn hop_rtt(port: u16, id: &str, count: usize, gap: Duration) -> Result<f64> {
    let mut stream = socket::connect(([127, 0, 0, 1], port).into(), Duration::from_secs(5)).await?;
    let hello = Hello {
        node_id: "bench-hop".into(),
        expected_peer: String::new(),
        limits: Limits::default(),
        capabilities: DeviceCapabilities::unknown("bench"),
    };
    let (theirs, leftover) =
        handshake::dial(&mut stream, &hello, id, Duration::from_secs(5)).await?;
    let client = Client::start(
        stream,
        leftover,
        theirs,
        hello.limits,
        Duration::from_secs(30),
    );
    let hidden = Tensor::new(DType::F32, vec![1, 1, 576], vec![0u8; 576 * 4])?;
    // Without an inference state the node refuses the step at once, after
    // reading every byte of it: the wire's cost without the model's.
    let message = Message::SendTensor {
        shard: Shard {
            model_sha256: "hop".into(),
            start_layer: 0,
            end_layer: 0,
            n_layers: 1,
        },
        tensor: hidden,
        request_id: "hop".into(),
        inference_state: None,
    };
    let mut times = Vec::with_capacity(count);
    for i in 0..count + count / 10 {
        if !gap.is_zero() {
            // Stands in for a token's compute, during which the link is idle.
            tokio::time::sleep(gap).await;
        }
        let start = Instant::now();
        let _ = client.request(&message).await;
        if i >= count / 10 {
            times.push(start.elapsed());
        }
    }
    Ok(Stats::new(times).p50_us())
}

/// llama.cpp on the same prompt ids: (prefill tok/s, decode tok/s, version).
fn llama_cpp(
    model: &Path,
    threads: u16,
    decode: u32,
    repeats: usize,
) -> Result<(f64, f64, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let file = ModelFile::open(model)?;
    let tokenizer = ModelTokenizer::from_gguf(file.metadata())?;
    let text = ChatTemplate::from_gguf(file.metadata(), &tokenizer)?
        .context("the model has no chat template")?
        .render(&[ChatMessage {
            role: "user".into(),
            content: PROMPT.into(),
        }])?;
    let ids = tokenizer.encode(&text)?;
    let python = crate::models::llama_python(&root)?;
    let (m, version) = crate::models::llama_cpp(&python, model, threads, &ids, decode, repeats)?;
    Ok((m.prefill_tps, m.decode_tps, version))
}
