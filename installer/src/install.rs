//! Carrying out a plan as a list of [`Step`]s, in order: take down the other
//! mode's jobs when switching between LaunchAgents and LaunchDaemons, create
//! the missing folders, write the files (only those that changed, each
//! replaced atomically), record a receipt, retire jobs the cluster no longer
//! needs, and (re)load each job whose plist or inputs changed since it was
//! last loaded. `--dry-run` prints the same steps' descriptions. The receipt
//! is written once the files are in place and again after every step that
//! changes what is loaded, so an install interrupted half-way can still be
//! completed or uninstalled; uninstall takes back what the receipt lists and
//! nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tensorlink_launchd::launchctl::bootout_and_wait;
use tensorlink_launchd::{Domain, Launchctl, LaunchctlError};

use crate::plan::{Account, Agent, Mode, Paths, Plan, LABEL_PREFIX};

/// A file the install writes.
pub struct File {
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub mode: u32,
    pub what: String,
}

/// What an install wrote and loaded, so re-install knows what changed and
/// uninstall takes back exactly that.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Receipt {
    pub node: String,
    /// LaunchAgents or LaunchDaemons (`--system`).
    #[serde(default)]
    pub mode: Mode,
    /// Job label → sha256 of its plist and inputs when it was last loaded
    /// (empty: written but never loaded).
    pub agents: BTreeMap<String, String>,
    pub files: BTreeSet<PathBuf>,
    /// Folders that did not exist before install made them: uninstall removes
    /// them once empty, never with something in them.
    #[serde(default)]
    pub dirs: BTreeSet<PathBuf>,
    /// The jobs' log files: launchd writes them, install chose their names.
    #[serde(default)]
    pub logs: BTreeSet<PathBuf>,
}

impl Receipt {
    pub fn read(path: &Path) -> Result<Option<Receipt>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a tensorlink receipt; move it aside if you are sure",
                    path.display()
                )
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Left alone when it already says this: an install that changes nothing
    /// writes nothing.
    fn write(&self, path: &Path, owner: Owner) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        if std::fs::read(path).is_ok_and(|old| old == bytes) {
            return Ok(());
        }
        write_atomic(path, &bytes, 0o644, owner)
            .with_context(|| format!("writing the install receipt {}", path.display()))
    }
}

/// Whether `line` is one install or uninstall prints for a change it made
/// (`  wrote      …`, `  loaded     …`, `  removed    …`): `--all` counts
/// them for its summary. The verbs are those of [`Step::execute`] and
/// [`uninstall`]; what is left as it was prints `unchanged` or `running`.
pub fn reports_change(line: &str) -> bool {
    const VERBS: [&str; 7] = [
        "wrote", "loaded", "reloaded", "retired", "switched", "removed", "stopped",
    ];
    line.starts_with("  ")
        && line
            .split_whitespace()
            .next()
            .is_some_and(|w| VERBS.contains(&w))
}

/// Every file of the plan, in the order they are written.
pub fn files(plan: &Plan, node_binary: Vec<u8>, known_hosts: String) -> Result<Vec<File>> {
    let mut files = vec![
        File {
            path: plan.paths.node_binary.clone(),
            contents: node_binary,
            mode: 0o755,
            what: "node binary".into(),
        },
        File {
            path: plan.paths.peer_file.clone(),
            contents: plan.peer_file.clone().into_bytes(),
            mode: 0o644,
            what: "peer file".into(),
        },
    ];
    if !plan.tunnels.is_empty() {
        files.push(File {
            path: plan.paths.known_hosts.clone(),
            contents: known_hosts.into_bytes(),
            mode: 0o644,
            what: "pinned ssh host keys".into(),
        });
    }
    for a in plan.agents() {
        files.push(File {
            path: a.plist_path.clone(),
            contents: a.agent.to_xml()?,
            mode: 0o644,
            what: format!("{} {}", plan.mode.job(), a.label),
        });
    }
    Ok(files)
}

/// Identifies a job's plist and inputs as planned, so a re-install can tell
/// whether the running job is still the one it would load now. sha256, not
/// std's hasher: Rust does not promise that one stays the same across
/// releases, and a changed fingerprint reloads every job for nothing.
fn fingerprint(agent: &Agent, files: &[File]) -> String {
    let mut h = Sha256::new();
    for path in std::iter::once(&agent.plist_path).chain(&agent.inputs) {
        let contents = match files.iter().find(|f| &f.path == path) {
            Some(f) => f.contents.clone(),
            None => std::fs::read(path).unwrap_or_default(),
        };
        // Lengths first, so no two different (path, contents) lists hash alike.
        for part in [path.as_os_str().as_encoded_bytes(), &contents[..]] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    format!("{:x}", h.finalize())
}

/// The launchctl to load and unload with, or nothing for `--no-load`.
pub type Loader<'a> = Option<&'a dyn Launchctl>;

/// Running as root for a user (`sudo`): the files written into that user's
/// home are given to them (uid, gid), so they stay theirs to change.
pub type Owner = Option<(u32, u32)>;

/// What to do with an agent, given what is loaded and what the receipt says.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    LeaveRunning,
    Load,
    Reload,
}

fn action(loaded: bool, recorded: Option<&String>, planned: &str) -> Action {
    match (loaded, recorded.is_some_and(|r| r == planned)) {
        (true, true) => Action::LeaveRunning,
        (true, false) => Action::Reload,
        (false, _) => Action::Load,
    }
}

/// launchd can load the plan's jobs now: `gui/<uid>` exists only while the
/// user is logged in at the screen, which an install over ssh often is not.
pub fn require_domain(plan: &Plan, launchctl: &dyn Launchctl) -> Result<()> {
    if launchctl.has_domain(plan.domain)? {
        return Ok(());
    }
    bail!(
        "{user} has no login session at this Mac's screen, so launchd has no {domain} domain to \
         load LaunchAgents into (installing over ssh does not create one); nothing was written. \
         Either log in as {user} at the Mac's screen once and run the installer again (and turn on \
         automatic login in System Settings > Users & Groups for a Mac that restarts unattended), \
         or install with --system: LaunchDaemons run from boot with nobody logged in",
        user = plan.account.name,
        domain = plan.domain,
    )
}

/// Our jobs of `mode`: those the receipt recorded for that mode, and the
/// `dev.tensorlink.*` plists in its folder — for LaunchDaemons, only those that
/// run as `user`: `/Library/LaunchDaemons` is the whole Mac's, and another
/// user's `--system` install is theirs to change ([`foreign_daemons`]).
pub fn jobs_of_mode(paths: &Paths, mode: Mode, receipt: &Receipt, user: &str) -> BTreeSet<String> {
    let mut labels: BTreeSet<String> = if receipt.mode == mode {
        receipt.agents.keys().cloned().collect()
    } else {
        BTreeSet::new()
    };
    for (label, owner) in plists(paths.jobs(mode)) {
        if mode == Mode::Agents || owner.as_deref().is_none_or(|o| o == user) {
            labels.insert(label);
        }
    }
    labels
}

/// LaunchDaemons of ours that run as another user: (label, that user).
pub fn foreign_daemons(paths: &Paths, user: &str) -> Vec<(String, String)> {
    plists(&paths.daemons)
        .into_iter()
        .filter_map(|(label, owner)| Some((label, owner?)))
        .filter(|(_, owner)| owner != user)
        .collect()
}

/// The `dev.tensorlink.*` plists in `dir`: label and `UserName`.
fn plists(dir: &Path) -> Vec<(String, Option<String>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(label) = name
            .strip_suffix(".plist")
            .filter(|l| l.starts_with(&format!("{LABEL_PREFIX}.")))
        {
            let owner = std::fs::read(e.path())
                .ok()
                .and_then(|b| tensorlink_launchd::LaunchAgent::from_bytes(&b).ok())
                .and_then(|a| a.user_name);
            found.push((label.to_owned(), owner));
        }
    }
    found
}

/// Refuses to touch the Mac-wide LaunchDaemons another user installed: one
/// tensorlink per Mac, and theirs runs with their key and home.
pub fn refuse_foreign_daemons(paths: &Paths, user: &str) -> Result<()> {
    let foreign = foreign_daemons(paths, user);
    let Some((label, owner)) = foreign.first() else {
        return Ok(());
    };
    bail!(
        "the LaunchDaemon {label} in {} runs as `{owner}`, not `{user}`: another user installed \
         tensorlink on this Mac with --system, and launchd labels are the whole Mac's. Have {owner} \
         run `install --uninstall` first; nothing was changed",
        paths.daemons.display()
    )
}

/// Boots a job out, taking an absent domain (nobody logged in: nothing of
/// theirs runs) as already stopped.
fn stop(launchctl: &dyn Launchctl, domain: Domain, label: &str) -> Result<bool, LaunchctlError> {
    match launchctl.bootout(domain, label) {
        Ok(()) => Ok(true),
        Err(e) if e.is_missing_domain() => Ok(false),
        Err(e) => Err(e),
    }
}

/// One thing an install does. [`steps`] lists them all from what is on disk
/// and loaded now; [`install`] executes them in order and [`dry_run`] prints
/// their descriptions, so a preview is the very plan an install carries out.
/// Each executed step is recorded in the receipt, which is how uninstall
/// takes back exactly what was done.
pub enum Step<'a> {
    /// Switching kinds: the other kind's job holds the same label and ports.
    SwitchOut {
        label: String,
        from: Mode,
        plist: PathBuf,
    },
    /// A folder that does not exist yet.
    CreateDir(PathBuf),
    Write {
        file: &'a File,
        /// `None` when the file is new, else whether its contents change.
        changes: Option<bool>,
    },
    /// The receipt, once the files it lists are in place.
    WriteReceipt,
    /// A job of an earlier install that the cluster no longer has.
    Retire { label: String, plist: PathBuf },
    /// Loaded and unchanged since it was last loaded.
    LeaveRunning { label: String },
    /// (Re)load a job: its plist or inputs changed, or it is not loaded.
    Load {
        agent: &'a Agent,
        reload: bool,
        fingerprint: String,
    },
}

/// Everything `install` would do now, in order. Asks launchctl only `print`.
pub fn steps<'a>(plan: &'a Plan, files: &'a [File], loader: Loader<'_>) -> Result<Vec<Step<'a>>> {
    let paths = &plan.paths;
    let receipt = Receipt::read(&paths.receipt)?.unwrap_or_default();
    let mut steps = Vec::new();

    let other = plan.mode.other();
    let mut switched = jobs_of_mode(paths, other, &receipt, &plan.account.name);
    if let Some(launchctl) = loader {
        // Loaded there with its plist gone: still holding our ports.
        let other_domain = other.domain(plan.account.uid);
        for a in plan.agents() {
            if launchctl
                .print(other_domain, &a.label)
                .ok()
                .flatten()
                .is_some()
            {
                switched.insert(a.label.clone());
            }
        }
    }
    steps.extend(switched.into_iter().map(|label| Step::SwitchOut {
        plist: paths.jobs(other).join(format!("{label}.plist")),
        label,
        from: other,
    }));

    let mut missing = BTreeSet::new();
    // The models folder too, so a model can be copied in at once; uninstall
    // removes it only empty, as every folder it made.
    for dir in [
        &paths.support.join("bin"),
        &paths.models,
        &paths.logs,
        paths.jobs(plan.mode),
    ] {
        missing.extend(
            dir.ancestors()
                .take_while(|d| !d.exists())
                .map(Path::to_path_buf),
        );
    }
    // Shallowest first: each folder's parent exists by the time it is made.
    let mut missing: Vec<PathBuf> = missing.into_iter().collect();
    missing.sort_by_key(|d| d.components().count());
    steps.extend(missing.into_iter().map(Step::CreateDir));

    for file in files {
        let changes = std::fs::read(&file.path)
            .ok()
            .map(|old| old != file.contents);
        steps.push(Step::Write { file, changes });
    }
    steps.push(Step::WriteReceipt);

    let planned: BTreeSet<&String> = plan.agents().map(|a| &a.label).collect();
    let same_mode = receipt.mode == plan.mode;
    for label in receipt
        .agents
        .keys()
        .filter(|l| same_mode && !planned.contains(l))
    {
        steps.push(Step::Retire {
            label: label.clone(),
            plist: paths.jobs(plan.mode).join(format!("{label}.plist")),
        });
    }

    if let Some(launchctl) = loader {
        for agent in plan.agents() {
            let fingerprint = fingerprint(agent, files);
            let loaded = launchctl.print(plan.domain, &agent.label)?.is_some();
            let recorded = receipt.agents.get(&agent.label).filter(|_| same_mode);
            steps.push(match action(loaded, recorded, &fingerprint) {
                Action::LeaveRunning => Step::LeaveRunning {
                    label: agent.label.clone(),
                },
                Action::Reload => Step::Load {
                    agent,
                    reload: true,
                    fingerprint,
                },
                Action::Load => Step::Load {
                    agent,
                    reload: false,
                    fingerprint,
                },
            });
        }
    }
    Ok(steps)
}

impl Step<'_> {
    /// The step as `--dry-run` prints it: a comment, then what it writes or
    /// the commands it runs.
    /// `loads`: whether the install runs launchctl (not with `--no-load`).
    pub fn describe(&self, plan: &Plan, loads: bool, out: &mut dyn Write) -> Result<()> {
        let bootout = |domain: Domain, label: &str| {
            if loads {
                format!("launchctl bootout {}\n", domain.service(label))
            } else {
                String::new()
            }
        };
        match self {
            Step::SwitchOut { label, from, plist } => writeln!(
                out,
                "# switching to {}s: would stop and remove the {} {label}\n{}rm {}\n",
                plan.mode.job(),
                from.job(),
                bootout(from.domain(plan.account.uid), label),
                shell_quote(plist)
            )?,
            Step::CreateDir(dir) => {
                writeln!(out, "# would create the folder {}\n", dir.display())?
            }
            Step::Write { file, changes } => {
                let state = match changes {
                    Some(false) => "unchanged",
                    Some(true) => "would replace",
                    None => "would write",
                };
                writeln!(
                    out,
                    "# {state}: {} ({}, mode {:o})",
                    file.path.display(),
                    file.what,
                    file.mode
                )?;
                match std::str::from_utf8(&file.contents) {
                    Ok(text) if file.mode != 0o755 => writeln!(out, "{}", text.trim_end())?,
                    _ => writeln!(out, "<{} bytes>", file.contents.len())?,
                }
                writeln!(out)?;
            }
            Step::WriteReceipt => writeln!(
                out,
                "# would write: {} (the install receipt: jobs, fingerprints, files and folders, for re-install and --uninstall)\n",
                plan.paths.receipt.display()
            )?,
            Step::Retire { label, plist } => writeln!(
                out,
                "# {label} is no longer in the cluster: would stop and remove it\n{}rm {}\n",
                bootout(plan.domain, label),
                shell_quote(plist)
            )?,
            Step::LeaveRunning { label } => {
                writeln!(out, "# {label} is loaded and unchanged: left alone")?
            }
            Step::Load { agent, reload, .. } => {
                let service = plan.domain.service(&agent.label);
                if *reload {
                    writeln!(out, "launchctl bootout {service}")?;
                }
                writeln!(
                    out,
                    "launchctl enable {service}\nlaunchctl bootstrap {} {}",
                    plan.domain,
                    shell_quote(&agent.plist_path)
                )?;
            }
        }
        Ok(())
    }

    /// Carries the step out and records it in `receipt`.
    fn execute(&self, run: &mut Run<'_>) -> Result<()> {
        let (plan, paths) = (run.plan, &run.plan.paths);
        match self {
            Step::SwitchOut { label, from, plist } => {
                if let Some(launchctl) = run.loader {
                    // Waited for: the replacement binds the same ports at once.
                    let domain = from.domain(plan.account.uid);
                    match bootout_and_wait(launchctl, domain, label, Duration::from_secs(10)) {
                        Err(e) if !e.is_missing_domain() => return Err(e.into()),
                        _ => {}
                    }
                }
                remove_file(plist)?;
                run.receipt.files.remove(plist);
                writeln!(
                    run.out,
                    "  switched   {label}: the {} {} is removed, a {} replaces it",
                    from.job(),
                    plist.display(),
                    plan.mode.job()
                )?;
            }
            Step::CreateDir(dir) => {
                match std::fs::create_dir(dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(e).with_context(|| format!("creating {}", dir.display()))
                    }
                    _ => {}
                }
                if let Some((uid, gid)) = owner_of(dir, paths, run.owner) {
                    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                        .with_context(|| format!("giving {} to uid {uid}", dir.display()))?;
                }
                run.receipt.dirs.insert(dir.clone());
            }
            Step::Write { file, changes } => {
                if *changes == Some(false) {
                    writeln!(
                        run.out,
                        "  unchanged  {} ({})",
                        file.path.display(),
                        file.what
                    )?;
                } else {
                    let owner = owner_of(&file.path, paths, run.owner);
                    write_atomic(&file.path, &file.contents, file.mode, owner).with_context(
                        || format!("writing {} ({})", file.path.display(), file.what),
                    )?;
                    writeln!(
                        run.out,
                        "  wrote      {} ({})",
                        file.path.display(),
                        file.what
                    )?;
                }
                run.receipt.files.insert(file.path.clone());
            }
            Step::WriteReceipt => {
                run.receipt.files.insert(paths.receipt.clone());
                for a in plan.agents() {
                    run.receipt.agents.entry(a.label.clone()).or_default();
                    run.receipt.logs.extend(
                        [&a.agent.standard_out_path, &a.agent.standard_error_path]
                            .into_iter()
                            .flatten()
                            .map(PathBuf::from),
                    );
                }
            }
            Step::Retire { label, plist } => {
                if let Some(launchctl) = run.loader {
                    stop(launchctl, plan.domain, label)?;
                }
                remove_file(plist)?;
                run.receipt.agents.remove(label);
                run.receipt.files.remove(plist);
                writeln!(run.out, "  retired    {label} (no longer in the cluster)")?;
            }
            Step::LeaveRunning { label } => {
                writeln!(run.out, "  running    {label} (unchanged, left alone)")?
            }
            Step::Load {
                agent,
                reload,
                fingerprint,
            } => {
                let launchctl = run.loader.context("loading a job needs launchctl")?;
                if *reload {
                    bootout_and_wait(
                        launchctl,
                        plan.domain,
                        &agent.label,
                        Duration::from_secs(10),
                    )?;
                }
                launchctl.enable(plan.domain, &agent.label)?;
                launchctl.bootstrap(plan.domain, &agent.plist_path)?;
                let verb = if *reload { "reloaded" } else { "loaded" };
                writeln!(run.out, "  {verb:<10} {}", agent.label)?;
                run.receipt
                    .agents
                    .insert(agent.label.clone(), fingerprint.clone());
            }
        }
        Ok(())
    }

    /// Whether the receipt on disk must record this step before the next one:
    /// once it exists, every change to what is installed is written down.
    fn recorded(&self) -> bool {
        !matches!(
            self,
            Step::CreateDir(_) | Step::Write { .. } | Step::LeaveRunning { .. }
        )
    }
}

/// An install under way: what it executes with, and the receipt it keeps.
struct Run<'a> {
    plan: &'a Plan,
    loader: Loader<'a>,
    owner: Owner,
    receipt: Receipt,
    out: &'a mut dyn Write,
}

pub fn install(
    plan: &Plan,
    files: &[File],
    loader: Loader<'_>,
    owner: Owner,
    out: &mut dyn Write,
) -> Result<()> {
    if let Some(launchctl) = loader {
        require_domain(plan, launchctl)?;
    }
    refuse_foreign_daemons(&plan.paths, &plan.account.name)?;
    let steps = steps(plan, files, loader)?;
    let mut receipt = Receipt::read(&plan.paths.receipt)?.unwrap_or_default();
    if receipt.mode != plan.mode {
        // The other kind's fingerprints say nothing about this kind's jobs.
        receipt.agents.clear();
    }
    receipt.node = plan.node.id.clone();
    receipt.mode = plan.mode;
    let mut run = Run {
        plan,
        loader,
        owner,
        receipt,
        out,
    };
    for step in &steps {
        step.execute(&mut run)?;
        if step.recorded() && (matches!(step, Step::WriteReceipt) || plan.paths.receipt.exists()) {
            run.receipt.write(&plan.paths.receipt, owner)?;
        }
    }
    Ok(())
}

/// What install would do, without doing it: the descriptions of the steps
/// install would execute now, every file in full (the binary by size).
pub fn dry_run(plan: &Plan, files: &[File], loader: Loader<'_>, out: &mut dyn Write) -> Result<()> {
    if let Some(launchctl) = loader {
        if let Err(e) = require_domain(plan, launchctl) {
            writeln!(out, "# note: the install would stop here: {e:#}\n")?;
        }
    }
    let steps = steps(plan, files, loader)?;
    for step in &steps {
        step.describe(plan, loader.is_some(), out)?;
    }
    if loader.is_none() {
        writeln!(
            out,
            "# launchctl: none (--no-load); an install on the Mac would (re)load each job whose plist or inputs changed"
        )?;
    }
    Ok(())
}

/// Boots out and removes what install wrote: the jobs of either mode, the
/// files the receipt lists, the jobs' logs, and the folders install created,
/// each only once empty. Anything else — a model in the models folder, a file
/// the user put beside ours — stays, and is named. Running it again finds
/// nothing to do. Without a receipt (an install that never got that far), the
/// `dev.tensorlink.*` jobs in the two job folders are taken.
pub fn uninstall(
    paths: &Paths,
    loader: Loader<'_>,
    account: &Account,
    out: &mut dyn Write,
) -> Result<()> {
    let uid = account.uid;
    let receipt = Receipt::read(&paths.receipt)?.unwrap_or_default();
    for (label, owner) in foreign_daemons(paths, &account.name) {
        writeln!(
            out,
            "  left       {label}: a LaunchDaemon of `{owner}`'s, not yours"
        )?;
    }
    let jobs: Vec<(Mode, String)> = [Mode::Agents, Mode::Daemons]
        .into_iter()
        .flat_map(|m| {
            jobs_of_mode(paths, m, &receipt, &account.name)
                .into_iter()
                .map(move |l| (m, l))
        })
        .collect();
    let mut dirs: BTreeSet<PathBuf> = receipt.dirs.clone();
    dirs.extend([
        paths.support.join("bin"),
        paths.support.clone(),
        paths.logs.clone(),
    ]);
    if jobs.is_empty() && receipt.files.is_empty() && !dirs.iter().any(|d| d.exists()) {
        writeln!(out, "nothing to uninstall under {}", paths.home.display())?;
        return Ok(());
    }
    for (mode, label) in &jobs {
        if let Some(launchctl) = loader {
            if stop(launchctl, mode.domain(uid), label)? {
                writeln!(out, "  stopped    {label}")?;
            } else {
                writeln!(out, "  stopped    {label} (not running: no login session)")?;
            }
        }
        let plist = paths.jobs(*mode).join(format!("{label}.plist"));
        if remove_file(&plist)? {
            writeln!(out, "  removed    {}", plist.display())?;
        }
    }
    // Only what lies where install writes: a receipt is a file, and a file can
    // be edited.
    let plain = |f: &Path| {
        f.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
    };
    let ours = |f: &Path| {
        plain(f) && f.starts_with(&paths.home)
            || (f.starts_with(&paths.daemons)
                && f.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{LABEL_PREFIX}."))))
    };
    for f in receipt.files.iter().filter(|f| ours(f)) {
        if remove_file(f)? {
            writeln!(out, "  removed    {}", f.display())?;
        }
    }
    // A log and the copy the node rotated it to.
    for log in receipt
        .logs
        .iter()
        .filter(|f| plain(f) && f.starts_with(&paths.logs))
    {
        for f in [log.clone(), tensorlink_launchd::rotated_log(log)] {
            if remove_file(&f)? {
                writeln!(out, "  removed    {}", f.display())?;
            }
        }
    }
    // Deepest first, so a folder's emptied subfolders go before it.
    let mut dirs: Vec<PathBuf> = dirs
        .into_iter()
        .filter(|d| plain(d) && (d.starts_with(&paths.home) || d.starts_with(&paths.daemons)))
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in &dirs {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        let mut left: Vec<String> = entries
            .flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() {
                    format!("{name}/")
                } else {
                    name
                }
            })
            .collect();
        if left.is_empty() {
            std::fs::remove_dir(d).with_context(|| format!("removing {}", d.display()))?;
            writeln!(out, "  removed    {}/", d.display())?;
        } else {
            left.sort();
            let more = left.len().saturating_sub(5);
            left.truncate(5);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            writeln!(
                out,
                "  kept       {}/ — it holds what install did not write: {}{more}",
                d.display(),
                left.join(", ")
            )?;
        }
    }
    Ok(())
}

/// Who a path under the home should belong to when written as root.
fn owner_of(path: &Path, paths: &Paths, owner: Owner) -> Owner {
    owner.filter(|_| path.starts_with(&paths.home))
}

fn remove_file(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Writes beside the target and renames over it, so a reader (launchd, the
/// node following its peer file, a running binary) never sees a half-written file.
fn write_atomic(path: &Path, contents: &[u8], mode: u32, owner: Owner) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("path has no parent directory")?;
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .context("path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tensorlink-tmp"));
    let written = (|| {
        // A fresh file, never one a link points at: as root (sudo) this writes
        // into the user's folders, where anything the user runs can plant one.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself must survive a power cut too.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(written?)
}

pub fn shell_quote(path: &Path) -> String {
    let s = path.to_string_lossy();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-=".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_lines_are_those_that_say_so() {
        assert!(reports_change("  wrote      /x (peer file)"));
        assert!(reports_change("  reloaded   dev.tensorlink.node"));
        assert!(reports_change("  removed    /x"));
        assert!(!reports_change("  unchanged  /x (peer file)"));
        assert!(!reports_change(
            "  running    dev.tensorlink.node (unchanged, left alone)"
        ));
        assert!(!reports_change("wrote nothing"));
    }

    #[test]
    fn an_agent_is_left_alone_only_when_loaded_and_unchanged() {
        let fp = "abc".to_owned();
        assert_eq!(action(true, Some(&fp), "abc"), Action::LeaveRunning);
        assert_eq!(action(true, Some(&fp), "abd"), Action::Reload);
        assert_eq!(action(true, None, "abc"), Action::Reload);
        assert_eq!(action(false, Some(&fp), "abc"), Action::Load);
    }
}
