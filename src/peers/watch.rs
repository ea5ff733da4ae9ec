//! Follows edits to the peer file while the node runs.
//!
//! Polling, not file events: it behaves the same on macOS and Linux, survives
//! editors that replace the file instead of writing it, and a 250 ms poll of a
//! small file costs nothing. A broken edit never replaces the last good set.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::file::{self, PeerSet};

pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Publishes every new good peer set on `tx` until `stop` fires. `seen` is the
/// content the initial set was parsed from.
pub async fn follow(
    path: PathBuf,
    own_id: String,
    mut seen: Vec<u8>,
    tx: watch::Sender<PeerSet>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last broken content seen, and whether its error was logged already.
    let mut broken: Option<(Vec<u8>, bool)> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // `key` identifies what was read: the bytes, or why they could not be
        // read (deleted and unreadable are two different faults).
        let (key, parsed) = match tokio::fs::read(&path).await {
            Ok(bytes) if bytes == seen => continue,
            Ok(bytes) => {
                let parsed = file::parse(&bytes, &path, &own_id);
                (bytes, parsed)
            }
            Err(source) => (
                source.to_string().into_bytes(),
                Err(file::PeerFileError::Read {
                    path: path.clone(),
                    source,
                }),
            ),
        };
        match parsed {
            Ok(set) => {
                seen = key;
                broken = None;
                let changes = describe_changes(&tx.borrow(), &set);
                if !changes.is_empty() {
                    tracing::info!(target: "tensorlink::peers", file = %path.display(), "peer file changed: {changes}");
                    tx.send_replace(set);
                }
            }
            Err(err) => {
                // An editor writing the file can be caught half-way; only a
                // broken state that is still there on the next poll is logged,
                // and only once.
                match &mut broken {
                    Some((prev, logged)) if *prev == key => {
                        if !*logged {
                            *logged = true;
                            let kept = tx.borrow().len();
                            tracing::error!(target: "tensorlink::peers", "{err}; keeping the last good set of {kept} peer(s)");
                        }
                    }
                    _ => broken = Some((key, false)),
                }
            }
        }
    }
}

/// "added mac3 (127.0.0.1:50070); moved mac2 to 127.0.0.1:50053", or empty.
pub fn describe_changes(old: &PeerSet, new: &PeerSet) -> String {
    let mut parts = Vec::new();
    for (id, spec) in new {
        match old.get(id) {
            None => parts.push(format!("added {id} ({})", spec.address())),
            Some(prev) if prev.address() != spec.address() => {
                parts.push(format!("moved {id} to {}", spec.address()))
            }
            Some(prev) if prev != spec => parts.push(format!("updated {id}")),
            Some(_) => {}
        }
    }
    for id in old.keys().filter(|id| !new.contains_key(*id)) {
        parts.push(format!("removed {id}"));
    }
    parts.join("; ")
}
