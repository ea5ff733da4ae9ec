//! The plan: cluster.toml and this Mac's node id in, every file and agent this
//! Mac needs out. A pure function, golden-tested; nothing here touches the disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tensorlink_launchd::{Domain, KeepAlive, LaunchAgent, ProcessType};

use crate::cluster::{Cluster, Node, PortUse, ResolvedLink};

/// Every label starts with this, so `launchctl list | grep dev.tensorlink` finds them all.
pub const LABEL_PREFIX: &str = "dev.tensorlink";
/// launchd restarts a job that exited after this many seconds (its default, 10,
/// would leave a dropped tunnel down for 10 s).
pub const THROTTLE_INTERVAL: u32 = 2;
/// What launchd gives jobs instead of the user's shell PATH.
const PATH: &str = "/usr/bin:/bin:/usr/sbin:/sbin";
/// The tunnel holds its session with a remote command instead of `-N`: with a
/// session and a terminal (`-tt`) both ssh ends disable Nagle, and the far
/// command dies with the session (no stray process per reconnect). macOS
/// `sleep` has no `infinity`; 2^31-1 seconds is 68 years.
pub const HOLD_COMMAND: &str = "exec sleep 2147483647";

/// Where things live under a home directory (`--root` replaces the home, and
/// the system's `/` for LaunchDaemons).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub home: PathBuf,
    pub support: PathBuf,
    pub node_binary: PathBuf,
    pub peer_file: PathBuf,
    /// Where cluster.toml's `[model] file` is looked for when it is a name.
    pub models: PathBuf,
    pub known_hosts: PathBuf,
    pub receipt: PathBuf,
    pub agents: PathBuf,
    /// `/Library/LaunchDaemons`: root-owned, so only `--system` writes there.
    pub daemons: PathBuf,
    pub logs: PathBuf,
}

impl Paths {
    /// The layout of a Mac: the user's `home`, and the system's folders under `/`.
    pub fn new(home: &Path) -> Paths {
        Paths::with_system_root(home, Path::new("/"))
    }

    /// As [`Paths::new`], with the system's folders under `root` instead of `/`.
    pub fn with_system_root(home: &Path, root: &Path) -> Paths {
        let support = home.join("Library/Application Support/tensorlink");
        Paths {
            home: home.to_owned(),
            node_binary: support.join("bin/tensorlink-node"),
            peer_file: support.join("peers.json"),
            models: support.join("models"),
            known_hosts: support.join("known_hosts"),
            receipt: support.join("receipt.json"),
            support,
            agents: home.join("Library/LaunchAgents"),
            daemons: root.join("Library/LaunchDaemons"),
            logs: home.join("Library/Logs/tensorlink"),
        }
    }

    /// The folder a mode's job plists go in.
    pub fn jobs(&self, mode: Mode) -> &Path {
        match mode {
            Mode::Agents => &self.agents,
            Mode::Daemons => &self.daemons,
        }
    }

    /// `~/x` → `<home>/x`; absolute paths stay.
    pub fn expand(&self, path: &str) -> PathBuf {
        match path.strip_prefix("~/") {
            Some(rest) => self.home.join(rest),
            None if path == "~" => self.home.clone(),
            None => PathBuf::from(path),
        }
    }
}

/// The user the jobs run as: their home holds the key, the files and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// How launchd runs the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// LaunchAgents in `gui/<uid>`: they run while the user is logged in at
    /// the Mac's screen, and Local Network privacy applies to them.
    Agents,
    /// LaunchDaemons in `system`, run as the user (`UserName`): from boot, with
    /// nobody logged in. Installing them needs root (`--system`).
    Daemons,
}

impl Default for Mode {
    /// What receipts written before `--system` existed describe.
    fn default() -> Self {
        Mode::Agents
    }
}

impl Mode {
    pub fn other(self) -> Mode {
        match self {
            Mode::Agents => Mode::Daemons,
            Mode::Daemons => Mode::Agents,
        }
    }

    /// The launchd domain of this mode's jobs for `uid`.
    pub fn domain(self, uid: u32) -> Domain {
        match self {
            Mode::Agents => Domain::Gui(uid),
            Mode::Daemons => Domain::System,
        }
    }

    /// "LaunchAgent" or "LaunchDaemon", for messages.
    pub fn job(self) -> &'static str {
        match self {
            Mode::Agents => "LaunchAgent",
            Mode::Daemons => "LaunchDaemon",
        }
    }
}

/// One launchd job (LaunchAgent or LaunchDaemon) to install.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub label: String,
    pub plist_path: PathBuf,
    pub agent: LaunchAgent,
    /// Files the running job reads at start: a change to one restarts it.
    pub inputs: Vec<PathBuf>,
}

/// An ssh tunnel this Mac opens.
#[derive(Debug, Clone, PartialEq)]
pub struct Tunnel {
    pub link: ResolvedLink,
    pub to: Node,
    pub agent: Agent,
}

/// cluster.toml's `[model]` on this Mac.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedModel {
    /// The file: a name in [`Paths::models`], or the path as written, `~` expanded.
    pub path: PathBuf,
    /// Lowercase, as the node compares it.
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub node: Node,
    pub mode: Mode,
    pub account: Account,
    /// Where the jobs are loaded: `gui/<uid>` or `system`.
    pub domain: Domain,
    pub paths: Paths,
    pub identity_file: PathBuf,
    /// The model file the node serves, from cluster.toml's `[model]`.
    pub model: Option<PlannedModel>,
    pub node_agent: Agent,
    pub tunnels: Vec<Tunnel>,
    /// The node's peer file, in the seed's format.
    pub peer_file: String,
    /// Every port this Mac uses.
    pub ports: Vec<PortUse>,
}

impl Plan {
    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        std::iter::once(&self.node_agent).chain(self.tunnels.iter().map(|t| &t.agent))
    }
}

/// The plan for node `id` of a validated cluster, installed for `account`
/// (whose home `paths` describes) as `mode`'s jobs.
pub fn plan(
    cluster: &Cluster,
    id: &str,
    paths: &Paths,
    account: &Account,
    mode: Mode,
) -> Option<Plan> {
    let node = cluster.node(id)?.clone();
    let paths = paths.clone();
    let jobs = Jobs {
        paths: &paths,
        account,
        mode,
    };
    let identity_file = paths.expand(cluster.identity_file());
    let links = cluster.resolved_links();
    let model = cluster.model.as_ref().map(|m| PlannedModel {
        path: if m.is_path() {
            paths.expand(&m.file)
        } else {
            paths.models.join(&m.file)
        },
        sha256: m.sha256.as_ref().map(|s| s.to_ascii_lowercase()),
    });

    let mut peers = BTreeMap::new();
    for l in &links {
        if l.from == id {
            peers.insert(l.to.clone(), format!("127.0.0.1:{}", l.local_port));
        } else if l.to == id {
            peers.insert(l.from.clone(), format!("127.0.0.1:{}", l.remote_port));
        }
    }
    let tunnels = links
        .iter()
        .filter(|l| l.from == id)
        .filter_map(|l| {
            let to = cluster.node(&l.to)?.clone();
            let from = cluster.node(&l.from)?;
            Some(tunnel(l, from, to, &jobs, &identity_file))
        })
        .collect();

    Some(Plan {
        node_agent: node_agent(&node, model.as_ref(), &jobs),
        model,
        mode,
        domain: mode.domain(account.uid),
        account: account.clone(),
        ports: cluster.ports().remove(id).unwrap_or_default(),
        peer_file: peer_file_json(&peers),
        node,
        paths,
        identity_file,
        tunnels,
    })
}

/// What every job of one plan shares.
struct Jobs<'a> {
    paths: &'a Paths,
    account: &'a Account,
    mode: Mode,
}

impl Jobs<'_> {
    fn job(&self, label: String, args: Vec<String>, log: &str) -> Agent {
        let paths = self.paths;
        let mut a = LaunchAgent::new(label.clone(), args);
        a.run_at_load = true;
        a.keep_alive = Some(KeepAlive::Always(true));
        a.throttle_interval = Some(THROTTLE_INTERVAL);
        let log = paths.logs.join(log).to_string_lossy().into_owned();
        a.standard_out_path = Some(log.clone());
        a.standard_error_path = Some(log);
        a.environment_variables.insert("PATH".into(), PATH.into());
        if self.mode == Mode::Daemons {
            // A daemon runs as the user, with the user's key and files; launchd
            // gives a daemon no login environment, so HOME is stated.
            a.user_name = Some(self.account.name.clone());
            a.environment_variables
                .insert("HOME".into(), paths.home.to_string_lossy().into_owned());
        }
        Agent {
            plist_path: paths.jobs(self.mode).join(format!("{label}.plist")),
            label,
            agent: a,
            inputs: Vec::new(),
        }
    }
}

fn node_agent(node: &Node, model: Option<&PlannedModel>, jobs: &Jobs<'_>) -> Agent {
    let paths = jobs.paths;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mut args = vec![
        s(&paths.node_binary),
        "--node-id".into(),
        node.id.clone(),
        "--node-port".into(),
        node.node_port.to_string(),
        "--chatgpt-api-port".into(),
        node.api_port.to_string(),
        "--discovery-module".into(),
        "manual".into(),
        "--discovery-config-path".into(),
        s(&paths.peer_file),
        "--disable-tui".into(),
        // launchd never rotates the logs it writes; the node keeps them bounded.
        "--log-dir".into(),
        s(&paths.logs),
        // Stated, not the node's default: a `--root` home keeps it too.
        "--models-dir".into(),
        s(&paths.models),
    ];
    if let Some(model) = model {
        args.extend(["--model".into(), s(&model.path)]);
        if let Some(sha) = &model.sha256 {
            args.extend(["--model-sha256".into(), sha.clone()]);
        }
    }
    let mut a = jobs.job(format!("{LABEL_PREFIX}.node"), args, "node.log");
    // No App Nap or background throttling for the process doing inference.
    a.agent.process_type = Some(ProcessType::Interactive);
    a.agent
        .environment_variables
        .insert("TENSORLINK_LOG".into(), "info".into());
    a.agent.working_directory = Some(s(&paths.support));
    // Not the peer file: the node follows its edits while running.
    a.inputs = vec![paths.node_binary.clone()];
    a
}

fn tunnel(link: &ResolvedLink, from: &Node, to: Node, jobs: &Jobs<'_>, identity: &Path) -> Tunnel {
    let paths = jobs.paths;
    let args = ssh_args(link, from, &to, identity, &paths.known_hosts);
    let label = format!("{LABEL_PREFIX}.tunnel.{}", to.id);
    let mut a = jobs.job(label, args, &format!("tunnel-{}.log", to.id));
    a.agent.process_type = Some(ProcessType::Interactive);
    a.inputs = vec![paths.known_hosts.clone(), identity.to_owned()];
    Tunnel {
        link: link.clone(),
        to,
        agent: a,
    }
}

/// How `node` appears in known_hosts: `addr`, or `[addr]:port`.
pub fn host_pattern(node: &Node) -> String {
    if node.ssh_port.get() == 22 {
        node.address.clone()
    } else {
        format!("[{}]:{}", node.address, node.ssh_port)
    }
}

/// Options every ssh the installer runs shares (the tunnel and its pre-flight
/// check), so the check tests exactly what the tunnel will do.
pub fn ssh_options(to: &Node, identity: &Path, known_hosts: &Path) -> Vec<String> {
    // No ~/.ssh/config: everything the tunnel needs is on this command line.
    let mut args = vec!["-F".to_owned(), "/dev/null".to_owned()];
    for o in [
        "BatchMode=yes".to_owned(),
        "StrictHostKeyChecking=yes".to_owned(),
        // ssh splits this option's value on whitespace (it takes several files),
        // and the path has "Application Support" in it: quote it inside the value.
        format!("UserKnownHostsFile=\"{}\"", known_hosts.display()),
        "GlobalKnownHostsFile=/dev/null".to_owned(),
        "IdentitiesOnly=yes".to_owned(),
        // launchd hands gui agents the user's ssh-agent (SSH_AUTH_SOCK), daemons
        // none, the installer's shell perhaps another: use none anywhere, so the
        // pre-flight check authenticates exactly as the tunnel will.
        "IdentityAgent=none".to_owned(),
        "ConnectTimeout=5".to_owned(),
        "ControlMaster=no".to_owned(),
        "ControlPath=none".to_owned(),
    ] {
        args.push("-o".into());
        args.push(o);
    }
    args.extend(["-i".to_owned(), identity.to_string_lossy().into_owned()]);
    args.extend(["-p".to_owned(), to.ssh_port.to_string()]);
    args
}

/// The tunnel command: the seed's `-L`/`-R` pair, made unattended and stall-free.
pub fn ssh_args(
    link: &ResolvedLink,
    from: &Node,
    to: &Node,
    identity: &Path,
    known_hosts: &Path,
) -> Vec<String> {
    let mut args = vec![
        "/usr/bin/ssh".to_owned(),
        "-tt".to_owned(),
        // With a terminal, `~` would be an escape character; nothing types here.
        "-e".to_owned(),
        "none".to_owned(),
        "-L".to_owned(),
        format!("{}:localhost:{}", link.local_port, to.node_port),
        "-R".to_owned(),
        format!("{}:localhost:{}", link.remote_port, from.node_port),
    ];
    for o in [
        // A forward that cannot bind (a stale -R port on the far Mac) must end
        // ssh, so launchd retries it, instead of leaving a tunnel that does not carry.
        "ExitOnForwardFailure=yes",
        // Notice a dead link within 15 s even when no data flows.
        "ServerAliveInterval=5",
        "ServerAliveCountMax=3",
        // The -L ends listen on loopback only (ssh's default, stated here). The
        // -R ends bind the far Mac's loopback unless its sshd sets GatewayPorts.
        "GatewayPorts=no",
    ] {
        args.push("-o".into());
        args.push(o.into());
    }
    args.extend(ssh_options(to, identity, known_hosts));
    args.push(format!("{}@{}", to.ssh_user, to.address));
    args.push(HOLD_COMMAND.into());
    args
}

fn peer_file_json(peers: &BTreeMap<String, String>) -> String {
    let peers: serde_json::Map<String, serde_json::Value> = peers
        .iter()
        .map(|(id, addr)| (id.clone(), serde_json::json!({ "address": addr })))
        .collect();
    let mut text =
        serde_json::to_string_pretty(&serde_json::json!({ "peers": peers })).unwrap_or_default();
    text.push('\n');
    text
}
