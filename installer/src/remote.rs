//! `install --all`: this installer, run on every other Mac of the cluster over
//! ssh. For each far Mac it asks what the Mac is (CPU, macOS) and which node
//! binary is installed there. If the Mac can run the binary, it copies the
//! installer, the cluster file and (only when it differs) the node binary into
//! a fresh folder there. Then it runs the installer there with this run's
//! options, streaming what it prints, and removes the folder. What runs on the
//! far Mac is the installer a user would run there by hand: one code path.
//!
//! Every ssh uses the cluster's key and the far Mac's host key pinned from
//! `~/.ssh/known_hosts`, with the options the tunnels use ([`ssh_options`]).
//! Commands go through [`Shell`], so the sequence is tested with a recording
//! fake as well as against a real sshd.

use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::check::diagnose_login;
use crate::cluster::Node;
use crate::install::shell_quote;
use crate::plan::{ssh_options, Paths};
use crate::platform::{self, Build, Host, PlatformError};

/// What `--all` does on each Mac.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Install,
    Check,
    Uninstall,
}

impl Action {
    /// The far installer's flag for this action.
    fn flag(self) -> Option<&'static str> {
        match self {
            Action::Install => None,
            Action::Check => Some("--check"),
            Action::Uninstall => Some("--uninstall"),
        }
    }

    /// "installed", for the summary.
    pub fn done(self) -> &'static str {
        match self {
            Action::Install => "installed",
            Action::Check => "checked",
            Action::Uninstall => "uninstalled",
        }
    }
}

/// The node binary an install copies, with what it runs on.
pub struct NodeBinary {
    pub path: PathBuf,
    pub sha256: String,
    pub builds: Vec<Build>,
}

impl NodeBinary {
    pub fn read(path: &Path) -> Result<NodeBinary, Failure> {
        use sha2::{Digest, Sha256};
        let bytes = std::fs::read(path).map_err(|error| Failure::Local {
            what: format!("reading the node binary {}", path.display()),
            error,
        })?;
        Ok(NodeBinary {
            builds: platform::builds_of(&bytes)?,
            sha256: format!("{:x}", Sha256::digest(&bytes)),
            path: path.to_owned(),
        })
    }
}

/// What is copied to each far Mac.
pub struct Payload<'a> {
    /// This installer (the far Mac needs no checkout and no Rust).
    pub installer: &'a Path,
    pub cluster: &'a Path,
    /// Only for [`Action::Install`].
    pub node_binary: Option<&'a NodeBinary>,
}

/// How this Mac logs in to a far Mac: as the node's `ssh_user`, with the
/// cluster's key, trusting only the pinned host key.
pub struct Login<'a> {
    pub node: &'a Node,
    pub identity: &'a Path,
    pub known_hosts: &'a Path,
}

impl Login<'_> {
    /// `ssh … user@address script`; `tty` gives the far command a terminal,
    /// so that sudo there can ask for a password.
    pub fn ssh(&self, tty: bool, script: &str) -> Vec<String> {
        let mut argv = vec!["/usr/bin/ssh".to_owned()];
        if tty {
            argv.extend(["-t".to_owned(), "-e".to_owned(), "none".to_owned()]);
        }
        argv.extend(ssh_options(self.node, self.identity, self.known_hosts));
        argv.push(format!("{}@{}", self.node.ssh_user, self.node.address));
        argv.push(script.to_owned());
        argv
    }
}

/// Where a command's input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input<'a> {
    Nothing,
    File(&'a Path),
    /// This process's own stdin: the terminal a far sudo asks on.
    Terminal,
}

/// Runs commands (ssh, or the local shell) and hands over each line they
/// print, from either stream, as it comes.
pub trait Shell {
    /// The exit code (`None`: killed by a signal).
    fn run(
        &mut self,
        argv: &[String],
        input: Input<'_>,
        line: &mut dyn FnMut(&str),
    ) -> io::Result<Option<i32>>;
}

/// [`Shell`] with real processes.
pub struct System;

impl Shell for System {
    fn run(
        &mut self,
        argv: &[String],
        input: Input<'_>,
        line: &mut dyn FnMut(&str),
    ) -> io::Result<Option<i32>> {
        let stdin = match input {
            Input::Nothing => Stdio::null(),
            Input::File(path) => Stdio::from(std::fs::File::open(path)?),
            Input::Terminal => Stdio::inherit(),
        };
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let pipes: [Box<dyn io::Read + Send>; 2] = [
            Box::new(child.stdout.take().ok_or(io::ErrorKind::BrokenPipe)?),
            Box::new(child.stderr.take().ok_or(io::ErrorKind::BrokenPipe)?),
        ];
        let readers: Vec<_> = pipes
            .into_iter()
            .map(|pipe| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for l in io::BufReader::new(pipe).lines().map_while(Result::ok) {
                        // A terminal's lines end in \r\n.
                        if tx.send(l.trim_end_matches('\r').to_owned()).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        for l in rx {
            line(&l);
        }
        for r in readers {
            let _ = r.join();
        }
        Ok(child.wait()?.code())
    }
}

/// Why a Mac was not done.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{problem}. Fix: {fix}")]
    Ssh { problem: String, fix: String },
    #[error("ssh to {login} failed: {said}")]
    SshOther { login: String, said: String },
    #[error("the node binary: {0}")]
    Platform(#[from] PlatformError),
    #[error("{0}")]
    HostKey(#[from] crate::known_hosts::KnownHostsError),
    #[error("{0}")]
    Installer(String),
    #[error("{what}: {error}")]
    Local { what: String, error: io::Error },
}

/// The installer's output lines that report a change on the Mac.
pub fn is_change(line: &str) -> bool {
    const VERBS: [&str; 7] = [
        "wrote", "loaded", "reloaded", "retired", "switched", "removed", "stopped",
    ];
    let word = line.split_whitespace().next().unwrap_or("");
    line.starts_with("  ") && VERBS.contains(&word)
}

/// The installer's own error line (`install: …`), if it printed one.
fn installer_error(lines: &[String]) -> Option<String> {
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("install: "))
        .map(str::to_owned)
}

/// Prints each line of one Mac's work, prefixed with its node id, and counts
/// the lines that report a change. As a [`Write`], it takes the local
/// installer's output the same way.
pub struct Prefixed<'a> {
    prefix: String,
    out: &'a mut dyn Write,
    /// Lines that changed something (wrote, loaded, removed…).
    pub changes: usize,
    partial: Vec<u8>,
}

impl Prefixed<'_> {
    pub fn new<'a>(id: &str, width: usize, out: &'a mut dyn Write) -> Prefixed<'a> {
        Prefixed {
            prefix: format!("{id:<width$} │ "),
            out,
            changes: 0,
            partial: Vec::new(),
        }
    }

    pub fn line(&mut self, text: &str) {
        self.changes += usize::from(is_change(text));
        // What the user reads is best effort: a closed stdout stops nothing.
        let _ = writeln!(self.out, "{}{text}", self.prefix);
    }
}

impl Write for Prefixed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.line(String::from_utf8_lossy(&line[..end]).trim_end_matches('\r'));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&String::from_utf8_lossy(&line));
        }
        self.out.flush()
    }
}

impl Drop for Prefixed<'_> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// A folder on the far Mac for one run's copies: made with `mkdir` (which
/// fails if anything is there, so nothing planted is followed), mode 700,
/// removed when the installer there has run.
pub fn staging_name() -> String {
    use sha2::{Digest, Sha256};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seed = format!(
        "{}-{}-{:?}",
        std::process::id(),
        now.as_nanos(),
        std::thread::current().id()
    );
    let digest = Sha256::digest(seed.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("/tmp/tensorlink-install.{hex}")
}

/// The far installer's options that this run passes on (`--system`,
/// `--no-load`, `--trust-new-host-keys`).
pub struct Plan<'a> {
    pub action: Action,
    pub payload: Payload<'a>,
    pub pass_on: &'a [String],
    pub staging: &'a str,
    /// Give the far installer a terminal (sudo asks there for `--system`).
    pub tty: bool,
}

/// The probe: what the Mac is, and the sha256 of the node binary installed
/// there (none when there is none).
fn probe_script() -> String {
    let installed = Paths::new(Path::new("")).node_binary;
    format!(
        "{}; f=\"$HOME\"/{}; if [ -f \"$f\" ]; then echo \"node_sha256=$( (shasum -a 256 \"$f\" 2>/dev/null || sha256sum \"$f\") | cut -d ' ' -f 1)\"; fi; echo \"home=$HOME\"",
        platform::PROBE,
        shell_quote(&installed)
    )
}

/// One copy: a file of this Mac into the staging folder, as `name`.
struct Upload<'a> {
    from: &'a Path,
    name: &'static str,
    mode: &'static str,
}

fn upload_script(staging: &str, upload: &Upload<'_>, first: bool) -> String {
    let dir = shell_quote(Path::new(staging));
    let to = format!("{dir}/{}", upload.name);
    let make = if first {
        format!("umask 077 && mkdir {dir} && ")
    } else {
        String::new()
    };
    format!("{make}cat > {to} && chmod {} {to}", upload.mode)
}

fn uploads<'a>(plan: &'a Plan<'_>, copy_node: bool) -> Vec<Upload<'a>> {
    let mut list = vec![Upload {
        from: plan.payload.installer,
        name: "install",
        mode: "700",
    }];
    if plan.action != Action::Uninstall {
        list.push(Upload {
            from: plan.payload.cluster,
            name: "cluster.toml",
            mode: "600",
        });
    }
    if let (true, Some(node)) = (copy_node, plan.payload.node_binary) {
        list.push(Upload {
            from: &node.path,
            name: "tensorlink-node",
            mode: "755",
        });
    }
    list
}

/// The far installer's command line, then the staging folder's removal
/// whatever it exited with.
fn install_script(plan: &Plan<'_>, node: &Node, node_binary: Option<&Path>) -> String {
    let dir = shell_quote(Path::new(plan.staging));
    let mut cmd = vec![format!("{dir}/install")];
    cmd.extend(plan.action.flag().map(str::to_owned));
    if plan.action != Action::Uninstall {
        cmd.push(format!("--cluster {dir}/cluster.toml"));
        cmd.push(format!("--node {}", shell_quote(Path::new(&node.id))));
    }
    if let Some(b) = node_binary {
        cmd.push(format!("--node-binary {}", shell_quote(b)));
    }
    cmd.extend(plan.pass_on.iter().map(|a| shell_quote(Path::new(a))));
    format!("{}; rc=$?; rm -rf {dir}; exit $rc", cmd.join(" "))
}

/// "1.2 kB", "40.3 MB".
fn size(bytes: u64) -> String {
    match bytes {
        b if b < 1_000_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{:.1} MB", b as f64 / 1e6),
    }
}

/// Every command [`run`] would run for `login`'s Mac, for `--dry-run`
/// (the node binary's copy is skipped when the one installed there matches).
pub fn commands(login: &Login<'_>, plan: &Plan<'_>) -> Vec<String> {
    let quote = |argv: Vec<String>| {
        argv.iter()
            .map(|a| shell_quote(Path::new(a)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut lines = vec![quote(login.ssh(false, &probe_script()))];
    for (i, u) in uploads(plan, true).iter().enumerate() {
        let mut line = quote(login.ssh(false, &upload_script(plan.staging, u, i == 0)));
        line.push_str(&format!(" < {}", shell_quote(u.from)));
        lines.push(line);
    }
    let staged = plan
        .payload
        .node_binary
        .map(|_| PathBuf::from(format!("{}/tensorlink-node", plan.staging)));
    lines.push(quote(login.ssh(
        plan.tty,
        &install_script(plan, login.node, staged.as_deref()),
    )));
    lines
}

/// Does `plan` on `login`'s Mac, printing what happens through `out`.
pub fn run(
    login: &Login<'_>,
    plan: &Plan<'_>,
    shell: &mut dyn Shell,
    out: &mut Prefixed<'_>,
) -> Result<(), Failure> {
    let node = login.node;
    let mut said = Vec::new();
    let ssh_failed = |said: &[String]| {
        let text = said.join("\n");
        match diagnose_login(&text, login.identity, node) {
            Some((problem, fix)) => Failure::Ssh { problem, fix },
            None => Failure::SshOther {
                login: format!("{}@{}", node.ssh_user, node.address),
                said: said.last().cloned().unwrap_or_default(),
            },
        }
    };
    let local = |what: &str| {
        let what = what.to_owned();
        move |error| Failure::Local { what, error }
    };

    let code = shell
        .run(
            &login.ssh(false, &probe_script()),
            Input::Nothing,
            &mut |l| said.push(l.to_owned()),
        )
        .map_err(local("running /usr/bin/ssh"))?;
    if code != Some(0) {
        return Err(ssh_failed(&said));
    }
    let answer = said.join("\n");
    let host = Host::parse(&answer)?;
    let installed_sha = answer
        .lines()
        .find_map(|l| l.strip_prefix("node_sha256="))
        .map(str::trim);
    let home = answer
        .lines()
        .find_map(|l| l.strip_prefix("home="))
        .map(|h| PathBuf::from(h.trim()));
    out.line(&format!("{}@{}: {host}", node.ssh_user, node.address));

    let mut node_binary = None;
    let mut copy_node = false;
    if let Some(binary) = plan.payload.node_binary {
        host.runs(&binary.builds)?;
        match (installed_sha, &home) {
            (Some(sha), Some(home)) if sha == binary.sha256 => {
                out.line("the node binary there is this one: not copied");
                node_binary = Some(Paths::new(home).node_binary);
            }
            _ => {
                copy_node = true;
                node_binary = Some(PathBuf::from(format!("{}/tensorlink-node", plan.staging)));
            }
        }
    }

    for (i, upload) in uploads(plan, copy_node).iter().enumerate() {
        // The size is for the reader; a file that cannot be read fails the copy.
        let size = std::fs::metadata(upload.from)
            .map(|m| format!(" ({})", size(m.len())))
            .unwrap_or_default();
        out.line(&format!("copying {}{size}", upload.name));
        let mut said = Vec::new();
        let code = shell
            .run(
                &login.ssh(false, &upload_script(plan.staging, upload, i == 0)),
                Input::File(upload.from),
                &mut |l| said.push(l.to_owned()),
            )
            .map_err(local("running /usr/bin/ssh"))?;
        if code != Some(0) {
            // Best effort: the folder is the far Mac's /tmp, cleared at its restart.
            if i > 0 {
                let rm = format!("rm -rf {}", shell_quote(Path::new(plan.staging)));
                let _ = shell.run(&login.ssh(false, &rm), Input::Nothing, &mut |_| {});
            }
            return Err(match code {
                Some(255) => ssh_failed(&said),
                _ => Failure::Installer(format!(
                    "copying {} to {}:{} failed: {}",
                    upload.name,
                    node.id,
                    plan.staging,
                    said.last().cloned().unwrap_or_default()
                )),
            });
        }
    }

    let input = if plan.tty {
        Input::Terminal
    } else {
        Input::Nothing
    };
    let mut lines = Vec::new();
    let code = shell
        .run(
            &login.ssh(
                plan.tty,
                &install_script(plan, node, node_binary.as_deref()),
            ),
            input,
            &mut |l| {
                out.line(l);
                lines.push(l.to_owned());
            },
        )
        .map_err(local("running /usr/bin/ssh"))?;
    match code {
        Some(0) => Ok(()),
        _ => Err(match installer_error(&lines) {
            Some(e) => Failure::Installer(e),
            None if code == Some(255) => ssh_failed(&lines),
            None => Failure::Installer(format!(
                "the installer on {} exited with {} (see its output above)",
                node.id,
                code.map_or("a signal".to_owned(), |c| format!("code {c}"))
            )),
        }),
    }
}

/// This Mac, through the same probe as the far ones.
pub fn local_host(shell: &mut dyn Shell) -> Result<Host, Failure> {
    let mut said = Vec::new();
    let argv = [
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        platform::PROBE.to_owned(),
    ];
    shell
        .run(&argv, Input::Nothing, &mut |l| said.push(l.to_owned()))
        .map_err(|error| Failure::Local {
            what: "running /bin/sh".into(),
            error,
        })?;
    Ok(Host::parse(&said.join("\n"))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::platform::{Arch, Os, Version};

    /// Records every command and answers as a far Mac would.
    struct FakeMac {
        /// What the probe prints.
        probe: String,
        /// Exit code and lines for each command, matched by a word in its script.
        answers: Vec<(&'static str, i32, Vec<&'static str>)>,
        ran: Vec<(String, Input<'static>)>,
    }

    impl Shell for FakeMac {
        fn run(
            &mut self,
            argv: &[String],
            input: Input<'_>,
            line: &mut dyn FnMut(&str),
        ) -> io::Result<Option<i32>> {
            let script = argv.last().cloned().unwrap_or_default();
            let input = match input {
                Input::Nothing => Input::Nothing,
                Input::Terminal => Input::Terminal,
                Input::File(_) => Input::File(Path::new("<file>")),
            };
            self.ran.push((script.clone(), input));
            if script.contains("uname") {
                for l in self.probe.lines() {
                    line(l);
                }
                return Ok(Some(0));
            }
            for (word, code, lines) in &self.answers {
                if script.contains(word) {
                    for l in lines {
                        line(l);
                    }
                    return Ok(Some(*code));
                }
            }
            Ok(Some(0))
        }
    }

    fn mac(probe: &str) -> FakeMac {
        FakeMac {
            probe: probe.to_owned(),
            answers: Vec::new(),
            ran: Vec::new(),
        }
    }

    const APPLE_SILICON: &str =
        "os=Darwin\narch=arm64\narm64=1\nmacos=14.5\nhome=/Users/remoteuser";

    fn seed_mac2() -> Node {
        let cluster = Cluster::parse(
            include_str!("../../examples/seed-cluster.toml"),
            Path::new("cluster.toml"),
        )
        .unwrap();
        cluster.node("mac2").unwrap().clone()
    }

    fn binary(sha: &str) -> NodeBinary {
        NodeBinary {
            path: PathBuf::from("/build/tensorlink-node"),
            sha256: sha.to_owned(),
            builds: vec![Build {
                os: Os::MacOs,
                arch: Arch::Arm64,
                min_macos: Some(Version(11, 0, 0)),
            }],
        }
    }

    /// The result, what was printed and the changes counted.
    fn go(
        shell: &mut FakeMac,
        action: Action,
        node_binary: Option<&NodeBinary>,
    ) -> (Result<(), Failure>, String, usize) {
        let node = seed_mac2();
        let login = Login {
            node: &node,
            identity: Path::new("/Users/me/.ssh/id_ed25519"),
            known_hosts: Path::new("/tmp/pinned"),
        };
        let plan = Plan {
            action,
            payload: Payload {
                installer: Path::new("/build/install"),
                cluster: Path::new("/build/cluster.toml"),
                node_binary,
            },
            pass_on: &["--system".to_owned()],
            staging: "/tmp/tensorlink-install.0123456789abcdef",
            tty: false,
        };
        let mut printed = Vec::new();
        let mut out = Prefixed::new("mac2", 4, &mut printed);
        let result = run(&login, &plan, shell, &mut out);
        let changes = out.changes;
        drop(out);
        (result, String::from_utf8(printed).unwrap(), changes)
    }

    #[test]
    fn an_install_copies_then_runs_the_same_installer_there_then_removes_the_copies() {
        let mut far = mac(APPLE_SILICON);
        far.answers.push((
            "--cluster",
            0,
            vec![
                "  wrote      /Users/remoteuser/x (peer file)",
                "  unchanged  /Users/remoteuser/y (z)",
            ],
        ));
        let (result, printed, changes) = go(&mut far, Action::Install, Some(&binary("aa")));
        result.unwrap();
        assert_eq!(changes, 1);
        let scripts: Vec<&str> = far.ran.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(scripts.len(), 5, "{scripts:#?}");
        assert!(
            scripts[0].contains("uname -s")
                && scripts[0]
                    .contains("'Library/Application Support/tensorlink/bin/tensorlink-node'")
        );
        let dir = "/tmp/tensorlink-install.0123456789abcdef";
        assert_eq!(
            scripts[1],
            format!("umask 077 && mkdir {dir} && cat > {dir}/install && chmod 700 {dir}/install")
        );
        assert_eq!(
            scripts[2],
            format!("cat > {dir}/cluster.toml && chmod 600 {dir}/cluster.toml")
        );
        assert_eq!(
            scripts[3],
            format!("cat > {dir}/tensorlink-node && chmod 755 {dir}/tensorlink-node")
        );
        assert_eq!(
            scripts[4],
            format!("{dir}/install --cluster {dir}/cluster.toml --node mac2 --node-binary {dir}/tensorlink-node --system; rc=$?; rm -rf {dir}; exit $rc")
        );
        assert!(far.ran[1..4]
            .iter()
            .all(|(_, i)| matches!(i, Input::File(_))));
        assert!(
            printed.contains("mac2 │ remoteuser@192.168.2.1: macOS 14.5 on arm64\n"),
            "{printed}"
        );
        assert!(
            printed.contains("mac2 │   wrote      /Users/remoteuser/x (peer file)\n"),
            "{printed}"
        );
    }

    #[test]
    fn the_node_binary_installed_there_already_is_not_copied_again() {
        let mut far = mac(&format!("{APPLE_SILICON}\nnode_sha256=aa"));
        let (result, printed, changes) = go(&mut far, Action::Install, Some(&binary("aa")));
        result.unwrap();
        assert_eq!(changes, 0);
        assert_eq!(far.ran.len(), 4);
        assert!(!far
            .ran
            .iter()
            .any(|(s, _)| s
                .contains("cat > /tmp/tensorlink-install.0123456789abcdef/tensorlink-node")));
        assert!(far.ran[3].0.contains("--node-binary '/Users/remoteuser/Library/Application Support/tensorlink/bin/tensorlink-node'"), "{}", far.ran[3].0);
        assert!(printed.contains("not copied"));
    }

    #[test]
    fn a_mac_that_cannot_run_the_binary_gets_nothing() {
        let mut far = mac("os=Darwin\narch=x86_64\narm64=\nmacos=13.6\nhome=/Users/remoteuser");
        let (result, _, _) = go(&mut far, Action::Install, Some(&binary("aa")));
        let err = result.unwrap_err().to_string();
        assert_eq!(err, "the node binary: macOS 13.6 on x86_64 cannot run it: it is built for macOS 11.0 or later on arm64");
        assert_eq!(far.ran.len(), 1, "only the probe ran");
    }

    /// sshd refuses the key: ssh exits 255 with what OpenSSH prints.
    struct Refusing(usize);

    impl Shell for Refusing {
        fn run(
            &mut self,
            _: &[String],
            _: Input<'_>,
            line: &mut dyn FnMut(&str),
        ) -> io::Result<Option<i32>> {
            self.0 += 1;
            line("remoteuser@192.168.2.1: Permission denied (publickey).");
            Ok(Some(255))
        }
    }

    #[test]
    fn a_refused_key_is_named_with_its_fix() {
        let node = seed_mac2();
        let login = Login {
            node: &node,
            identity: Path::new("/Users/me/.ssh/id_ed25519"),
            known_hosts: Path::new("/tmp/pinned"),
        };
        let plan = Plan {
            action: Action::Check,
            payload: Payload {
                installer: Path::new("/build/install"),
                cluster: Path::new("/build/cluster.toml"),
                node_binary: None,
            },
            pass_on: &[],
            staging: "/tmp/s",
            tty: false,
        };
        let mut shell = Refusing(0);
        let mut printed = Vec::new();
        let err = run(
            &login,
            &plan,
            &mut shell,
            &mut Prefixed::new("mac2", 4, &mut printed),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "ssh authentication fails. Fix: copy the key to mac2: `ssh-copy-id -i /Users/me/.ssh/id_ed25519.pub remoteuser@192.168.2.1`"
            ),
            "{err}"
        );
        assert_eq!(shell.0, 1, "nothing after the refused probe");
    }

    #[test]
    fn the_far_installers_own_error_is_the_reason() {
        let mut far = mac(APPLE_SILICON);
        far.answers.push((
            "--check",
            1,
            vec![
                "[FAIL] link to mac1: …",
                "install: remoteuser has no login session at this Mac's screen",
            ],
        ));
        let (result, _, _) = go(&mut far, Action::Check, None);
        assert_eq!(
            result.unwrap_err().to_string(),
            "remoteuser has no login session at this Mac's screen"
        );
        // --check needs no node binary: only the installer and the cluster file go.
        assert_eq!(far.ran.len(), 4);
    }

    #[test]
    fn uninstall_copies_only_the_installer_and_names_no_cluster() {
        let mut far = mac(APPLE_SILICON);
        let (result, _, _) = go(&mut far, Action::Uninstall, None);
        result.unwrap();
        assert_eq!(far.ran.len(), 3);
        let dir = "/tmp/tensorlink-install.0123456789abcdef";
        assert_eq!(
            far.ran[2].0,
            format!("{dir}/install --uninstall --system; rc=$?; rm -rf {dir}; exit $rc")
        );
    }

    #[test]
    fn a_failed_copy_removes_what_was_copied() {
        let mut far = mac(APPLE_SILICON);
        far.answers.push((
            "cluster.toml &&",
            1,
            vec!["cat: write error: No space left on device"],
        ));
        let (result, _, _) = go(&mut far, Action::Check, None);
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("copying cluster.toml to mac2") && err.contains("No space left"),
            "{err}"
        );
        assert_eq!(
            far.ran.last().unwrap().0,
            "rm -rf /tmp/tensorlink-install.0123456789abcdef"
        );
    }

    #[test]
    fn change_lines_are_those_that_say_so() {
        assert!(is_change("  wrote      /x (peer file)"));
        assert!(is_change("  reloaded   dev.tensorlink.node"));
        assert!(is_change("  removed    /x"));
        assert!(!is_change("  unchanged  /x (peer file)"));
        assert!(!is_change(
            "  running    dev.tensorlink.node (unchanged, left alone)"
        ));
        assert!(!is_change("wrote nothing"));
    }
}
