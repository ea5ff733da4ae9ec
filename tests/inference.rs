//! Distributed inference with the real test model (SmolLM2-135M-Instruct,
//! Q4_1): the same greedy tokens whether the model runs on one node, is split
//! across two or three on loopback, or across two through a real ssh tunnel;
//! the OpenAI API's streaming and error shapes; and the failures a cluster
//! meets: a node that leaves mid-request, a client that hangs up, a node with
//! another model file.

mod common;
mod logprobs;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use common::model::{cluster_view, start_ring, test_model, Wiring};
use common::sshd::Sshd;
use common::{
    api_agent, figure, free_port, get_json, linked_pair_with, post_json, wait_until,
    write_peer_file, NodeProc,
};
use serde_json::{json, Value};

const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Write a haiku about cables.",
    "List three prime numbers.",
];
const TOKENS: u64 = 32;

fn chat(port: u16, body: &Value) -> (u16, Value) {
    post_json(port, "/v1/chat/completions", body)
}

fn greedy(prompt: &str) -> Value {
    json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": TOKENS,
    })
}

/// `ids` on loopback, each reaching every other, all holding the test model.
fn loopback_cluster(dir: &Path, ids: &[&str], model: &Path) -> Vec<NodeProc> {
    let model = model.to_str().unwrap();
    start_ring(dir, ids, &Wiring::loopback(ids.len()), &["--model", model])
}

/// The token ids of greedy answers to every prompt, asked of `node`.
fn answers(node: &NodeProc, expected_ring: &[(&str, u64, u64)]) -> Vec<Vec<u64>> {
    PROMPTS
        .iter()
        .map(|prompt| {
            let (status, body) = chat(node.api_port, &greedy(prompt));
            assert_eq!(status, 200, "{body}");
            let ring: Vec<(String, u64, u64)> = body["tensorlink"]["ring"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    let id = a["node_id"].as_str().unwrap().to_owned();
                    (
                        id,
                        a["start_layer"].as_u64().unwrap(),
                        a["end_layer"].as_u64().unwrap(),
                    )
                })
                .collect();
            let expected: Vec<(String, u64, u64)> = expected_ring
                .iter()
                .map(|(id, s, e)| (id.to_string(), *s, *e))
                .collect();
            assert_eq!(ring, expected, "the ring the request ran on");
            let tokens: Vec<u64> = body["tensorlink"]["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap())
                .collect();
            assert!(!tokens.is_empty());
            assert!(!body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .is_empty());
            tokens
        })
        .collect()
}

#[test]
fn greedy_tokens_are_identical_on_one_two_and_three_nodes_and_through_ssh() {
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();

    let one = loopback_cluster(&dir.path().join("one"), &["solo"], &model).remove(0);
    let reference = answers(&one, &[("solo", 0, 29)]);
    drop(one);
    figure(&format!(
        "greedy token counts per prompt: {:?}",
        reference.iter().map(Vec::len).collect::<Vec<_>>()
    ));

    let two = loopback_cluster(&dir.path().join("two"), &["mac1", "mac2"], &model);
    assert_eq!(
        answers(&two[0], &[("mac1", 0, 14), ("mac2", 15, 29)]),
        reference,
        "2 nodes"
    );
    // Asked of the second node, the ring is the same and so are the tokens.
    assert_eq!(
        answers(&two[1], &[("mac1", 0, 14), ("mac2", 15, 29)]),
        reference,
        "2 nodes, via mac2"
    );
    drop(two);

    let three = loopback_cluster(&dir.path().join("three"), &["a", "b", "c"], &model);
    assert_eq!(
        answers(&three[2], &[("a", 0, 9), ("b", 10, 19), ("c", 20, 29)]),
        reference,
        "3 nodes"
    );
    drop(three);

    // The seed's layout: mac2's node is reached through -L, mac1's through -R.
    let ssh_dir = dir.path().join("ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    let sshd = Sshd::start(&ssh_dir);
    let (p1, p2, l1, r1) = (free_port(), free_port(), free_port(), free_port());
    let _tunnel = sshd.seed_tunnel(&ssh_dir, (p1, p2), (l1, r1));
    let wiring = Wiring {
        ports: vec![p1, p2],
        addresses: vec![
            vec![String::new(), format!("127.0.0.1:{l1}")],
            vec![format!("127.0.0.1:{r1}"), String::new()],
        ],
    };
    let model_path = model.to_str().unwrap();
    let tunnelled = start_ring(
        &ssh_dir,
        &["mac1", "mac2"],
        &wiring,
        &["--model", model_path],
    );
    let started = Instant::now();
    assert_eq!(
        answers(&tunnelled[0], &[("mac1", 0, 14), ("mac2", 15, 29)]),
        reference,
        "2 nodes through ssh"
    );
    figure(&format!(
        "2 nodes through ssh: {} prompts in {:?}",
        PROMPTS.len(),
        started.elapsed()
    ));
}

/// Reads an SSE response's `data:` payloads until the stream ends or `stop`
/// says enough (the reader is then dropped: the client hangs up).
fn stream(port: u16, body: &Value, mut stop: impl FnMut(&[String]) -> bool) -> (u16, Vec<String>) {
    let response = api_agent()
        .post(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .send_json(body)
        .expect("the API answers");
    let status = response.status().as_u16();
    let mut events = Vec::new();
    let reader = BufReader::new(response.into_body().into_reader());
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if let Some(data) = line.strip_prefix("data: ") {
            events.push(data.to_owned());
            if stop(&events) {
                break;
            }
        }
    }
    (status, events)
}

fn content_of(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn the_api_streams_with_curl_and_answers_errors_in_openai_shape() {
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    let nodes = loopback_cluster(dir.path(), &["mac1", "mac2"], &model);
    let port = nodes[0].api_port;

    let models = get_json(port, "/v1/models").unwrap();
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");

    // curl -N, as a user would: role first, text in pieces, a finish reason, [DONE].
    let mut body = greedy(PROMPTS[0]);
    body["stream"] = json!(true);
    let out = std::process::Command::new("curl")
        .args([
            "-sN",
            "--max-time",
            "120",
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(body.to_string())
        .arg(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .output()
        .expect("run curl");
    let text = String::from_utf8(out.stdout).unwrap();
    let events: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
        .collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let pieces = events
        .iter()
        .filter(|e| e.contains("\"content\":\"") && !e.contains("\"content\":\"\""))
        .count();
    assert!(pieces >= 5, "the answer came in {pieces} pieces:\n{text}");
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(["stop", "length"].contains(&last["choices"][0]["finish_reason"].as_str().unwrap()));
    let (_, whole) = chat(port, &greedy(PROMPTS[0]));
    assert_eq!(
        content_of(&events),
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // A stop string ends the answer before it, with finish_reason "stop".
    let answer = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let word = answer
        .split_whitespace()
        .nth(3)
        .expect("a few words")
        .to_owned();
    let mut stopped = greedy(PROMPTS[0]);
    stopped["stop"] = json!([word]);
    let (status, cut) = chat(port, &stopped);
    assert_eq!(status, 200, "{cut}");
    let cut_text = cut["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        cut_text,
        &answer[..answer.find(&word).unwrap()],
        "stop at {word:?}"
    );
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");

    // Concurrent requests keep separate caches: the same tokens as one at a time.
    let alone: Vec<Value> = PROMPTS
        .iter()
        .map(|p| chat(port, &greedy(p)).1["tensorlink"]["tokens"].clone())
        .collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let asks: Vec<_> = PROMPTS
            .iter()
            .map(|p| s.spawn(move || chat(port, &greedy(p)).1["tensorlink"]["tokens"].clone()))
            .collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    assert_eq!(together, alone, "concurrent requests");

    // A prompt longer than one step (512 positions) goes in several.
    let long_prompt = format!(
        "Summarise this list: {}",
        "apples, pears, plums, ".repeat(120)
    );
    let (status, long) = chat(port, &greedy(&long_prompt));
    assert_eq!(status, 200, "{long}");
    let prompt_tokens = long["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 512, "{prompt_tokens} prompt tokens");
    assert!(long["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // Sampling with a seed repeats itself.
    let mut sampled = greedy(PROMPTS[1]);
    sampled["temperature"] = json!(0.9);
    sampled["top_p"] = json!(0.95);
    sampled["seed"] = json!(42);
    let (_, a) = chat(port, &sampled);
    let (_, b) = chat(port, &sampled);
    assert_eq!(a["tensorlink"]["tokens"], b["tensorlink"]["tokens"]);

    // `logprobs` against llama.cpp's logits on the same file.
    let fixture = logprobs::fixture("SmolLM2-135M-Instruct.Q4_1");
    let worst = logprobs::check_against_fixture(port, &model, &fixture);
    common::figure(&format!(
        "SmolLM2 logprobs: largest gap difference from llama.cpp {worst:.3}"
    ));
    // Chat's shape: each token with its bytes and alternatives; the bytes join
    // to the answer, streamed or whole.
    let mut asked = greedy(PROMPTS[0]);
    asked["logprobs"] = json!(true);
    asked["top_logprobs"] = json!(3);
    let (status, whole) = chat(port, &asked);
    assert_eq!(status, 200, "{whole}");
    let content = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let bytes = |entries: &[Value]| -> Vec<u8> {
        entries
            .iter()
            .flat_map(|e| {
                e["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
            })
            .collect()
    };
    let answer = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(String::from_utf8(bytes(content)).unwrap(), answer);
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{entry}");
        assert_eq!(
            top[0]["token"], entry["token"],
            "greedy takes the likeliest: {entry}"
        );
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    }
    let mut streamed = asked.clone();
    streamed["stream"] = json!(true);
    let (_, events) = stream(port, &streamed, |_| false);
    let pieces: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&pieces, content, "streamed logprobs are the whole answer's");
    let mut without = greedy("hi");
    without["top_logprobs"] = json!(2);
    let (status, err) = chat(port, &without);
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("top_logprobs")),
        "{err}"
    );

    // Errors: OpenAI's shape and fitting codes.
    let raw = api_agent()
        .post(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .content_type("application/json")
        .send("{not json")
        .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    let mut unknown = greedy("hi");
    unknown["model"] = json!("gpt-4o");
    let (status, err) = chat(port, &unknown);
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], "model_not_found");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("SmolLM2"),
        "{err}"
    );
    let mut hot = greedy("hi");
    hot["temperature"] = json!(7);
    assert_eq!(chat(port, &hot).0, 400);

    // A node without a model: 503, saying so.
    let empty = tempfile::tempdir().unwrap();
    let file = dir.path().join("bare_peers.json");
    write_peer_file(&file, &[]);
    let bare = NodeProc::start_with(
        dir.path(),
        "bare",
        free_port(),
        free_port(),
        &file,
        &["--models-dir", empty.path().to_str().unwrap()],
    );
    let (status, err) = chat(bare.api_port, &greedy("hi"));
    assert_eq!(status, 503, "{err}");
    assert_eq!(err["error"]["code"], "model_not_loaded");
}

#[test]
fn a_node_that_leaves_mid_request_fails_it_within_seconds_and_the_ring_shrinks() {
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = loopback_cluster(dir.path(), &["mac1", "mac2"], &model);
    let port = nodes[0].api_port;
    let mut long = greedy("Tell me a very long story about the sea.");
    long["max_tokens"] = json!(4000);
    long["stream"] = json!(true);

    let mut killed_at = None;
    let mac2 = &mut nodes[1];
    let (status, events) = stream(port, &long, |events| {
        if killed_at.is_none() && events.len() >= 4 {
            mac2.kill();
            killed_at = Some(Instant::now());
        }
        false
    });
    assert_eq!(status, 200);
    let killed_at = killed_at.expect("mac2 was killed mid-stream");
    let failed_after = killed_at.elapsed();
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let message = last["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("mac2"),
        "the stream's last event names mac2: {last}"
    );
    assert!(
        failed_after < Duration::from_secs(5),
        "failed {failed_after:?} after the kill"
    );
    figure(&format!(
        "node killed mid-request: the stream failed {failed_after:?} later: {message}"
    ));

    // The next request runs on the ring that is left: mac1 alone.
    wait_until(Duration::from_secs(5), "mac1 to drop mac2", || {
        !nodes[0].peer_up("mac2")
    });
    let (status, body) = chat(port, &greedy(PROMPTS[0]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["tensorlink"]["ring"],
        json!([{"node_id": "mac1", "start_layer": 0, "end_layer": 29}])
    );
}

#[test]
fn a_client_that_hangs_up_cancels_the_request_on_every_node() {
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    let nodes = loopback_cluster(dir.path(), &["mac1", "mac2"], &model);
    let mut long = greedy("Tell me a very long story about the sea.");
    long["max_tokens"] = json!(4000);
    long["stream"] = json!(true);
    let active = |n: &NodeProc| cluster_view(n)["active_requests"].as_u64();

    let (_, events) = stream(nodes[0].api_port, &long, |events| {
        // Mid-request, both shards hold the request's cache.
        events.len() >= 4 && nodes.iter().all(|n| active(n) == Some(1))
    });
    assert!(events.len() >= 4);
    let freed = wait_until(
        Duration::from_secs(5),
        "both nodes to free the request",
        || nodes.iter().all(|n| active(n) == Some(0)),
    );
    figure(&format!(
        "client hung up: both nodes freed the request within {freed:?}"
    ));
    let mac1_log = nodes[0].log_text();
    assert!(
        !mac1_log.contains("request failed"),
        "a hang-up is not a failure:\n{mac1_log}"
    );
}

#[test]
fn nodes_with_different_model_files_are_refused_naming_both() {
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    // Same name, one byte more: a different file by hash.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = other_dir.join(model.file_name().unwrap());
    let mut bytes = std::fs::read(&model).unwrap();
    bytes.push(0);
    std::fs::write(&other, bytes).unwrap();

    let (mac1, _mac2) = linked_pair_with(
        dir.path(),
        &["--model", model.to_str().unwrap()],
        &["--model", other.to_str().unwrap()],
    );

    let (status, err) = chat(mac1.api_port, &greedy("hi"));
    assert_eq!(status, 503, "{err}");
    assert_eq!(err["error"]["code"], "model_mismatch");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`mac1`") && message.contains("`mac2`") && message.contains("sha256"),
        "{message}"
    );
    let problem = cluster_view(&mac1)["problem"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(problem.contains("mac2"), "{problem}");
}

/// A restart trusts the sha256 it recorded for this very file instead of
/// reading the whole model again; a different file put under the same name is
/// read again.
#[test]
fn a_restarted_node_remembers_the_models_sha256_until_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(test_model(), &model).unwrap();
    let peers = dir.path().join("peers.json");
    write_peer_file(&peers, &[]);
    let flags = ["--model", model.to_str().unwrap()];
    let mut node =
        NodeProc::start_with(dir.path(), "solo", free_port(), free_port(), &peers, &flags);
    let log = || std::fs::read_to_string(dir.path().join("solo.log")).unwrap();
    let count = |what: &str| log().matches(what).count();
    assert_eq!(count("hashed the model"), 1, "{}", log());
    let sha256 = |text: &str| -> String {
        let at = text
            .rfind("sha256=")
            .expect("the ready line names the sha256")
            + 7;
        text[at..at + 64].to_owned()
    };
    let first = sha256(&log());
    let expected = std::process::Command::new("sha256sum")
        .arg(&model)
        .output()
        .unwrap();
    let expected = String::from_utf8(expected.stdout).unwrap();
    assert_eq!(first, expected[..64], "not the file's sha256");

    node.kill();
    node.launch(&flags);
    assert_eq!(count("remembered from an earlier start"), 1, "{}", log());
    assert_eq!(count("hashed the model"), 1);
    assert_eq!(sha256(&log()), first);

    // Another file renamed over the model: read again, and its own hash.
    node.kill();
    let other = dir.path().join("download.partial");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes.push(0);
    std::fs::write(&other, bytes).unwrap();
    std::fs::rename(&other, &model).unwrap();
    node.launch(&flags);
    assert_eq!(count("hashed the model"), 2, "{}", log());
    assert_ne!(sha256(&log()), first);
}

/// A streamed request the node has no room for is answered 429 with the
/// reason, as clients that retry on 429 expect, not with a 200 whose stream
/// holds an error.
#[test]
fn a_streamed_request_without_room_for_its_cache_is_a_429() {
    use tensorlink::inference::gguf::ModelFile;
    use tensorlink::inference::memory::Footprint;

    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    let mut file = ModelFile::open(&model).unwrap();
    file.limit_context(Some(1024)).unwrap();
    let footprint = Footprint::of(&file, 0, file.config().n_layers - 1);
    // Room for the layers and one and a half caches of the whole context.
    let limit = (footprint.weights + footprint.kv(1024) * 3 / 2).div_ceil(1 << 20);
    let peers = dir.path().join("peers.json");
    write_peer_file(&peers, &[]);
    let limit = limit.to_string();
    let flags = [
        "--model",
        model.to_str().unwrap(),
        "--ctx-size",
        "1024",
        "--memory-limit",
        &limit,
    ];
    let node = NodeProc::start_with(dir.path(), "solo", free_port(), free_port(), &peers, &flags);
    let port = node.api_port;
    let body = json!({
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "temperature": 0,
        "max_tokens": 900,
        "stream": true,
    });

    // The first request holds its reservation while it streams.
    let (started, is_started) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let first = {
        let body = body.clone();
        std::thread::spawn(move || {
            stream(port, &body, |events| {
                if events.len() == 2 {
                    started.send(()).unwrap();
                    let _ = released.recv();
                    return true;
                }
                false
            })
        })
    };
    is_started
        .recv_timeout(Duration::from_secs(60))
        .expect("the first request streams");
    let (status, err) = post_json(port, "/v1/chat/completions", &body);
    release.send(()).unwrap();
    let (first_status, _) = first.join().unwrap();
    assert_eq!(first_status, 200);
    assert_eq!(status, 429, "{err}");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("node `solo`") && message.contains("--memory-limit"),
        "{message}"
    );
}
