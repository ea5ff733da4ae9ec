//! SendTensor through the node's real server and client code: every dtype and a
//! 256 MiB tensor arrive bit-identical, and many requests in flight on one link
//! are answered out of order yet each to its caller.
//!
//! The node runs in-process with a test engine that echoes what it receives;
//! the product's node answers `no_model_loaded` instead (checked at the end
//! against the real binary).

mod common;
mod echo;

use std::sync::Arc;
use std::time::{Duration, Instant};

use echo::{dial, Echo};
use tensorlink::net::client::RequestError;
use tensorlink::protocol::{DType, ErrorCode, Limits, Message, Shard, Tensor};
use tensorlink::server::ServerConfig;

async fn start_echo_node(dir: &std::path::Path) -> tensorlink::node::RunningNode {
    echo::start_echo_node(dir, "echo", ServerConfig::default(), Echo::default()).await
}

fn shard() -> Shard {
    Shard {
        model_sha256: "test".into(),
        start_layer: 0,
        end_layer: 0,
        n_layers: 1,
    }
}

fn send_tensor(tensor: Tensor, delay_ms: u64) -> Message {
    Message::SendTensor {
        shard: shard(),
        tensor,
        request_id: "r".into(),
        inference_state: Some(tensorlink::protocol::InferenceState {
            position: delay_ms,
            context: None,
        }),
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dtype_arrives_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_echo_node(dir.path()).await;
    let client = dial(node.node_addr, "echo").await;
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let shape = vec![3, 5, 7];
        let data = pattern(105 * dtype.size(), i as u64);
        let sent = Tensor::new(dtype, shape, data).unwrap();
        let answer = client.request(&send_tensor(sent.clone(), 0)).await.unwrap();
        assert_eq!(answer, Message::TensorResult(Some(sent)), "{dtype:?}");
    }
    node.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_tensor_arrives_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_echo_node(dir.path()).await;
    let client = dial(node.node_addr, "echo").await;
    let len = 256usize << 20;
    let data = pattern(len, 42);
    let sent = Tensor::new(DType::F16, vec![(len / 2 / 4096) as u64, 4096], data).unwrap();
    let start = Instant::now();
    let answer = client.request(&send_tensor(sent.clone(), 0)).await.unwrap();
    common::figure(&format!(
        "256 MiB round trip (debug build, there and back) in {:?}",
        start.elapsed()
    ));
    let Message::TensorResult(Some(back)) = answer else {
        panic!("unexpected answer")
    };
    assert_eq!(back.shape(), sent.shape());
    assert!(
        back.data() == sent.data(),
        "256 MiB tensor differs after the round trip"
    );
    node.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_matched_by_id_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_echo_node(dir.path()).await;
    let client = dial(node.node_addr, "echo").await;
    // Earlier requests sleep longer, so answers come back in reverse order.
    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let t =
                    Tensor::new(DType::I64, vec![1], (i as i64).to_le_bytes().to_vec()).unwrap();
                let answer = client
                    .request(&send_tensor(t.clone(), (32 - i) * 5))
                    .await
                    .unwrap();
                (answer == Message::TensorResult(Some(t)), Instant::now())
            })
        })
        .collect();
    let mut finished = Vec::new();
    for t in tasks {
        let (ok, at) = t.await.unwrap();
        assert!(ok, "an answer went to the wrong caller");
        finished.push(at);
    }
    assert!(
        finished.first() > finished.last(),
        "answers were not reordered, so the test proved nothing"
    );
    node.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_beyond_the_peer_limits_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_echo_node(dir.path()).await;
    let client = dial(node.node_addr, "echo").await;
    let prompt = "x".repeat(Limits::default().max_meta as usize + 1);
    let huge = Message::SendPrompt {
        shard: shard(),
        prompt,
        request_id: "r".into(),
        inference_state: None,
    };
    let err = client.request(&huge).await.unwrap_err();
    assert!(
        matches!(
            err,
            RequestError::TooLarge {
                what: "metadata",
                ..
            }
        ),
        "{err}"
    );
    // The link itself is untouched.
    let t = Tensor::new(DType::U8, vec![3], vec![1, 2, 3]).unwrap();
    assert_eq!(
        client.request(&send_tensor(t.clone(), 0)).await.unwrap(),
        Message::TensorResult(Some(t))
    );
    // A shard that does not fit its model is a bad request, not a broken stream.
    let bad = Message::SendTensor {
        shard: Shard {
            model_sha256: "m".into(),
            start_layer: 3,
            end_layer: 1,
            n_layers: 2,
        },
        tensor: Tensor::new(DType::U8, vec![1], vec![0]).unwrap(),
        request_id: "r".into(),
        inference_state: None,
    };
    assert!(matches!(
        client.request(&bad).await,
        Err(RequestError::Remote {
            code: ErrorCode::Malformed,
            ..
        })
    ));
    assert!(!client.is_closed());
    node.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_fail_fast_when_the_link_dies() {
    let dir = tempfile::tempdir().unwrap();
    let received = Arc::new(tokio::sync::Notify::new());
    let node = echo::start_echo_node(
        dir.path(),
        "echo",
        ServerConfig::default(),
        Echo {
            received: received.clone(),
        },
    )
    .await;
    let client = dial(node.node_addr, "echo").await;
    let t = Tensor::new(DType::U8, vec![1], vec![1]).unwrap();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.request(&send_tensor(t, 60_000)).await })
    };
    received.notified().await; // the request is in flight at the node
    let start = Instant::now();
    client.close("test closes the link");
    let err = slow.await.unwrap().unwrap_err();
    assert!(matches!(err, RequestError::Closed(_)), "{err}");
    assert!(start.elapsed() < Duration::from_secs(1));
    node.shutdown(Duration::from_millis(100)).await;
}

#[test]
fn the_real_node_answers_no_model_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.json");
    common::write_peer_file(&f, &[]);
    let n = common::NodeProc::start(
        dir.path(),
        "bare",
        common::free_port(),
        common::free_port(),
        &f,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = dial(([127, 0, 0, 1], n.node_port).into(), "bare").await;
        let t = Tensor::new(DType::F32, vec![2], vec![0u8; 8]).unwrap();
        let err = client.request(&send_tensor(t, 0)).await.unwrap_err();
        match err {
            RequestError::Remote { code, message } => {
                assert_eq!(code, ErrorCode::NoModelLoaded);
                assert!(message.contains("bare"), "{message}");
            }
            other => panic!("expected no_model_loaded, got {other}"),
        }
        assert!(matches!(
            client.request(&Message::HealthCheck).await,
            Ok(Message::HealthStatus { healthy: true, .. })
        ));
    });
}

/// docs/PROTOCOL.md §8.5: the acceptor's idle timer starts when it has read a
/// frame (or finished the handshake); it closes a connection that stays silent
/// that long with nothing in flight, and waits again while a request is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timer_runs_from_the_last_frame_read_and_spares_requests_in_flight() {
    const IDLE: Duration = Duration::from_millis(400);
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        idle_timeout: IDLE,
        ..ServerConfig::default()
    };
    let node = echo::start_echo_node(dir.path(), "echo", config, Echo::default()).await;
    let tiny = || Tensor::new(DType::U8, vec![1], vec![7]).unwrap();

    // Silent after the handshake: closed once the timer runs out, not before.
    let silent = dial(node.node_addr, "echo").await;
    let opened = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(10), silent.closed())
        .await
        .expect("an idle connection is closed");
    let lasted = opened.elapsed();
    assert!(
        lasted >= IDLE.mul_f32(0.9),
        "closed after {lasted:?}: {reason}"
    );

    // Frames more often than the timer keep a connection, however long.
    let busy = dial(node.node_addr, "echo").await;
    for _ in 0..6 {
        tokio::time::sleep(IDLE / 3).await;
        assert!(matches!(
            busy.request(&send_tensor(tiny(), 0)).await,
            Ok(Message::TensorResult(Some(_)))
        ));
    }
    assert!(!busy.is_closed(), "a connection in use was closed");

    // A request that takes three timers to answer is answered; the connection
    // then goes at the first expiry with nothing in flight, a timer after it.
    let slow = dial(node.node_addr, "echo").await;
    let sent = Instant::now();
    let delay = IDLE.as_millis() as u64 * 3;
    assert!(matches!(
        slow.request(&send_tensor(tiny(), delay)).await,
        Ok(Message::TensorResult(Some(_)))
    ));
    tokio::time::timeout(Duration::from_secs(10), slow.closed())
        .await
        .expect("closed once nothing is in flight");
    let lasted = sent.elapsed();
    assert!(
        lasted >= Duration::from_millis(delay) && lasted < Duration::from_millis(delay) + IDLE * 3,
        "closed {lasted:?} after the last frame"
    );
}
