//! A local two-node demo: two nodes on loopback wired exactly as the seed's
//! peer files wire mac1 and mac2, linked, and the topology printed as
//! `curl localhost:<api>/topology` would show it.
//!
//! `cargo run --release --example demo`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tensorlink::capabilities::DeviceCapabilities;
use tensorlink::engine::NoModel;
use tensorlink::node::{self, NodeConfig};
use tensorlink::peers::LinkTiming;
use tensorlink::protocol::Limits;
use tensorlink::server::ServerConfig;

#[tokio::main]
async fn main() -> Result<()> {
    tensorlink::telemetry::init();
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
            capabilities: DeviceCapabilities::detect(),
            limits: Limits::default(),
            server: ServerConfig::default(),
            timing: LinkTiming::default(),
        };
        let engine = Arc::new(NoModel { node_id: id.into() });
        running.push(
            node::start(config, engine)
                .await
                .with_context(|| format!("starting {id}"))?,
        );
    }

    let start = Instant::now();
    let api = ports[2];
    let topology = loop {
        let body = http_get(api, "/topology").await?;
        let value: serde_json::Value = serde_json::from_str(&body)?;
        if value["nodes"].as_object().is_some_and(|n| n.len() == 2) {
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
    for node in running {
        node.shutdown(Duration::from_secs(2)).await;
    }
    Ok(())
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
