//! A node whose engine echoes tensors, in the test process: the node's real
//! server, handshake and request path, with answers that can be checked byte
//! for byte. (The product's node has no such engine; without a model it
//! answers `no_model_loaded`.)

// Included by the tests that need it, not by tests/common: the installer's
// tests share tests/common and do not depend on the node's crate. Each test
// uses a part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tensorlink::capabilities::DeviceCapabilities;
use tensorlink::engine::{Backend, BoxFuture, Engine};
use tensorlink::net::client::Client;
use tensorlink::net::{handshake, socket};
use tensorlink::node::{self, NodeConfig, RunningNode};
use tensorlink::peers::LinkTiming;
use tensorlink::protocol::{Hello, Limits, Message};
use tensorlink::server::ServerConfig;

/// Answers a SendTensor with the tensor it received, after as many
/// milliseconds as its inference state's `position` names (so answers can be
/// made to overtake each other); anything else with an empty result.
#[derive(Default)]
pub struct Echo {
    /// Signalled as each request reaches the engine.
    pub received: Arc<tokio::sync::Notify>,
}

impl Engine for Echo {
    fn infer(&self, request: Message) -> BoxFuture<'static, Message> {
        self.received.notify_one();
        let (tensor, delay) = match request {
            Message::SendTensor {
                tensor,
                inference_state,
                ..
            } => (Some(tensor), inference_state.map_or(0, |s| s.position)),
            _ => (None, 0),
        };
        if delay == 0 {
            return Box::pin(std::future::ready(Message::TensorResult(tensor)));
        }
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Message::TensorResult(tensor)
        })
    }
}

/// Starts a node called `id` with the echo engine, listening on free loopback ports.
pub async fn start_echo_node(
    dir: &std::path::Path,
    id: &str,
    server: ServerConfig,
    engine: Echo,
) -> RunningNode {
    let peer_file = dir.join("peers.json");
    std::fs::write(&peer_file, r#"{"peers": {}}"#).unwrap();
    let config = NodeConfig {
        node_id: id.into(),
        node_addr: "127.0.0.1:0".parse().unwrap(),
        api_addr: "127.0.0.1:0".parse().unwrap(),
        peer_file,
        capabilities: DeviceCapabilities::unknown(id),
        limits: Limits::default(),
        server,
        timing: LinkTiming::default(),
        allow_sleep: false,
    };
    node::start(config, Backend::Engine(Arc::new(engine)))
        .await
        .unwrap()
}

/// Dials `addr` as a node called "tester" that expects `expected` there.
pub async fn dial(addr: SocketAddr, expected: &str) -> Client {
    let mut stream = socket::connect(addr, Duration::from_secs(2)).await.unwrap();
    let hello = Hello {
        node_id: "tester".into(),
        expected_peer: String::new(),
        limits: Limits::default(),
        capabilities: DeviceCapabilities::unknown("tester"),
    };
    let (theirs, leftover) = handshake::dial(&mut stream, &hello, expected, Duration::from_secs(3))
        .await
        .unwrap();
    Client::start(
        stream,
        leftover,
        theirs,
        hello.limits,
        Duration::from_secs(10),
    )
}
