//! A node whose model file is missing copies it from a linked peer that runs
//! it, over the node protocol and so through the same tunnels (docs/PROTOCOL.md
//! §9.8–9.9), then loads it and serves without a restart.
//!
//! - [`serve`]: the other side, a node giving the file it loaded;
//! - [`download`]: one attempt from one peer, into a partial file, resumed
//!   from where the last attempt stopped and checked by its sha256;
//! - [`status`]: where it stands, for `/cluster`, the web UI and the log.
//!
//! One fetch per node: a node runs one model, and [`fetch_and_load`] is
//! started once, for it. Attempts that fail (a link lost, a peer stuck, wrong
//! bytes) are retried with a growing delay, from whichever peer offers the
//! file then.

pub mod download;
pub mod serve;
pub mod status;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::engine::ModelSlot;
use crate::inference::{fingerprint, Inference, LoadOptions};
use crate::peers::backoff::Backoff;
use crate::peers::Peers;
use crate::protocol::Message;
use crate::telemetry::Throttle;
use download::{download, Offer, Step};
use status::{FetchStatus, Meter};

/// How often a node that found no peer with its model asks again.
const ASK_AGAIN: Duration = Duration::from_millis(500);
/// How long a peer may take to say what model it has.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a running fetch writes a progress line to the log.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Fetches the model to `target` (the `--model` path, or its name in the
/// models directory), loads it with `options` and puts it in `slot`. The
/// file asked for is the one of `options.expected_sha256` (the cluster's);
/// without one, any peer's file of that name, checked against the sha256
/// that peer states. Returns when the model is in the slot, when it failed
/// to load (reported in the slot and the log), or when `stop` is cancelled.
pub async fn fetch_and_load(
    node_id: String,
    target: PathBuf,
    options: LoadOptions,
    peers: Arc<Peers>,
    slot: ModelSlot,
    stop: CancellationToken,
) {
    let file = target.display().to_string();
    let wanted = Wanted {
        target: &target,
        sha256: options.expected_sha256.as_deref(),
        hash_records: options.hash_records.as_deref(),
    };
    let Some(from) = fetch(&wanted, &peers, &slot, &stop).await else {
        return;
    };
    // What the copy came to (bytes, rate), now with what became of it.
    let copied = slot
        .fetch_status()
        .filter(|_| from.is_some())
        .unwrap_or_else(|| FetchStatus::waiting(file.clone(), None));
    let report = |state, error| {
        slot.report(FetchStatus {
            state,
            from: from.clone(),
            error,
            eta_seconds: None,
            ..copied.clone()
        })
    };
    report("loading", None);
    match Inference::load_in_background(&node_id, &target, &options).await {
        Ok(inference) => {
            slot.fill(inference);
            report("done", None);
        }
        Err(e) => {
            tracing::error!(target: "tensorlink::fetch", "the fetched model does not load: {e}");
            report("failed", Some(e.to_string()));
        }
    }
}

/// What a fetch is for, as [`fetch_and_load`] was given it.
struct Wanted<'a> {
    target: &'a Path,
    sha256: Option<&'a str>,
    /// Where the copy's sha256 is recorded, so loading it does not read it again.
    hash_records: Option<&'a Path>,
}

/// Tries peers until `wanted.target` holds the file; the peer it came from
/// (none when the file appeared by other means), or `None` when stopped.
async fn fetch(
    wanted: &Wanted<'_>,
    peers: &Peers,
    slot: &ModelSlot,
    stop: &CancellationToken,
) -> Option<Option<String>> {
    let file = wanted.target.display().to_string();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut last_error: Option<String> = None;
    // The peer the last attempt failed with is asked last next time: one
    // that answers queries but not reads must not hold the fetch for ever.
    let mut avoid: Option<String> = None;
    tracing::info!(target: "tensorlink::fetch", "the model {file} is missing: fetching it from a linked peer that runs it");
    loop {
        if !download::is_absent(wanted.target) {
            // Put there by hand meanwhile; loading checks it.
            return Some(None);
        }
        let delay = match find_offer(wanted, peers, avoid.as_deref()).await {
            Err(why) => {
                let error = last_error.clone().or(why);
                slot.report(FetchStatus::waiting(file.clone(), error));
                ASK_AGAIN
            }
            Ok(offer) => {
                let began = Instant::now();
                let result = tokio::select! {
                    // Stopped mid-copy: the partial file is resumed next time.
                    _ = stop.cancelled() => return None,
                    result = attempt(&offer, wanted, slot) => result,
                };
                match result {
                    Ok((_, download::Published::NameTaken)) => {
                        tracing::info!(target: "tensorlink::fetch", "{file} appeared while it was being fetched; the copy was deleted and that file is loaded");
                        return Some(None);
                    }
                    Ok((resumed_at, download::Published::Linked)) => {
                        let secs = began.elapsed().as_secs_f64();
                        tracing::info!(
                            target: "tensorlink::fetch",
                            peer = %offer.peer, bytes = offer.size, resumed_at,
                            mb_per_s = ((offer.size - resumed_at) as f64 / secs / 1e6).round(),
                            "fetched {file} in {secs:.1} s"
                        );
                        return Some(Some(offer.peer));
                    }
                    Err((e, progressed)) => {
                        tracing::warn!(target: "tensorlink::fetch", "fetching {file} stopped: {e}; trying again");
                        if progressed {
                            // A link lost mid-copy is not a peer that never gives.
                            backoff.reset();
                        }
                        avoid = Some(offer.peer.clone());
                        last_error = Some(e.to_string());
                        slot.report(FetchStatus::waiting(file.clone(), last_error.clone()));
                        backoff.next_delay()
                    }
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One download from `offer`, reporting as it goes: where it started and
/// what became of the copy, or why it stopped and whether it got further.
async fn attempt(
    offer: &Offer,
    wanted: &Wanted<'_>,
    slot: &ModelSlot,
) -> Result<(u64, download::Published), (download::FetchError, bool)> {
    let file = wanted.target.display().to_string();
    let meter: Mutex<Option<Meter>> = Mutex::new(None);
    let reached = std::sync::atomic::AtomicU64::new(0);
    let log = Throttle::new(LOG_EVERY);
    let report = |step: Step| {
        let mut meter = crate::net::sync::lock(&meter);
        let (state, bytes) = match step {
            Step::Checking(n) => ("checking", n),
            Step::Started(n) => {
                tracing::info!(
                    target: "tensorlink::fetch",
                    peer = %offer.peer, bytes = offer.size, resume_at = n,
                    "fetching {file} ({}) from {}", status::size(offer.size), offer.peer
                );
                *meter = Some(Meter::new(n));
                ("fetching", n)
            }
            Step::Fetched(n) => {
                reached.store(n, std::sync::atomic::Ordering::Relaxed);
                ("fetching", n)
            }
        };
        let (rate, eta_seconds) = meter
            .as_ref()
            .map_or((None, None), |m| m.read(bytes, offer.size));
        let status = FetchStatus {
            file: file.clone(),
            state,
            from: Some(offer.peer.clone()),
            bytes,
            total: Some(offer.size),
            rate,
            eta_seconds,
            error: None,
        };
        if matches!(step, Step::Fetched(_)) && log.allow().is_some() {
            tracing::info!(target: "tensorlink::fetch", "{}", status.describe());
        }
        slot.report(status);
    };
    let result = download(offer, wanted.target, &report).await;
    let started = crate::net::sync::lock(&meter)
        .as_ref()
        .map_or(0, Meter::start_bytes);
    let published = match result {
        Ok(p) => p,
        Err(e) => {
            let progressed = reached.load(std::sync::atomic::Ordering::Relaxed) > started;
            return Err((e, progressed));
        }
    };
    if published == download::Published::NameTaken {
        return Ok((started, published));
    }
    if let Some(dir) = wanted.hash_records {
        // A failure costs the load one read of the file, nothing more.
        if let Err(e) = fingerprint::record(wanted.target, dir, &offer.sha256) {
            tracing::warn!(target: "tensorlink::fetch", "{e}");
        }
    }
    Ok((started, published))
}

/// The first linked peer that runs the wanted file, `avoid` asked last, or
/// why none does.
async fn find_offer(
    wanted: &Wanted<'_>,
    peers: &Peers,
    avoid: Option<&str>,
) -> Result<Offer, Option<String>> {
    let name = wanted
        .target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The sha256 names the file; a name is only asked for without one.
    let query = match wanted.sha256 {
        Some(sha256) => Message::QueryModelFile {
            sha256: sha256.to_owned(),
            name: String::new(),
        },
        None => Message::QueryModelFile {
            sha256: String::new(),
            name,
        },
    };
    let mut linked = peers.linked();
    linked.sort_by_key(|p| Some(p.id.as_str()) == avoid);
    if linked.is_empty() {
        return Err(Some("no peer is linked".into()));
    }
    let mut refusals = Vec::new();
    for peer in linked {
        let answer = tokio::time::timeout(QUERY_TIMEOUT, peer.client.request(&query)).await;
        match answer {
            Ok(Ok(Message::ModelFileInfo { sha256, size, .. })) => {
                if wanted
                    .sha256
                    .is_some_and(|w| !w.eq_ignore_ascii_case(&sha256))
                {
                    refusals.push(format!("{} offers another file (sha256 {sha256})", peer.id));
                    continue;
                }
                return Ok(Offer {
                    peer: peer.id,
                    client: peer.client,
                    sha256,
                    size,
                });
            }
            Ok(Ok(other)) => refusals.push(format!(
                "{} answered with a {:?}",
                peer.id,
                other.frame_type()
            )),
            Ok(Err(e)) => refusals.push(format!("{}: {e}", peer.id)),
            Err(_) => refusals.push(format!("{} did not answer in {QUERY_TIMEOUT:?}", peer.id)),
        }
    }
    Err(Some(refusals.join("; ")))
}
