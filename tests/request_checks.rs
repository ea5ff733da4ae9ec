//! The order in which a node checks an inference request (docs/PROTOCOL.md
//! §9.3): each request here breaks two rules, and the answer must name the
//! one the spec checks first. Against a node in this process, over a real
//! connection, with the test model.

mod common;
mod echo;

use tensorlink::capabilities::DeviceCapabilities;
use tensorlink::engine::{Backend, BoxFuture, Engine};
use tensorlink::inference::gguf::ModelFile;
use tensorlink::inference::memory::Footprint;
use tensorlink::inference::{Inference, LoadOptions};
use tensorlink::net::client::{Client, RequestError};
use tensorlink::node::{self, NodeConfig, RunningNode};
use tensorlink::peers::LinkTiming;
use tensorlink::protocol::{
    Assignment, DType, ErrorCode, InferenceState, Limits, Message, RingContext, SamplingParams,
    Shard, Tensor,
};
use tensorlink::server::ServerConfig;

async fn start(dir: &std::path::Path, backend: Backend) -> RunningNode {
    let peer_file = dir.join("peers.json");
    std::fs::write(&peer_file, r#"{"peers": {}}"#).unwrap();
    let config = NodeConfig {
        node_id: "solo".into(),
        node_addr: "127.0.0.1:0".parse().unwrap(),
        api_addr: "127.0.0.1:0".parse().unwrap(),
        peer_file,
        capabilities: DeviceCapabilities::unknown("solo"),
        limits: Limits::default(),
        server: ServerConfig::default(),
        timing: LinkTiming::default(),
        allow_sleep: false,
    };
    node::start(config, backend).await.unwrap()
}

/// The error a request is answered with: its code and message.
async fn refusal(client: &Client, request: Message) -> (ErrorCode, String) {
    match client.request(&request).await {
        Err(RequestError::Remote { code, message }) => (code, message),
        other => panic!("expected an Error, got {other:?}"),
    }
}

fn tokens(ids: &[i32]) -> Tensor {
    let data: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    Tensor::new(DType::I32, vec![1, ids.len() as u64], data).unwrap()
}

/// Layer 0 of a one-layer model no node here holds.
fn one_layer() -> Shard {
    Shard {
        model_sha256: "0".repeat(64),
        start_layer: 0,
        end_layer: 0,
        n_layers: 1,
    }
}

fn step(shard: Shard, tensor: Tensor, state: Option<InferenceState>) -> Message {
    Message::SendTensor {
        shard,
        tensor,
        request_id: "r1".into(),
        inference_state: state,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_refused_for_the_first_rule_it_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let inference = Inference::load(
        "solo",
        &common::model::test_model(),
        &LoadOptions::default(),
    )
    .unwrap();
    let info = inference.info().clone();
    let context = inference.context_length() as u64;
    let node = start(dir.path(), Backend::model(inference)).await;
    let client = echo::dial(node.node_addr, "solo").await;

    let n = info.n_layers;
    let shard = Shard {
        model_sha256: info.sha256.clone(),
        start_layer: 0,
        end_layer: n - 1,
        n_layers: n,
    };
    let other_model = Shard {
        model_sha256: "0".repeat(64),
        ..shard.clone()
    };
    let bad_range = Shard {
        start_layer: n,
        ..other_model.clone()
    };
    let ring = RingContext {
        max_positions: None,
        ..solo_context(n, 1)
    };
    // A request's first step carries its ring context; later ones do not.
    let at = |position: u64| {
        Some(InferenceState {
            position,
            context: (position == 0).then(|| ring.clone()),
        })
    };
    let beyond = at(context);

    let cases: Vec<(&str, Message, ErrorCode, &str)> = vec![
        (
            "1. the shard's layer range, before the state",
            step(bad_range, tokens(&[1]), None),
            ErrorCode::Malformed,
            "shard",
        ),
        // 2. a model loaded: a_node_without_a_model_checks_the_shard_first
        (
            "3. the request type (training), before the shard's model",
            Message::SendExample {
                shard: other_model.clone(),
                example: tokens(&[1]),
                target: tokens(&[1]),
                length: tokens(&[1]),
                train: false,
                request_id: "r1".into(),
            },
            ErrorCode::UnknownType,
            "not implemented",
        ),
        (
            "4. the inference state, before the model",
            step(other_model.clone(), tokens(&[1]), None),
            ErrorCode::Malformed,
            "needs its inference state",
        ),
        (
            "5. the ring context on a first step, before the model",
            step(
                other_model.clone(),
                tokens(&[1]),
                Some(InferenceState {
                    position: 0,
                    context: None,
                }),
            ),
            ErrorCode::Malformed,
            "a request's first step (position 0) carries its ring context",
        ),
        (
            "5. no ring context on a later step, before the model",
            step(
                other_model.clone(),
                tokens(&[1]),
                Some(InferenceState {
                    position: 3,
                    context: Some(ring.clone()),
                }),
            ),
            ErrorCode::Malformed,
            "only a request's first step",
        ),
        (
            "6. the model, before the input",
            step(
                other_model,
                Tensor::new(DType::F32, vec![1], vec![0; 4]).unwrap(),
                at(0),
            ),
            ErrorCode::WrongModel,
            "same model file",
        ),
        (
            "7. the input's dtype and shape, before positions",
            step(
                shard.clone(),
                Tensor::new(DType::F32, vec![1, 1], vec![0; 4]).unwrap(),
                beyond.clone(),
            ),
            ErrorCode::Malformed,
            "token ids (i32 [1, n])",
        ),
        (
            "8. token ids within the vocabulary, before positions",
            step(shard.clone(), tokens(&[i32::MAX]), beyond.clone()),
            ErrorCode::Malformed,
            "outside the vocabulary",
        ),
        (
            "9. positions within the context",
            step(shard.clone(), tokens(&[1]), beyond),
            ErrorCode::Malformed,
            "beyond the model's context",
        ),
        (
            "5. the ring context's values, before the model",
            step(
                Shard {
                    model_sha256: "0".repeat(64),
                    ..shard.clone()
                },
                tokens(&[1]),
                Some(InferenceState {
                    position: 0,
                    context: Some(RingContext {
                        sampling: SamplingParams {
                            temperature: 9.0,
                            ..SamplingParams::default()
                        },
                        ..ring.clone()
                    }),
                }),
            ),
            ErrorCode::Malformed,
            "`temperature` must be between 0 and 2, not 9",
        ),
    ];
    for (rule, request, code, says) in cases {
        let (got, message) = refusal(&client, request).await;
        assert_eq!(got, code, "{rule}: {message}");
        assert!(message.contains(says), "{rule}: {message}");
    }
    // A request that breaks none is answered with a token, and its cache holds it.
    let answer = client
        .request(&step(shard.clone(), tokens(&[1]), at(0)))
        .await;
    assert!(
        matches!(answer, Ok(Message::TensorResult(Some(_)))),
        "{answer:?}"
    );

    // 10. the request's cache, before any layer is loaded: a step for other
    // layers (which would make the node load them and drop every resting
    // cache) at a position its cache does not hold is refused first, and the
    // request above goes on where it was.
    let other_layers = Message::SendTensor {
        shard: Shard {
            end_layer: n - 2,
            ..shard.clone()
        },
        tensor: tokens(&[1]),
        request_id: "r2".into(),
        inference_state: Some(InferenceState {
            position: 5,
            context: None,
        }),
    };
    let (code, message) = refusal(&client, other_layers).await;
    assert_eq!(code, ErrorCode::Malformed, "{message}");
    assert!(message.contains("holds 0 positions"), "{message}");
    let answer = client.request(&step(shard, tokens(&[2]), at(1))).await;
    assert!(
        matches!(answer, Ok(Message::TensorResult(Some(_)))),
        "the first request's cache survived: {answer:?}"
    );
    node.shutdown(std::time::Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_node_without_a_model_checks_the_shard_first() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), Backend::NoModel).await;
    let client = echo::dial(node.node_addr, "solo").await;
    let shard = one_layer();
    let bad = Shard {
        start_layer: 1,
        ..shard.clone()
    };
    let (code, message) = refusal(&client, step(bad, tokens(&[1]), None)).await;
    assert_eq!(code, ErrorCode::Malformed, "{message}");
    let (code, message) = refusal(&client, step(shard, tokens(&[1]), None)).await;
    assert_eq!(code, ErrorCode::NoModelLoaded, "{message}");
    assert!(
        message.contains("node `solo` has no model loaded"),
        "{message}"
    );
    node.shutdown(std::time::Duration::from_secs(2)).await;
}

/// Panics in `infer` itself when the request id says so, else in its future.
struct Panics;

impl Engine for Panics {
    fn infer(&self, request: Message) -> BoxFuture<'static, Message> {
        if matches!(&request, Message::SendTensor { request_id, .. } if request_id == "now") {
            panic!("the engine broke at once");
        }
        Box::pin(async {
            tokio::task::yield_now().await;
            panic!("the engine broke later")
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_answers_internal_and_the_connection_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), Backend::Engine(std::sync::Arc::new(Panics))).await;
    let client = echo::dial(node.node_addr, "solo").await;
    let shard = one_layer();
    for (id, says) in [("now", "broke at once"), ("later", "broke later")] {
        let request = Message::SendTensor {
            shard: shard.clone(),
            tensor: tokens(&[1]),
            request_id: id.into(),
            inference_state: None,
        };
        let (code, message) = refusal(&client, request).await;
        assert_eq!(code, ErrorCode::Internal, "{message}");
        assert!(message.contains(says), "{message}");
    }
    assert!(matches!(
        client.request(&Message::HealthCheck).await,
        Ok(Message::HealthStatus { healthy: true, .. })
    ));
    node.shutdown(std::time::Duration::from_secs(2)).await;
}

/// The ring context of a one-node ring over every layer of an `n`-layer model.
fn solo_context(n: u32, max_positions: u64) -> RingContext {
    RingContext {
        origin: "tester".into(),
        ring: vec![Assignment {
            node_id: "solo".into(),
            start_layer: 0,
            end_layer: n - 1,
        }],
        sampling: SamplingParams::default(),
        max_positions: Some(max_positions),
        top_logprobs: None,
    }
}

/// A node lends the model a fixed memory: a first step must find room for its
/// request's whole cache (prompt and answer, as `max_positions` says) beside
/// the layers and every other request's, or it is `busy`, with the figures
/// and what to do; the room comes back when a request ends. Its steps may not
/// outgrow what it reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_cache_does_not_fit_is_busy_until_another_ends() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::model::test_model();
    let file = ModelFile::open(&model).unwrap();
    let n = file.config().n_layers;
    let footprint = Footprint::of(&file, 0, n - 1);
    // SmolLM2-135M: 30 layers × 3 kv heads × 64 wide × (k, v) × f32.
    assert_eq!(footprint.kv_per_position, 30 * 3 * 64 * 2 * 4);
    // Room for the layers and one and a half caches of 1000 positions.
    let limit = (footprint.weights + footprint.kv(1500)).div_ceil(1 << 20);
    let options = LoadOptions {
        ctx_size: Some(2048),
        memory_limit_mib: Some(limit),
        ..LoadOptions::default()
    };
    let inference = Inference::load("solo", &model, &options).unwrap();
    let info = inference.info().clone();
    let node = start(dir.path(), Backend::model(inference)).await;
    let client = echo::dial(node.node_addr, "solo").await;
    let shard = Shard {
        model_sha256: info.sha256.clone(),
        start_layer: 0,
        end_layer: info.n_layers - 1,
        n_layers: info.n_layers,
    };
    let first = |id: &str, positions: u64| Message::SendTensor {
        shard: shard.clone(),
        tensor: tokens(&[1, 2]),
        request_id: id.into(),
        inference_state: Some(InferenceState {
            position: 0,
            context: Some(solo_context(info.n_layers, positions)),
        }),
    };
    let answered =
        |m: &Result<Message, RequestError>| matches!(m, Ok(Message::TensorResult(Some(_))));

    let a = client.request(&first("a", 1000)).await;
    assert!(answered(&a), "{a:?}");
    let (code, message) = refusal(&client, first("b", 1000)).await;
    assert_eq!(code, ErrorCode::Busy, "{message}");
    for says in [
        "node `solo`",
        "1000 positions",
        "1 other requests",
        "--memory-limit",
    ] {
        assert!(message.contains(says), "`{says}` in: {message}");
    }
    // A request that fits beside it is served.
    let small = client.request(&first("c", 100)).await;
    assert!(answered(&small), "{small:?}");
    // …and may not grow beyond what it reserved.
    let beyond = Message::SendTensor {
        shard: shard.clone(),
        tensor: tokens(&[3; 99]),
        request_id: "c".into(),
        inference_state: Some(InferenceState {
            position: 2,
            context: None,
        }),
    };
    let (code, message) = refusal(&client, beyond).await;
    assert_eq!(code, ErrorCode::Malformed, "{message}");
    assert!(message.contains("reserved 100 positions"), "{message}");

    // The origin ends the first request: its room is free again.
    let end = Message::SendOpaqueStatus {
        request_id: "a".into(),
        status: r#"{"type":"end"}"#.into(),
    };
    client.request(&end).await.unwrap();
    let b = client.request(&first("b", 1000)).await;
    assert!(answered(&b), "{b:?}");
    node.shutdown(std::time::Duration::from_secs(2)).await;
}

/// Asked for `top_logprobs`, the last shard answers f32 `[k + 1, 2]`: the
/// sampled token and the k likeliest, as (id, log-probability) rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_shard_asked_for_logprobs_answers_them_beside_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let inference = Inference::load(
        "solo",
        &common::model::test_model(),
        &LoadOptions::default(),
    )
    .unwrap();
    let info = inference.info().clone();
    let node = start(dir.path(), Backend::model(inference)).await;
    let client = echo::dial(node.node_addr, "solo").await;
    let shard = Shard {
        model_sha256: info.sha256.clone(),
        start_layer: 0,
        end_layer: info.n_layers - 1,
        n_layers: info.n_layers,
    };
    let ask = |id: &str, top: Option<u32>| Message::SendTensor {
        shard: shard.clone(),
        tensor: tokens(&[504, 3575, 282]),
        request_id: id.into(),
        inference_state: Some(InferenceState {
            position: 0,
            context: Some(RingContext {
                top_logprobs: top,
                ..solo_context(info.n_layers, 16)
            }),
        }),
    };
    let Ok(Message::TensorResult(Some(plain))) = client.request(&ask("plain", None)).await else {
        panic!("no token")
    };
    assert_eq!((plain.dtype(), plain.shape()), (DType::I32, &[1u64, 1][..]));
    let token = i32::from_le_bytes(plain.data()[..4].try_into().unwrap()) as f32;
    let Ok(Message::TensorResult(Some(t))) = client.request(&ask("lp", Some(3))).await else {
        panic!("no log-probabilities")
    };
    assert_eq!((t.dtype(), t.shape()), (DType::F32, &[4u64, 2][..]));
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // Greedy: the sampled token is the likeliest, and comes first twice.
    assert_eq!((v[0], v[2]), (token, token), "{v:?}");
    assert_eq!(v[1], v[3]);
    assert!(v[1] <= 0.0 && v[3] >= v[5] && v[5] >= v[7], "{v:?}");
    let mass: f32 = [v[3], v[5], v[7]].iter().map(|l| l.exp()).sum();
    assert!(mass <= 1.0 + 1e-5, "{v:?}");

    let (code, message) = refusal(&client, ask("many", Some(21))).await;
    assert_eq!(code, ErrorCode::Malformed, "{message}");
    assert!(message.contains("at most 20"), "{message}");
    node.shutdown(std::time::Duration::from_secs(2)).await;
}

/// `--model-sha256` (cluster.toml's `[model] sha256`): the file's published
/// sha256 (the one scripts/fetch-test-model checks with sha256sum, in any
/// case) is accepted, any other refused with the path and both hashes.
#[test]
fn a_model_whose_sha256_is_not_the_clusters_is_refused_at_load() {
    const PUBLISHED: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
    let model = common::model::test_model();
    let with = |sha: &str| LoadOptions {
        ctx_size: Some(64),
        expected_sha256: Some(sha.to_owned()),
        ..LoadOptions::default()
    };
    let loaded = Inference::load("solo", &model, &with(&PUBLISHED.to_ascii_uppercase())).unwrap();
    assert_eq!(loaded.info().sha256, PUBLISHED);
    let other = format!("0{}", &PUBLISHED[1..]);
    let err = Inference::load("solo", &model, &with(&other))
        .err()
        .expect("refused")
        .to_string();
    let path = model.display().to_string();
    for part in [path.as_str(), PUBLISHED, other.as_str(), "cluster.toml"] {
        assert!(err.contains(part), "`{part}` in: {err}");
    }
}

/// docs/PROTOCOL.md §9.8–9.9: a peer may read the model file this node
/// loaded, by its sha256 or its name, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gives_peers_only_the_model_file_it_loaded() {
    use tensorlink::fetch::serve::MAX_READ;
    let dir = tempfile::tempdir().unwrap();
    let path = common::model::test_model();
    let bytes = std::fs::read(&path).unwrap();
    let inference = Inference::load("solo", &path, &LoadOptions::default()).unwrap();
    let sha256 = inference.info().sha256.clone();
    let name = path.file_name().unwrap().to_str().unwrap().to_owned();
    let node = start(dir.path(), Backend::model(inference)).await;
    let client = echo::dial(node.node_addr, "solo").await;

    let query = |sha256: &str, name: &str| Message::QueryModelFile {
        sha256: sha256.into(),
        name: name.into(),
    };
    let info = Message::ModelFileInfo {
        name: name.clone(),
        sha256: sha256.clone(),
        size: bytes.len() as u64,
    };
    for q in [
        query(&sha256, ""),
        query(&sha256.to_uppercase(), &name),
        query("", &name),
        query("", ""),
    ] {
        assert_eq!(client.request(&q).await.unwrap(), info, "{q:?}");
    }
    let other = "0".repeat(64);
    for q in [
        query(&other, ""),
        query("", "other.gguf"),
        query("", "../../.ssh/id_ed25519"),
        query(&sha256, "other.gguf"),
    ] {
        let (code, message) = refusal(&client, q).await;
        assert_eq!(code, ErrorCode::WrongModel, "{message}");
        assert!(
            message.contains("gives only the model it runs") && message.contains(&name),
            "{message}"
        );
    }

    let read = |sha256: &str, offset: u64, len: u32| Message::ReadModelFile {
        sha256: sha256.into(),
        offset,
        len,
    };
    let end = bytes.len() as u64;
    for (offset, len) in [(0, 8), (end - 5000, 5000), (1 << 20, MAX_READ)] {
        let answer = client.request(&read(&sha256, offset, len)).await.unwrap();
        let span = offset as usize..(offset + len as u64) as usize;
        assert_eq!(
            answer,
            Message::ModelBytes {
                offset,
                data: bytes[span].to_vec().into()
            }
        );
    }
    for (q, code) in [
        (read(&sha256, end - 4, 5), ErrorCode::Malformed),
        (read(&sha256, u64::MAX, 1), ErrorCode::Malformed),
        (read(&sha256, 0, 0), ErrorCode::Malformed),
        (read(&sha256, 0, MAX_READ + 1), ErrorCode::Malformed),
        (read(&other, 0, 8), ErrorCode::WrongModel),
        (read("", 0, 8), ErrorCode::WrongModel),
    ] {
        let (got, message) = refusal(&client, q.clone()).await;
        assert_eq!(got, code, "{q:?}: {message}");
    }
    node.shutdown(std::time::Duration::from_secs(2)).await;

    // A node without a model has no file to give.
    let node = start(dir.path(), Backend::NoModel).await;
    let client = echo::dial(node.node_addr, "solo").await;
    let (code, message) = refusal(&client, query("", "")).await;
    assert_eq!(code, ErrorCode::NoModelLoaded, "{message}");
    node.shutdown(std::time::Duration::from_secs(2)).await;
}
