//! The web UI in a real browser: two nodes split the test model, Debian's
//! headless Chromium (driven by tests/browser/chat.mjs through
//! scripts/browser-test) types a prompt, watches the answer stream in, checks
//! both nodes' cards, and saves a screenshot to target/browser/chat.png; then
//! the stock OpenAI Python client (scripts/openai-client-check) asks the same
//! cluster, streamed and whole.

mod common;

use std::process::Command;

use common::figure;
use common::model::{start_ring, test_model, Wiring};

#[test]
fn the_page_and_the_openai_client_get_streamed_answers_from_two_nodes() {
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--model", model.to_str().unwrap()];
    let nodes = start_ring(dir.path(), &["mac1", "mac2"], &Wiring::loopback(2), &flags);
    let mac1 = &nodes[0];

    let root = env!("CARGO_MANIFEST_DIR");
    let shot = format!("{root}/target/browser/chat.png");
    std::fs::create_dir_all(format!("{root}/target/browser")).unwrap();
    let out = Command::new(format!("{root}/scripts/browser-test"))
        .arg(format!("http://127.0.0.1:{}", mac1.api_port))
        .arg(&shot)
        .arg("mac1,mac2")
        .output()
        .expect("run scripts/browser-test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot at {shot}"
    );
    figure(&format!("browser: {} (screenshot {shot})", stdout.trim()));

    // The same cluster through the stock OpenAI Python client.
    let out = Command::new(format!("{root}/scripts/openai-client-check"))
        .arg(format!("http://127.0.0.1:{}", mac1.api_port))
        .output()
        .expect("run scripts/openai-client-check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the OpenAI client check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    figure(&format!("openai client: {}", stdout.trim()));
}
