//! `install`: run once on each Mac. Reads the cluster file, works out which node
//! this Mac is, and installs its LaunchAgents (node and ssh tunnels); or checks,
//! previews or removes them.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tensorlink_installer::plan::{Account, Mode};
use tensorlink_installer::remote::Shell;
use tensorlink_installer::{
    check, cluster::Cluster, identify, install, known_hosts, plan, preflight, remote,
};
use tensorlink_launchd::{launchctl, Launchctl};

#[derive(Debug, Clone, Parser)]
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
daemon run as a user is undocumented; --check tells). The installer asks sudo for the password.

--all does it for the whole cluster from this Mac: over ssh (the cluster's key, host keys from \
~/.ssh/known_hosts) it checks that each other Mac can run the node binary, copies the node binary, this \
installer and cluster.toml there, and runs the same install there, then here. Works with --check, \
--uninstall, --dry-run and --system."
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

    /// Write the files as if DIR were the home directory (tests, packaging; with --all, this Mac's only)
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

    /// Every Mac of the cluster from this one, over ssh: the other Macs first, then this one
    #[arg(long)]
    all: bool,
}

impl Args {
    /// The options that say how to install rather than what or where:
    /// `--all` passes them on to every far installer.
    fn how(&self) -> Vec<&'static str> {
        [
            (self.system, "--system"),
            (self.no_load, "--no-load"),
            (self.trust_new_host_keys, "--trust-new-host-keys"),
        ]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect()
    }

    /// These options as a command line, for running this installer again
    /// through sudo; `--all` is not among them.
    fn argv(&self) -> Vec<std::ffi::OsString> {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        let mut value = |flag: &str, v: Option<&std::ffi::OsStr>| {
            if let Some(v) = v {
                argv.push(flag.into());
                argv.push(v.into());
            }
        };
        value("--cluster", self.cluster.as_deref().map(Path::as_os_str));
        value("--node", self.node.as_deref().map(std::ffi::OsStr::new));
        value("--root", self.root.as_deref().map(Path::as_os_str));
        value(
            "--node-binary",
            self.node_binary.as_deref().map(Path::as_os_str),
        );
        let what = [
            (self.dry_run, "--dry-run"),
            (self.check, "--check"),
            (self.uninstall, "--uninstall"),
        ];
        argv.extend(
            what.into_iter()
                .filter(|(on, _)| *on)
                .map(|(_, f)| f.into()),
        );
        argv.extend(self.how().into_iter().map(Into::into));
        argv
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = if args.all {
        run_all(&args)
    } else {
        run(&args, &mut std::io::stdout())
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("install: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Combinations refused before anything is done, here or (with `--all`) on
/// another Mac.
fn refuse_misuse(args: &Args, euid: u32, account: &User) -> Result<()> {
    if args.root.is_some() && !args.no_load && !args.dry_run {
        bail!(
            "--root writes agents for another home directory; add --no-load, since launchctl would load \
             them into your own session"
        );
    }
    let uses_launchctl = !args.no_load && args.root.is_none();
    if uses_launchctl && !args.check && !args.dry_run && !cfg!(target_os = "macos") {
        bail!(
            "loading and unloading LaunchAgents needs macOS (launchctl). On this machine, add --no-load \
             (with --root DIR to write the files for a test home), or preview with --dry-run"
        );
    }
    // What changes the real system's folders (not a --root test home).
    let changes = args.root.is_none() && !args.check && !args.dry_run;
    if changes && euid == 0 && account.uid == 0 {
        bail!(
            "run the installer as the Mac's user, not as root: the jobs run as that user, with that \
             user's ssh key and home (it asks sudo itself for what needs root)"
        );
    }
    if changes && euid == 0 && args.all {
        bail!(
            "run install --all as yourself, without sudo: it logs in to the other Macs with your ssh key, \
             and asks sudo itself, on each Mac, where --system needs it"
        );
    }
    Ok(())
}

/// The cluster file, read and checked, and which of its nodes this Mac is.
fn load_cluster(args: &Args, home: &Path) -> Result<(PathBuf, Cluster, String)> {
    let path = cluster_file(args.cluster.as_deref(), home)?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cluster = Cluster::parse(&text, &path)?;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let node = identify::identify(
        &cluster,
        args.node.as_deref(),
        &hostname,
        &identify::local_addresses(),
    )?;
    Ok((path, cluster, node))
}

fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let euid = nix::unistd::geteuid().as_raw();
    let account = account(euid)?;
    refuse_misuse(args, euid, &account)?;
    let paths = paths(args, &account)?;
    let home = paths.home.clone();
    let system = launchctl::System::new();
    let uses_launchctl = !args.no_load && args.root.is_none();
    let loader: install::Loader<'_> =
        (uses_launchctl && cfg!(target_os = "macos")).then_some(&system as &dyn Launchctl);
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
        return escalate(args, mode, out);
    }
    if changes && euid == 0 && !args.uninstall && args.node_binary.is_none() {
        bail!(
            "run the installer without sudo (it asks sudo itself for what needs root): as root it \
             would build the node with root's cargo and leave root-owned files in your checkout; \
             or pass --node-binary PATH"
        );
    }
    let owner = (euid == 0 && account.uid != 0).then_some((account.uid, account.gid));

    if args.uninstall {
        install::uninstall(&paths, loader, &account.plan_account(), out)?;
        return Ok(ExitCode::SUCCESS);
    }

    let (cluster_path, cluster, node) = load_cluster(args, &home)?;
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

/// Where this Mac's files go: the account's home, or `--root`.
fn paths(args: &Args, account: &User) -> Result<plan::Paths> {
    Ok(match &args.root {
        // Absolute: every path in the plists derives from it, and launchd runs
        // from /. The system's LaunchDaemons folder moves under it too.
        Some(root) => {
            let root =
                std::path::absolute(root).with_context(|| format!("--root {}", root.display()))?;
            plan::Paths::with_system_root(&root, &root)
        }
        None => plan::Paths::new(&account.home),
    })
}

/// `--all`: each other Mac of the cluster over ssh ([`remote`]), in the
/// order cluster.toml lists them, then this Mac with this same program; a
/// summary at the end. A Mac that fails does not stop the others: the summary
/// names each, and the exit code is non-zero.
fn run_all(args: &Args) -> Result<ExitCode> {
    let action = match (args.check, args.uninstall) {
        (true, _) => remote::Action::Check,
        (_, true) => remote::Action::Uninstall,
        _ => remote::Action::Install,
    };
    let euid = nix::unistd::geteuid().as_raw();
    let account = account(euid)?;
    // Refused here, before any other Mac is touched, not after.
    refuse_misuse(args, euid, &account)?;
    let paths = paths(args, &account)?;
    let (cluster_path, cluster, here) = load_cluster(args, &paths.home)?;
    let cluster_path = std::path::absolute(&cluster_path).context("the cluster file's path")?;
    let identity = paths.expand(cluster.identity_file());
    if !identity.is_file() {
        bail!(
            "the ssh identity file {id} does not exist: --all logs in to the other Macs with it. Create \
             it with `ssh-keygen -t ed25519 -f {id}`, copy it to each Mac with `ssh-copy-id -i {id}.pub \
             USER@ADDRESS`, or set [ssh] identity_file in cluster.toml",
            id = identity.display()
        );
    }
    let exe = std::env::current_exe().context("cannot locate this program to copy it")?;
    let installer = remote::Program::read(&exe, "the installer")?;
    // Built (or taken) once, for every Mac.
    let node_binary = match action {
        remote::Action::Install if args.dry_run => node_binary_path(args.node_binary.as_deref()),
        remote::Action::Install => Some(build_node_binary(args.node_binary.as_deref())?),
        _ => None,
    };
    let node_binary = match node_binary.map(|p| remote::Program::read(&p, "the node binary")) {
        Some(Err(e)) if args.dry_run => {
            println!("# note: {e}");
            None
        }
        other => other.transpose()?,
    };

    let width = cluster.nodes.iter().map(|n| n.id.len()).max().unwrap_or(0);
    let user_known_hosts = paths.home.join(".ssh/known_hosts");
    let pass_on: Vec<String> = args.how().iter().map(|f| f.to_string()).collect();
    // Whenever there is a terminal: sudo on a far Mac may ask in it (for
    // --system, or to remove or replace the LaunchDaemons it has).
    // (Only when the output is the terminal too: ssh puts it in raw mode.)
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout();
    let mut results: Vec<(String, Result<usize, String>)> = Vec::new();

    let mut interrupted = false;
    for node in cluster.nodes.iter().filter(|n| n.id != here) {
        if interrupted {
            results.push((
                node.id.clone(),
                Err("skipped: the run was interrupted".into()),
            ));
            continue;
        }
        let mut out = remote::Prefixed::new(&node.id, width, &mut stdout);
        let result = remote::staging_name()
            .map_err(remote::Failure::local("reading /dev/urandom"))
            .and_then(|staging| {
                far(
                    node,
                    &identity,
                    &user_known_hosts,
                    args,
                    remote::Plan {
                        action,
                        payload: remote::Payload {
                            installer: &installer,
                            cluster: &cluster_path,
                            node_binary: node_binary.as_ref(),
                        },
                        pass_on: &pass_on,
                        staging: &staging,
                        tty,
                    },
                    &mut out,
                )
            });
        if let Err(e) = &result {
            out.line(&format!("FAILED: {e}"));
        }
        interrupted = matches!(result, Err(remote::Failure::Interrupted));
        let changes = out.changes;
        drop(out);
        results.push((
            node.id.clone(),
            result.map(|()| changes).map_err(|e| e.to_string()),
        ));
    }

    if interrupted {
        results.push((
            format!("{here} (this Mac)"),
            Err("skipped: the run was interrupted".into()),
        ));
        summary(action, args.dry_run, &results)?;
        return Ok(ExitCode::from(130));
    }

    // This Mac last, with this same program: the far Macs' ends of its tunnels are ready.
    let mut local = args.clone();
    local.all = false;
    local.node = Some(here.clone());
    local.cluster = Some(cluster_path.clone());
    local.node_binary = node_binary.as_ref().map(|b| b.path.clone());
    let mut out = remote::Prefixed::new(&here, width, &mut stdout);
    let result = (|| -> Result<ExitCode> {
        if let (Some(binary), false) = (&node_binary, args.dry_run) {
            binary.runs_on(&remote::local_host(&mut remote::System)?, "the node binary")?;
        }
        run(&local, &mut out)
    })();
    let result = match result {
        Ok(code) if code == ExitCode::SUCCESS => Ok(out.changes),
        Ok(_) if action == remote::Action::Check => Err("its checks failed (see above)".to_owned()),
        Ok(_) => Err("it failed (see its output above)".to_owned()),
        Err(e) => {
            out.line(&format!("FAILED: {e:#}"));
            Err(format!("{e:#}"))
        }
    };
    drop(out);
    results.push((format!("{here} (this Mac)"), result));
    summary(action, args.dry_run, &results)
}

/// One far Mac: its host key pinned in a scratch file, then [`remote::run`]
/// (or, for `--dry-run`, the commands it would run).
fn far(
    node: &tensorlink_installer::cluster::Node,
    identity: &Path,
    user_known_hosts: &Path,
    args: &Args,
    plan: remote::Plan<'_>,
    out: &mut remote::Prefixed<'_>,
) -> std::result::Result<(), remote::Failure> {
    // A dry run contacts no one: no ssh-keyscan either.
    let trust_new = args.trust_new_host_keys && !args.dry_run;
    let pinned = match known_hosts::pin_node(node, user_known_hosts, trust_new) {
        Err(e) if args.dry_run => {
            out.line(&format!("# note: {e}"));
            String::new()
        }
        other => other?,
    };
    let scratch_failed = remote::Failure::local("writing a scratch known_hosts");
    let mut scratch = match tempfile::Builder::new()
        .prefix("tensorlink-known-hosts-")
        .tempfile()
        .and_then(|mut f| f.write_all(pinned.as_bytes()).map(|()| f))
    {
        Ok(f) => f,
        Err(e) => return Err(scratch_failed(e)),
    };
    let _ = scratch.flush();
    let login = remote::Login {
        node,
        identity,
        known_hosts: scratch.path(),
    };
    if args.dry_run {
        out.line(&format!(
            "# would run, as {}@{}:",
            node.ssh_user, node.address
        ));
        for command in remote::commands(&login, &plan) {
            out.line(&command);
        }
        return Ok(());
    }
    remote::run(&login, &plan, &mut remote::System, out)
}

/// The table at the end of `--all`, and its exit code.
fn summary(
    action: remote::Action,
    dry_run: bool,
    results: &[(String, Result<usize, String>)],
) -> Result<ExitCode> {
    let width = results.iter().map(|(id, _)| id.len()).max().unwrap_or(0);
    println!("\nsummary:");
    for (id, result) in results {
        let done = action.done();
        match (result, action) {
            (Ok(_), _) if dry_run => println!("  {id:<width$}  dry run: nothing changed"),
            (Ok(_), remote::Action::Check) => println!("  {id:<width$}  ok      {done}: all green"),
            (Ok(0), _) => println!("  {id:<width$}  ok      {done}, nothing changed"),
            (Ok(1), _) => println!("  {id:<width$}  ok      {done}, 1 change"),
            (Ok(n), _) => println!("  {id:<width$}  ok      {done}, {n} changes"),
            (Err(why), _) => println!("  {id:<width$}  FAILED  {why}"),
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(id, _)| id.as_str())
        .collect();
    if failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "install: {} of {} Macs failed: {}",
        failed.len(),
        results.len(),
        failed.join(", ")
    );
    Ok(ExitCode::FAILURE)
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
fn escalate(args: &Args, mode: Mode, out: &mut dyn Write) -> Result<ExitCode> {
    let mut args = args.clone();
    if !args.uninstall && args.node_binary.is_none() {
        args.node_binary = Some(build_node_binary(None)?);
    }
    let exe = std::env::current_exe().context("cannot locate this program to run it with sudo")?;
    let why = match mode {
        Mode::Daemons => "LaunchDaemons are installed by root",
        Mode::Agents => {
            "this Mac has tensorlink's LaunchDaemons (--system), and removing them needs root"
        }
    };
    writeln!(
        out,
        "{why}: running the installer again with sudo (it may ask for your password)"
    )?;
    // The prompt ends its line: under `install --all` it reaches the user
    // through ssh and a line-by-line reader.
    let mut argv: Vec<String> = vec![
        "/usr/bin/sudo".into(),
        "-p".into(),
        "[sudo] password for %u on %h:\n".into(),
        "--".into(),
        exe.to_string_lossy().into_owned(),
    ];
    argv.extend(args.argv().iter().map(|a| a.to_string_lossy().into_owned()));
    let code = remote::System
        .run(&argv, remote::Input::Terminal, &mut |l| {
            let _ = writeln!(out, "{l}");
        })
        .context("running sudo")?;
    Ok(match code {
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
    writeln!(
        out,
        "verify:  cargo run --release --bin install -- --check (--check --all from the Mac that ran --all)"
    )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What sudo runs again is what was asked, less `--all`.
    #[test]
    fn argv_gives_back_the_same_options_without_all() {
        let asked = Args::parse_from([
            "install",
            "--all",
            "--cluster",
            "my cluster.toml",
            "--node",
            "mac2",
            "--root",
            "/tmp/home",
            "--no-load",
            "--system",
            "--trust-new-host-keys",
            "--node-binary",
            "/build/tensorlink-node",
            "--dry-run",
        ]);
        let again = Args::parse_from(std::iter::once("install".into()).chain(asked.argv()));
        let mut expected = asked.clone();
        expected.all = false;
        assert_eq!(format!("{again:?}"), format!("{expected:?}"));
        let check = Args::parse_from(["install", "--check"]);
        assert_eq!(check.argv(), vec![std::ffi::OsString::from("--check")]);
        assert_eq!(check.how(), Vec::<&str>::new());
    }
}
