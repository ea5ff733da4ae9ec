//! Two Macs on a cable, on one Linux machine: two network namespaces joined by
//! a veth pair, with the seed's addresses (mac1 192.168.2.2, mac2
//! 192.168.2.1). The far Mac has a real sshd on port 22 and its own user
//! (`remoteuser`, uid 4242) with their own home directory. The user exists
//! only in the passwd file that sshd's private mount namespace sees, so the
//! machine's own accounts are never touched. Everything made here goes when
//! the test ends, however it ends: namespaces are deleted and sshd is killed on
//! drop. Needs root, `ip` (iproute2), `unshare`, `setpriv` (util-linux) and
//! OpenSSH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::sshd::keygen;
use super::wait_until;

pub const MAC1: &str = "192.168.2.2";
pub const MAC2: &str = "192.168.2.1";
/// The far user's uid and gid: no account of the machine's own.
pub const FAR_UID: u32 = 4242;
pub const FAR_USER: &str = "remoteuser";

/// A network namespace this test made, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `program` run inside this namespace (as root).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// `program` run inside this namespace as the far user, with only `env`.
    pub fn command_as_far_user(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, "setpriv"])
            .arg(format!("--reuid={FAR_UID}"))
            .arg(format!("--regid={FAR_UID}"))
            .args(["--clear-groups", "--"])
            .arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// mac1's and mac2's namespaces, cabled.
pub struct Cable {
    pub mac1: Netns,
    pub mac2: Netns,
}

impl Cable {
    pub fn new() -> Cable {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests make network namespaces and a user of their own: run them as root (CI does)"
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let made = |side: &str| {
            let name = format!("tl{tag}{side}");
            ip(&["netns", "add", &name]);
            Netns { name }
        };
        let cable = Cable {
            mac1: made("a"),
            mac2: made("b"),
        };
        // Interface names have at most 15 characters.
        let (va, vb) = (format!("tv{tag}a"), format!("tv{tag}b"));
        ip(&[
            "link",
            "add",
            &va,
            "netns",
            &cable.mac1.name,
            "type",
            "veth",
            "peer",
            "name",
            &vb,
            "netns",
            &cable.mac2.name,
        ]);
        for (ns, dev, addr) in [(&cable.mac1, &va, MAC1), (&cable.mac2, &vb, MAC2)] {
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]);
            ip(&["-n", &ns.name, "link", "set", dev, "up"]);
            ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        }
        cable
    }
}

/// The far Mac's sshd, listening on mac2's address, port 22, letting in only
/// the far user with the test's client key.
pub struct FarSshd {
    pub home: PathBuf,
    pub dir: PathBuf,
    child: Child,
}

impl FarSshd {
    /// `dir` must be reachable by the far user (mode 755 up to it).
    pub fn start(cable: &Cable, dir: &Path) -> FarSshd {
        let sshd_dir = dir.join("far-sshd");
        let home = dir.join("far-home");
        std::fs::create_dir_all(&sshd_dir).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(FAR_UID), Some(FAR_UID)).unwrap();
        keygen(&sshd_dir.join("host_key"));
        keygen(&sshd_dir.join("client_key"));
        std::fs::copy(
            sshd_dir.join("client_key.pub"),
            sshd_dir.join("authorized_keys"),
        )
        .unwrap();
        // zsh, a Mac's login shell, runs what ssh sends there (scripts/deps
        // installs it); sh where it is missing.
        let shell = ["/usr/bin/zsh", "/bin/zsh", "/bin/sh"]
            .into_iter()
            .find(|s| Path::new(s).exists())
            .unwrap_or("/bin/sh");
        let mut passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        passwd.push_str(&format!(
            "{FAR_USER}:x:{FAR_UID}:{FAR_UID}:the far Mac's user:{}:{shell}\n",
            home.display()
        ));
        std::fs::write(sshd_dir.join("passwd"), passwd).unwrap();
        let _ = std::fs::create_dir_all("/run/sshd");
        std::fs::write(
            sshd_dir.join("sshd_config"),
            format!(
                "Port 22\nListenAddress {MAC2}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nAllowUsers {FAR_USER}\n\
                 AllowTcpForwarding yes\nGatewayPorts no\nClientAliveInterval 5\nLogLevel VERBOSE\n",
                d = sshd_dir.display()
            ),
        )
        .unwrap();
        let log = sshd_dir.join("sshd.log");
        let child = cable
            .mac2
            .command("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/passwd && exec /usr/sbin/sshd -D -e -f "$2""#)
            .arg("sh")
            .arg(sshd_dir.join("passwd"))
            .arg(sshd_dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sshd in the far namespace");
        let sshd = FarSshd {
            home,
            dir: sshd_dir,
            child,
        };
        wait_until(Duration::from_secs(10), "the far sshd to listen", || {
            sshd.log()
                .contains(&format!("Server listening on {MAC2} port 22"))
        });
        sshd
    }

    /// The client key, as mac1's user has it.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    /// mac2's host key as a known_hosts line, as a first `ssh` records it.
    pub fn known_hosts_line(&self) -> String {
        let key = std::fs::read_to_string(self.dir.join("host_key.pub")).unwrap();
        let key: Vec<&str> = key.split_whitespace().take(2).collect();
        format!("{MAC2} {}\n", key.join(" "))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for FarSshd {
    fn drop(&mut self) {
        // sshd's sessions die with their namespace's processes: kill the
        // listener's own children (one per connection) first.
        let _ = Command::new("pkill")
            .args(["-KILL", "-P", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- far sshd log ----\n{}", self.log());
        }
    }
}
