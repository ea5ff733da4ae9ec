//! The exact launchctl commands of an install, an unchanged re-install (none),
//! a changed re-install (bootout + bootstrap of what changed) and an uninstall,
//! recorded by the fake launchctl.

use std::path::Path;

use tensorlink_installer::cluster::Cluster;
use tensorlink_installer::install::{self, Receipt};
use tensorlink_installer::plan::{plan, Plan};
use tensorlink_launchd::fake::Recording;
use tensorlink_launchd::{Domain, Launchctl};

mod common;

use common::SEED_CLUSTER as CLUSTER;

fn plan_of(text: &str, home: &Path) -> Plan {
    let cluster = Cluster::parse(text, Path::new("cluster.toml")).unwrap();
    plan(&cluster, "mac1", home).unwrap()
}

fn run(plan: &Plan, binary: &[u8], fake: &Recording) {
    let files = install::files(
        plan,
        binary.to_vec(),
        "[192.168.2.1] ssh-ed25519 AAAA\n".into(),
    )
    .unwrap();
    let loader: install::Loader<'_> = Some((fake as &dyn Launchctl, Domain::Gui(501)));
    install::install(plan, &files, loader, &mut std::io::sink()).unwrap();
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
    fake.bootout(Domain::Gui(501), "dev.tensorlink.node")
        .unwrap();
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
    let loader: install::Loader<'_> = Some((&fake as &dyn Launchctl, Domain::Gui(501)));
    install::uninstall(&p.paths, loader, &mut std::io::sink()).unwrap();
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
    install::uninstall(&p.paths, loader, &mut std::io::sink()).unwrap();
    assert_eq!(fake.take_changes(), Vec::<String>::new());
}

#[test]
fn an_agent_the_cluster_no_longer_needs_is_retired() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let fake = Recording::new();
    let three = format!(
        "{CLUSTER}\n[[nodes]]\nid = \"mac3\"\naddress = \"192.168.2.3\"\nssh_user = \"u\"\nnode_port = 50070\napi_port = 52417\n\n[[links]]\nfrom = \"mac1\"\nto = \"mac3\"\n"
    );
    run(&plan_of(&three, home), b"node", &fake);
    assert!(fake.is_loaded("dev.tensorlink.tunnel.mac3"));
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
        fake.is_loaded("dev.tensorlink.tunnel.mac2")
            && !fake.is_loaded("dev.tensorlink.tunnel.mac3")
    );
}
