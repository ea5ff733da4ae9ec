//! Carrying out a plan, in reading order: write the files (only those that
//! changed, each replaced atomically), record a receipt, retire agents the
//! cluster no longer needs, and (re)load each agent whose plist or inputs
//! changed since it was last loaded. The receipt is rewritten after every step,
//! so an install interrupted half-way can still be completed or uninstalled.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tensorlink_launchd::launchctl::bootout_and_wait;
use tensorlink_launchd::{Domain, Launchctl};

use crate::plan::{Agent, Paths, Plan, LABEL_PREFIX};

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
    /// Agent label → fingerprint of its plist and inputs when it was last
    /// loaded (empty: written but never loaded).
    pub agents: BTreeMap<String, String>,
    pub files: BTreeSet<PathBuf>,
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

    fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &serde_json::to_vec_pretty(self)?, 0o644)
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
            what: format!("LaunchAgent {}", a.label),
        });
    }
    Ok(files)
}

/// Identifies an agent's plist and inputs as planned, so a re-install can tell
/// whether the running job is still the one it would load now.
fn fingerprint(agent: &Agent, files: &[File]) -> String {
    let mut h = std::hash::DefaultHasher::new();
    for path in std::iter::once(&agent.plist_path).chain(&agent.inputs) {
        h.write(path.as_os_str().as_encoded_bytes());
        match files.iter().find(|f| &f.path == path) {
            Some(f) => h.write(&f.contents),
            None => h.write(&std::fs::read(path).unwrap_or_default()),
        }
    }
    format!("{:016x}", h.finish())
}

/// Launchctl and its domain, or nothing for `--no-load`.
pub type Loader<'a> = Option<(&'a dyn Launchctl, Domain)>;

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

pub fn install(plan: &Plan, files: &[File], loader: Loader<'_>, out: &mut dyn Write) -> Result<()> {
    let paths = &plan.paths;
    let mut receipt = Receipt::read(&paths.receipt)?.unwrap_or_default();
    receipt.node = plan.node.id.clone();
    for dir in [&paths.support.join("bin"), &paths.logs, &paths.agents] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    for f in files {
        if std::fs::read(&f.path).is_ok_and(|old| old == f.contents) {
            writeln!(out, "  unchanged  {} ({})", f.path.display(), f.what)?;
        } else {
            write_atomic(&f.path, &f.contents, f.mode)
                .with_context(|| format!("writing {} ({})", f.path.display(), f.what))?;
            writeln!(out, "  wrote      {} ({})", f.path.display(), f.what)?;
        }
        receipt.files.insert(f.path.clone());
    }
    receipt.files.insert(paths.receipt.clone());
    for a in plan.agents() {
        receipt.agents.entry(a.label.clone()).or_default();
    }
    receipt.write(&paths.receipt)?;

    let planned: BTreeSet<String> = plan.agents().map(|a| a.label.clone()).collect();
    let retired: Vec<String> = receipt
        .agents
        .keys()
        .filter(|l| !planned.contains(*l))
        .cloned()
        .collect();
    for label in retired {
        if let Some((launchctl, domain)) = loader {
            launchctl.bootout(domain, &label)?;
        }
        let plist = paths.agents.join(format!("{label}.plist"));
        remove_file(&plist)?;
        receipt.agents.remove(&label);
        receipt.files.remove(&plist);
        receipt.write(&paths.receipt)?;
        writeln!(out, "  retired    {label} (no longer in the cluster)")?;
    }

    let Some((launchctl, domain)) = loader else {
        return Ok(());
    };
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
        receipt.write(&paths.receipt)?;
    }
    Ok(())
}

/// What install would do, without doing it: every file in full (the binary by
/// size) and the launchctl commands it would run now. Asks launchctl only
/// `print`, which changes nothing.
pub fn dry_run(
    plan: &Plan,
    files: &[File],
    loader: Loader<'_>,
    domain: Domain,
    out: &mut dyn Write,
) -> Result<()> {
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
    let receipt = Receipt::read(&plan.paths.receipt)?.unwrap_or_default();
    writeln!(out, "# launchctl commands:")?;
    for a in plan.agents() {
        let service = domain.service(&a.label);
        let bootstrap = format!(
            "launchctl enable {service}\nlaunchctl bootstrap {domain} {}",
            shell_quote(&a.plist_path)
        );
        let Some((launchctl, domain)) = loader else {
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

/// Boots out and removes what install wrote under `paths.home`; running it
/// again finds nothing to do. Without a receipt (an install that never got
/// that far), the `dev.tensorlink.*` agents in the LaunchAgents folder are taken.
pub fn uninstall(paths: &Paths, loader: Loader<'_>, out: &mut dyn Write) -> Result<()> {
    let receipt = Receipt::read(&paths.receipt)?.unwrap_or_default();
    let mut labels: BTreeSet<String> = receipt.agents.keys().cloned().collect();
    if let Ok(entries) = std::fs::read_dir(&paths.agents) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(label) = name
                .strip_suffix(".plist")
                .filter(|l| l.starts_with(&format!("{LABEL_PREFIX}.")))
            {
                labels.insert(label.to_owned());
            }
        }
    }
    let dirs = [paths.support.clone(), paths.logs.clone()];
    if labels.is_empty() && receipt.files.is_empty() && !dirs.iter().any(|d| d.exists()) {
        writeln!(out, "nothing to uninstall under {}", paths.home.display())?;
        return Ok(());
    }
    for label in &labels {
        if let Some((launchctl, domain)) = loader {
            launchctl.bootout(domain, label)?;
        }
        writeln!(out, "  stopped    {label}")?;
        let plist = paths.agents.join(format!("{label}.plist"));
        if remove_file(&plist)? {
            writeln!(out, "  removed    {}", plist.display())?;
        }
    }
    // Only what lies under the home it was installed in: a receipt is a file,
    // and a file can be edited.
    for f in receipt.files.iter().filter(|f| f.starts_with(&paths.home)) {
        if remove_file(f)? {
            writeln!(out, "  removed    {}", f.display())?;
        }
    }
    for d in &dirs {
        match std::fs::remove_dir_all(d) {
            Ok(()) => writeln!(out, "  removed    {}/", d.display())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", d.display())),
        }
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
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("path has no parent directory")?;
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .context("path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tensorlink-tmp"));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
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
