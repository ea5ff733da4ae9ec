//! `logprobs` through the API held against llama.cpp's recorded logits
//! (tests/fixtures/llamacpp): a log-probability differs from its logit by the
//! one normalizer of its step, so the gaps between a step's log-probabilities
//! are llama.cpp's gaps between logits, within what the two engines' rounding
//! allows (tests/llamacpp_agreement.rs states it: 1.0 on a logit of a deep
//! model, so 2.0 on a gap between two).

use std::path::Path;

use serde_json::{json, Value};
use tensorlink::inference::gguf::ModelFile;
use tensorlink::inference::tokenizer::ModelTokenizer;

use crate::common::post_json;

const GAP_TOL: f64 = 2.0;

pub fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llamacpp")
        .join(format!("{name}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The largest difference seen between our gaps and llama.cpp's, over each
/// recorded prompt's first step (its top 5) and every greedy step where the
/// two engines still agree (the margin between first and second).
pub fn check_against_fixture(port: u16, model: &Path, fixture: &Value) -> f64 {
    let file = ModelFile::open(model).unwrap();
    let tokenizer = ModelTokenizer::from_gguf(file.metadata()).unwrap();
    let piece = |id: u64| String::from_utf8_lossy(&tokenizer.piece(id as u32)).into_owned();
    let mut worst: f64 = 0.0;
    let mut checked = 0;
    for prompt in fixture["prompts"].as_array().unwrap() {
        let greedy = prompt["greedy"].as_array().unwrap();
        let ask = json!({"prompt": prompt["tokens"], "temperature": 0, "logprobs": 5,
                         "max_tokens": greedy.len()});
        let (status, body) = post_json(port, "/v1/completions", &ask);
        assert_eq!(status, 200, "{body}");
        let lp = &body["choices"][0]["logprobs"];
        let ours: Vec<u64> = body["tensorlink"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        let name = prompt["name"].as_str().unwrap();

        // The tokens listed are the answer's.
        let tokens: Vec<&str> = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        // Every token of the answer, but an end of generation, which prints nothing.
        let ends = ours
            .last()
            .is_some_and(|&t| tokenizer.is_end_of_generation(t as u32));
        assert_eq!(tokens.len(), ours.len() - usize::from(ends), "{name}: {lp}");
        let listed: Vec<String> = ours.iter().take(tokens.len()).map(|&t| piece(t)).collect();
        assert_eq!(tokens, listed, "{name}: {lp}");
        // The tokens' bytes are the answer's, and each offset is where its
        // token starts in the answer, in characters: those begun before it
        // (a character split across tokens counts at its first byte).
        let bytes: Vec<Vec<u8>> = ours
            .iter()
            .take(tokens.len())
            .map(|&t| tokenizer.piece(t as u32))
            .collect();
        let text = body["choices"][0]["text"].as_str().unwrap();
        assert_eq!(String::from_utf8_lossy(&bytes.concat()), text, "{name}");
        let mut last = 0;
        for i in 0..tokens.len() {
            let offset = lp["text_offset"][i].as_u64().unwrap() as usize;
            // Where the text before the token is whole characters, the
            // offset is their count; inside a split one it only moves on.
            match std::str::from_utf8(&bytes[..i].concat()) {
                Ok(before) => assert_eq!(offset, before.chars().count(), "{name}: token {i}"),
                Err(_) => assert!(offset >= last, "{name}: token {i} {lp}"),
            }
            last = offset;
        }
        if tokens.is_empty() {
            // The answer was its end of generation, which is not listed.
            assert!(
                tokenizer.is_end_of_generation(ours[0] as u32),
                "{name}: {body}"
            );
            continue;
        }
        checked += 1;

        // The first step's five likeliest, as llama.cpp ranks them, with its gaps.
        let top: &serde_json::Map<String, Value> = lp["top_logprobs"][0].as_object().unwrap();
        let recorded = prompt["first_logits_top"].as_array().unwrap();
        let (best_id, best_logit) = (
            recorded[0][0].as_u64().unwrap(),
            recorded[0][1].as_f64().unwrap(),
        );
        let best = top[&piece(best_id)].as_f64().unwrap();
        for entry in &recorded[1..5] {
            let (id, logit) = (entry[0].as_u64().unwrap(), entry[1].as_f64().unwrap());
            let Some(ours) = top.get(&piece(id)).and_then(Value::as_f64) else {
                // Left out of our five only by a near tie with our fifth.
                let fifth = top
                    .values()
                    .filter_map(Value::as_f64)
                    .fold(f64::MAX, f64::min);
                let gap = (best - fifth) - (best_logit - logit);
                assert!(
                    gap.abs() <= GAP_TOL,
                    "{name}: `{}` not in our top 5 {top:?}",
                    piece(id)
                );
                continue;
            };
            let gap = (best - ours) - (best_logit - logit);
            worst = worst.max(gap.abs());
            assert!(
                gap.abs() <= GAP_TOL,
                "{name}: `{}`: ours {} below the best, llama.cpp's {}",
                piece(id),
                best - ours,
                best_logit - logit
            );
        }

        // Each agreeing greedy step's margin between its first and second choice.
        let margins = prompt["greedy_margins"].as_array().unwrap();
        for (i, (got, want)) in ours.iter().zip(greedy).enumerate() {
            if *got != want.as_u64().unwrap() || i >= tokens.len() {
                break;
            }
            let mut values: Vec<f64> = lp["top_logprobs"][i]
                .as_object()
                .unwrap()
                .values()
                .filter_map(Value::as_f64)
                .collect();
            values.sort_by(|a, b| b.total_cmp(a));
            let chosen = lp["token_logprobs"][i].as_f64().unwrap();
            assert_eq!(
                chosen, values[0],
                "{name} step {i}: greedy takes the likeliest"
            );
            if values.len() < 2 {
                continue; // the two likeliest print alike
            }
            let gap = (values[0] - values[1]) - margins[i].as_f64().unwrap();
            worst = worst.max(gap.abs());
            assert!(
                gap.abs() <= GAP_TOL,
                "{name} step {i}: margin {} against llama.cpp's {}",
                values[0] - values[1],
                margins[i]
            );
            let mass: f64 = values.iter().map(|v| v.exp()).sum();
            assert!(mass <= 1.0 + 1e-4, "{name} step {i}: {values:?}");
        }
    }
    assert!(checked > 0, "no prompt's answer had a token to check");
    worst
}
