//! Checks made before anything is written, when the install will load agents:
//! the identity file, ssh reaching every Mac this one tunnels to, and this
//! Mac's ports being free or held by our own agents. Each failure says how to fix it.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use tensorlink_launchd::Launchctl;

use crate::install::shell_quote;
use crate::plan::{ssh_options, Plan};
use crate::ports;

/// The identity file must exist for any Mac that opens tunnels.
pub fn identity(plan: &Plan) -> Result<()> {
    if plan.tunnels.is_empty() || plan.identity_file.exists() {
        return Ok(());
    }
    let id = plan.identity_file.display();
    let first = &plan.tunnels[0].to;
    bail!(
        "the ssh identity file {id} does not exist. Create it with `ssh-keygen -t ed25519 -f {id}` and \
         copy it to the other Mac with `ssh-copy-id -i {id}.pub {}@{}` (or set [ssh] identity_file in cluster.toml)",
        first.ssh_user,
        first.address
    )
}

/// `ssh … true` with the tunnel's own options, for every Mac this one tunnels
/// to: against the host keys about to be pinned (written to a scratch file, as
/// the real one is not written yet), and without any ssh-agent (the options say
/// `IdentityAgent=none`, as the tunnel's do): a key with a passphrase fails
/// here, not at 3 am.
/// Run as root for a user (`--system` through sudo), ssh runs as `as_user`,
/// as the daemon will.
pub fn ssh_reachable(plan: &Plan, pinned_known_hosts: &str, as_user: Option<&str>) -> Result<()> {
    // A fresh file with a random name, opened exclusively (never through a
    // planted link), in a folder the user ssh runs as can read: under sudo,
    // the temporary folder is root's own.
    let dir = match as_user {
        Some(_) => std::path::PathBuf::from("/tmp"),
        None => std::env::temp_dir(),
    };
    let mut scratch = tempfile::Builder::new()
        .prefix("tensorlink-preflight-")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a scratch known_hosts in {}", dir.display()))?;
    std::io::Write::write_all(&mut scratch, pinned_known_hosts.as_bytes())
        .and_then(|()| scratch.as_file().sync_all())
        .context("writing the scratch known_hosts")?;
    if let Some(u) = as_user.and_then(|u| nix::unistd::User::from_name(u).ok().flatten()) {
        std::os::unix::fs::fchown(scratch.as_file(), Some(u.uid.as_raw()), None)
            .context("giving the scratch known_hosts to the user")?;
    }
    let scratch = scratch.into_temp_path();
    let result = plan.tunnels.iter().try_for_each(|t| {
        let mut args = ssh_options(&t.to, &plan.identity_file, &scratch);
        args.push(format!("{}@{}", t.to.ssh_user, t.to.address));
        args.push("true".into());
        let mut cmd = match as_user {
            Some(user) => {
                let mut c = Command::new("/usr/bin/sudo");
                c.args(["-u", user, "-H", "/usr/bin/ssh"]);
                c
            }
            None => Command::new("/usr/bin/ssh"),
        };
        let out = cmd
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .context("running /usr/bin/ssh")?;
        if out.status.success() {
            return Ok(());
        }
        let command = std::iter::once("/usr/bin/ssh".to_owned())
            .chain(args.iter().map(|a| shell_quote(std::path::Path::new(a))))
            .collect::<Vec<_>>()
            .join(" ");
        let said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let fix = crate::check::diagnose_text(&said, &plan.identity_file, t)
            .map(|(_, fix)| fix)
            .unwrap_or_else(|| {
                format!(
                    "turn on Remote Login on {} and copy your key: ssh-copy-id -i {}.pub {}@{}",
                    t.to.id,
                    plan.identity_file.display(),
                    t.to.ssh_user,
                    t.to.address
                )
            });
        bail!(
            "ssh cannot reach {} ({}@{}): {said}\n  command: {command}\n  fix: {fix}",
            t.to.id,
            t.to.ssh_user,
            t.to.address
        )
    });
    drop(scratch);
    result
}

/// Ports this Mac binds (node, API, `-L` ends) must be free or held by our own agents.
/// Our own jobs of either mode count as ours: switching modes replaces them.
pub fn ports_free(plan: &Plan, launchctl: &dyn Launchctl) -> Result<()> {
    let domains = [plan.domain, plan.mode.other().domain(plan.account.uid)];
    let ours: Vec<u32> = plan
        .agents()
        .flat_map(|a| domains.map(|d| (d, a.label.clone())))
        .filter_map(|(d, label)| launchctl.print(d, &label).ok().flatten()?.pid)
        .collect();
    let mut bound = vec![
        (plan.node.node_port.get(), "node_port".to_owned()),
        (plan.node.api_port.get(), "api_port".to_owned()),
    ];
    bound.extend(plan.tunnels.iter().map(|t| {
        (
            t.link.local_port.get(),
            format!("local_port of the link to {}", t.to.id),
        )
    }));
    for (port, field) in bound {
        if ports::is_free(port) {
            continue;
        }
        match ports::listener(port) {
            Some(l) if ours.contains(&l.pid) => {}
            Some(l) => bail!("port {port} ({field}) is held by {l}: stop it, or choose another port in cluster.toml"),
            None => bail!("port {port} ({field}) is in use by another process: find it with `lsof -i :{port}` and stop it, or choose another port in cluster.toml"),
        }
    }
    Ok(())
}
