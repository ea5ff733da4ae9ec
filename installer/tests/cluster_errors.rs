//! Every class of bad cluster.toml is refused, naming the field, before any file
//! is written.

use std::path::Path;
use std::process::Command;

use tensorlink_installer::cluster::Cluster;

mod common;

use common::SEED_CLUSTER as GOOD;

fn error_of(text: &str) -> String {
    Cluster::parse(text, Path::new("cluster.toml"))
        .unwrap_err()
        .to_string()
}

#[test]
fn the_good_file_parses() {
    assert!(Cluster::parse(GOOD, Path::new("cluster.toml")).is_ok());
}

#[test]
fn each_mistake_is_named() {
    let cases: Vec<(String, &str)> = vec![
        (
            GOOD.replace("id = \"mac2\"", "id = \"mac1\""),
            "nodes[1].id",
        ),
        (
            GOOD.replace("192.168.2.1", "192.168.2.2"),
            "nodes[1].address",
        ),
        // Refused as the file is read, with the line it is on.
        (
            GOOD.replace("node_port = 50051", "node_port = 70000"),
            "node_port = 70000",
        ),
        (
            GOOD.replace("node_port = 50051", "node_port = 70000"),
            "70000 is not a port: ports go from 1 to 65535",
        ),
        (
            GOOD.replace("api_port = 52415", "api_port = 0"),
            "0 is not a port",
        ),
        (
            GOOD.replace("api_port = 52415", "api_port = 50051"),
            "port 50051 on mac2",
        ),
        (
            GOOD.replace("to = \"mac2\"", "to = \"mac3\""),
            "links[0].to",
        ),
        (GOOD.replace("to = \"mac2\"", "to = \"mac1\""), "to itself"),
        (
            format!("{GOOD}\n[[links]]\nfrom = \"mac2\"\nto = \"mac1\"\n"),
            "linked twice",
        ),
        (
            GOOD.replace("[[links]]\nfrom = \"mac1\"\nto = \"mac2\"\n", ""),
            "not connected",
        ),
        (GOOD.replace("ssh_user = \"remoteuser\"\n", ""), "ssh_user"),
        (
            GOOD.replace("node_port = 50051", "node_prot = 50051"),
            "node_prot",
        ),
        (
            GOOD.replace("id = \"mac1\"", "id = \"mac 1\""),
            "nodes[0].id",
        ),
        // The derived -L port (mac2's node port + 1 = 50052) clashes with mac1's API port.
        (
            GOOD.replace("api_port = 52416", "api_port = 50052"),
            "links[0].local_port",
        ),
        // The derived -R port (mac1's node port) clashes with mac2's API port.
        (
            GOOD.replace("api_port = 52415", "api_port = 50060"),
            "links[0].remote_port",
        ),
        (
            format!("[model]\nfile = \"models/x.gguf\"\n{GOOD}"),
            "model.file: `models/x.gguf` is a relative path",
        ),
        (
            format!("[model]\nfile = \"Llama-3.2-1B\"\n{GOOD}"),
            "model.file: `Llama-3.2-1B` does not end in .gguf",
        ),
        (
            format!("[model]\nfile = \"~me/x.gguf\"\n{GOOD}"),
            "another user's home",
        ),
        (
            format!("[model]\nfile = \" x.gguf\"\n{GOOD}"),
            "starts or ends with a space",
        ),
        (
            format!("[model]\nfile = \"\"\n{GOOD}"),
            "model.file: is empty",
        ),
        (
            format!("[model]\nfile = \"x.gguf\"\nsha256 = \"abc\"\n{GOOD}"),
            "model.sha256: `abc` is not a sha256",
        ),
        (
            format!("[model]\nfile = \"x.gguf\"\nsha = \"abc\"\n{GOOD}"),
            "unknown field `sha`",
        ),
        ("nodes = 3".to_string(), "cluster.toml"),
        (String::new(), "nodes"),
    ];
    for (text, expected) in cases {
        let err = error_of(&text);
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
        assert!(err.starts_with("cluster.toml"), "names the file: {err}");
    }
}

#[test]
fn a_bad_file_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, expected) in [
        (
            "syntax",
            GOOD.replace("[[links]]", "[[links"),
            "cluster.toml",
        ),
        (
            "port clash",
            GOOD.replace("api_port = 52415", "api_port = 50051"),
            "port 50051 on mac2",
        ),
        (
            "missing key",
            GOOD.replace("node_port = 50060\n", ""),
            "node_port",
        ),
    ] {
        let bad = dir.path().join("cluster.toml");
        std::fs::write(&bad, text).unwrap();
        let root = dir.path().join(name);
        std::fs::create_dir(&root).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_install"))
            .arg("--cluster")
            .arg(&bad)
            .args(["--node", "mac1", "--no-load", "--root"])
            .arg(&root)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{name}: {err}");
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "{name}: nothing may be written"
        );
    }
}

#[cfg(not(target_os = "macos"))]
#[test]
fn loading_off_macos_and_root_without_no_load_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.toml");
    std::fs::write(&cluster, GOOD).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_install"))
            .arg("--cluster")
            .arg(&cluster)
            .args(["--node", "mac2"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A staged home would be loaded into this user's own session.
    let err = run(&["--root", root.to_str().unwrap()]);
    assert!(err.contains("--root") && err.contains("--no-load"), "{err}");
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    // Installing for real needs launchctl; it says so before touching anything.
    let err = run(&[]);
    assert!(
        err.contains("needs macOS") && err.contains("--no-load"),
        "{err}"
    );
}

#[test]
fn which_mac_am_i() {
    use std::net::IpAddr;
    use tensorlink_installer::identify::{identify, IdentifyError};
    let c = Cluster::parse(GOOD, Path::new("cluster.toml")).unwrap();
    let local = |s: &str| vec![s.parse::<IpAddr>().unwrap(), "127.0.0.1".parse().unwrap()];
    assert_eq!(identify(&c, Some("mac2"), "x", &[]).unwrap(), "mac2");
    assert!(matches!(
        identify(&c, Some("mac9"), "x", &[]),
        Err(IdentifyError::UnknownNode(..))
    ));
    assert_eq!(identify(&c, None, "MAC1.local", &[]).unwrap(), "mac1");
    assert_eq!(
        identify(&c, None, "studio", &local("192.168.2.1")).unwrap(),
        "mac2"
    );
    let err = identify(&c, None, "studio", &local("10.0.0.5"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--node"), "{err}");
    // Host name says one node, an address says the other: ambiguous.
    assert!(matches!(
        identify(&c, None, "mac1", &local("192.168.2.1")),
        Err(IdentifyError::Ambiguous(_))
    ));
}
