//! tensorlink: the node's real transport. The server is a real node
//! (`node::start`: the same listener, handshake, framing and request path the
//! service runs) whose engine echoes or acknowledges tensors; the client is the
//! node's own multiplexed link client.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use tensorlink::capabilities::DeviceCapabilities;
use tensorlink::engine::{Backend, BoxFuture, Engine};
use tensorlink::net::client::Client;
use tensorlink::net::{handshake, socket};
use tensorlink::node::{self, NodeConfig};
use tensorlink::peers::LinkTiming;
use tensorlink::protocol::{DType, Hello, Limits, Message, Shard, Tensor};
use tensorlink::server::ServerConfig;

/// Echoes a tensor whose request id is "echo"; acknowledges any other.
struct Bench;

impl Engine for Bench {
    fn infer(&self, request: Message) -> BoxFuture<'static, Message> {
        let answer = match request {
            Message::SendTensor {
                tensor, request_id, ..
            } if request_id == "echo" => Message::TensorResult(Some(tensor)),
            _ => Message::TensorResult(None),
        };
        Box::pin(std::future::ready(answer))
    }
}

pub async fn serve(port: u16) -> Result<()> {
    // In the parent's temporary directory, which the parent removes: this
    // process ends by SIGKILL and cleans up nothing itself.
    let dir = std::env::var_os(crate::workload::SCRATCH_ENV)
        .context("started without a scratch directory")?;
    let peer_file = std::path::Path::new(&dir).join(format!("peers-{port}.json"));
    std::fs::write(&peer_file, r#"{"peers": {}}"#)?;
    let config = NodeConfig {
        node_id: "bench-server".into(),
        node_addr: ([127, 0, 0, 1], port).into(),
        api_addr: ([127, 0, 0, 1], 0).into(),
        peer_file,
        capabilities: DeviceCapabilities::unknown("bench"),
        limits: Limits {
            max_meta: 1 << 20,
            max_payload: 1 << 30,
        },
        server: ServerConfig::default(),
        timing: LinkTiming::default(),
        allow_sleep: false,
    };
    let _node = node::start(config, Backend::Engine(Arc::new(Bench))).await?;
    std::future::pending::<()>().await;
    Ok(())
}

pub async fn connect(port: u16) -> Result<Client> {
    let mut stream = socket::connect(([127, 0, 0, 1], port).into(), Duration::from_secs(5))
        .await
        .context("tensorlink connect")?;
    let hello = Hello {
        node_id: "bench-client".into(),
        expected_peer: String::new(),
        limits: Limits {
            max_meta: 1 << 20,
            max_payload: 1 << 30,
        },
        capabilities: DeviceCapabilities::unknown("bench"),
    };
    let (theirs, leftover) =
        handshake::dial(&mut stream, &hello, "bench-server", Duration::from_secs(5)).await?;
    Ok(Client::start(
        stream,
        leftover,
        theirs,
        hello.limits,
        Duration::from_secs(60),
    ))
}

/// A SendTensor of `payload` as f16 of shape [rows, cols] (or flat u8).
pub fn request(payload: &Bytes, shape: &[u64], echo: bool) -> Result<Message> {
    let dtype = if shape.len() == 1 {
        DType::U8
    } else {
        DType::F16
    };
    Ok(Message::SendTensor {
        shard: Shard {
            model_sha256: "bench".into(),
            start_layer: 0,
            end_layer: 0,
            n_layers: 1,
        },
        tensor: Tensor::new(dtype, shape.to_vec(), payload.clone())?,
        request_id: if echo { "echo" } else { "ack" }.into(),
        inference_state: None,
    })
}

pub async fn round_trip(client: &Client, msg: &Message) -> Result<()> {
    match client.request(msg).await? {
        Message::TensorResult(Some(_)) => Ok(()),
        other => anyhow::bail!("unexpected answer {:?}", other.frame_type()),
    }
}

/// One-way transfer of `warmup` then `count` tensors with at most `window`
/// in flight; the seconds the `count` took.
pub async fn transfer(
    client: &Client,
    payload: &Bytes,
    warmup: usize,
    count: usize,
    window: usize,
) -> Result<f64> {
    let msg = Arc::new(request(payload, &[payload.len() as u64], false)?);
    windowed(client, &msg, warmup, window).await?;
    let start = std::time::Instant::now();
    windowed(client, &msg, count, window).await?;
    Ok(start.elapsed().as_secs_f64())
}

async fn windowed(client: &Client, msg: &Arc<Message>, count: usize, window: usize) -> Result<()> {
    crate::workload::windowed(count, window, || {
        let (client, msg) = (client.clone(), msg.clone());
        async move {
            client
                .request(&msg)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    })
    .await
}
