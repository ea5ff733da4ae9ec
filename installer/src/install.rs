//! Carrying out a plan, in reading order: check that launchd can load the
//! jobs at all, take down the other mode's jobs when switching between
//! LaunchAgents and LaunchDaemons, write the files (only those that changed,
//! each replaced atomically), record a receipt, retire jobs the cluster no
//! longer needs, and (re)load each job whose plist or inputs changed since it
//! was last loaded. The receipt is rewritten after every step, so an install
//! interrupted half-way can still be completed or uninstalled; uninstall takes
//! back what the receipt lists and nothing else.

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

    fn write(&self, path: &Path, owner: Owner) -> Result<()> {
        write_atomic(path, &serde_json::to_vec_pretty(self)?, 0o644, owner)
            .with_context(|| format!("writing the install receipt {}", path.display()))
    }
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
    let paths = &plan.paths;
    let mut receipt = Receipt::read(&paths.receipt)?.unwrap_or_default();
    switch_mode(plan, &mut receipt, loader, owner, out)?;
    receipt.node = plan.node.id.clone();
    receipt.mode = plan.mode;
    for dir in [
        &paths.support.join("bin"),
        &paths.logs,
        paths.jobs(plan.mode),
    ] {
        create_dirs(dir, paths, owner, &mut receipt.dirs)?;
    }

    for f in files {
        if std::fs::read(&f.path).is_ok_and(|old| old == f.contents) {
            writeln!(out, "  unchanged  {} ({})", f.path.display(), f.what)?;
        } else {
            write_atomic(
                &f.path,
                &f.contents,
                f.mode,
                owner_of(&f.path, paths, owner),
            )
            .with_context(|| format!("writing {} ({})", f.path.display(), f.what))?;
            writeln!(out, "  wrote      {} ({})", f.path.display(), f.what)?;
        }
        receipt.files.insert(f.path.clone());
    }
    receipt.files.insert(paths.receipt.clone());
    for a in plan.agents() {
        receipt.agents.entry(a.label.clone()).or_default();
        receipt.logs.extend(
            [&a.agent.standard_out_path, &a.agent.standard_error_path]
                .into_iter()
                .flatten()
                .map(PathBuf::from),
        );
    }
    receipt.write(&paths.receipt, owner)?;

    let planned: BTreeSet<String> = plan.agents().map(|a| a.label.clone()).collect();
    let retired: Vec<String> = receipt
        .agents
        .keys()
        .filter(|l| !planned.contains(*l))
        .cloned()
        .collect();
    for label in retired {
        if let Some(launchctl) = loader {
            stop(launchctl, plan.domain, &label)?;
        }
        let plist = paths.jobs(plan.mode).join(format!("{label}.plist"));
        remove_file(&plist)?;
        receipt.agents.remove(&label);
        receipt.files.remove(&plist);
        receipt.write(&paths.receipt, owner)?;
        writeln!(out, "  retired    {label} (no longer in the cluster)")?;
    }

    let Some(launchctl) = loader else {
        return Ok(());
    };
    let domain = plan.domain;
    for a in plan.agents() {
        let planned = fingerprint(a, files);
        let loaded = launchctl.print(domain, &a.label)?.is_some();
        match action(loaded, receipt.agents.get(&a.label), &planned) {
            Action::LeaveRunning => {
                writeln!(out, "  running    {} (unchanged, left alone)", a.label)?;
                continue;
            }
            Action::Reload => {
                bootout_and_wait(launchctl, domain, &a.label, Duration::from_secs(10))?
            }
            Action::Load => {}
        }
        launchctl.enable(domain, &a.label)?;
        launchctl.bootstrap(domain, &a.plist_path)?;
        let verb = if loaded { "reloaded" } else { "loaded" };
        writeln!(out, "  {verb:<10} {}", a.label)?;
        receipt.agents.insert(a.label.clone(), planned);
        receipt.write(&paths.receipt, owner)?;
    }
    Ok(())
}

/// Switching between LaunchAgents and LaunchDaemons: the other mode's jobs hold
/// the same ports and labels, so they are stopped and their plists removed
/// before this mode's are written.
fn switch_mode(
    plan: &Plan,
    receipt: &mut Receipt,
    loader: Loader<'_>,
    owner: Owner,
    out: &mut dyn Write,
) -> Result<()> {
    let other = plan.mode.other();
    let other_domain = other.domain(plan.account.uid);
    let mut labels = jobs_of_mode(&plan.paths, other, receipt, &plan.account.name);
    if let Some(launchctl) = loader {
        // Loaded there with its plist gone: still holding our ports.
        for a in plan.agents() {
            if launchctl
                .print(other_domain, &a.label)
                .ok()
                .flatten()
                .is_some()
            {
                labels.insert(a.label.clone());
            }
        }
    }
    for label in &labels {
        if let Some(launchctl) = loader {
            // Waited for: the replacement binds the same ports at once.
            match bootout_and_wait(launchctl, other_domain, label, Duration::from_secs(10)) {
                Err(e) if !e.is_missing_domain() => return Err(e.into()),
                _ => {}
            }
        }
        let plist = plan.paths.jobs(other).join(format!("{label}.plist"));
        remove_file(&plist)?;
        receipt.files.remove(&plist);
        writeln!(
            out,
            "  switched   {label}: the {} {} is removed, a {} replaces it",
            other.job(),
            plist.display(),
            plan.mode.job()
        )?;
    }
    if receipt.mode != plan.mode {
        receipt.agents.clear();
        receipt.mode = plan.mode;
        if plan.paths.receipt.exists() {
            receipt.write(&plan.paths.receipt, owner)?;
        }
    }
    Ok(())
}

/// What install would do, without doing it: every file in full (the binary by
/// size) and the launchctl commands it would run now. Asks launchctl only
/// `print`, which changes nothing.
pub fn dry_run(plan: &Plan, files: &[File], loader: Loader<'_>, out: &mut dyn Write) -> Result<()> {
    if let Some(launchctl) = loader {
        if let Err(e) = require_domain(plan, launchctl) {
            writeln!(out, "# note: the install would stop here: {e:#}\n")?;
        }
    }
    let receipt = Receipt::read(&plan.paths.receipt)?.unwrap_or_default();
    let other = plan.mode.other();
    for label in jobs_of_mode(&plan.paths, other, &receipt, &plan.account.name) {
        let plist = plan.paths.jobs(other).join(format!("{label}.plist"));
        writeln!(
            out,
            "# switching to {}s: would stop and remove the {} {label}\nlaunchctl bootout {}\nrm {}\n",
            plan.mode.job(),
            other.job(),
            other.domain(plan.account.uid).service(&label),
            shell_quote(&plist)
        )?;
    }
    for f in files {
        let state = match std::fs::read(&f.path) {
            Ok(old) if old == f.contents => "unchanged",
            Ok(_) => "would replace",
            Err(_) => "would write",
        };
        writeln!(
            out,
            "# {state}: {} ({}, mode {:o})",
            f.path.display(),
            f.what,
            f.mode
        )?;
        match std::str::from_utf8(&f.contents) {
            Ok(text) if f.mode != 0o755 => writeln!(out, "{}", text.trim_end())?,
            _ => writeln!(out, "<{} bytes>", f.contents.len())?,
        }
        writeln!(out)?;
    }
    writeln!(out, "# would write: {} (the install receipt: agents, fingerprints and files, for re-install and --uninstall)\n", plan.paths.receipt.display())?;
    writeln!(out, "# launchctl commands:")?;
    let domain = plan.domain;
    for a in plan.agents() {
        let service = domain.service(&a.label);
        let bootstrap = format!(
            "launchctl enable {service}\nlaunchctl bootstrap {domain} {}",
            shell_quote(&a.plist_path)
        );
        let Some(launchctl) = loader else {
            writeln!(
                out,
                "launchctl bootout {service}   # only if loaded\n{bootstrap}"
            )?;
            continue;
        };
        let loaded = launchctl.print(domain, &a.label)?.is_some();
        match action(loaded, receipt.agents.get(&a.label), &fingerprint(a, files)) {
            Action::LeaveRunning => {
                writeln!(out, "# {} is loaded and unchanged: left alone", a.label)?
            }
            Action::Reload => writeln!(out, "launchctl bootout {service}\n{bootstrap}")?,
            Action::Load => writeln!(out, "{bootstrap}")?,
        }
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

/// Creates `dir` and any missing parents, recording each one it made.
fn create_dirs(
    dir: &Path,
    paths: &Paths,
    owner: Owner,
    made: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    let missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for d in missing.iter().rev() {
        if let Some((uid, gid)) = owner_of(d, paths, owner) {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to uid {uid}", d.display()))?;
        }
        made.insert(d.clone());
    }
    Ok(())
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
    fn an_agent_is_left_alone_only_when_loaded_and_unchanged() {
        let fp = "abc".to_owned();
        assert_eq!(action(true, Some(&fp), "abc"), Action::LeaveRunning);
        assert_eq!(action(true, Some(&fp), "abd"), Action::Reload);
        assert_eq!(action(true, None, "abc"), Action::Reload);
        assert_eq!(action(false, Some(&fp), "abc"), Action::Load);
    }
}
