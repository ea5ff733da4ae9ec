//! A launchctl that records what it is asked and keeps a model of what is
//! loaded, so tests can assert the exact commands an install sequence issues.
//! It can also play the Mac's harder states: a user with no login session at
//! the screen (no `gui/<uid>` domain) and a service that crash-loops or was
//! killed by a signal.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::agent::LaunchAgent;
use crate::launchctl::{Domain, Launchctl, LaunchctlError, ServiceStatus, NO_SESSION};

#[derive(Default)]
pub struct Recording {
    commands: RefCell<Vec<String>>,
    /// (domain, label) → what `print` reports of the loaded services.
    loaded: RefCell<BTreeMap<(String, String), ServiceStatus>>,
    /// Domains that do not exist now (a `gui/<uid>` with nobody logged in).
    missing: RefCell<BTreeSet<String>>,
    next_pid: RefCell<u32>,
}

impl Recording {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every command so far, as `launchctl <verb> <args>`.
    pub fn commands(&self) -> Vec<String> {
        self.commands.borrow().clone()
    }

    /// The commands that change state (everything but `print`), then forgets all.
    pub fn take_changes(&self) -> Vec<String> {
        let all = std::mem::take(&mut *self.commands.borrow_mut());
        all.into_iter()
            .filter(|c| !c.starts_with("launchctl print"))
            .collect()
    }

    pub fn is_loaded(&self, domain: Domain, label: &str) -> bool {
        self.loaded.borrow().contains_key(&key(domain, label))
    }

    /// From now on the domain is absent, as `gui/<uid>` is while its user is
    /// not logged in at the screen (launchctl answers 125); or present again.
    pub fn set_domain_present(&self, domain: Domain, present: bool) {
        let mut missing = self.missing.borrow_mut();
        if present {
            missing.remove(&domain.to_string());
        } else {
            missing.insert(domain.to_string());
        }
    }

    /// Makes `print` report `status` for a service, loaded from now on: a
    /// crash loop (`runs` climbing, a failing last exit), a signal death, a stall.
    pub fn set_status(&self, domain: Domain, label: &str, status: ServiceStatus) {
        self.loaded.borrow_mut().insert(key(domain, label), status);
    }

    fn record(&self, line: String) {
        self.commands.borrow_mut().push(line);
    }

    fn refuse_missing(&self, domain: Domain, command: &str) -> Result<(), LaunchctlError> {
        if !self.missing.borrow().contains(&domain.to_string()) {
            return Ok(());
        }
        Err(LaunchctlError::Failed {
            command: command.to_owned(),
            status: format!("exit status: {NO_SESSION}"),
            code: Some(NO_SESSION),
            output: "Domain does not support specified action".into(),
        })
    }

    fn start(&self, domain: Domain, label: &str) {
        let mut pid = self.next_pid.borrow_mut();
        *pid += 1;
        let mut loaded = self.loaded.borrow_mut();
        let runs = loaded
            .get(&key(domain, label))
            .and_then(|s| s.runs)
            .unwrap_or(0);
        loaded.insert(
            key(domain, label),
            ServiceStatus {
                state: "running".into(),
                pid: Some(1000 + *pid),
                last_exit: Some("(never exited)".into()),
                last_signal: None,
                runs: Some(runs + 1),
            },
        );
    }
}

fn key(domain: Domain, label: &str) -> (String, String) {
    (domain.to_string(), label.to_owned())
}

impl Launchctl for Recording {
    fn bootstrap(&self, domain: Domain, plist: &Path) -> Result<(), LaunchctlError> {
        let command = format!("launchctl bootstrap {domain} {}", plist.display());
        self.record(command.clone());
        self.refuse_missing(domain, &command)?;
        let failed = |output: &str| LaunchctlError::Failed {
            command: command.clone(),
            status: "exit status: 5".into(),
            code: Some(5),
            output: output.into(),
        };
        let agent = std::fs::read(plist)
            .ok()
            .and_then(|b| LaunchAgent::from_bytes(&b).ok())
            .ok_or_else(|| failed("Bootstrap failed: 5: Input/output error"))?;
        if self.is_loaded(domain, &agent.label) {
            return Err(failed(
                "Bootstrap failed: 5: Input/output error (already loaded)",
            ));
        }
        self.start(domain, &agent.label);
        Ok(())
    }

    fn bootout(&self, domain: Domain, label: &str) -> Result<(), LaunchctlError> {
        let command = format!("launchctl bootout {}", domain.service(label));
        self.record(command.clone());
        self.refuse_missing(domain, &command)?;
        self.loaded.borrow_mut().remove(&key(domain, label));
        Ok(())
    }

    fn enable(&self, domain: Domain, label: &str) -> Result<(), LaunchctlError> {
        let command = format!("launchctl enable {}", domain.service(label));
        self.record(command.clone());
        self.refuse_missing(domain, &command)
    }

    fn kickstart(&self, domain: Domain, label: &str, kill: bool) -> Result<(), LaunchctlError> {
        let k = if kill { "-k " } else { "" };
        let command = format!("launchctl kickstart {k}{}", domain.service(label));
        self.record(command.clone());
        self.refuse_missing(domain, &command)?;
        if self.is_loaded(domain, label) {
            self.start(domain, label);
        }
        Ok(())
    }

    fn print(&self, domain: Domain, label: &str) -> Result<Option<ServiceStatus>, LaunchctlError> {
        self.record(format!("launchctl print {}", domain.service(label)));
        Ok(self.loaded.borrow().get(&key(domain, label)).cloned())
    }

    fn has_domain(&self, domain: Domain) -> Result<bool, LaunchctlError> {
        self.record(format!("launchctl print {domain}"));
        Ok(!self.missing.borrow().contains(&domain.to_string()))
    }
}
