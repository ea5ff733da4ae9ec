//! The ssh leg: an sshd on 127.0.0.1 with throw-away keys (the test suite's
//! own helper) and tunnels built from the installer's plan, so the benchmark
//! measures exactly the command the LaunchAgent runs.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tensorlink_installer::cluster::{Cluster, Link, Node, Port, Ssh};
use tensorlink_installer::plan;

use crate::common::sshd::{Sshd, Tunnel};
use crate::common::{free_port, port_open, wait_until};

/// The installer's tunnel command (ProgramArguments) from this machine to
/// `sshd`, whose `-L` end reaches 127.0.0.1:`target`, with the files it needs
/// put in place under `home`: (ProgramArguments, -L port, -R port).
/// `near_port` is this side's node port, which the `-R` end reaches.
pub fn tunnel_command(
    sshd: &Sshd,
    home: &Path,
    near_port: u16,
    target: u16,
) -> Result<(Vec<String>, u16, u16)> {
    let (local_port, remote_port) = (free_port(), free_port());
    let port = |p: u16| Port::new(p).context("port 0 is not a port");
    let node = |id: &str, address: &str, ssh_port: u16, node_port: u16| -> Result<Node> {
        Ok(Node {
            id: id.into(),
            address: address.into(),
            ssh_user: sshd.user.clone(),
            ssh_port: port(ssh_port)?,
            node_port: port(node_port)?,
            api_port: port(free_port())?,
        })
    };
    let cluster = Cluster {
        ssh: Ssh::default(),
        model: None,
        nodes: vec![
            node("near", "127.0.0.2", 22, near_port)?,
            node("far", "127.0.0.1", sshd.port, target)?,
        ],
        links: vec![Link {
            from: "near".into(),
            to: "far".into(),
            local_port: Some(port(local_port)?),
            remote_port: Some(port(remote_port)?),
        }],
    };
    let me = plan::Account {
        name: "bench".into(),
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    };
    let plan = plan::plan(
        &cluster,
        "near",
        &plan::Paths::new(home),
        &me,
        plan::Mode::Agents,
    )
    .context("plan")?;
    // The files the installer would have put in place.
    std::fs::create_dir_all(home.join(".ssh"))?;
    std::fs::copy(sshd.dir.join("client_key"), &plan.identity_file)?;
    std::fs::set_permissions(
        &plan.identity_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    std::fs::create_dir_all(plan.paths.known_hosts.parent().context("known_hosts dir")?)?;
    std::fs::copy(sshd.dir.join("known_hosts"), &plan.paths.known_hosts)?;
    Ok((
        plan.tunnels[0].agent.agent.program_arguments.clone(),
        local_port,
        remote_port,
    ))
}

/// Runs the tunnel command and waits for its `-L` end.
pub fn start_tunnel(home: &Path, program: &[String], local_port: u16) -> Tunnel {
    let tunnel = Tunnel::start(home, &program[1..]);
    wait_until(Duration::from_secs(10), "the tunnel to listen", || {
        port_open(local_port)
    });
    tunnel
}

/// A running tunnel whose `-L` end on this machine reaches 127.0.0.1:`target`.
pub struct Forward {
    pub local_port: u16,
    pub args: Vec<String>,
    _tunnel: Tunnel,
}

pub fn forward(sshd: &Sshd, home: &Path, target: u16) -> Result<Forward> {
    let (args, local_port, _) = tunnel_command(sshd, home, free_port(), target)?;
    let tunnel = start_tunnel(home, &args, local_port);
    Ok(Forward {
        local_port,
        args,
        _tunnel: tunnel,
    })
}
