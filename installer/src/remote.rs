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
use crate::install::{self, shell_quote};
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

/// A program copied to the far Macs (the node, the installer), with what it
/// runs on.
pub struct Program {
    pub path: PathBuf,
    pub sha256: String,
    pub builds: Vec<Build>,
}

impl Program {
    /// `what` names it in errors: "the node binary".
    pub fn read(path: &Path, what: &str) -> Result<Program, Failure> {
        use sha2::{Digest, Sha256};
        let bytes = std::fs::read(path).map_err(Failure::local(&format!(
            "reading {what} {}",
            path.display()
        )))?;
        Ok(Program {
            builds: platform::builds_of(&bytes).map_err(|e| Failure::Platform {
                what: what.to_owned(),
                problem: e,
            })?,
            sha256: format!("{:x}", Sha256::digest(&bytes)),
            path: path.to_owned(),
        })
    }

    /// Ok when `host` can start it.
    pub fn runs_on(&self, host: &Host, what: &str) -> Result<(), Failure> {
        host.runs(&self.builds).map_err(|e| Failure::Platform {
            what: what.to_owned(),
            problem: e,
        })
    }
}

/// What is copied to each far Mac.
pub struct Payload<'a> {
    /// This installer (the far Mac needs no checkout and no Rust).
    pub installer: &'a Program,
    pub cluster: &'a Path,
    /// Only for [`Action::Install`].
    pub node_binary: Option<&'a Program>,
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
    /// so that sudo there can ask for a password (and leaves out ssh's own
    /// "Connection to … closed." at the end).
    pub fn ssh(&self, tty: bool, script: &str) -> Vec<String> {
        let mut argv = vec!["/usr/bin/ssh".to_owned()];
        if tty {
            argv.extend(["-t", "-e", "none", "-o", "LogLevel=ERROR"].map(str::to_owned));
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
            Input::File(path) => Stdio::from(
                std::fs::File::open(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
            ),
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
                    // Bytes, not UTF-8 lines: a line of anything else must
                    // not stop the reading (the writer would then meet a
                    // closed pipe).
                    let mut pipe = io::BufReader::new(pipe);
                    let mut raw = Vec::new();
                    while matches!(pipe.read_until(b'\n', &mut raw), Ok(n) if n > 0) {
                        let l = String::from_utf8_lossy(&raw);
                        // A terminal's lines end in \r\n.
                        let l = l.trim_end_matches('\n').trim_end_matches('\r').to_owned();
                        raw.clear();
                        if tx.send(l).is_err() {
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
    #[error("{what}: {problem}")]
    Platform {
        what: String,
        problem: PlatformError,
    },
    #[error("could not tell what the Mac is: {0}")]
    Probe(PlatformError),
    #[error(transparent)]
    HostKey(#[from] crate::known_hosts::KnownHostsError),
    #[error("{0}")]
    Installer(String),
    #[error("{what}: {error}")]
    Local { what: String, error: io::Error },
    #[error("interrupted")]
    Interrupted,
}

impl Failure {
    /// For `map_err`: an error of this Mac's own, doing `what`.
    pub fn local(what: &str) -> impl FnOnce(io::Error) -> Failure {
        let what = what.to_owned();
        move |error| Failure::Local { what, error }
    }
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
    /// The terminal is in raw mode (ssh -t has it): a line ends in \r\n.
    raw: bool,
}

impl Prefixed<'_> {
    pub fn new<'a>(id: &str, width: usize, out: &'a mut dyn Write) -> Prefixed<'a> {
        Prefixed {
            prefix: format!("{id:<width$} │ "),
            out,
            changes: 0,
            partial: Vec::new(),
            raw: false,
        }
    }

    pub fn line(&mut self, text: &str) {
        self.changes += usize::from(install::reports_change(text));
        // What the user reads is best effort: a closed stdout stops nothing.
        let end = if self.raw { "\r\n" } else { "\n" };
        let _ = write!(self.out, "{}{text}{end}", self.prefix);
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

/// A new name for the far Mac's staging folder (see [`mkdir_script`]): 64
/// random bits, so that runs never share one.
pub fn staging_name() -> io::Result<String> {
    let mut bits = [0u8; 8];
    io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bits)?;
    let hex: String = bits.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("/tmp/tensorlink-install.{hex}"))
}

/// What `--all` does on one far Mac.
pub struct Plan<'a> {
    pub action: Action,
    pub payload: Payload<'a>,
    /// This run's options for the far installer (`--system`, `--no-load`…).
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

/// The staging folder, in the far Mac's /tmp: `mkdir` fails if anything is
/// at the name, so nothing planted there is written through or followed;
/// mode 700, so no other user reads or swaps the copies.
fn mkdir_script(staging: &str) -> String {
    format!("umask 077 && mkdir {}", shell_quote(Path::new(staging)))
}

fn upload_script(staging: &str, upload: &Upload<'_>) -> String {
    let to = format!("{}/{}", shell_quote(Path::new(staging)), upload.name);
    format!("cat > {to} && chmod {} {to}", upload.mode)
}

fn rm_script(staging: &str) -> String {
    format!("rm -rf {}", shell_quote(Path::new(staging)))
}

fn uploads<'a>(plan: &'a Plan<'_>, copy_node: bool) -> Vec<Upload<'a>> {
    let mut list = vec![Upload {
        from: &plan.payload.installer.path,
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

/// The far installer's command line, with the staging folder removed
/// however the shell ends: the installer's exit, a lost session (HUP) or
/// Ctrl-C in the terminal it was given (INT).
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
    format!(
        "trap 'rm -rf {dir}' EXIT; trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM; {}; exit $?",
        cmd.join(" ")
    )
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
    let mut lines = vec![
        quote(login.ssh(false, &probe_script())),
        quote(login.ssh(false, &mkdir_script(plan.staging))),
    ];
    for u in uploads(plan, true) {
        let mut line = quote(login.ssh(false, &upload_script(plan.staging, &u)));
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

/// What ssh's own failure (exit 255) says, with its fix when it is a known one.
fn ssh_failure(login: &Login<'_>, said: &[String]) -> Failure {
    let node = login.node;
    match diagnose_login(&said.join("\n"), login.identity, node) {
        Some((problem, fix)) => Failure::Ssh { problem, fix },
        None => Failure::SshOther {
            login: format!("{}@{}", node.ssh_user, node.address),
            said: said.last().cloned().unwrap_or_default(),
        },
    }
}

/// One quiet step's outcome: ssh's own failure (255) diagnosed, any other
/// as `what` and the last thing the command said.
fn step(login: &Login<'_>, code: Option<i32>, said: &[String], what: &str) -> Result<(), Failure> {
    match code {
        Some(0) => Ok(()),
        Some(255) => Err(ssh_failure(login, said)),
        _ => Err(Failure::Installer(format!(
            "{what}: {}",
            said.last().map_or("", String::as_str)
        ))),
    }
}

/// Does `plan` on `login`'s Mac, printing what happens through `out`.
pub fn run(
    login: &Login<'_>,
    plan: &Plan<'_>,
    shell: &mut dyn Shell,
    out: &mut Prefixed<'_>,
) -> Result<(), Failure> {
    let node = login.node;
    let ssh = |tty: bool, script: &str| login.ssh(tty, script);
    // Runs `script` there quietly: (exit code, what it printed).
    let quiet = |shell: &mut dyn Shell, script: &str, input: Input<'_>| {
        let mut said = Vec::new();
        let code = shell
            .run(&ssh(false, script), input, &mut |l| said.push(l.to_owned()))
            .map_err(Failure::local("running /usr/bin/ssh"))?;
        Ok::<_, Failure>((code, said))
    };

    let (code, said) = quiet(shell, &probe_script(), Input::Nothing)?;
    if code != Some(0) {
        return Err(ssh_failure(login, &said));
    }
    let answer = said.join("\n");
    let host = Host::parse(&answer).map_err(Failure::Probe)?;
    let value = |key: &str| {
        answer
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    out.line(&format!("{}@{}: {host}", node.ssh_user, node.address));
    plan.payload.installer.runs_on(&host, "the installer")?;

    let mut node_binary = None;
    let mut copy_node = false;
    if let Some(binary) = plan.payload.node_binary {
        binary.runs_on(&host, "the node binary")?;
        match (value("node_sha256"), value("home")) {
            (Some(sha), Some(home)) if sha == binary.sha256 => {
                out.line("the node binary there is this one: not copied");
                node_binary = Some(Paths::new(Path::new(home)).node_binary);
            }
            _ => {
                copy_node = true;
                node_binary = Some(PathBuf::from(format!("{}/tensorlink-node", plan.staging)));
            }
        }
    }

    let (code, said) = quiet(shell, &mkdir_script(plan.staging), Input::Nothing)?;
    step(
        login,
        code,
        &said,
        &format!("could not make the folder {} on {}", plan.staging, node.id),
    )?;
    // From here on the folder is ours: the install script's trap removes it,
    // and this run does where that script never ran.
    let (result, script_ran) =
        copy_and_install(login, plan, shell, out, copy_node, node_binary.as_deref());
    if !script_ran {
        // Best effort, as the failure may be the link itself; /tmp is cleared
        // at the far Mac's restart anyway.
        let _ = quiet(shell, &rm_script(plan.staging), Input::Nothing);
    }
    result
}

/// The copies into the staging folder, then the far installer; and whether
/// its script ran there (and so removed the folder itself).
fn copy_and_install(
    login: &Login<'_>,
    plan: &Plan<'_>,
    shell: &mut dyn Shell,
    out: &mut Prefixed<'_>,
    copy_node: bool,
    node_binary: Option<&Path>,
) -> (Result<(), Failure>, bool) {
    match copy(login, plan, shell, out, copy_node) {
        Ok(()) => install_there(login, plan, shell, out, node_binary),
        Err(e) => (Err(e), false),
    }
}

fn copy(
    login: &Login<'_>,
    plan: &Plan<'_>,
    shell: &mut dyn Shell,
    out: &mut Prefixed<'_>,
    copy_node: bool,
) -> Result<(), Failure> {
    let node = login.node;
    for upload in uploads(plan, copy_node) {
        // The size is for the reader; a file that cannot be read fails the copy.
        let size = std::fs::metadata(upload.from)
            .map(|m| format!(" ({})", size(m.len())))
            .unwrap_or_default();
        out.line(&format!("copying {}{size}", upload.name));
        let mut said = Vec::new();
        let code = shell
            .run(
                &login.ssh(false, &upload_script(plan.staging, &upload)),
                Input::File(upload.from),
                &mut |l| said.push(l.to_owned()),
            )
            .map_err(Failure::local("copying with /usr/bin/ssh"))?;
        let what = format!(
            "copying {} to {}:{} failed",
            upload.name, node.id, plan.staging
        );
        step(login, code, &said, &what)?;
    }
    Ok(())
}

/// The far installer, streamed; and whether its script ran (ssh's own
/// failure, 255 with no installer output, means it may not have).
fn install_there(
    login: &Login<'_>,
    plan: &Plan<'_>,
    shell: &mut dyn Shell,
    out: &mut Prefixed<'_>,
    node_binary: Option<&Path>,
) -> (Result<(), Failure>, bool) {
    let node = login.node;
    let input = if plan.tty {
        Input::Terminal
    } else {
        Input::Nothing
    };
    let mut lines = Vec::new();
    out.raw = plan.tty;
    let code = shell.run(
        &login.ssh(plan.tty, &install_script(plan, node, node_binary)),
        input,
        &mut |l| {
            out.line(l);
            lines.push(l.to_owned());
        },
    );
    out.raw = false;
    let code = match code {
        Ok(code) => code,
        Err(e) => return (Err(Failure::local("running /usr/bin/ssh")(e)), false),
    };
    let result = match code {
        Some(0) => Ok(()),
        // Ctrl-C or a hang-up in the terminal the far installer was given
        // (the trap's codes): the user stops the run, not only this Mac.
        Some(129 | 130 | 143) if plan.tty => Err(Failure::Interrupted),
        _ => Err(match installer_error(&lines) {
            Some(e) => Failure::Installer(e),
            None if code == Some(255) => return (Err(ssh_failure(login, &lines)), false),
            // --check prints its findings and exits 1 when one is not green.
            None if plan.action == Action::Check && code == Some(1) => {
                Failure::Installer("its checks failed (see above)".into())
            }
            None => Failure::Installer(format!(
                "the installer on {} exited with {} (see its output above)",
                node.id,
                code.map_or("a signal".to_owned(), |c| format!("code {c}"))
            )),
        }),
    };
    (result, true)
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
        .map_err(Failure::local("running /bin/sh"))?;
    Host::parse(&said.join("\n")).map_err(Failure::Probe)
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
    const DIR: &str = "/tmp/tensorlink-install.0123456789abcdef";

    fn seed_mac2() -> Node {
        let cluster = Cluster::parse(
            include_str!("../../examples/seed-cluster.toml"),
            Path::new("cluster.toml"),
        )
        .unwrap();
        cluster.node("mac2").unwrap().clone()
    }

    /// A program built for Apple silicon, macOS 11 or later.
    fn program(path: &str, sha: &str) -> Program {
        Program {
            path: PathBuf::from(path),
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
        shell: &mut dyn Shell,
        action: Action,
        node_binary: Option<&Program>,
    ) -> (Result<(), Failure>, String, usize) {
        go_with(shell, action, node_binary, false)
    }

    fn go_with(
        shell: &mut dyn Shell,
        action: Action,
        node_binary: Option<&Program>,
        tty: bool,
    ) -> (Result<(), Failure>, String, usize) {
        let node = seed_mac2();
        let login = Login {
            node: &node,
            identity: Path::new("/Users/me/.ssh/id_ed25519"),
            known_hosts: Path::new("/tmp/pinned"),
        };
        let installer = program("/build/install", "ii");
        let plan = Plan {
            action,
            payload: Payload {
                installer: &installer,
                cluster: Path::new("/build/cluster.toml"),
                node_binary,
            },
            pass_on: &["--system".to_owned()],
            staging: DIR,
            tty,
        };
        let mut printed = Vec::new();
        let mut out = Prefixed::new("mac2", 4, &mut printed);
        let result = run(&login, &plan, shell, &mut out);
        let changes = out.changes;
        drop(out);
        (result, String::from_utf8(printed).unwrap(), changes)
    }

    fn installed(dir: &str, args: &str) -> String {
        format!(
            "trap 'rm -rf {dir}' EXIT; trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM; {dir}/install {args}; exit $?"
        )
    }

    #[test]
    fn an_install_copies_then_runs_the_same_installer_there_in_a_folder_it_removes() {
        let mut far = mac(APPLE_SILICON);
        far.answers.push((
            "--cluster",
            0,
            vec![
                "  wrote      /Users/remoteuser/x (peer file)",
                "  unchanged  /Users/remoteuser/y (z)",
            ],
        ));
        let node = program("/build/tensorlink-node", "aa");
        let (result, printed, changes) = go(&mut far, Action::Install, Some(&node));
        result.unwrap();
        assert_eq!(changes, 1);
        let scripts: Vec<&str> = far.ran.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(scripts.len(), 6, "{scripts:#?}");
        assert!(
            scripts[0].contains("uname -s")
                && scripts[0]
                    .contains("'Library/Application Support/tensorlink/bin/tensorlink-node'")
        );
        assert_eq!(scripts[1], format!("umask 077 && mkdir {DIR}"));
        assert_eq!(
            scripts[2],
            format!("cat > {DIR}/install && chmod 700 {DIR}/install")
        );
        assert_eq!(
            scripts[3],
            format!("cat > {DIR}/cluster.toml && chmod 600 {DIR}/cluster.toml")
        );
        assert_eq!(
            scripts[4],
            format!("cat > {DIR}/tensorlink-node && chmod 755 {DIR}/tensorlink-node")
        );
        assert_eq!(
            scripts[5],
            installed(
                DIR,
                &format!("--cluster {DIR}/cluster.toml --node mac2 --node-binary {DIR}/tensorlink-node --system")
            )
        );
        assert!(far.ran[2..5]
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

    /// The far installer's script, run by the shell the tests have: its
    /// folder goes whatever the installer exits with, and the code is kept.
    #[test]
    fn the_install_script_removes_its_folder_and_keeps_the_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        for (body, code) in [("exit 0", 0), ("echo 'install: no' >&2; exit 3", 3)] {
            std::fs::create_dir(&staging).unwrap();
            let script = staging.join("install");
            std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
            let line = installed(&shell_quote(&staging), "--check");
            let status = Command::new("/bin/sh")
                .args(["-c", &line])
                .status()
                .unwrap();
            assert_eq!(status.code(), Some(code));
            assert!(!staging.exists(), "the folder stayed after exit {code}");
        }
    }

    #[test]
    fn the_node_binary_installed_there_already_is_not_copied_again() {
        let mut far = mac(&format!("{APPLE_SILICON}\nnode_sha256=aa"));
        let node = program("/build/tensorlink-node", "aa");
        let (result, printed, changes) = go(&mut far, Action::Install, Some(&node));
        result.unwrap();
        assert_eq!(changes, 0);
        assert_eq!(far.ran.len(), 5);
        assert!(!far
            .ran
            .iter()
            .any(|(s, _)| s.contains(&format!("cat > {DIR}/tensorlink-node"))));
        assert!(far.ran[4].0.contains("--node-binary '/Users/remoteuser/Library/Application Support/tensorlink/bin/tensorlink-node'"), "{}", far.ran[4].0);
        assert!(printed.contains("not copied"));
    }

    #[test]
    fn a_mac_that_cannot_run_the_binary_gets_nothing() {
        let mut far = mac("os=Darwin\narch=x86_64\narm64=\nmacos=13.6\nhome=/Users/remoteuser");
        let node = program("/build/tensorlink-node", "aa");
        let (result, _, _) = go(&mut far, Action::Install, Some(&node));
        let err = result.unwrap_err().to_string();
        assert_eq!(err, "the installer: macOS 13.6 on x86_64 cannot run it: it is built for macOS 11.0 or later on arm64");
        assert_eq!(far.ran.len(), 1, "only the probe ran");
        let old = mac("os=Darwin\narch=arm64\narm64=1\nmacos=10.15\nhome=/Users/remoteuser");
        let (result, _, _) = go(&mut { old }, Action::Check, None);
        assert!(result
            .unwrap_err()
            .to_string()
            .contains("macOS 10.15 on arm64 cannot run it"));
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
        let mut shell = Refusing(0);
        let (result, _, _) = go(&mut shell, Action::Check, None);
        let err = result.unwrap_err();
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
        // --check needs no node binary: only the installer and the cluster file
        // go; the install script ran, so its trap removed the folder: no
        // second removal of a name no longer ours.
        let scripts: Vec<&str> = far.ran.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(scripts.len(), 5, "{scripts:#?}");
        assert!(!scripts.iter().any(|s| s.starts_with("rm ")));
    }

    /// Ctrl-C in the terminal the far installer has: the trap's exit code
    /// stops the run; without a terminal, the same code is that Mac's failure.
    #[test]
    fn ctrl_c_in_the_far_terminal_interrupts_the_run() {
        let mut far = mac(APPLE_SILICON);
        far.answers.push(("--uninstall", 130, vec![]));
        let (result, _, _) = go_with(&mut far, Action::Uninstall, None, true);
        assert!(matches!(result, Err(Failure::Interrupted)), "{result:?}");
        assert!(matches!(far.ran.last(), Some((_, Input::Terminal))));
        let mut far = mac(APPLE_SILICON);
        far.answers.push(("--uninstall", 130, vec![]));
        let (result, _, _) = go(&mut far, Action::Uninstall, None);
        assert!(matches!(result, Err(Failure::Installer(_))), "{result:?}");
    }

    #[test]
    fn uninstall_copies_only_the_installer_and_names_no_cluster() {
        let mut far = mac(APPLE_SILICON);
        let (result, _, _) = go(&mut far, Action::Uninstall, None);
        result.unwrap();
        assert_eq!(far.ran.len(), 4);
        assert_eq!(far.ran[3].0, installed(DIR, "--uninstall --system"));
    }

    #[test]
    fn a_failed_copy_removes_the_folder_and_a_failed_mkdir_touches_nothing() {
        let mut far = mac(APPLE_SILICON);
        far.answers.push((
            "cat > /tmp/tensorlink-install.0123456789abcdef/install",
            1,
            vec!["cat: write error: No space left on device"],
        ));
        let (result, _, _) = go(&mut far, Action::Check, None);
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("copying install to mac2") && err.contains("No space left"),
            "{err}"
        );
        assert_eq!(far.ran.last().unwrap().0, format!("rm -rf {DIR}"));

        // Something is already at the name: it is not ours to remove.
        let mut far = mac(APPLE_SILICON);
        far.answers
            .push(("mkdir", 1, vec!["mkdir: /tmp/…: File exists"]));
        let (result, _, _) = go(&mut far, Action::Check, None);
        assert!(result
            .unwrap_err()
            .to_string()
            .contains("could not make the folder"));
        assert!(!far.ran.iter().any(|(s, _)| s.starts_with("rm ")));
    }

    /// A line that is not UTF-8 is passed on, mended, and the lines after it
    /// still come; so does a last line without its newline, and a
    /// terminal's \r\n endings lose their \r.
    #[test]
    fn the_system_shell_reads_every_line_whatever_its_bytes() {
        let mut lines = Vec::new();
        let argv = ["/bin/sh", "-c", r"printf 'a\377b\r\nc\n' && printf 'd' >&2"].map(String::from);
        let code = System
            .run(&argv, Input::Nothing, &mut |l| lines.push(l.to_owned()))
            .unwrap();
        assert_eq!(code, Some(0));
        lines.sort();
        assert_eq!(lines, ["a\u{fffd}b", "c", "d"]);
    }

    #[test]
    fn a_raw_terminal_gets_whole_lines() {
        let mut printed = Vec::new();
        let mut out = Prefixed::new("mac2", 4, &mut printed);
        out.raw = true;
        out.line("a");
        out.raw = false;
        write!(out, "b\nc").unwrap();
        drop(out);
        assert_eq!(
            String::from_utf8(printed).unwrap(),
            "mac2 │ a\r\nmac2 │ b\nmac2 │ c\n"
        );
    }
}
