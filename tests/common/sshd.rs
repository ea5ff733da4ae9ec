//! A real OpenSSH server on 127.0.0.1 for the tests, with throw-away host and
//! client keys in a temporary directory, and an ssh client that runs tunnels
//! against it. Needs `sshd`, `ssh` and `ssh-keygen` (scripts/test installs them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, port_open, wait_until};

pub struct Sshd {
    pub port: u16,
    pub dir: PathBuf,
    pub user: String,
    child: Child,
}

fn find(program: &str) -> PathBuf {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return p;
        }
    }
    panic!("`{program}` not found: install openssh-server and openssh-client (scripts/test does)");
}

/// A throw-away ed25519 key pair at `path` and `path.pub`.
pub fn keygen(path: &Path) {
    let status = Command::new(find("ssh-keygen"))
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "tensorlink-test",
            "-f",
        ])
        .arg(path)
        .status()
        .expect("run ssh-keygen");
    assert!(status.success(), "ssh-keygen failed");
}

impl Sshd {
    pub fn start(dir: &Path) -> Sshd {
        let dir = dir.join("sshd");
        std::fs::create_dir_all(&dir).unwrap();
        keygen(&dir.join("host_key"));
        keygen(&dir.join("client_key"));
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        // sshd's privilege separation directory; Debian creates it at boot only.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPidFile none\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nGatewayPorts no\n\
             ClientAliveInterval 5\nLogLevel VERBOSE\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        let child = spawn_sshd(&dir, port);
        let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
        let key: Vec<&str> = host_pub.split_whitespace().take(2).collect();
        std::fs::write(
            dir.join("known_hosts"),
            format!("[127.0.0.1]:{port} {}\n", key.join(" ")),
        )
        .unwrap();
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .expect("current user name");
        Sshd {
            port,
            dir,
            user,
            child,
        }
    }

    /// The listening sshd; every session is a descendant of it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops sshd and every session it has (as a reboot of the far Mac would),
    /// then starts it again on the same port with the same keys.
    pub fn restart(&mut self) {
        // Only this sshd's own sessions: its direct children, one per connection.
        let _ = Command::new("pkill")
            .args(["-KILL", "-P", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_sshd(&self.dir, self.port);
    }

    /// The ssh client's arguments for a tunnel to this server with the given
    /// forwards (each a full `-L`/`-R` value).
    pub fn tunnel_args(&self, forwards: &[(&str, String)]) -> Vec<String> {
        let mut args = vec!["-N".to_owned()];
        for (flag, spec) in forwards {
            args.push(flag.to_string());
            args.push(spec.clone());
        }
        for opt in [
            "BatchMode=yes".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
            format!("UserKnownHostsFile={}/known_hosts", self.dir.display()),
            "IdentitiesOnly=yes".to_owned(),
            "ExitOnForwardFailure=yes".to_owned(),
            "ServerAliveInterval=5".to_owned(),
            "ServerAliveCountMax=3".to_owned(),
            "ControlMaster=no".to_owned(),
        ] {
            args.push("-o".into());
            args.push(opt);
        }
        args.push("-i".into());
        args.push(format!("{}/client_key", self.dir.display()));
        args.push("-p".into());
        args.push(self.port.to_string());
        args.push(format!("{}@127.0.0.1", self.user));
        args
    }

    /// The seed's tunnel from "mac1" through this server: `-L local` reaches
    /// mac2's node port, `-R remote` reaches mac1's; returns once both ends listen.
    pub fn seed_tunnel(
        &self,
        dir: &Path,
        (mac1, mac2): (u16, u16),
        (local, remote): (u16, u16),
    ) -> Tunnel {
        let args = self.tunnel_args(&[
            ("-L", format!("{local}:localhost:{mac2}")),
            ("-R", format!("{remote}:localhost:{mac1}")),
        ]);
        let mut tunnel = Tunnel::start(dir, &args);
        wait_until(
            Duration::from_secs(10),
            "both tunnel ends to listen",
            || {
                assert!(tunnel.is_running(), "ssh exited; see its log");
                port_open(local) && port_open(remote)
            },
        );
        tunnel
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

fn spawn_sshd(dir: &Path, port: u16) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("sshd.log"))
        .unwrap();
    let child = Command::new(find("sshd"))
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start sshd");
    wait_until(Duration::from_secs(10), "sshd to listen", || {
        port_open(port)
    });
    child
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- sshd log ----\n{}", self.log());
        }
    }
}

/// A running `ssh` client process, killed on drop.
pub struct Tunnel {
    child: Child,
    pub log: PathBuf,
}

impl Tunnel {
    pub fn start(dir: &Path, args: &[String]) -> Tunnel {
        let log = dir.join("ssh-client.log");
        let child = Command::new(find("ssh"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start ssh");
        Tunnel { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- ssh client log ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}
