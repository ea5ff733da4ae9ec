//! Uninstall as a new user would run it, on the macOS layout under `--root`:
//! the models folder the README tells users to fill lies inside the folder
//! install writes to, and what the user put there survives uninstall, in both
//! modes (LaunchAgents, and LaunchDaemons with `--system`).

use std::path::Path;
use std::process::{Command, Output};

mod common;

fn install(root: &Path, args: &[&str]) -> String {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_install"))
        .arg("--root")
        .arg(root)
        .arg("--no-load")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install {args:?}:\n{text}");
    text
}

fn install_and_uninstall_keep_the_model(system: bool) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("home");
    std::fs::create_dir(&root).unwrap();
    let cluster = dir.path().join("cluster.toml");
    std::fs::write(&cluster, common::SEED_CLUSTER).unwrap();
    let binary = dir.path().join("tensorlink-node");
    std::fs::write(&binary, b"#!/bin/sh\n").unwrap();
    let mut args = vec![
        "--cluster",
        cluster.to_str().unwrap(),
        "--node",
        "mac2",
        "--node-binary",
        binary.to_str().unwrap(),
    ];
    if system {
        args.push("--system");
    }
    install(&root, &args);
    let jobs = if system {
        "Library/LaunchDaemons"
    } else {
        "Library/LaunchAgents"
    };
    let plist = root.join(jobs).join("dev.tensorlink.node.plist");
    assert!(plist.exists(), "{}", plist.display());

    let support = root.join("Library/Application Support/tensorlink");
    // Install makes the models folder, so a model can be copied straight in.
    let model = support.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.parent().unwrap().is_dir());
    std::fs::write(&model, b"GGUF").unwrap();
    let said = install(&root, &["--uninstall"]);
    assert_eq!(std::fs::read(&model).unwrap(), b"GGUF", "{said}");
    assert!(
        !plist.exists() && !support.join("bin").exists() && !support.join("receipt.json").exists()
    );
    assert!(
        said.contains("kept")
            && said.contains(&support.display().to_string())
            && said.contains("models/"),
        "uninstall names what it left and where:\n{said}"
    );
    // Once the user has taken their model away, the folder goes too.
    std::fs::remove_dir_all(support.join("models")).unwrap();
    install(&root, &["--uninstall"]);
    assert!(!support.exists());
}

#[test]
fn uninstall_keeps_a_model_in_the_models_folder() {
    install_and_uninstall_keep_the_model(false);
}

#[test]
fn uninstall_of_launch_daemons_keeps_a_model_too() {
    install_and_uninstall_keep_the_model(true);
}
