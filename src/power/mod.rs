//! Keeping the Mac awake while it serves the cluster. An idle Mac sleeps and
//! drops every tunnel with it, and launchd's `ProcessType Interactive` does not
//! prevent that; so the node holds a "prevent idle system sleep" power
//! assertion while it has a linked peer or a request in flight, and lets it go
//! otherwise (or never takes it, with `--allow-sleep`). The assertion does not
//! stop sleep for a closed laptop lid, the Apple menu or a low battery: macOS
//! sleeps then regardless.
//!
//! The system call sits behind [`Power`] so the policy is tested anywhere with
//! a recording fake; on Apple platforms [`system`] is IOKit's
//! `IOPMAssertionCreateWithName`, whose assertion macOS also releases when the
//! process dies, so a crashed node never keeps a Mac awake.

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::net::sync::lock;

#[cfg(target_vendor = "apple")]
mod iokit;

/// An assertion handed out by a [`Power`].
pub type AssertionId = u32;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PowerError {
    #[error("power assertions are not available on this platform")]
    Unsupported,
    #[error("{call} failed with IOReturn {code:#x}")]
    Failed { call: &'static str, code: i32 },
}

/// The operating system's sleep control.
pub trait Power: Send + Sync {
    /// Prevents idle system sleep until released; `name` is what
    /// `pmset -g assertions` shows for it.
    fn prevent_idle_sleep(&self, name: &str) -> Result<AssertionId, PowerError>;
    fn release(&self, id: AssertionId);
}

/// This platform's power control: IOKit on Apple platforms, none elsewhere.
pub fn system() -> Box<dyn Power> {
    #[cfg(target_vendor = "apple")]
    {
        Box::new(iokit::IoKit)
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        Box::new(Unsupported)
    }
}

/// Where there is no power assertion to take (Linux: nothing to do).
pub struct Unsupported;

impl Power for Unsupported {
    fn prevent_idle_sleep(&self, _name: &str) -> Result<AssertionId, PowerError> {
        Err(PowerError::Unsupported)
    }

    fn release(&self, _id: AssertionId) {}
}

/// What keeps the node busy right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    pub linked_peers: usize,
    pub requests: usize,
}

/// What `/cluster` and the web UI show.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PowerStatus {
    /// The node holds a "prevent idle system sleep" assertion now.
    pub preventing_sleep: bool,
    /// `--allow-sleep`: the node never takes one.
    pub allow_sleep: bool,
    /// Why it holds one, or why not.
    pub reason: String,
    /// The last failure to take one, if taking one failed.
    pub error: Option<String>,
}

/// The node's sleep policy: holds an assertion exactly while there is work.
pub struct KeepAwake {
    power: Box<dyn Power>,
    name: String,
    allow_sleep: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    held: Option<AssertionId>,
    work: Work,
    error: Option<PowerError>,
}

impl KeepAwake {
    pub fn new(power: Box<dyn Power>, node_id: &str, allow_sleep: bool) -> Self {
        // IOKit takes names of up to 128 characters.
        let mut name = format!("tensorlink node {node_id}: serving the cluster");
        if name.len() > 128 {
            let mut end = 128;
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            name.truncate(end);
        }
        KeepAwake {
            power,
            name,
            allow_sleep,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Takes or releases the assertion to match `work`.
    pub fn update(&self, work: Work) {
        let mut state = self.state();
        state.work = work;
        let wanted = !self.allow_sleep && (work.linked_peers > 0 || work.requests > 0);
        match (wanted, state.held) {
            (true, None) => match self.power.prevent_idle_sleep(&self.name) {
                Ok(id) => {
                    state.held = Some(id);
                    state.error = None;
                    tracing::info!(target: "tensorlink::power", peers = work.linked_peers, requests = work.requests, "preventing idle sleep while serving the cluster");
                }
                Err(e) => {
                    if state.error.as_ref() != Some(&e) {
                        tracing::warn!(target: "tensorlink::power", "cannot prevent idle sleep: {e}");
                    }
                    state.error = Some(e);
                }
            },
            (false, Some(id)) => {
                self.power.release(id);
                state.held = None;
                tracing::info!(target: "tensorlink::power", "idle: the Mac may sleep again");
            }
            _ => {}
        }
    }

    pub fn status(&self) -> PowerStatus {
        let state = self.state();
        let Work {
            linked_peers,
            requests,
        } = state.work;
        let reason = if self.allow_sleep {
            "--allow-sleep: the Mac may sleep whenever it is idle".to_owned()
        } else if linked_peers == 0 && requests == 0 {
            "idle: no linked peer and no request".to_owned()
        } else {
            format!("{linked_peers} linked peer(s), {requests} request(s) in flight")
        };
        PowerStatus {
            preventing_sleep: state.held.is_some(),
            allow_sleep: self.allow_sleep,
            reason,
            error: state.error.as_ref().map(ToString::to_string),
        }
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        if let Some(id) = self.state().held.take() {
            self.power.release(id);
        }
    }
}

/// How often the node's work is looked at: a peer linking is noticed within a
/// second, far inside any idle-sleep timer (a minute at least).
pub const POLL: Duration = Duration::from_secs(1);

/// Keeps `keep` matched to `work()` until `stop`.
pub async fn follow(
    keep: std::sync::Arc<KeepAwake>,
    work: impl Fn() -> Work + Send + 'static,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => keep.update(work()),
        }
    }
    keep.update(Work::default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Records every call, as the real assertions would be taken and released.
    #[derive(Default, Clone)]
    struct Recording {
        calls: Arc<Mutex<Vec<String>>>,
        fail: bool,
    }

    impl Power for Recording {
        fn prevent_idle_sleep(&self, name: &str) -> Result<AssertionId, PowerError> {
            let mut calls = self.calls.lock().unwrap();
            if self.fail {
                calls.push("refused".into());
                return Err(PowerError::Failed {
                    call: "IOPMAssertionCreateWithName",
                    code: 0x2c1,
                });
            }
            calls.push(format!("prevent {name}"));
            Ok(calls.len() as u32)
        }

        fn release(&self, id: AssertionId) {
            self.calls.lock().unwrap().push(format!("release {id}"));
        }
    }

    fn work(linked_peers: usize, requests: usize) -> Work {
        Work {
            linked_peers,
            requests,
        }
    }

    #[test]
    fn held_while_there_is_work_and_released_when_idle() {
        let fake = Recording::default();
        let keep = KeepAwake::new(Box::new(fake.clone()), "mac1", false);
        keep.update(work(0, 0));
        assert!(!keep.status().preventing_sleep);
        keep.update(work(1, 0));
        keep.update(work(1, 2));
        keep.update(work(0, 1));
        let s = keep.status();
        assert!(s.preventing_sleep);
        assert_eq!(s.reason, "0 linked peer(s), 1 request(s) in flight");
        keep.update(work(0, 0));
        assert!(!keep.status().preventing_sleep);
        keep.update(work(2, 0));
        drop(keep);
        assert_eq!(
            *fake.calls.lock().unwrap(),
            [
                "prevent tensorlink node mac1: serving the cluster",
                "release 1",
                "prevent tensorlink node mac1: serving the cluster",
                "release 3",
            ],
            "one assertion per busy period, released on drop too"
        );
    }

    #[test]
    fn allow_sleep_never_takes_one() {
        let fake = Recording::default();
        let keep = KeepAwake::new(Box::new(fake.clone()), "mac1", true);
        keep.update(work(3, 1));
        let s = keep.status();
        assert!(!s.preventing_sleep && s.allow_sleep);
        assert!(s.reason.contains("--allow-sleep"), "{}", s.reason);
        assert!(fake.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn a_refusal_is_shown_and_retried() {
        let fake = Recording {
            fail: true,
            ..Recording::default()
        };
        let keep = KeepAwake::new(Box::new(fake.clone()), &"x".repeat(300), false);
        keep.update(work(1, 0));
        keep.update(work(1, 0));
        let s = keep.status();
        assert!(!s.preventing_sleep);
        assert_eq!(
            s.error.as_deref(),
            Some("IOPMAssertionCreateWithName failed with IOReturn 0x2c1")
        );
        assert_eq!(fake.calls.lock().unwrap().len(), 2);
        assert!(keep.name.len() <= 128);
    }

    #[tokio::test(start_paused = true)]
    async fn follow_releases_when_stopped() {
        let fake = Recording::default();
        let keep = Arc::new(KeepAwake::new(Box::new(fake.clone()), "mac1", false));
        let stop = CancellationToken::new();
        let task = tokio::spawn(follow(keep.clone(), || work(1, 0), stop.clone()));
        tokio::time::sleep(POLL * 3).await;
        assert!(keep.status().preventing_sleep);
        stop.cancel();
        task.await.unwrap();
        assert!(!keep.status().preventing_sleep);
        assert_eq!(fake.calls.lock().unwrap().len(), 2);
    }
}
