//! Carrying out a plan, in reading order: write the files (only those that
//! changed, each replaced atomically), retire agents the cluster no longer
//! needs, (re)load the agents whose files changed, and record a receipt so
//! `--uninstall` removes exactly what was installed.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tensorlink_launchd::{Domain, Launchctl};

use crate::plan::Plan;

/// A file the install writes.
pub struct File {
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub mode: u32,
    pub what: String,
}

/// What an install wrote, so uninstall can take back exactly that.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Receipt {
    pub node: String,
    pub labels: Vec<String>,
    pub files: Vec<PathBuf>,
    /// Directories tensorlink owns outright (removed with their contents).
    pub dirs: Vec<PathBuf>,
}

impl Receipt {
    pub fn read(path: &Path) -> Result<Option<Receipt>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a tensorlink receipt; remove it by hand if you are sure",
                    path.display()
                )
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
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

fn owned_dirs(plan: &Plan) -> Vec<PathBuf> {
    vec![plan.paths.support.clone(), plan.paths.logs.clone()]
}

/// Launchctl and its domain, or nothing for `--no-load`.
pub type Loader<'a> = Option<(&'a dyn Launchctl, Domain)>;

pub fn install(plan: &Plan, files: &[File], loader: Loader<'_>, out: &mut dyn Write) -> Result<()> {
    let previous = Receipt::read(&plan.paths.receipt)?;
    for dir in owned_dirs(plan)
        .iter()
        .chain([&plan.paths.agents, &plan.paths.support.join("bin")])
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let mut changed = BTreeSet::new();
    for f in files {
        if std::fs::read(&f.path).is_ok_and(|old| old == f.contents) {
            writeln!(out, "  unchanged  {} ({})", f.path.display(), f.what)?;
            continue;
        }
        write_atomic(&f.path, &f.contents, f.mode)
            .with_context(|| format!("writing {} ({})", f.path.display(), f.what))?;
        writeln!(out, "  wrote      {} ({})", f.path.display(), f.what)?;
        changed.insert(f.path.clone());
    }

    let planned: BTreeSet<&str> = plan.agents().map(|a| a.label.as_str()).collect();
    if let Some(old) = &previous {
        for label in old.labels.iter().filter(|l| !planned.contains(l.as_str())) {
            if let Some((launchctl, domain)) = loader {
                launchctl.bootout(domain, label)?;
            }
            let plist = plan.paths.agents.join(format!("{label}.plist"));
            remove_file(&plist)?;
            writeln!(out, "  retired    {label} (no longer in the cluster)")?;
        }
    }

    if let Some((launchctl, domain)) = loader {
        for a in plan.agents() {
            let input = if a.label == plan.node_agent.label {
                &plan.paths.node_binary
            } else {
                &plan.paths.known_hosts
            };
            let dirty = changed.contains(&a.plist_path) || changed.contains(input);
            let loaded = launchctl.print(domain, &a.label)?.is_some();
            if loaded && !dirty {
                writeln!(out, "  running    {} (unchanged, left alone)", a.label)?;
                continue;
            }
            if loaded {
                launchctl.bootout(domain, &a.label)?;
            }
            launchctl.enable(domain, &a.label)?;
            launchctl.bootstrap(domain, &a.plist_path)?;
            let verb = if loaded { "reloaded" } else { "loaded" };
            writeln!(out, "  {verb:<10} {}", a.label)?;
        }
    }

    let receipt = Receipt {
        node: plan.node.id.clone(),
        labels: plan.agents().map(|a| a.label.clone()).collect(),
        files: files
            .iter()
            .map(|f| f.path.clone())
            .chain([plan.paths.receipt.clone()])
            .collect(),
        dirs: owned_dirs(plan),
    };
    write_atomic(
        &plan.paths.receipt,
        &serde_json::to_vec_pretty(&receipt)?,
        0o644,
    )?;
    Ok(())
}

/// What install would do, without doing it: every file in full (the binary by
/// size) and every launchctl command.
pub fn dry_run(plan: &Plan, files: &[File], domain: Domain, out: &mut dyn Write) -> Result<()> {
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
    writeln!(
        out,
        "# launchctl commands (an agent already loaded and unchanged is left alone):"
    )?;
    for a in plan.agents() {
        writeln!(
            out,
            "launchctl bootout {}   # only if loaded",
            domain.service(&a.label)
        )?;
        writeln!(out, "launchctl enable {}", domain.service(&a.label))?;
        writeln!(
            out,
            "launchctl bootstrap {domain} {}",
            shell_quote(&a.plist_path)
        )?;
    }
    Ok(())
}

/// Boots out and removes what the receipt lists; running it again finds nothing to do.
pub fn uninstall(receipt_path: &Path, loader: Loader<'_>, out: &mut dyn Write) -> Result<()> {
    let Some(receipt) = Receipt::read(receipt_path)? else {
        writeln!(
            out,
            "nothing to uninstall: no receipt at {}",
            receipt_path.display()
        )?;
        return Ok(());
    };
    for label in &receipt.labels {
        if let Some((launchctl, domain)) = loader {
            launchctl.bootout(domain, label)?;
        }
        writeln!(out, "  stopped    {label}")?;
    }
    for f in &receipt.files {
        if remove_file(f)? {
            writeln!(out, "  removed    {}", f.display())?;
        }
    }
    for d in &receipt.dirs {
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
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub fn shell_quote(path: &Path) -> String {
    let s = path.to_string_lossy();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
