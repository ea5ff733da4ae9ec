//! The live peer set: which peers the file names, which links are up, and the
//! link task behind each. The peer file's set is applied here as a diff, so an
//! edit touches only the peers it changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::file::{PeerSet, PeerSpec};
use super::link::{self, LinkTiming};
use crate::capabilities::DeviceCapabilities;
use crate::net::client::Client;
use crate::net::sync::lock;
use crate::protocol::Hello;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Not linked yet, or redialing after a failure.
    Connecting,
    Up,
    /// The peer answered but the link was refused (wrong node id, version).
    Refused,
}

/// A peer as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    pub id: String,
    pub address: String,
    pub state: LinkState,
    /// Milliseconds since the Unix epoch of the last state change.
    pub since_ms: u64,
    /// How many times the link came up.
    pub links: u64,
    pub last_error: Option<String>,
    pub device_capabilities: DeviceCapabilities,
    /// `handshake` once the peer introduced itself, else `peer_file`.
    pub capabilities_from: &'static str,
}

/// A linked peer, for requests and topology.
#[derive(Clone)]
pub struct LinkedPeer {
    pub id: String,
    pub address: String,
    pub client: Client,
}

struct Entry {
    spec: PeerSpec,
    state: LinkState,
    since: SystemTime,
    links: u64,
    last_error: Option<String>,
    /// What the peer said of itself in its last hello.
    hello_caps: Option<DeviceCapabilities>,
    client: Option<Client>,
    cancel: CancellationToken,
}

impl Entry {
    fn linked(&self) -> Option<LinkedPeer> {
        let client = self.client.as_ref().filter(|c| !c.is_closed())?;
        Some(LinkedPeer {
            id: self.spec.id.clone(),
            address: self.spec.address(),
            client: client.clone(),
        })
    }
}

pub struct Peers {
    hello: Hello,
    timing: LinkTiming,
    entries: Mutex<BTreeMap<String, Entry>>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Peers {
    pub fn new(
        hello: Hello,
        timing: LinkTiming,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Peers {
            hello,
            timing,
            entries: Mutex::new(BTreeMap::new()),
            stop,
            tracker,
        })
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    pub fn timing(&self) -> &LinkTiming {
        &self.timing
    }

    /// Makes the running links match `set`: new peers are dialed, removed ones
    /// closed, moved ones redialed at their new address; others are untouched.
    pub fn apply(self: &Arc<Self>, set: &PeerSet) {
        let mut entries = lock(&self.entries);
        entries.retain(|id, e| {
            let keep = set.get(id).is_some_and(|s| s.address() == e.spec.address());
            if !keep {
                e.cancel.cancel();
            }
            keep
        });
        for (id, spec) in set {
            if let Some(e) = entries.get_mut(id) {
                e.spec = spec.clone();
                continue;
            }
            let cancel = self.stop.child_token();
            self.tracker
                .spawn(link::run(self.clone(), spec.clone(), cancel.clone()));
            entries.insert(
                id.clone(),
                Entry {
                    spec: spec.clone(),
                    state: LinkState::Connecting,
                    since: SystemTime::now(),
                    links: 0,
                    last_error: None,
                    hello_caps: None,
                    client: None,
                    cancel,
                },
            );
        }
    }

    pub(super) fn set_up(&self, id: &str, client: Client) {
        self.update(id, |e| {
            e.hello_caps = Some(client.peer().capabilities.clone());
            e.client = Some(client);
            e.links += 1;
            e.last_error = None;
            LinkState::Up
        });
    }

    pub(super) fn set_down(&self, id: &str, reason: String) {
        self.update(id, |e| {
            e.client = None;
            e.last_error = Some(reason);
            LinkState::Connecting
        });
    }

    pub(super) fn set_failed(&self, id: &str, reason: String, refused: bool) {
        self.update(id, |e| {
            e.last_error = Some(reason);
            if refused {
                LinkState::Refused
            } else {
                LinkState::Connecting
            }
        });
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Entry) -> LinkState) {
        if let Some(e) = lock(&self.entries).get_mut(id) {
            let state = f(e);
            if state != e.state {
                e.state = state;
                e.since = SystemTime::now();
            }
        }
    }

    /// Peers whose link is up right now.
    pub fn linked(&self) -> Vec<LinkedPeer> {
        lock(&self.entries)
            .values()
            .filter_map(Entry::linked)
            .collect()
    }

    /// The link to `id` if it is up: one lookup, for the inference hot path.
    pub fn linked_to(&self, id: &str) -> Option<LinkedPeer> {
        lock(&self.entries).get(id).and_then(Entry::linked)
    }

    pub fn views(&self) -> Vec<PeerView> {
        lock(&self.entries)
            .values()
            .map(|e| {
                let (caps, from) = match (&e.hello_caps, &e.spec.capabilities) {
                    (Some(c), _) => (c.clone(), "handshake"),
                    (None, Some(c)) => (c.clone(), "peer_file"),
                    (None, None) => (DeviceCapabilities::default(), "peer_file"),
                };
                PeerView {
                    id: e.spec.id.clone(),
                    address: e.spec.address(),
                    state: e.state,
                    since_ms: e
                        .since
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0),
                    links: e.links,
                    last_error: e.last_error.clone(),
                    device_capabilities: caps,
                    capabilities_from: from,
                }
            })
            .collect()
    }
}
