//! What the installer's tests share.

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
