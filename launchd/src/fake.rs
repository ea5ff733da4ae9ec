//! A launchctl that records what it is asked and keeps a model of what is
//! loaded, so tests can assert the exact commands an install sequence issues.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use crate::agent::LaunchAgent;
use crate::launchctl::{Domain, Launchctl, LaunchctlError, ServiceStatus};

#[derive(Default)]
pub struct Recording {
    commands: RefCell<Vec<String>>,
    /// label → pid of the loaded agents.
    loaded: RefCell<BTreeMap<String, u32>>,
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

    pub fn is_loaded(&self, label: &str) -> bool {
        self.loaded.borrow().contains_key(label)
    }

    fn record(&self, line: String) {
        self.commands.borrow_mut().push(line);
    }

    fn start(&self, label: &str) {
        let mut pid = self.next_pid.borrow_mut();
        *pid += 1;
        self.loaded
            .borrow_mut()
            .insert(label.to_owned(), 1000 + *pid);
    }
}

impl Launchctl for Recording {
    fn bootstrap(&self, domain: Domain, plist: &Path) -> Result<(), LaunchctlError> {
        let command = format!("launchctl bootstrap {domain} {}", plist.display());
        self.record(command.clone());
        let agent = std::fs::read(plist)
            .ok()
            .and_then(|b| LaunchAgent::from_bytes(&b).ok())
            .ok_or_else(|| LaunchctlError::Failed {
                command: command.clone(),
                status: "exit status: 5".into(),
                output: "Bootstrap failed: 5: Input/output error".into(),
            })?;
        if self.is_loaded(&agent.label) {
            return Err(LaunchctlError::Failed {
                command,
                status: "exit status: 5".into(),
                output: "Bootstrap failed: 5: Input/output error (already loaded)".into(),
            });
        }
        self.start(&agent.label);
        Ok(())
    }

    fn bootout(&self, domain: Domain, label: &str) -> Result<(), LaunchctlError> {
        self.record(format!("launchctl bootout {}", domain.service(label)));
        self.loaded.borrow_mut().remove(label);
        Ok(())
    }

    fn enable(&self, domain: Domain, label: &str) -> Result<(), LaunchctlError> {
        self.record(format!("launchctl enable {}", domain.service(label)));
        Ok(())
    }

    fn kickstart(&self, domain: Domain, label: &str, kill: bool) -> Result<(), LaunchctlError> {
        let k = if kill { "-k " } else { "" };
        self.record(format!("launchctl kickstart {k}{}", domain.service(label)));
        if self.is_loaded(label) {
            self.start(label);
        }
        Ok(())
    }

    fn print(&self, domain: Domain, label: &str) -> Result<Option<ServiceStatus>, LaunchctlError> {
        self.record(format!("launchctl print {}", domain.service(label)));
        Ok(self.loaded.borrow().get(label).map(|&pid| ServiceStatus {
            state: "running".into(),
            pid: Some(pid),
            last_exit: Some("(never exited)".into()),
            runs: Some(1),
        }))
    }
}
