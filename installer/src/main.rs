//! `install`: run once on each Mac. Reads the cluster file, works out which node
//! this Mac is, and installs its LaunchAgents (node and ssh tunnels); or checks,
//! previews or removes them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tensorlink_installer::plan::{Account, Mode};
use tensorlink_installer::{
    check, cluster::Cluster, identify, install, known_hosts, plan, preflight,
};
use tensorlink_launchd::{launchctl, Launchctl};

#[derive(Debug, Parser)]
#[command(
    name = "install",
    version,
    about = "Install tensorlink on this Mac: LaunchAgents for its ssh tunnels and its node, derived from one cluster.toml",
    long_about = "Install tensorlink on this Mac: LaunchAgents for its ssh tunnels and its node, derived from \
one cluster.toml shared by every Mac of the cluster. Run it once on each Mac; running it again is safe \
(unchanged agents keep running, changed ones are replaced). Manage the agents afterwards with launchctl; \
logs are in ~/Library/Logs/tensorlink and in the unified log (subsystem dev.tensorlink).

LaunchAgents run while you are logged in at the Mac's screen. --system installs LaunchDaemons \
instead, run as you: they start at boot with nobody logged in (a Mac mini on a shelf, after a power \
cut), and Apple's TN3179 exempts launchd daemons from Local Network privacy (whether that holds for a \
daemon run as a user is undocumented; --check tells). The installer asks sudo for the password."
)]
struct Args {
    /// The cluster file [default: ./cluster.toml, then ~/.config/tensorlink/cluster.toml]
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,

    /// This Mac's node id [default: the node whose id is the host name or whose address is local]
    #[arg(long, value_name = "ID")]
    node: Option<String>,

    /// Print every file it would write and every launchctl command; change nothing
    #[arg(long)]
    dry_run: bool,

    /// Write the files as if DIR were the home directory (tests, packaging)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,

    /// Run no launchctl and no network check (with --root: just write the files)
    #[arg(long)]
    no_load: bool,

    /// Verify the installed cluster from this Mac: agents, forwarded ports, handshakes, topology
    #[arg(long, conflicts_with_all = ["dry_run", "uninstall"])]
    check: bool,

    /// Stop and remove everything install wrote, and nothing else (models and your own files stay)
    #[arg(long, conflicts_with = "dry_run")]
    uninstall: bool,

    /// Install LaunchDaemons that run as you from boot, with nobody logged in (asks sudo); switching back and forth replaces the other kind
    #[arg(long)]
    system: bool,

    /// Accept a far Mac's host key that is not yet in ~/.ssh/known_hosts, unchecked (first contact only)
    #[arg(long)]
    trust_new_host_keys: bool,

    /// The tensorlink-node binary to install [default: built from this checkout with cargo]
    #[arg(long, value_name = "PATH")]
    node_binary: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("install: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitCode> {
    if args.root.is_some() && !args.no_load && !args.dry_run {
        bail!(
            "--root writes agents for another home directory; add --no-load, since launchctl would load \
             them into your own session"
        );
    }
    let euid = nix::unistd::geteuid().as_raw();
    let account = account(euid)?;
    let paths = match &args.root {
        // Absolute: every path in the plists derives from it, and launchd runs
        // from /. The system's LaunchDaemons folder moves under it too.
        Some(root) => {
            let root =
                std::path::absolute(root).with_context(|| format!("--root {}", root.display()))?;
            plan::Paths::with_system_root(&root, &root)
        }
        None => plan::Paths::new(&account.home),
    };
    let home = paths.home.clone();
    let system = launchctl::System::new();
    let uses_launchctl = !args.no_load && args.root.is_none();
    let loader: install::Loader<'_> =
        (uses_launchctl && cfg!(target_os = "macos")).then_some(&system as &dyn Launchctl);
    if uses_launchctl && !args.check && !args.dry_run && loader.is_none() {
        bail!(
            "loading and unloading LaunchAgents needs macOS (launchctl). On this machine, add --no-load \
             (with --root DIR to write the files for a test home), or preview with --dry-run"
        );
    }
    let receipt = install::Receipt::read(&paths.receipt)?;
    // --check and --uninstall find the mode installed; install is told it.
    let mode = match (&receipt, args.system || !(args.check || args.uninstall)) {
        (Some(r), false) => r.mode,
        _ if args.system => Mode::Daemons,
        _ => Mode::Agents,
    };
    let daemons_present = !install::jobs_of_mode(
        &paths,
        Mode::Daemons,
        receipt.as_ref().unwrap_or(&install::Receipt::default()),
        &account.name,
    )
    .is_empty();
    // What changes the real system's folders (not a --root test home).
    let changes = args.root.is_none() && !args.check && !args.dry_run;
    let needs_root = changes && (mode == Mode::Daemons || daemons_present);
    if needs_root && euid != 0 {
        return escalate(args, mode);
    }
    if changes && euid == 0 && account.uid == 0 {
        bail!(
            "run the installer as the Mac's user, not as root: the jobs run as that user, with that \
             user's ssh key and home (it asks sudo itself for what needs root)"
        );
    }
    if changes && euid == 0 && !args.uninstall && args.node_binary.is_none() {
        bail!(
            "run the installer without sudo (it asks sudo itself for what needs root): as root it \
             would build the node with root's cargo and leave root-owned files in your checkout; \
             or pass --node-binary PATH"
        );
    }
    let owner = (euid == 0 && account.uid != 0).then_some((account.uid, account.gid));
    let out = &mut std::io::stdout();

    if args.uninstall {
        install::uninstall(&paths, loader, &account.plan_account(), out)?;
        return Ok(ExitCode::SUCCESS);
    }

    let cluster_path = cluster_file(args.cluster.as_deref(), &home)?;
    let text = std::fs::read_to_string(&cluster_path)
        .with_context(|| format!("reading {}", cluster_path.display()))?;
    let cluster = Cluster::parse(&text, &cluster_path)?;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let node = identify::identify(
        &cluster,
        args.node.as_deref(),
        &hostname,
        &identify::local_addresses(),
    )?;
    let plan = plan::plan(&cluster, &node, &paths, &account.plan_account(), mode)
        .context("the identified node is missing from the plan")?;

    if args.check {
        if loader.is_none() {
            writeln!(
                out,
                "(launchctl checks skipped: they need macOS and no --no-load)"
            )?;
        }
        let findings = check::run(&plan, &cluster, loader);
        for f in &findings {
            writeln!(out, "{f}")?;
        }
        return Ok(if findings.iter().all(|f| f.ok) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }

    writeln!(
        out,
        "tensorlink: installing node `{node}` from {} into {} as {}s",
        cluster_path.display(),
        home.display(),
        mode.job()
    )?;
    if let Some(model) = &plan.model {
        writeln!(out, "{}", check::model_finding(model))?;
    }
    if let Some(launchctl) = loader.filter(|_| !args.dry_run) {
        install::require_domain(&plan, launchctl)?;
    }
    match preflight::identity(&plan) {
        Err(e) if args.dry_run => writeln!(out, "# note: {e:#}")?,
        other => other?,
    }
    let user_known_hosts = home.join(".ssh/known_hosts");
    let trust_new = args.trust_new_host_keys && loader.is_some() && !args.dry_run;
    let known_hosts = match known_hosts::pin(&plan, &user_known_hosts, trust_new) {
        Ok(k) => k,
        Err(e) if args.dry_run => format!("# not pinned yet: {e}\n"),
        Err(e) => return Err(e.into()),
    };
    if let (Some(launchctl), false) = (loader, args.dry_run) {
        let as_user = owner.map(|_| account.name.as_str());
        preflight::ssh_reachable(&plan, &known_hosts, as_user)?;
        preflight::ports_free(&plan, launchctl)?;
    }

    let binary = if args.dry_run {
        node_binary_path(args.node_binary.as_deref())
            .and_then(|p| std::fs::read(&p).ok())
            .unwrap_or_default()
    } else {
        let path = build_node_binary(args.node_binary.as_deref())?;
        std::fs::read(&path)
            .with_context(|| format!("reading the node binary {}", path.display()))?
    };
    let files = install::files(&plan, binary, known_hosts)?;

    if args.dry_run {
        install::dry_run(&plan, &files, loader, out)?;
        return Ok(ExitCode::SUCCESS);
    }
    install::install(&plan, &files, loader, owner, out)?;
    if loader.is_none() {
        writeln!(out, "files written; no agent loaded (--no-load)")?;
        return Ok(ExitCode::SUCCESS);
    }
    verify(&plan, &cluster, loader, out)
}

/// The user the jobs are for: the one who ran `sudo`, or the one running this.
struct User {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl User {
    fn plan_account(&self) -> Account {
        Account {
            name: self.name.clone(),
            uid: self.uid,
            gid: self.gid,
        }
    }
}

fn account(euid: u32) -> Result<User> {
    let sudo_uid = std::env::var("SUDO_UID")
        .ok()
        .and_then(|u| u.parse::<u32>().ok())
        .filter(|_| euid == 0);
    let uid = sudo_uid.unwrap_or_else(|| nix::unistd::getuid().as_raw());
    let user = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .with_context(|| format!("cannot look up the account of uid {uid}"))?;
    Ok(User {
        name: user.name,
        uid,
        gid: user.gid.as_raw(),
        home: user.dir,
    })
}

/// Runs this same command again through `sudo`, for what only root may do:
/// writing `/Library/LaunchDaemons` and loading into the `system` domain. The
/// node binary is built first, as the user (root's shell has no cargo).
fn escalate(args: &Args, mode: Mode) -> Result<ExitCode> {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if !args.uninstall && args.node_binary.is_none() {
        let binary = build_node_binary(None)?;
        argv.push("--node-binary".into());
        argv.push(binary.into());
    }
    let exe = std::env::current_exe().context("cannot locate this program to run it with sudo")?;
    let why = match mode {
        Mode::Daemons => "LaunchDaemons are installed by root",
        Mode::Agents => {
            "this Mac has tensorlink's LaunchDaemons (--system), and removing them needs root"
        }
    };
    eprintln!("install: {why}; running it again with sudo (it may ask for your password)");
    let status = Command::new("/usr/bin/sudo")
        .arg("--")
        .arg(&exe)
        .args(&argv)
        .status()
        .context("running sudo")?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// The seed's Verification section, until green or 30 s have passed. What
/// waits on another Mac (its node or its tunnel) does not fail this install:
/// the first Mac of a cluster is installed before the others.
fn verify(
    plan: &plan::Plan,
    cluster: &Cluster,
    loader: install::Loader<'_>,
    out: &mut dyn Write,
) -> Result<ExitCode> {
    writeln!(out, "checking (up to 30 s)…")?;
    let start = Instant::now();
    let findings = loop {
        let findings = check::run(plan, cluster, loader);
        if findings.iter().all(|f| f.ok) || start.elapsed() > Duration::from_secs(30) {
            break findings;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for f in &findings {
        writeln!(out, "{f}")?;
    }
    let local_ok = findings.iter().all(|f| f.ok || f.needs_peer);
    if local_ok && findings.iter().any(|f| f.needs_peer) {
        writeln!(
            out,
            "\nthis Mac is ready; what is marked WAIT comes up once the other Macs are installed"
        )?;
    }
    writeln!(
        out,
        "\nmanage:  launchctl print {}",
        plan.domain.service(&plan.node_agent.label)
    )?;
    writeln!(
        out,
        "logs:    {} and `log stream --predicate 'subsystem == \"dev.tensorlink\"'`",
        plan.paths.logs.display()
    )?;
    writeln!(out, "verify:  cargo run --release --bin install -- --check")?;
    Ok(if local_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cluster_file(flag: Option<&Path>, home: &Path) -> Result<PathBuf> {
    if let Some(f) = flag {
        return Ok(f.to_owned());
    }
    let candidates = [
        PathBuf::from("cluster.toml"),
        home.join(".config/tensorlink/cluster.toml"),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| {
            "no cluster file: write ./cluster.toml (see examples/seed-cluster.toml) or pass --cluster FILE".to_string()
        })
}

/// The node binary beside this program (where cargo puts both).
fn node_binary_path(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = flag {
        return Some(p.to_owned());
    }
    Some(
        std::env::current_exe()
            .ok()?
            .parent()?
            .join("tensorlink-node"),
    )
}

/// The given binary, or the node built from this checkout: `cargo run --bin
/// install` builds only the installer, so the node is built here (cargo's own
/// progress shows; an up-to-date build takes a moment).
fn build_node_binary(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        if !p.is_file() {
            bail!("--node-binary {}: no such file", p.display());
        }
        return Ok(p.to_owned());
    }
    let target = node_binary_path(None).context("cannot locate this program")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if workspace.join("Cargo.toml").is_file() {
        let release = target.parent().is_some_and(|d| d.ends_with("release"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&workspace)
            .args(["build", "-p", "tensorlink", "--bin", "tensorlink-node"]);
        if release {
            cmd.arg("--release");
        }
        // On a Mac the model runs on the GPU through candle's Metal backend.
        if cfg!(target_vendor = "apple") {
            cmd.args(["--features", "metal"]);
        }
        eprintln!("building tensorlink-node…");
        let status = cmd
            .status()
            .context("running cargo to build tensorlink-node")?;
        if !status.success() {
            bail!("building tensorlink-node failed; see cargo's output above");
        }
    }
    if !target.is_file() {
        bail!("no node binary at {}: build it with `cargo build --release --bin tensorlink-node`, or pass --node-binary", target.display());
    }
    Ok(target)
}
