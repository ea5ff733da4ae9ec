//! A local two-node demo: two nodes on loopback wired exactly as the seed's
//! peer files wire mac1 and mac2, each holding the test model (fetched once by
//! scripts/fetch-test-model), linked; the topology printed as `curl
//! localhost:<api>/topology` would show it; then a chat answer streamed from
//! the model split across both, and the web UI left running until Ctrl-C.
//!
//! `cargo run --release --example demo`            (`-- --once` exits after the answer)

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tensorlink::engine::Backend;
use tensorlink::inference::{Inference, LoadOptions};
use tensorlink::node::{self, NodeConfig};
use tensorlink::peers::LinkTiming;
use tensorlink::protocol::Limits;
use tensorlink::server::ServerConfig;

#[tokio::main]
async fn main() -> Result<()> {
    tensorlink::telemetry::init();
    let once = std::env::args().any(|a| a == "--once");
    let fetched = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/fetch-test-model"
    ))
    .stderr(std::process::Stdio::inherit())
    .output()
    .context("running scripts/fetch-test-model")?;
    if !fetched.status.success() {
        bail!("scripts/fetch-test-model could not fetch the test model");
    }
    let model = std::path::PathBuf::from(String::from_utf8(fetched.stdout)?.trim());
    let dir = tempfile::tempdir()?;
    // Ports from the kernel, so the demo runs beside anything else.
    let ports: Vec<u16> = (0..4)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
        })
        .collect::<std::io::Result<_>>()?;
    let (mac1_port, mac2_port) = (ports[0], ports[1]);

    let mut running = Vec::new();
    for (id, port, api, peer, peer_port) in [
        ("mac1", mac1_port, ports[2], "mac2", mac2_port),
        ("mac2", mac2_port, ports[3], "mac1", mac1_port),
    ] {
        let peer_file = dir.path().join(format!("{id}_peers.json"));
        let text = format!(r#"{{"peers": {{"{peer}": {{"address": "127.0.0.1:{peer_port}"}}}}}}"#);
        std::fs::write(&peer_file, &text)?;
        println!(
            "{id}: node port {port}, API port {api}, {} = {text}",
            peer_file.display()
        );
        let config = NodeConfig {
            node_id: id.into(),
            node_addr: ([127, 0, 0, 1], port).into(),
            api_addr: ([127, 0, 0, 1], api).into(),
            peer_file,
            capabilities: tensorlink::capabilities::detect(),
            limits: Limits::default(),
            server: ServerConfig::default(),
            timing: LinkTiming::default(),
            allow_sleep: false,
        };
        let backend = Backend::model(Inference::load(id, &model, &LoadOptions::default())?);
        running.push(
            node::start(config, backend)
                .await
                .with_context(|| format!("starting {id}"))?,
        );
    }

    let start = Instant::now();
    let api = ports[2];
    let topology = loop {
        let body = http_get(api, "/topology").await?;
        let value: serde_json::Value = serde_json::from_str(&body)?;
        let ready = http_get(api, "/cluster").await?;
        let ready: serde_json::Value = serde_json::from_str(&ready)?;
        if value["nodes"].as_object().is_some_and(|n| n.len() == 2) && ready["problem"].is_null() {
            break value;
        }
        if start.elapsed() > Duration::from_secs(5) {
            bail!("the nodes did not link within 5 s; topology: {body}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "\nlinked in {:?}; curl http://127.0.0.1:{api}/topology:\n{}",
        start.elapsed(),
        serde_json::to_string_pretty(&topology)?
    );

    let question = "Write one sentence about the sea.";
    println!("\nPOST /v1/chat/completions {question:?} (stream, the model split across mac1 and mac2):\n");
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || stream_chat(api, question)).await??;
    println!(
        "\n\n{} characters in {:.2} s",
        answer.len(),
        started.elapsed().as_secs_f64()
    );
    if !once {
        println!("\nweb UI: http://127.0.0.1:{api}/  (Ctrl-C stops both nodes)");
        tokio::signal::ctrl_c().await?;
    }
    for node in running {
        node.shutdown(Duration::from_secs(2)).await;
    }
    Ok(())
}

/// Streams a chat answer to stdout as the tokens arrive, as `curl -N` would.
fn stream_chat(port: u16, question: &str) -> Result<String> {
    use std::io::{BufRead, Write};
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": question}],
        "stream": true,
        "temperature": 0.7,
        "seed": 1,
        "max_tokens": 200,
    });
    let response =
        ureq::post(&format!("http://127.0.0.1:{port}/v1/chat/completions")).send_json(&body)?;
    let mut answer = String::new();
    for line in std::io::BufReader::new(response.into_body().into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(data)?;
        if let Some(error) = chunk.get("error") {
            bail!("the cluster failed: {error}");
        }
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            print!("{text}");
            std::io::stdout().flush()?;
            answer.push_str(text);
        }
    }
    Ok(answer)
}

/// A minimal HTTP/1.0 GET, so the demo needs no HTTP client crate.
async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    s.read_to_string(&mut response).await?;
    let (_, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    Ok(body.to_owned())
}
