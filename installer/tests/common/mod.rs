//! What the installer's tests share.

#![allow(dead_code)]

/// The seed's two Macs, as a minimal cluster.toml.
pub const SEED_CLUSTER: &str = r#"
[[nodes]]
id = "mac1"
address = "192.168.2.2"
ssh_user = "me"
node_port = 50060
api_port = 52416

[[nodes]]
id = "mac2"
address = "192.168.2.1"
ssh_user = "remoteuser"
node_port = 50051
api_port = 52415

[[links]]
from = "mac1"
to = "mac2"
"#;

use std::path::Path;

use tensorlink_installer::cluster::Cluster;
use tensorlink_installer::plan::{self, Account, Mode, Paths, Plan};

/// The account the tests install for (a Mac's first user).
pub fn me() -> Account {
    Account {
        name: "me".into(),
        uid: 501,
        gid: 20,
    }
}

/// The plan for `id` as `mode`'s jobs, with `home` as the home directory and
/// the system's folders under `system_root`.
pub fn plan_in(cluster: &Cluster, id: &str, home: &Path, system_root: &Path, mode: Mode) -> Plan {
    let paths = Paths::with_system_root(home, system_root);
    plan::plan(cluster, id, &paths, &me(), mode).unwrap()
}
