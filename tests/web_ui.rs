//! The web UI in a real browser: two nodes split the test model, Debian's
//! headless Chromium (driven by tests/browser/chat.mjs through
//! scripts/browser-test) types a prompt, watches the answer stream in, checks
//! both nodes' cards, and saves a screenshot to target/browser/chat.png; then
//! the stock OpenAI Python client (scripts/openai-client-check) asks the same
//! cluster, streamed and whole.

mod common;

use std::process::Command;
use std::time::Duration;

use common::model::test_model;
use common::{figure, free_port, get_json, wait_until, write_peer_file, NodeProc};

#[test]
fn the_page_and_the_openai_client_get_streamed_answers_from_two_nodes() {
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (free_port(), free_port());
    let (f1, f2) = (
        dir.path().join("mac1_peers.json"),
        dir.path().join("mac2_peers.json"),
    );
    write_peer_file(&f1, &[("mac2", format!("127.0.0.1:{p2}"))]);
    write_peer_file(&f2, &[("mac1", format!("127.0.0.1:{p1}"))]);
    let flags = ["--model", model.to_str().unwrap()];
    let mac1 = NodeProc::start_with(dir.path(), "mac1", p1, free_port(), &f1, &flags);
    let _mac2 = NodeProc::start_with(dir.path(), "mac2", p2, free_port(), &f2, &flags);
    wait_until(Duration::from_secs(10), "the ring of two", || {
        get_json(mac1.api_port, "/cluster").is_some_and(|v| v["problem"].is_null())
    });

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
