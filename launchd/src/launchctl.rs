//! `launchctl` with the modern verbs (`bootstrap`, `bootout`, `enable`,
//! `kickstart`, `print`), behind a trait so the installer's logic is tested on
//! any machine against a recording fake.
//!
//! The real implementation runs `/bin/launchctl` as a child with stdin closed and
//! output captured; a failure carries the exact command line and what launchctl
//! printed, so the user sees what failed and why.

use std::fmt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use thiserror::Error;

/// A launchd domain. LaunchAgents of a logged-in user live in `gui/<uid>`,
/// which exists only while that user has a login session at the screen;
/// LaunchDaemons live in `system`, which exists from boot, with nobody logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    Gui(u32),
    System,
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Gui(uid) => write!(f, "gui/{uid}"),
            Domain::System => f.write_str("system"),
        }
    }
}

impl Domain {
    /// `gui/<uid>/<label>`, the form `print`, `enable` and `kickstart` take.
    pub fn service(&self, label: &str) -> String {
        format!("{self}/{label}")
    }
}

/// What `launchctl print` says of a loaded service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceStatus {
    /// `running`, `waiting`, `not running`, …
    pub state: String,
    pub pid: Option<u32>,
    /// The last exit status as launchctl words it (`0`, `255`, `78: EX_CONFIG`,
    /// `(never exited)`).
    pub last_exit: Option<String>,
    /// How the last run was killed, when a signal ended it (`Killed: 9`,
    /// `Abort trap: 6`): launchctl reports such deaths here, not as an exit code.
    pub last_signal: Option<String>,
    /// How many times launchd has started it.
    pub runs: Option<u64>,
}

/// How the previous run of a service ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastDeath {
    /// Never exited, or exited 0.
    Clean,
    /// A non-zero exit status.
    Exit(i32),
    /// Killed by a signal: its number and launchctl's description of it.
    Signal { number: Option<i32>, text: String },
}

impl ServiceStatus {
    pub fn is_running(&self) -> bool {
        self.state == "running" && self.pid.is_some()
    }

    pub fn last_death(&self) -> LastDeath {
        if let Some(text) = &self.last_signal {
            let number = text
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok());
            return LastDeath::Signal {
                number,
                text: text.clone(),
            };
        }
        let code = self.last_exit.as_deref().and_then(|e| {
            let digits: String = e.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse::<i32>().ok()
        });
        match code {
            Some(c) if c != 0 => LastDeath::Exit(c),
            _ => LastDeath::Clean,
        }
    }
}

impl fmt::Display for LastDeath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LastDeath::Clean => f.write_str("no abnormal exit"),
            LastDeath::Exit(c) => write!(f, "exit status {c}"),
            LastDeath::Signal { text, .. } => write!(f, "killed by signal ({text})"),
        }
    }
}

#[derive(Debug, Error)]
pub enum LaunchctlError {
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {output}")]
    Failed {
        command: String,
        status: String,
        /// launchctl's exit status, when it exited.
        code: Option<i32>,
        output: String,
    },
}

/// What launchctl answers for a `gui/<uid>` domain while that user has no
/// login session at the screen: "Domain does not support specified action".
pub const NO_SESSION: i32 = 125;

impl LaunchctlError {
    /// The domain does not exist now (a `gui/<uid>` with nobody logged in).
    pub fn is_missing_domain(&self) -> bool {
        matches!(
            self,
            LaunchctlError::Failed {
                code: Some(NO_SESSION),
                ..
            }
        )
    }
}

pub trait Launchctl {
    /// Loads the agent at `plist` into `domain`.
    fn bootstrap(&self, domain: Domain, plist: &Path) -> Result<(), LaunchctlError>;
    /// Unloads `label`; an agent that is not loaded is not an error.
    fn bootout(&self, domain: Domain, label: &str) -> Result<(), LaunchctlError>;
    /// Clears a "disabled" override a user may have set with `launchctl disable`.
    fn enable(&self, domain: Domain, label: &str) -> Result<(), LaunchctlError>;
    /// Starts the agent now; with `kill`, restarts it if running.
    fn kickstart(&self, domain: Domain, label: &str, kill: bool) -> Result<(), LaunchctlError>;
    /// The agent's status, or `None` when it is not loaded.
    fn print(&self, domain: Domain, label: &str) -> Result<Option<ServiceStatus>, LaunchctlError>;
    /// Whether the domain exists now: `gui/<uid>` only while the user is
    /// logged in at the screen.
    fn has_domain(&self, domain: Domain) -> Result<bool, LaunchctlError>;
}

/// Runs a program and captures its output; the seam that lets the real
/// launchctl logic run in tests against scripted answers.
pub trait Runner {
    fn run(&self, program: &str, args: &[String]) -> std::io::Result<Output>;
}

/// Runs real processes with stdin closed.
pub struct ProcessRunner;

impl Runner for ProcessRunner {
    fn run(&self, program: &str, args: &[String]) -> std::io::Result<Output> {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }
}

/// The real `/bin/launchctl`.
pub struct System<R: Runner = ProcessRunner> {
    runner: R,
    program: String,
    /// Pause between attempts while launchctl reports an operation in progress.
    retry_delay: Duration,
}

impl System {
    pub fn new() -> Self {
        System::with_runner(ProcessRunner)
    }
}

impl Default for System {
    fn default() -> Self {
        System::new()
    }
}

/// launchctl exit statuses that mean "no such service" (ESRCH, and 113 from
/// `print` and newer `bootout`).
const NOT_LOADED: [i32; 2] = [3, 113];
/// A previous operation on the same service has not finished: EINPROGRESS (36)
/// and EALREADY (37). Right after a bootout, `bootstrap` can also answer 5
/// (EIO) until launchd has let go of the old job.
const IN_PROGRESS: [i32; 2] = [36, 37];
const BOOTSTRAP_RACE: [i32; 3] = [36, 37, 5];
const ATTEMPTS: u32 = 20;

/// What launchctl's usual exit statuses mean for the user.
fn hint(code: Option<i32>) -> &'static str {
    match code {
        Some(5) | Some(37) => " (the agent may already be loaded, or its plist is invalid: check it with `plutil -lint`)",
        Some(119) => " (the service is disabled: `launchctl enable` it)",
        Some(NO_SESSION) => " (no graphical login session for this user: log in at the Mac's screen once, or install with --system)",
        _ => "",
    }
}

impl<R: Runner> System<R> {
    pub fn with_runner(runner: R) -> Self {
        System {
            runner,
            program: "/bin/launchctl".to_owned(),
            retry_delay: Duration::from_millis(250),
        }
    }

    pub fn with_retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    fn run(&self, args: &[String]) -> Result<Output, LaunchctlError> {
        self.runner
            .run(&self.program, args)
            .map_err(|source| LaunchctlError::Spawn {
                command: self.command_line(args),
                source,
            })
    }

    fn command_line(&self, args: &[String]) -> String {
        std::iter::once(self.program.as_str())
            .chain(args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn failed(&self, args: &[String], out: &Output) -> LaunchctlError {
        let mut text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if text.is_empty() {
            text = stdout.trim().to_owned();
        }
        LaunchctlError::Failed {
            command: self.command_line(args),
            status: out.status.to_string(),
            code: out.status.code(),
            output: format!("{text}{}", hint(out.status.code())),
        }
    }

    /// Runs a mutating verb, retrying while launchctl says a previous operation
    /// on the service is still in progress.
    fn run_retrying(
        &self,
        args: &[String],
        ok_codes: &[i32],
        retry_codes: &[i32],
    ) -> Result<(), LaunchctlError> {
        for attempt in 1..=ATTEMPTS {
            let out = self.run(args)?;
            let code = out.status.code();
            if out.status.success() || code.is_some_and(|c| ok_codes.contains(&c)) {
                return Ok(());
            }
            if code.is_some_and(|c| retry_codes.contains(&c)) && attempt < ATTEMPTS {
                std::thread::sleep(self.retry_delay);
                continue;
            }
            return Err(self.failed(args, &out));
        }
        unreachable!("the last attempt returns")
    }
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

impl<R: Runner> Launchctl for System<R> {
    fn bootstrap(&self, domain: Domain, plist: &Path) -> Result<(), LaunchctlError> {
        let a = vec![
            "bootstrap".to_owned(),
            domain.to_string(),
            plist.to_string_lossy().into_owned(),
        ];
        self.run_retrying(&a, &[], &BOOTSTRAP_RACE)
    }

    fn bootout(&self, domain: Domain, label: &str) -> Result<(), LaunchctlError> {
        self.run_retrying(
            &args(&["bootout", &domain.service(label)]),
            &NOT_LOADED,
            &IN_PROGRESS,
        )
    }

    fn enable(&self, domain: Domain, label: &str) -> Result<(), LaunchctlError> {
        self.run_retrying(
            &args(&["enable", &domain.service(label)]),
            &[],
            &IN_PROGRESS,
        )
    }

    fn kickstart(&self, domain: Domain, label: &str, kill: bool) -> Result<(), LaunchctlError> {
        let service = domain.service(label);
        let a = if kill {
            args(&["kickstart", "-k", &service])
        } else {
            args(&["kickstart", &service])
        };
        self.run_retrying(&a, &[], &IN_PROGRESS)
    }

    fn print(&self, domain: Domain, label: &str) -> Result<Option<ServiceStatus>, LaunchctlError> {
        let a = args(&["print", &domain.service(label)]);
        let out = self.run(&a)?;
        if out.status.success() {
            return Ok(Some(parse_print(&String::from_utf8_lossy(&out.stdout))));
        }
        if out.status.code().is_some_and(|c| NOT_LOADED.contains(&c)) {
            return Ok(None);
        }
        Err(self.failed(&a, &out))
    }

    fn has_domain(&self, domain: Domain) -> Result<bool, LaunchctlError> {
        // Any refusal means the same to us: nothing can be loaded there now.
        Ok(self
            .run(&[String::from("print"), domain.to_string()])?
            .status
            .success())
    }
}

/// Boots `label` out and waits until launchd no longer lists it, so that a
/// bootstrap right after does not race the old job's teardown.
pub fn bootout_and_wait(
    launchctl: &dyn Launchctl,
    domain: Domain,
    label: &str,
    timeout: Duration,
) -> Result<(), LaunchctlError> {
    launchctl.bootout(domain, label)?;
    let start = std::time::Instant::now();
    while launchctl.print(domain, label)?.is_some() {
        if start.elapsed() > timeout {
            return Err(LaunchctlError::Failed {
                command: format!("launchctl bootout {}", domain.service(label)),
                status: "timeout".into(),
                code: None,
                output: format!("the service is still loaded {timeout:?} after bootout"),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Reads the service's own top-level `key = value` lines of `launchctl print`
/// (one tab deep); nested blocks such as `arguments = { … }` are skipped.
pub fn parse_print(text: &str) -> ServiceStatus {
    let mut status = ServiceStatus::default();
    let mut depth = 0usize;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.ends_with('{') {
            depth += 1;
            if depth > 1 {
                continue;
            }
        }
        if trimmed == "}" {
            depth = depth.saturating_sub(1);
            continue;
        }
        if depth != 1 {
            continue;
        }
        let Some((key, value)) = trimmed.split_once(" = ") else {
            continue;
        };
        match key {
            "state" => status.state = value.to_owned(),
            "pid" => status.pid = value.parse().ok(),
            "last exit code" => status.last_exit = Some(value.to_owned()),
            "last terminating signal" => status.last_signal = Some(value.to_owned()),
            "runs" => status.runs = value.parse().ok(),
            _ => {}
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    const PRINT: &str = "gui/501/dev.tensorlink.node = {
\tactive count = 1
\tpath = /Users/me/Library/LaunchAgents/dev.tensorlink.node.plist
\ttype = LaunchAgent
\tstate = running

\tprogram = /Users/me/Library/Application Support/tensorlink/bin/tensorlink-node
\targuments = {
\t\t/Users/me/Library/Application Support/tensorlink/bin/tensorlink-node
\t\tstate = fake-nested
\t}

\tenvironment = {
\t\tPATH => /usr/bin:/bin
\t}

\truns = 3
\tpid = 4242
\tlast exit code = 1
}
";

    #[test]
    fn print_output_is_parsed_at_top_level_only() {
        let s = parse_print(PRINT);
        assert_eq!(s.state, "running");
        assert_eq!(s.pid, Some(4242));
        assert_eq!(s.last_exit.as_deref(), Some("1"));
        assert_eq!(s.runs, Some(3));
        assert!(s.is_running());
        let never = parse_print("x = {\n\tstate = waiting\n\tlast exit code = (never exited)\n}\n");
        assert_eq!(never.last_exit.as_deref(), Some("(never exited)"));
        assert!(!never.is_running());
    }

    #[test]
    fn signal_deaths_and_worded_exit_codes_are_read() {
        let killed = parse_print(
            "system/dev.tensorlink.node = {\n\tstate = spawn scheduled\n\truns = 7\n\tlast exit code = (never exited)\n\tlast terminating signal = Killed: 9\n}\n",
        );
        assert_eq!(killed.runs, Some(7));
        assert_eq!(
            killed.last_death(),
            LastDeath::Signal {
                number: Some(9),
                text: "Killed: 9".into()
            }
        );
        let config = parse_print("x = {\n\tlast exit code = 78: EX_CONFIG\n}\n");
        assert_eq!(config.last_death(), LastDeath::Exit(78));
        let clean = parse_print("x = {\n\tlast exit code = 0\n}\n");
        assert_eq!(clean.last_death(), LastDeath::Clean);
        assert_eq!(parse_print(PRINT).last_death(), LastDeath::Exit(1));
    }

    #[test]
    fn a_missing_gui_domain_is_told_apart() {
        let s = scripted(vec![(
            125,
            "Bootstrap failed: 125: Domain does not support specified action",
        )]);
        let err = System::with_runner(&s)
            .bootstrap(Domain::Gui(501), Path::new("/x.plist"))
            .unwrap_err();
        assert!(err.is_missing_domain(), "{err}");
        assert!(err.to_string().contains("--system"), "{err}");
        let s = scripted(vec![
            (113, "Could not find domain for port identifier"),
            (0, ""),
        ]);
        let system = System::with_runner(&s);
        assert!(!system.has_domain(Domain::Gui(501)).unwrap());
        assert!(system.has_domain(Domain::System).unwrap());
        assert_eq!(
            s.calls.borrow().as_slice(),
            [
                "/bin/launchctl print gui/501",
                "/bin/launchctl print system"
            ]
        );
    }

    /// Answers each call with the next scripted (exit code, stderr).
    struct Scripted {
        answers: RefCell<Vec<(i32, &'static str)>>,
        calls: RefCell<Vec<String>>,
    }

    impl Runner for &Scripted {
        fn run(&self, program: &str, args: &[String]) -> std::io::Result<Output> {
            self.calls
                .borrow_mut()
                .push(format!("{program} {}", args.join(" ")));
            let (code, stderr) = self.answers.borrow_mut().remove(0);
            Ok(Output {
                status: ExitStatus::from_raw(code << 8),
                stdout: Vec::new(),
                stderr: stderr.as_bytes().to_vec(),
            })
        }
    }

    fn scripted(answers: Vec<(i32, &'static str)>) -> Scripted {
        Scripted {
            answers: RefCell::new(answers),
            calls: RefCell::new(Vec::new()),
        }
    }

    #[test]
    fn bootout_tolerates_not_loaded_and_retries_in_progress() {
        let s = scripted(vec![(3, "Boot-out failed: 3: No such process")]);
        System::with_runner(&s)
            .bootout(Domain::Gui(501), "a")
            .unwrap();
        assert_eq!(
            s.calls.borrow().as_slice(),
            ["/bin/launchctl bootout gui/501/a"]
        );

        let s = scripted(vec![
            (36, "Boot-out failed: 36: Operation now in progress"),
            (36, "Boot-out failed: 36: Operation now in progress"),
            (0, ""),
        ]);
        System::with_runner(&s)
            .with_retry_delay(Duration::ZERO)
            .bootout(Domain::Gui(501), "a")
            .unwrap();
        assert_eq!(s.calls.borrow().len(), 3);
    }

    #[test]
    fn failures_carry_the_command_and_what_launchctl_said() {
        let s = scripted(vec![
            (5, "Bootstrap failed: 5: Input/output error");
            ATTEMPTS as usize
        ]);
        let err = System::with_runner(&s)
            .with_retry_delay(Duration::ZERO)
            .bootstrap(
                Domain::Gui(501),
                Path::new("/Users/me/Library/LaunchAgents/x.plist"),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/bin/launchctl bootstrap gui/501 /Users/me/Library/LaunchAgents/x.plist"),
            "{err}"
        );
        assert!(
            err.contains("Input/output error") && err.contains("plutil -lint"),
            "{err}"
        );
        assert_eq!(
            s.calls.borrow().len(),
            ATTEMPTS as usize,
            "a bootstrap racing a bootout is retried"
        );
    }

    #[test]
    fn print_of_an_unloaded_service_is_none() {
        let s = scripted(vec![(
            113,
            "Could not find service \"a\" in domain for port",
        )]);
        assert_eq!(
            System::with_runner(&s)
                .print(Domain::Gui(501), "a")
                .unwrap(),
            None
        );
    }
}
