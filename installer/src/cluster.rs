//! `cluster.toml`: the one file, identical on every Mac, that describes the
//! whole cluster. Everything else the installer writes is derived from it, so
//! the two ends of a tunnel can never disagree.
//!
//! Parsing and validation are pure: every class of mistake is refused here,
//! naming the field and the fix, before anything is written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

/// A TCP port, 1 to 65535, checked as the file is read: a port out of range
/// is refused with the line it is on, and nothing downstream casts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(u16);

impl Port {
    pub fn new(port: u16) -> Option<Port> {
        (port != 0).then_some(Port(port))
    }

    pub fn get(self) -> u16 {
        self.0
    }

    /// The port after this one, if there is one.
    pub fn next(self) -> Option<Port> {
        self.0.checked_add(1).map(Port)
    }
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Port, D::Error> {
        let v = i64::deserialize(d)?;
        u16::try_from(v).ok().and_then(Port::new).ok_or_else(|| {
            serde::de::Error::custom(format!("{v} is not a port: ports go from 1 to 65535"))
        })
    }
}

/// One Mac.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// The node's id: its name in peer files, topology and agent labels.
    pub id: String,
    /// Its address on the cable (Thunderbolt bridge or Ethernet).
    pub address: String,
    /// The account other Macs log in as when they open a tunnel to this one.
    pub ssh_user: String,
    /// Its sshd port.
    #[serde(default = "default_ssh_port")]
    pub ssh_port: Port,
    /// The node protocol port on its loopback.
    pub node_port: Port,
    /// The HTTP API port on its loopback.
    pub api_port: Port,
}

fn default_ssh_port() -> Port {
    Port(22)
}

/// `from` runs the ssh tunnel to `to`'s sshd; traffic flows both ways through it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub from: String,
    pub to: String,
    /// The `-L` port on `from` that reaches `to`'s node (default: `to`'s node port + 1).
    pub local_port: Option<Port>,
    /// The `-R` port on `to` that reaches `from`'s node (default: `from`'s node port).
    pub remote_port: Option<Port>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ssh {
    /// Private key the tunnels log in with; `~` is the home directory.
    pub identity_file: Option<String>,
}

/// The model every node serves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// A file name in each Mac's models directory, or a path (`/…` or `~/…`).
    pub file: String,
    /// The file's sha256, when given: a node holding a different file refuses
    /// to start and says so, instead of joining a ring whose other nodes run
    /// another model.
    pub sha256: Option<String>,
}

impl Model {
    /// Whether `file` is a path (from `/` or `~/`) rather than a name in the
    /// models folder.
    pub fn is_path(&self) -> bool {
        is_path(&self.file)
    }
}

fn is_path(file: &str) -> bool {
    file.starts_with('/') || file.starts_with("~/")
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    #[serde(default)]
    pub ssh: Ssh,
    pub model: Option<Model>,
    #[serde(rename = "nodes")]
    pub nodes: Vec<Node>,
    #[serde(rename = "links", default)]
    pub links: Vec<Link>,
}

pub const DEFAULT_IDENTITY: &str = "~/.ssh/id_ed25519";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClusterError {
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {field}: {problem}. {fix}")]
    Invalid {
        file: String,
        field: String,
        problem: String,
        fix: String,
    },
}

/// A link with its ports worked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedLink {
    pub from: String,
    pub to: String,
    /// On `from`: `-L local_port:localhost:<to.node_port>`.
    pub local_port: Port,
    /// On `to`: `-R remote_port:localhost:<from.node_port>`.
    pub remote_port: Port,
}

/// Where a port is used, for clash reports and `--check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortUse {
    pub port: Port,
    pub what: String,
    /// The cluster.toml field that sets it.
    pub field: String,
}

impl Cluster {
    pub fn parse(text: &str, file: &Path) -> Result<Cluster, ClusterError> {
        let file_name = file.display().to_string();
        let cluster: Cluster = toml::from_str(text).map_err(|e| ClusterError::Syntax {
            file: file_name.clone(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cluster.validate(&file_name)?;
        Ok(cluster)
    }

    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn identity_file(&self) -> &str {
        self.ssh
            .identity_file
            .as_deref()
            .unwrap_or(DEFAULT_IDENTITY)
    }

    /// Links with derived ports. Only valid on a validated cluster.
    pub fn resolved_links(&self) -> Vec<ResolvedLink> {
        self.links
            .iter()
            .filter_map(|l| {
                let from = self.node(&l.from)?;
                let to = self.node(&l.to)?;
                Some(ResolvedLink {
                    from: l.from.clone(),
                    to: l.to.clone(),
                    local_port: l.local_port.or(to.node_port.next())?,
                    remote_port: l.remote_port.unwrap_or(from.node_port),
                })
            })
            .collect()
    }

    /// Every port each Mac uses, by node id.
    pub fn ports(&self) -> BTreeMap<String, Vec<PortUse>> {
        let mut map: BTreeMap<String, Vec<PortUse>> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let uses = map.entry(n.id.clone()).or_default();
            uses.push(PortUse {
                port: n.node_port,
                what: format!("{}'s node port", n.id),
                field: format!("nodes[{i}].node_port"),
            });
            uses.push(PortUse {
                port: n.api_port,
                what: format!("{}'s API port", n.id),
                field: format!("nodes[{i}].api_port"),
            });
        }
        for (i, l) in self.resolved_links().into_iter().enumerate() {
            map.entry(l.from.clone()).or_default().push(PortUse {
                port: l.local_port,
                what: format!(
                    "the tunnel {}→{}'s -L port (reaches {})",
                    l.from, l.to, l.to
                ),
                field: format!("links[{i}].local_port"),
            });
            map.entry(l.to.clone()).or_default().push(PortUse {
                port: l.remote_port,
                what: format!(
                    "the tunnel {}→{}'s -R port (reaches {})",
                    l.from, l.to, l.from
                ),
                field: format!("links[{i}].remote_port"),
            });
        }
        map
    }

    fn validate(&self, file: &str) -> Result<(), ClusterError> {
        let invalid = |field: String, problem: String, fix: &str| ClusterError::Invalid {
            file: file.to_owned(),
            field,
            problem,
            fix: fix.to_owned(),
        };
        if self.nodes.is_empty() {
            return Err(invalid(
                "nodes".into(),
                "no [[nodes]] are listed".into(),
                "Add one [[nodes]] table per Mac.",
            ));
        }
        if let Some(id) = &self.ssh.identity_file {
            if !(id.starts_with('/') || id.starts_with("~/")) {
                return Err(invalid(
                    "ssh.identity_file".into(),
                    format!("`{id}` is a relative path"),
                    "Write it from the root (/Users/me/.ssh/id_ed25519) or from the home directory (~/.ssh/id_ed25519): launchd runs the tunnel from /.",
                ));
            }
        }
        if let Some(model) = &self.model {
            if let Some(problem) = model_file_problem(&model.file) {
                return Err(invalid(
                    "model.file".into(),
                    problem,
                    "Write the model's whole file name, found in the models folder (\"Llama-3.3-70B-Instruct-Q4_K_M.gguf\"), or its path from the root (/Volumes/Models/….gguf) or from your home directory (~/Models/….gguf).",
                ));
            }
            if let Some(sha) = &model.sha256 {
                if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(
                        "model.sha256".into(),
                        format!("`{sha}` is not a sha256 (64 hexadecimal digits)"),
                        "Write the output of `shasum -a 256 FILE` (its first word), or leave sha256 out.",
                    ));
                }
            }
        }
        let mut ids = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.id.is_empty()
                || n.id.len() > 64
                || !n
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(invalid(format!("nodes[{i}].id"), format!("`{}` is not a valid node id", n.id), "Use 1 to 64 letters, digits, `-`, `_` or `.` (it becomes part of launchd labels)."));
            }
            // Compared ignoring case: the id names files, and macOS file systems fold case.
            if !ids.insert(n.id.to_ascii_lowercase()) {
                return Err(invalid(
                    format!("nodes[{i}].id"),
                    format!(
                        "`{}` is listed twice (ids are compared ignoring case)",
                        n.id
                    ),
                    "Give every Mac its own id.",
                ));
            }
            // Address and user end up on ssh's command line: nothing that reads as an option.
            if !is_host(&n.address) {
                return Err(invalid(
                    format!("nodes[{i}].address"),
                    format!("`{}` is not an IP address or host name", n.address),
                    "Write the Mac's IP address on the cable, e.g. \"192.168.2.1\".",
                ));
            }
            if !addresses.insert(n.address.as_str()) {
                return Err(invalid(
                    format!("nodes[{i}].address"),
                    format!("`{}` is used by two nodes", n.address),
                    "Every Mac needs its own address.",
                ));
            }
            if n.ssh_user.is_empty()
                || n.ssh_user.starts_with('-')
                || !n
                    .ssh_user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(invalid(
                    format!("nodes[{i}].ssh_user"),
                    format!("`{}` is not an account name", n.ssh_user),
                    "Name the macOS account to log in as on this Mac (its short name, e.g. \"remoteuser\").",
                ));
            }
        }
        let mut pairs = BTreeSet::new();
        for (i, l) in self.links.iter().enumerate() {
            for (field, id) in [("from", &l.from), ("to", &l.to)] {
                if self.node(id).is_none() {
                    return Err(invalid(
                        format!("links[{i}].{field}"),
                        format!("names `{id}`, which is not in [[nodes]]"),
                        "Use the id of a listed node.",
                    ));
                }
            }
            if l.from == l.to {
                return Err(invalid(
                    format!("links[{i}]"),
                    format!("links `{}` to itself", l.from),
                    "A link joins two different Macs.",
                ));
            }
            let pair = if l.from < l.to {
                (&l.from, &l.to)
            } else {
                (&l.to, &l.from)
            };
            if !pairs.insert(pair) {
                return Err(invalid(
                    format!("links[{i}]"),
                    format!("`{}` and `{}` are linked twice", l.from, l.to),
                    "One tunnel carries both directions; keep one link per pair.",
                ));
            }
            let to = self.node(&l.to).map(|n| n.node_port);
            if l.local_port.is_none() && to.and_then(Port::next).is_none() {
                return Err(invalid(
                    format!("links[{i}].local_port"),
                    format!("the default ({}'s node port + 1) is not a port", l.to),
                    "Set local_port explicitly.",
                ));
            }
        }
        for (node, uses) in self.ports() {
            let mut seen: BTreeMap<Port, &PortUse> = BTreeMap::new();
            for u in &uses {
                if let Some(first) = seen.insert(u.port, u) {
                    return Err(invalid(
                        u.field.clone(),
                        format!("port {} on {node} is already {}", u.port, first.what),
                        &format!(
                            "Choose another port for {} (or for {}).",
                            u.field, first.field
                        ),
                    ));
                }
            }
        }
        if let Some(unreached) = self.unreachable() {
            return Err(invalid(
                "links".into(),
                format!(
                    "`{unreached}` is not connected to `{}` by any chain of links",
                    self.nodes[0].id
                ),
                &format!("Add a [[links]] entry that joins `{unreached}` to the others."),
            ));
        }
        Ok(())
    }

    /// The first node not reachable from the first node through links.
    fn unreachable(&self) -> Option<String> {
        let mut seen = BTreeSet::from([self.nodes[0].id.as_str()]);
        let mut frontier = vec![self.nodes[0].id.as_str()];
        while let Some(n) = frontier.pop() {
            for l in &self.links {
                for (a, b) in [(&l.from, &l.to), (&l.to, &l.from)] {
                    if a == n && seen.insert(b.as_str()) {
                        frontier.push(b.as_str());
                    }
                }
            }
        }
        self.nodes
            .iter()
            .find(|n| !seen.contains(n.id.as_str()))
            .map(|n| n.id.clone())
    }
}

/// Why `file` cannot name the model, if it cannot. The plan makes it an
/// absolute path (a name goes under the models folder), so it never reads as
/// an option; a name must be the file's whole name, as `install --check`
/// looks for exactly that file.
fn model_file_problem(file: &str) -> Option<String> {
    if file.is_empty() {
        return Some("is empty".into());
    }
    if file.chars().any(char::is_control) {
        return Some(format!("{file:?} holds a control character"));
    }
    if file.trim() != file {
        return Some(format!("{file:?} starts or ends with a space"));
    }
    if file == "~" || (file.starts_with('~') && !file.starts_with("~/")) {
        return Some(format!(
            "`{file}` is not a file (`~` alone, or another user's home)"
        ));
    }
    if !is_path(file) && (file.contains('/') || file == "." || file == "..") {
        return Some(format!(
            "`{file}` is a relative path (launchd starts the node from its own folder)"
        ));
    }
    if !file.to_ascii_lowercase().ends_with(".gguf") {
        return Some(format!("`{file}` does not end in .gguf"));
    }
    None
}

fn is_host(s: &str) -> bool {
    s.parse::<std::net::IpAddr>().is_ok()
        || (!s.is_empty()
            && !s.starts_with('-')
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c)))
}
