//! The exact launchctl commands of an install, an unchanged re-install (none),
//! a changed re-install (bootout + bootstrap of what changed) and an uninstall,
//! recorded by the fake launchctl; the same for LaunchDaemons (`--system`) and
//! for switching between the two; and a Mac with nobody logged in at its screen.

use std::path::Path;

use tensorlink_installer::cluster::Cluster;
use tensorlink_installer::install::{self, Receipt};
use tensorlink_installer::plan::{Mode, Plan};
use tensorlink_launchd::fake::Recording;
use tensorlink_launchd::{Domain, LaunchAgent, Launchctl};

mod common;

use common::SEED_CLUSTER as CLUSTER;

/// mac1's plan with `home` as the home and the system's folders under it too.
fn plan_of(text: &str, home: &Path) -> Plan {
    plan_mode(text, home, Mode::Agents)
}

fn plan_mode(text: &str, home: &Path, mode: Mode) -> Plan {
    let cluster = Cluster::parse(text, Path::new("cluster.toml")).unwrap();
    common::plan_in(&cluster, "mac1", home, home, mode)
}

fn try_run(plan: &Plan, binary: &[u8], fake: &Recording) -> anyhow::Result<String> {
    let files = install::files(
        plan,
        binary.to_vec(),
        "[192.168.2.1] ssh-ed25519 AAAA\n".into(),
    )
    .unwrap();
    let mut out = Vec::new();
    install::install(plan, &files, Some(fake as &dyn Launchctl), None, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

fn run(plan: &Plan, binary: &[u8], fake: &Recording) -> String {
    try_run(plan, binary, fake).unwrap()
}

fn uninstall(plan: &Plan, fake: &Recording) -> String {
    let mut out = Vec::new();
    install::uninstall(
        &plan.paths,
        Some(fake as &dyn Launchctl),
        &plan.account,
        &mut out,
    )
    .unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn install_reinstall_change_and_uninstall() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let agents = home.join("Library/LaunchAgents");
    let (node_plist, tunnel_plist) = (
        agents
            .join("dev.tensorlink.node.plist")
            .display()
            .to_string(),
        agents
            .join("dev.tensorlink.tunnel.mac2.plist")
            .display()
            .to_string(),
    );
    // A Mac has this folder before tensorlink; uninstall must leave it.
    std::fs::create_dir_all(&agents).unwrap();
    let fake = Recording::new();
    let p = plan_of(CLUSTER, home);

    run(&p, b"node v1", &fake);
    assert_eq!(
        fake.take_changes(),
        [
            "launchctl enable gui/501/dev.tensorlink.node".to_owned(),
            format!("launchctl bootstrap gui/501 {node_plist}"),
            "launchctl enable gui/501/dev.tensorlink.tunnel.mac2".to_owned(),
            format!("launchctl bootstrap gui/501 {tunnel_plist}"),
        ]
    );

    // Unchanged: launchctl is only asked, nothing is touched.
    run(&p, b"node v1", &fake);
    assert!(
        fake.commands()
            .iter()
            .all(|c| c.starts_with("launchctl print")),
        "{:?}",
        fake.commands()
    );
    assert_eq!(fake.take_changes(), Vec::<String>::new());

    // A new node binary: only the node agent is replaced.
    run(&p, b"node v2", &fake);
    assert_eq!(
        fake.take_changes(),
        [
            "launchctl bootout gui/501/dev.tensorlink.node".to_owned(),
            "launchctl enable gui/501/dev.tensorlink.node".to_owned(),
            format!("launchctl bootstrap gui/501 {node_plist}"),
        ]
    );

    // A changed tunnel (another -L port): only the tunnel agent is replaced.
    let moved = plan_of(&format!("{CLUSTER}local_port = 50099\n"), home);
    run(&moved, b"node v2", &fake);
    assert_eq!(
        fake.take_changes(),
        [
            "launchctl bootout gui/501/dev.tensorlink.tunnel.mac2".to_owned(),
            "launchctl enable gui/501/dev.tensorlink.tunnel.mac2".to_owned(),
            format!("launchctl bootstrap gui/501 {tunnel_plist}"),
        ]
    );
    assert!(std::fs::read_to_string(&p.paths.peer_file)
        .unwrap()
        .contains("127.0.0.1:50099"));

    // An agent booted out by hand is loaded again, though its files are unchanged.
    fake.bootout(GUI, "dev.tensorlink.node").unwrap();
    fake.take_changes();
    run(&moved, b"node v2", &fake);
    assert_eq!(
        fake.take_changes(),
        [
            "launchctl enable gui/501/dev.tensorlink.node".to_owned(),
            format!("launchctl bootstrap gui/501 {node_plist}")
        ]
    );

    // Uninstall: everything in the receipt is stopped and removed; again, nothing to do.
    let receipt = Receipt::read(&p.paths.receipt).unwrap().unwrap();
    uninstall(&p, &fake);
    assert_eq!(
        fake.take_changes(),
        [
            "launchctl bootout gui/501/dev.tensorlink.node",
            "launchctl bootout gui/501/dev.tensorlink.tunnel.mac2"
        ]
    );
    for f in &receipt.files {
        assert!(!f.exists(), "{} left behind", f.display());
    }
    assert!(!p.paths.support.exists());
    assert!(
        agents.exists(),
        "the user's LaunchAgents folder is not ours to remove"
    );
    assert!(uninstall(&p, &fake).starts_with("nothing to uninstall"));
    assert_eq!(fake.take_changes(), Vec::<String>::new());
}

const GUI: Domain = Domain::Gui(501);

#[test]
fn an_agent_the_cluster_no_longer_needs_is_retired() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let fake = Recording::new();
    let three = format!(
        "{CLUSTER}\n[[nodes]]\nid = \"mac3\"\naddress = \"192.168.2.3\"\nssh_user = \"u\"\nnode_port = 50070\napi_port = 52417\n\n[[links]]\nfrom = \"mac1\"\nto = \"mac3\"\n"
    );
    run(&plan_of(&three, home), b"node", &fake);
    assert!(fake.is_loaded(GUI, "dev.tensorlink.tunnel.mac3"));
    fake.take_changes();
    run(&plan_of(CLUSTER, home), b"node", &fake);
    let changes = fake.take_changes();
    assert!(
        changes.contains(&"launchctl bootout gui/501/dev.tensorlink.tunnel.mac3".to_owned()),
        "{changes:?}"
    );
    assert!(!home
        .join("Library/LaunchAgents/dev.tensorlink.tunnel.mac3.plist")
        .exists());
    assert!(
        fake.is_loaded(GUI, "dev.tensorlink.tunnel.mac2")
            && !fake.is_loaded(GUI, "dev.tensorlink.tunnel.mac3")
    );
}

#[test]
fn a_mac_with_nobody_logged_in_is_told_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let fake = Recording::new();
    fake.set_domain_present(GUI, false);
    let p = plan_of(CLUSTER, home);
    let err = format!("{:#}", try_run(&p, b"node", &fake).unwrap_err());
    assert!(
        err.contains("no login session")
            && err.contains("log in as me")
            && err.contains("--system"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(home).unwrap().count(),
        0,
        "nothing written"
    );
    assert_eq!(fake.take_changes(), Vec::<String>::new());

    // Installed while logged in, then uninstalled over ssh with nobody at the
    // screen: launchctl refuses the domain, the files go all the same.
    fake.set_domain_present(GUI, true);
    run(&p, b"node", &fake);
    fake.set_domain_present(GUI, false);
    let said = uninstall(&p, &fake);
    assert!(said.contains("not running: no login session"), "{said}");
    assert!(
        !p.node_agent.plist_path.exists() && !p.paths.receipt.exists(),
        "{said}"
    );
    assert!(!p.paths.support.exists(), "{said}");

    // LaunchDaemons need no login session.
    let d = plan_mode(CLUSTER, home, Mode::Daemons);
    run(&d, b"node", &fake);
    assert!(fake.is_loaded(Domain::System, "dev.tensorlink.node"));
}

#[test]
fn launch_daemons_run_as_the_user_and_switching_modes_replaces_the_other_kind() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let fake = Recording::new();
    let daemons = plan_mode(CLUSTER, home, Mode::Daemons);
    let daemon_dir = home.join("Library/LaunchDaemons");
    let node_daemon = daemon_dir.join("dev.tensorlink.node.plist");
    let tunnel_daemon = daemon_dir.join("dev.tensorlink.tunnel.mac2.plist");

    run(&daemons, b"node", &fake);
    assert_eq!(
        fake.take_changes(),
        [
            "launchctl enable system/dev.tensorlink.node".to_owned(),
            format!("launchctl bootstrap system {}", node_daemon.display()),
            "launchctl enable system/dev.tensorlink.tunnel.mac2".to_owned(),
            format!("launchctl bootstrap system {}", tunnel_daemon.display()),
        ]
    );
    for plist in [&node_daemon, &tunnel_daemon] {
        let job = LaunchAgent::from_bytes(&std::fs::read(plist).unwrap()).unwrap();
        assert_eq!(
            job.user_name.as_deref(),
            Some("me"),
            "runs as the user, not root"
        );
        assert_eq!(
            job.environment_variables.get("HOME").map(String::as_str),
            home.to_str()
        );
    }
    // Unchanged: nothing happens; the receipt says which kind is installed.
    run(&daemons, b"node", &fake);
    assert_eq!(fake.take_changes(), Vec::<String>::new());
    assert_eq!(
        Receipt::read(&daemons.paths.receipt).unwrap().unwrap().mode,
        Mode::Daemons
    );

    // Back to LaunchAgents: the daemons are stopped and removed first (same
    // labels, same ports), then the agents load.
    let agents = plan_of(CLUSTER, home);
    let said = run(&agents, b"node", &fake);
    let changes = fake.take_changes();
    assert_eq!(
        changes[..2],
        [
            "launchctl bootout system/dev.tensorlink.node".to_owned(),
            "launchctl bootout system/dev.tensorlink.tunnel.mac2".to_owned(),
        ]
    );
    assert!(
        changes[2..].iter().all(|c| c.contains("gui/501")),
        "{changes:?}"
    );
    assert_eq!(changes.len(), 6, "{changes:?}");
    assert!(!node_daemon.exists() && !tunnel_daemon.exists());
    assert!(agents.node_agent.plist_path.exists());
    assert!(said.contains("switched   dev.tensorlink.node"), "{said}");
    assert!(!fake.is_loaded(Domain::System, "dev.tensorlink.node"));
    assert!(fake.is_loaded(GUI, "dev.tensorlink.node"));

    // And to LaunchDaemons again.
    run(&daemons, b"node", &fake);
    let changes = fake.take_changes();
    assert_eq!(changes[0], "launchctl bootout gui/501/dev.tensorlink.node");
    assert!(!agents.node_agent.plist_path.exists());
    assert!(fake.is_loaded(Domain::System, "dev.tensorlink.tunnel.mac2"));

    // Uninstall takes the daemons too.
    uninstall(&daemons, &fake);
    assert_eq!(
        fake.take_changes(),
        [
            "launchctl bootout system/dev.tensorlink.node",
            "launchctl bootout system/dev.tensorlink.tunnel.mac2"
        ]
    );
    assert!(
        !node_daemon.exists() && !daemon_dir.exists(),
        "created by install, now empty"
    );
}

#[test]
fn dry_run_shows_each_modes_commands_and_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let fake = Recording::new();
    let preview = |p: &Plan| {
        let files = install::files(p, b"node".to_vec(), String::new()).unwrap();
        let mut out = Vec::new();
        install::dry_run(p, &files, Some(&fake as &dyn Launchctl), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    };
    let daemons = plan_mode(CLUSTER, home, Mode::Daemons);
    let text = preview(&daemons);
    assert!(text.contains("launchctl bootstrap system "), "{text}");
    assert!(
        text.contains("<key>UserName</key>\n\t<string>me</string>"),
        "{text}"
    );
    run(&plan_of(CLUSTER, home), b"node", &fake);
    fake.take_changes();
    let text = preview(&daemons);
    assert_eq!(
        fake.take_changes(),
        Vec::<String>::new(),
        "a preview changes nothing"
    );
    assert!(
        text.contains("would stop and remove the LaunchAgent dev.tensorlink.node\nlaunchctl bootout gui/501/dev.tensorlink.node"),
        "{text}"
    );
    fake.set_domain_present(GUI, false);
    let text = preview(&plan_of(CLUSTER, home));
    assert!(
        text.contains("# note: the install would stop here"),
        "{text}"
    );
}

#[test]
fn uninstall_keeps_the_users_models_and_files_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let fake = Recording::new();
    let p = plan_of(CLUSTER, home);
    run(&p, b"node", &fake);
    // What launchd and the user add beside install's files.
    let models = p.paths.support.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(
        models.join("Llama-3.3-70B-Instruct-Q4_K_M.gguf"),
        b"GGUF weights",
    )
    .unwrap();
    std::fs::write(p.paths.logs.join("node.log"), b"node output").unwrap();
    std::fs::write(p.paths.logs.join("node.log.1"), b"rotated").unwrap();
    std::fs::write(p.paths.logs.join("my-notes.txt"), b"mine").unwrap();

    let said = uninstall(&p, &fake);
    assert_eq!(
        std::fs::read(models.join("Llama-3.3-70B-Instruct-Q4_K_M.gguf")).unwrap(),
        b"GGUF weights"
    );
    assert_eq!(
        std::fs::read(p.paths.logs.join("my-notes.txt")).unwrap(),
        b"mine"
    );
    assert!(!p.paths.logs.join("node.log").exists() && !p.paths.logs.join("node.log.1").exists());
    assert!(!p.paths.node_binary.exists() && !p.paths.support.join("bin").exists());
    assert!(
        said.contains(&format!(
            "kept       {}/ — it holds what install did not write: models/",
            p.paths.support.display()
        )),
        "{said}"
    );
    assert!(said.contains("my-notes.txt"), "{said}");
    // Again: the folders are still there with the user's things, nothing else.
    let again = uninstall(&p, &fake);
    assert!(
        again.contains("kept") && !again.contains("removed"),
        "{again}"
    );
}

#[test]
fn check_asks_the_installed_kinds_domain_and_names_a_crash_looping_tunnel() {
    use tensorlink_installer::check;
    use tensorlink_launchd::ServiceStatus;
    let dir = tempfile::tempdir().unwrap();
    let fake = Recording::new();
    let cluster = Cluster::parse(CLUSTER, Path::new("cluster.toml")).unwrap();
    let d = plan_mode(CLUSTER, dir.path(), Mode::Daemons);
    run(&d, b"node", &fake);
    fake.take_changes();
    fake.set_status(
        Domain::System,
        "dev.tensorlink.tunnel.mac2",
        ServiceStatus {
            state: "spawn scheduled".into(),
            runs: Some(30),
            last_exit: Some("255".into()),
            ..ServiceStatus::default()
        },
    );
    let findings = check::run(&d, &cluster, Some(&fake as &dyn Launchctl));
    assert!(
        fake.commands()
            .contains(&"launchctl print system/dev.tensorlink.node".to_owned()),
        "{:?}",
        fake.commands()
    );
    let node = &findings[0];
    assert!(
        node.ok && node.subject == "LaunchDaemon dev.tensorlink.node",
        "{node}"
    );
    let tunnel = &findings[1];
    assert!(
        !tunnel.ok
            && tunnel.detail.starts_with("crash-looping")
            && tunnel.detail.contains("exit status 255"),
        "{tunnel}"
    );
}

#[test]
fn another_users_launch_daemons_are_neither_replaced_nor_removed() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let fake = Recording::new();
    // bob installed with --system on this Mac: the labels are the whole Mac's.
    let daemons = home.join("Library/LaunchDaemons");
    std::fs::create_dir_all(&daemons).unwrap();
    let mut bobs = LaunchAgent::new("dev.tensorlink.node", vec!["/Users/bob/node".into()]);
    bobs.user_name = Some("bob".into());
    let plist = daemons.join("dev.tensorlink.node.plist");
    std::fs::write(&plist, bobs.to_xml().unwrap()).unwrap();

    for mode in [Mode::Daemons, Mode::Agents] {
        let err = format!(
            "{:#}",
            try_run(&plan_mode(CLUSTER, home, mode), b"node", &fake).unwrap_err()
        );
        assert!(
            err.contains("runs as `bob`") && err.contains("nothing was changed"),
            "{err}"
        );
    }
    assert_eq!(fake.take_changes(), Vec::<String>::new());
    let said = uninstall(&plan_of(CLUSTER, home), &fake);
    assert!(said.contains("a LaunchDaemon of `bob`'s"), "{said}");
    assert_eq!(fake.take_changes(), Vec::<String>::new());
    assert!(plist.exists());
}

/// `--dry-run` is the plan install carries out: the launchctl commands a
/// preview prints are the ones the install then runs, in order — fresh, after
/// a change, unchanged, and switching kinds.
#[test]
fn the_dry_run_prints_the_commands_the_install_then_runs() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let fake = Recording::new();
    let agents = plan_of(CLUSTER, home);
    let daemons = plan_mode(CLUSTER, home, Mode::Daemons);
    for (what, plan, binary) in [
        ("fresh", &agents, &b"node"[..]),
        ("a new binary", &agents, &b"node v2"[..]),
        ("unchanged", &agents, &b"node v2"[..]),
        ("switching to daemons", &daemons, &b"node v2"[..]),
    ] {
        let files = install::files(plan, binary.to_vec(), String::new()).unwrap();
        let mut out = Vec::new();
        install::dry_run(plan, &files, Some(&fake as &dyn Launchctl), &mut out).unwrap();
        let preview: Vec<String> = String::from_utf8(out)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("launchctl "))
            .map(str::to_owned)
            .collect();
        assert_eq!(
            fake.take_changes(),
            Vec::<String>::new(),
            "{what}: a preview changes nothing"
        );
        let mut out = Vec::new();
        install::install(plan, &files, Some(&fake as &dyn Launchctl), None, &mut out).unwrap();
        assert_eq!(fake.take_changes(), preview, "{what}");
    }
}
