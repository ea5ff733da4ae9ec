//! `/v1/completions` on a base model: Gemma 3 270M (Q4_K_M, SentencePiece, no
//! chat template), split over two nodes on loopback. Its greedy tokens are
//! checked against llama.cpp's, recorded on the same file in
//! tests/fixtures/llamacpp/gemma-3-270m-Q4_K_M.json: the whole way from text
//! through the API, our SentencePiece port, the gemma3 layers and the ring.

mod common;
mod logprobs;

use std::io::{BufRead, BufReader};

use common::model::{gemma3_model, start_ring, Wiring};
use serde_json::{json, Value};

/// As tests/llamacpp_agreement.rs states for models this deep.
const MARGIN_TOL: f64 = 0.5;

use common::{api_agent, post_json as post};

fn events(port: u16, body: &Value) -> Vec<Value> {
    let response = api_agent()
        .post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .send_json(body)
        .expect("the API answers");
    assert_eq!(response.status().as_u16(), 200);
    let reader = BufReader::new(response.into_body().into_reader());
    let mut out = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                out.push(Value::String("[DONE]".into()));
                break;
            }
            out.push(serde_json::from_str(data).unwrap());
        }
    }
    out
}

fn fixture() -> Value {
    logprobs::fixture("gemma-3-270m-Q4_K_M")
}

#[test]
fn a_base_model_completes_text_as_llama_cpp_does_across_two_nodes() {
    let model = gemma3_model();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_ring(
        dir.path(),
        &["mac1", "mac2"],
        &Wiring::loopback(2),
        &["--model", model.to_str().unwrap(), "--ctx-size", "256"],
    );
    let port = nodes[1].api_port;
    let models = common::get_json(port, "/v1/models").unwrap();
    assert_eq!(models["data"][0]["context_length"], 256, "{models}");

    for prompt in fixture()["prompts"].as_array().unwrap() {
        let want: Vec<u64> = prompt["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        let (status, body) = post(
            port,
            "/v1/completions",
            &json!({"prompt": prompt["text"], "temperature": 0, "max_tokens": 16}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "text_completion");
        let ring = body["tensorlink"]["ring"].as_array().unwrap();
        assert_eq!(ring.len(), 2, "both nodes run layers: {body}");
        let got: Vec<u64> = body["tensorlink"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        let agree = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        if agree < want.len() {
            let margin = prompt["greedy_margins"][agree].as_f64().unwrap();
            assert!(
                margin < MARGIN_TOL,
                "prompt {}: tokens part at {agree} where llama.cpp's margin was {margin}: \
                 ours {got:?}, llama.cpp's {want:?}",
                prompt["name"]
            );
        }
        assert_eq!(
            body["usage"]["prompt_tokens"],
            prompt["tokens"].as_array().unwrap().len()
        );
        // An answer shorter than asked ended at an end of generation.
        let finish = if got.len() < 16 { "stop" } else { "length" };
        assert_eq!(body["choices"][0]["finish_reason"], finish, "{body}");

        // The same prompt as token ids is the same request.
        let (status, by_ids) = post(
            port,
            "/v1/completions",
            &json!({"prompt": prompt["tokens"], "temperature": 0, "max_tokens": 16}),
        );
        assert_eq!(status, 200, "{by_ids}");
        assert_eq!(by_ids["tensorlink"]["tokens"], body["tensorlink"]["tokens"]);
    }

    // `logprobs`: llama.cpp's gaps between logits, on both nodes' way.
    let worst = logprobs::check_against_fixture(port, &model, &fixture());
    common::figure(&format!(
        "gemma3 270M logprobs: largest gap difference from llama.cpp {worst:.3}"
    ));

    // Streamed: text_completion chunks whose text joins to the whole answer.
    let ask = json!({"prompt": "The capital of France is", "temperature": 0, "stream": true,
                     "max_tokens": 12});
    let chunks = events(port, &ask);
    assert_eq!(chunks.last(), Some(&Value::String("[DONE]".into())));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    let mut whole_ask = ask.clone();
    whole_ask["stream"] = json!(false);
    let (_, whole) = post(port, "/v1/completions", &whole_ask);
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["object"], "text_completion");
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    // Without max_tokens, OpenAI's default for completions: 16.
    let (_, short) = post(
        port,
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "temperature": 0}),
    );
    let tokens = short["usage"]["completion_tokens"].as_u64().unwrap();
    let finish = short["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(
        tokens == 16 && finish == "length" || tokens < 16 && finish == "stop",
        "{short}"
    );

    // A base model has no chat template: the chat endpoint says where to go.
    let (status, body) = post(
        port,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 400);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("/v1/completions"), "{message}");

    // A prompt beyond --ctx-size is refused before any node runs a step.
    let long = "word ".repeat(400);
    let (status, body) = post(port, "/v1/completions", &json!({"prompt": long}));
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("--ctx-size"), "{message}");
    // An answer stops where the context ends.
    let (_, body) = post(
        port,
        "/v1/completions",
        &json!({"prompt": "word ".repeat(200), "max_tokens": 500, "temperature": 0}),
    );
    let used = body["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used <= 256, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");

    for (bad, param) in [
        (json!({"prompt": ["a", "b"]}), "prompt"),
        (json!({"prompt": [999_999_999]}), "prompt"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "temperature": 9}), "temperature"),
        (json!({"prompt": "x", "n": 2}), "n"),
        (json!({"prompt": "x", "logprobs": 21}), "logprobs"),
        (json!({"prompt": "x", "logprobs": true}), "logprobs"),
        (json!({"prompt": "x", "top_logprobs": 2}), "top_logprobs"),
        (json!({"prompt": "x", "echo": true}), "echo"),
    ] {
        let (status, body) = post(port, "/v1/completions", &bad);
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["param"], param, "{bad}: {body}");
    }
}

#[test]
fn a_context_beyond_the_trained_one_is_refused_at_start_and_the_default_is_8192() {
    let model = gemma3_model();
    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().join("peers.json");
    common::write_peer_file(&peers, &[]);
    let out = std::process::Command::new(common::node_bin())
        .args([
            "--node-id",
            "solo",
            "--disable-tui",
            "--discovery-config-path",
        ])
        .arg(&peers)
        .args(["--node-port", &common::free_port().to_string()])
        .args(["--chatgpt-api-port", &common::free_port().to_string()])
        .args(["--model", model.to_str().unwrap(), "--ctx-size", "40000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("--ctx-size 40000 is beyond the 32768 positions it was trained for"),
        "{log}"
    );

    // Without --ctx-size: the trained 32768, capped at 8192.
    let nodes = start_ring(
        dir.path(),
        &["solo"],
        &Wiring::loopback(1),
        &["--model", model.to_str().unwrap()],
    );
    let models = common::get_json(nodes[0].api_port, "/v1/models").unwrap();
    assert_eq!(models["data"][0]["context_length"], 8192, "{models}");
}
