//! `install --all` from mac1 across a cable: two network namespaces with the
//! seed's addresses, the far Mac's real sshd on port 22, and its own user in
//! their own home (tests/common/netns.rs). The README's path, step by step:
//! the model on mac1 only, `install --all` installs mac2 as that user over ssh,
//! then mac1; the installed jobs, run as launchd would (mac2's as the far
//! user), link the cluster and mac2 fetches the model; `--check --all` says so
//! from mac1; the web UI answers and a chat runs on both Macs. A second
//! `--all` changes nothing; `--uninstall --all` takes back what install wrote
//! and leaves the user's files, the fetched model among them. Failures (a refused key, a Mac that does
//! not answer, a binary the Mac cannot run) are named per Mac in the summary.
//! Linux has no launchctl, so every install here is `--no-load`.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::model::test_model;
use common::netns::{Cable, FarSshd, Netns, FAR_UID, MAC2};
use common::{figure, node_bin, output_text as text, wait_until};
use tensorlink_launchd::LaunchAgent;

/// A test's folder: reachable by the far user (tempdir makes it 700).
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// mac1's home: the client key the far sshd lets in and mac2's host key, as
/// `ssh-copy-id` and a first `ssh` by hand leave them.
fn mac1_home(dir: &Path, sshd: &FarSshd, extra_known_hosts: &str) -> PathBuf {
    let home = dir.join("mac1-home");
    let ssh = home.join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    std::fs::copy(sshd.client_key(), ssh.join("id_ed25519")).unwrap();
    std::fs::set_permissions(
        ssh.join("id_ed25519"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(
        ssh.join("known_hosts"),
        format!("{}{extra_known_hosts}", sshd.known_hosts_line()),
    )
    .unwrap();
    home
}

/// The installer, run on mac1 (in its namespace) for `home`.
fn install(mac1: &Netns, cluster: &Path, home: &Path, args: &[&str]) -> Output {
    mac1.command(env!("CARGO_BIN_EXE_install"))
        .arg("--cluster")
        .arg(cluster)
        .arg("--root")
        .arg(home)
        .arg("--no-load")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Every file under `root`: size, mode, owner and modification time, to tell
/// that a run changed nothing.
type Meta = (u64, u32, u32, SystemTime);

fn tree(root: &Path) -> BTreeMap<PathBuf, Meta> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                files.insert(
                    entry.path(),
                    (
                        meta.len(),
                        meta.mode(),
                        meta.uid(),
                        meta.modified().unwrap(),
                    ),
                );
            }
        }
    }
    files
}

/// The staging folders a run's output names on the far Mac
/// (`/tmp/tensorlink-install.` and 16 hex digits).
fn staging_named(report: &str) -> Vec<PathBuf> {
    const PREFIX: &str = "/tmp/tensorlink-install.";
    let mut dirs: Vec<PathBuf> = report
        .match_indices(PREFIX)
        .filter_map(|(at, _)| report.get(at..at + PREFIX.len() + 16))
        .map(PathBuf::from)
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// A job started from its plist as launchd starts it: its ProgramArguments,
/// only its EnvironmentVariables (and HOME), its working directory, stdin from
/// /dev/null and output appended to its log; inside its Mac's namespace, as
/// that Mac's user.
struct Job {
    label: String,
    log: PathBuf,
    child: Child,
}

impl Job {
    fn start(mut cmd: Command, plist: &Path, home: &Path) -> Job {
        let agent = LaunchAgent::from_bytes(&std::fs::read(plist).unwrap()).unwrap();
        let log = PathBuf::from(agent.standard_error_path.clone().unwrap());
        let append = || {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&log)
                .unwrap()
        };
        cmd.args(&agent.program_arguments[1..])
            .env_clear()
            .envs(&agent.environment_variables)
            .env("HOME", home)
            .stdin(Stdio::null())
            .stdout(append())
            .stderr(append());
        if let Some(dir) = &agent.working_directory {
            cmd.current_dir(dir);
        }
        Job {
            label: agent.label.clone(),
            log: log.clone(),
            child: cmd.spawn().unwrap(),
        }
    }

    fn program(plist: &Path) -> String {
        LaunchAgent::from_bytes(&std::fs::read(plist).unwrap())
            .unwrap()
            .program_arguments[0]
            .clone()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- {} ----\n{}",
                self.label,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// `curl` on a Mac of the cable: the body, or the test fails with curl's error.
fn curl(mac: &Netns, args: &[&str]) -> String {
    let out = mac
        .command("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "120"])
        .args(args)
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?}: {body}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    body
}

fn summary_line<'a>(report: &'a str, id: &str) -> &'a str {
    let summary = report.split("\nsummary:\n").nth(1).unwrap_or("");
    summary
        .lines()
        .find(|l| l.trim_start().starts_with(id))
        .unwrap_or("")
}

#[test]
fn install_all_sets_up_the_far_mac_as_its_user_and_the_cluster_links() {
    let dir = scratch();
    let cable = Cable::new();
    let sshd = FarSshd::start(&cable, dir.path());
    let home1 = mac1_home(dir.path(), &sshd, "");
    // The seed's cluster file, naming the model; the model is on mac1 only.
    let model = test_model();
    let model_name = model.file_name().unwrap().to_str().unwrap();
    let cluster = dir.path().join("cluster.toml");
    let seed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed-cluster.toml"),
    )
    .unwrap();
    std::fs::write(
        &cluster,
        format!("[model]\nfile = \"{model_name}\"\n\n{seed}"),
    )
    .unwrap();
    let models1 = home1.join("Library/Application Support/tensorlink/models");
    std::fs::create_dir_all(&models1).unwrap();
    std::fs::copy(&model, models1.join(model_name)).unwrap();
    let node = node_bin();
    let node = node.to_str().unwrap();
    // The far user's own file, which nothing may touch.
    let notes = sshd.home.join("Documents/notes.txt");
    std::fs::create_dir_all(notes.parent().unwrap()).unwrap();
    std::fs::write(&notes, "mine").unwrap();
    let before = tree(&sshd.home);

    // --dry-run shows every command for mac2 and changes nothing anywhere.
    let dry = install(
        &cable.mac1,
        &cluster,
        &home1,
        &["--all", "--dry-run", "--node-binary", node],
    );
    let report = text(&dry);
    assert!(dry.status.success(), "{report}");
    let ssh_lines: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("mac2 │ /usr/bin/ssh"))
        .collect();
    assert_eq!(
        ssh_lines.len(),
        6,
        "probe, mkdir, three copies, install:\n{report}"
    );
    assert!(ssh_lines
        .iter()
        .all(|l| l.contains("remoteuser@192.168.2.1")));
    assert!(ssh_lines[5].contains("/install --cluster") && ssh_lines[5].contains("--no-load"));
    assert_eq!(tree(&sshd.home), before, "--dry-run wrote on mac2");
    assert!(
        !home1.join("Library/LaunchAgents").exists(),
        "--dry-run wrote on mac1"
    );

    let start = Instant::now();
    let first = install(
        &cable.mac1,
        &cluster,
        &home1,
        &["--all", "--node-binary", node],
    );
    let report = text(&first);
    assert!(first.status.success(), "{report}");
    figure(&format!(
        "install --all: mac2 then mac1 in {:?}",
        start.elapsed()
    ));
    assert!(
        report.contains(&format!(
            "mac2 │ remoteuser@192.168.2.1: Linux on {}",
            std::env::consts::ARCH
        )) && report.contains("mac2 │ copying tensorlink-node")
            && report.contains("mac2 │ tensorlink: installing node `mac2`"),
        "{report}"
    );
    assert!(
        summary_line(&report, "mac2").contains("ok      installed"),
        "{report}"
    );
    assert!(
        summary_line(&report, "mac1 (this Mac)").contains("ok      installed"),
        "{report}"
    );

    // mac2 is installed as its user, in their home; its copy of the node is this one.
    let agents2 = sshd.home.join("Library/LaunchAgents");
    let node_plist2 = agents2.join("dev.tensorlink.node.plist");
    let installed = PathBuf::from(Job::program(&node_plist2));
    assert!(installed.starts_with(&sshd.home), "{}", installed.display());
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(node).unwrap()
    );
    for f in [&node_plist2, &installed] {
        assert_eq!(
            std::fs::metadata(f).unwrap().uid(),
            FAR_UID,
            "{}",
            f.display()
        );
    }
    let staged = staging_named(&report);
    assert_eq!(staged.len(), 1, "{report}");
    assert!(
        !staged[0].exists(),
        "the copies were left in {}",
        staged[0].display()
    );

    // The installed jobs, run as launchd would, link the cluster.
    let agents1 = home1.join("Library/LaunchAgents");
    let _mac2 = Job::start(
        cable.mac2.command_as_far_user(&installed),
        &node_plist2,
        &sshd.home,
    );
    let _mac1 = Job::start(
        cable
            .mac1
            .command(Job::program(&agents1.join("dev.tensorlink.node.plist"))),
        &agents1.join("dev.tensorlink.node.plist"),
        &home1,
    );
    let _tunnel = Job::start(
        cable.mac1.command("/usr/bin/ssh"),
        &agents1.join("dev.tensorlink.tunnel.mac2.plist"),
        &home1,
    );
    // Green once the tunnel is up, both nodes link, and mac2 holds the model
    // it fetched from mac1 (until then its model finding is WAIT).
    let mut check = String::new();
    let linked = wait_until(Duration::from_secs(60), "--check --all to be green", || {
        let out = install(&cable.mac1, &cluster, &home1, &["--all", "--check"]);
        check = text(&out);
        // A whole check of both Macs per round; not the helper's 10 ms pace.
        let green = out.status.success();
        if !green {
            std::thread::sleep(Duration::from_millis(500));
        }
        green
    });
    figure(&format!(
        "install --all: --check --all green {linked:?} after the jobs started"
    ));
    assert!(
        check.contains("mac2 │ [ok  ] link to mac1: mac1 answered a handshake")
            && check.contains("mac1 (this Mac)")
            && check.contains("[ok  ] link to mac2")
            && check.contains("lists all 2 nodes"),
        "{check}"
    );
    assert!(
        summary_line(&check, "mac2").contains("ok      checked"),
        "{check}"
    );
    let fetched = sshd
        .home
        .join("Library/Application Support/tensorlink/models")
        .join(model_name);
    assert_eq!(
        std::fs::metadata(&fetched).unwrap().len(),
        std::fs::metadata(&model).unwrap().len()
    );

    // The README's last step: the web UI on mac1, and an answer that runs on both Macs.
    let web_ui = curl(&cable.mac1, &["http://127.0.0.1:52416/"]);
    assert!(web_ui.contains("<html"), "{web_ui}");
    let answer = curl(
        &cable.mac1,
        &[
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0, "max_tokens": 8}"#,
            "http://127.0.0.1:52416/v1/chat/completions",
        ],
    );
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let ring: Vec<&str> = answer["tensorlink"]["ring"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .filter_map(|a| a["node_id"].as_str())
        .collect();
    assert!(ring.contains(&"mac1") && ring.contains(&"mac2"), "{answer}");
    assert!(
        !answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{answer}"
    );

    // Again: nothing changes on either Mac, and the node binary is not copied again.
    let (far_before, near_before) = (tree(&sshd.home), tree(&home1));
    let again = install(
        &cable.mac1,
        &cluster,
        &home1,
        &["--all", "--node-binary", node],
    );
    let report = text(&again);
    assert!(again.status.success(), "{report}");
    assert!(
        report.contains("mac2 │ the node binary there is this one: not copied"),
        "{report}"
    );
    assert!(
        summary_line(&report, "mac2").contains("installed, nothing changed"),
        "{report}"
    );
    assert!(
        summary_line(&report, "mac1 (this Mac)").contains("installed, nothing changed"),
        "{report}"
    );
    // The node's own logs grow while it runs; everything else stays as it was.
    let changed = |a: BTreeMap<PathBuf, Meta>, b: BTreeMap<PathBuf, Meta>| -> Vec<PathBuf> {
        let keys: std::collections::BTreeSet<&PathBuf> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|p| !p.to_string_lossy().contains("Library/Logs/"))
            .filter(|p| a.get(*p) != b.get(*p))
            .cloned()
            .collect()
    };
    assert_eq!(
        changed(far_before, tree(&sshd.home)),
        Vec::<PathBuf>::new(),
        "mac2 changed"
    );
    assert_eq!(
        changed(near_before, tree(&home1)),
        Vec::<PathBuf>::new(),
        "mac1 changed"
    );
    let staged = staging_named(&report);
    assert!(staged.len() == 1 && !staged[0].exists(), "{report}");

    // Uninstall everywhere: what install wrote goes, the user's own file stays.
    drop((_mac1, _mac2, _tunnel));
    let gone = install(&cable.mac1, &cluster, &home1, &["--all", "--uninstall"]);
    let report = text(&gone);
    assert!(gone.status.success(), "{report}");
    assert!(
        summary_line(&report, "mac2").contains("ok      uninstalled"),
        "{report}"
    );
    assert!(!node_plist2.exists() && !installed.exists(), "{report}");
    assert!(
        fetched.exists(),
        "uninstall removed the model mac2 fetched:\n{report}"
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "mine");
    assert!(!agents1.join("dev.tensorlink.node.plist").exists());
    assert!(home1.join(".ssh/id_ed25519").exists());
}

#[test]
fn install_all_names_each_mac_that_failed_and_why() {
    let dir = scratch();
    let cable = Cable::new();
    let sshd = FarSshd::start(&cable, dir.path());
    // mac3 is cabled to nobody: its address answers nothing. Its host key
    // line is an unrelated key, so that mac1's own install can pin it.
    let stranger_key = std::fs::read_to_string(sshd.dir.join("host_key.pub")).unwrap();
    let stranger_key: Vec<&str> = stranger_key.split_whitespace().take(2).collect();
    let home1 = mac1_home(
        dir.path(),
        &sshd,
        &format!("192.168.2.3 {}\n", stranger_key.join(" ")),
    );
    // mac2's account is not one its sshd lets in.
    let cluster = dir.path().join("cluster.toml");
    std::fs::write(
        &cluster,
        format!(
            "[[nodes]]\nid = \"mac1\"\naddress = \"192.168.2.2\"\nssh_user = \"me\"\nnode_port = 50060\napi_port = 52416\n\n\
             [[nodes]]\nid = \"mac2\"\naddress = \"{MAC2}\"\nssh_user = \"stranger\"\nnode_port = 50051\napi_port = 52415\n\n\
             [[nodes]]\nid = \"mac3\"\naddress = \"192.168.2.3\"\nssh_user = \"remoteuser\"\nnode_port = 50070\napi_port = 52417\n\n\
             [[links]]\nfrom = \"mac1\"\nto = \"mac2\"\n\n[[links]]\nfrom = \"mac1\"\nto = \"mac3\"\n"
        ),
    )
    .unwrap();
    let node = node_bin();
    let out = install(
        &cable.mac1,
        &cluster,
        &home1,
        &["--all", "--node-binary", node.to_str().unwrap()],
    );
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    assert!(
        summary_line(&report, "mac2").contains(
            "FAILED  ssh authentication fails. Fix: copy the key to mac2: `ssh-copy-id -i"
        ),
        "{report}"
    );
    assert!(
        summary_line(&report, "mac3")
            .contains("FAILED  mac3 does not answer ssh at 192.168.2.3. Fix: check the cable"),
        "{report}"
    );
    // This Mac is installed all the same: its tunnels retry until the others are.
    assert!(
        summary_line(&report, "mac1 (this Mac)").contains("ok      installed"),
        "{report}"
    );
    assert!(
        report.contains("install: 2 of 3 Macs failed: mac2, mac3"),
        "{report}"
    );
    assert!(!report.contains("copying"), "nothing is copied: {report}");
}

#[test]
fn install_all_copies_nothing_to_a_mac_that_cannot_run_the_binary() {
    let dir = scratch();
    let cable = Cable::new();
    let sshd = FarSshd::start(&cable, dir.path());
    let home1 = mac1_home(dir.path(), &sshd, "");
    let cluster = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed-cluster.toml");
    // A node binary for Apple silicon, macOS 11 or later, as a Mac build writes its header.
    let mac_binary = dir.path().join("tensorlink-node");
    let mut obj = object::write::Object::new(
        object::BinaryFormat::MachO,
        object::Architecture::Aarch64,
        object::Endianness::Little,
    );
    let mut version = object::write::MachOBuildVersion::default();
    version.platform = object::macho::PLATFORM_MACOS;
    version.minos = 0x000b_0000;
    obj.set_macho_build_version(version);
    std::fs::write(&mac_binary, obj.write().unwrap()).unwrap();
    let before = tree(&sshd.home);

    let out = install(
        &cable.mac1,
        &cluster,
        &home1,
        &["--all", "--node-binary", mac_binary.to_str().unwrap()],
    );
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    let refused = format!(
        "the node binary: Linux on {} cannot run it: it is built for macOS 11.0 or later on arm64",
        std::env::consts::ARCH
    );
    assert!(summary_line(&report, "mac2").contains(&refused), "{report}");
    assert!(
        summary_line(&report, "mac1 (this Mac)").contains(&refused),
        "{report}"
    );
    assert_eq!(tree(&sshd.home), before, "something was copied to mac2");
    assert!(!home1.join("Library").exists(), "mac1 was installed");
}
