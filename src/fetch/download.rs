//! One attempt to copy the model from one peer (docs/PROTOCOL.md §9.9).
//!
//! Reads of [`CHUNK`] bytes are kept [`DEPTH`] deep on the link, each its own
//! task so that the next is on the wire while one is written: the tunnel, not
//! the round trip, sets the pace. Answers are written in offset order to
//! `<name>.partial` and hashed while they are written, so the digest is ready
//! when the last byte is. A partial file from an earlier attempt is hashed
//! first and continued, never rewritten; `<name>.partial.sha256` says which
//! file it is a prefix of, so a partial file begun for another is started
//! again. The model's own name appears only once the whole file's sha256 is
//! right, and never over a file that is there.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::net::client::{Client, RequestError};
use crate::protocol::Message;

/// Bytes per read: large enough that a frame's header and the file write are
/// noise, small enough that 8 in flight are a modest buffer.
pub const CHUNK: u32 = 4 << 20;
/// Reads in flight on the link.
pub const DEPTH: usize = 8;
/// A read not answered in this long ends the attempt: the peer is stuck
/// although its link is up.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Space left free beyond the file, for everything else on the disk.
const SPARE_BYTES: u64 = 256 << 20;

/// A linked peer's answer to QueryModelFile: what it can give.
#[derive(Clone)]
pub struct Offer {
    pub peer: String,
    pub client: Client,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("{peer} did not answer: {source}")]
    Peer {
        peer: String,
        #[source]
        source: RequestError,
    },
    #[error("{peer} answered a read of bytes {offset}..+{len} with {got}")]
    BadAnswer {
        peer: String,
        offset: u64,
        len: u32,
        got: String,
    },
    #[error("{peer} sent nothing for {READ_TIMEOUT:?} although its link is up")]
    Stalled { peer: String },
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{dir} has {free} MiB free, and the rest of the model needs {need} MiB and {spare} MiB to spare: \
         free space there",
        dir = .dir.display(), free = .free >> 20, need = .need >> 20, spare = SPARE_BYTES >> 20
    )]
    NoSpace { dir: PathBuf, free: u64, need: u64 },
    #[error(
        "the file from {peer} has sha256 {got}, not {want}: {}; the partial file was deleted",
        if *.resumed {
            "it, or the copy this one resumed, sent wrong bytes"
        } else {
            "it sent wrong bytes"
        }
    )]
    Mismatch {
        peer: String,
        got: String,
        want: String,
        /// The copy continued one an earlier attempt had begun.
        resumed: bool,
    },
}

/// Where a fetch stands, reported after every chunk.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// Hashing what an earlier attempt left, this many bytes.
    Checking(u64),
    /// Reading from the peer from this byte on.
    Started(u64),
    /// Bytes of the file on disk and hashed.
    Fetched(u64),
}

/// The partial file of `target`, beside it.
pub fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    target.with_file_name(name)
}

/// The file beside the partial one that says which file it is a prefix of:
/// the sha256 it is being copied for.
fn claim_path(partial: &Path) -> PathBuf {
    let mut name = partial.file_name().unwrap_or_default().to_owned();
    name.push(".sha256");
    partial.with_file_name(name)
}

/// What became of a finished copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The copy now has the model's name.
    Linked,
    /// Something else took the name meanwhile; the copy was deleted and that
    /// file is left as it is.
    NameTaken,
}

/// Copies `offer` to `target`; on `Linked`, `target` is the copy, whose
/// sha256 is the offer's.
pub async fn download(
    offer: &Offer,
    target: &Path,
    report: &(dyn Fn(Step) + Send + Sync),
) -> Result<Published, FetchError> {
    let partial = partial_path(target);
    let claim = claim_path(&partial);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| FetchError::Io { what, path, source }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .map_err(io("cannot open", &partial))?;
    let mut have = file.metadata().map_err(io("cannot read", &partial))?.len();
    // A partial file is resumed only for the very file it was begun for.
    let claimed = std::fs::read_to_string(&claim).unwrap_or_default();
    if have > offer.size || !claimed.trim().eq_ignore_ascii_case(&offer.sha256) {
        file.set_len(0).map_err(io("cannot truncate", &partial))?;
        have = 0;
        std::fs::write(&claim, &offer.sha256).map_err(io("cannot write", &claim))?;
    }
    let resumed = have > 0;
    check_space(target, offer.size - have)?;

    report(Step::Checking(have));
    let file = Arc::new(file);
    let hasher = {
        let (file, partial) = (file.clone(), partial.clone());
        blocking(move || hash_prefix(&file, have).map_err(io("cannot read", &partial))).await?
    };
    report(Step::Started(have));
    let hasher = fetch_rest(offer, &file, &partial, have, hasher, report).await?;

    let got = format!("{:x}", hasher.finalize());
    if !got.eq_ignore_ascii_case(&offer.sha256) {
        std::fs::remove_file(&partial).map_err(io("cannot delete", &partial))?;
        let _ = std::fs::remove_file(&claim);
        return Err(FetchError::Mismatch {
            peer: offer.peer.clone(),
            got,
            want: offer.sha256.clone(),
            resumed,
        });
    }
    file.sync_all().map_err(io("cannot flush", &partial))?;
    drop(file);
    let published =
        publish(&partial, target).map_err(io("cannot name the fetched file", target))?;
    let _ = std::fs::remove_file(&claim);
    Ok(published)
}

/// Reads from `have` to the end, `DEPTH` reads in flight, written in order.
async fn fetch_rest(
    offer: &Offer,
    file: &Arc<File>,
    partial: &Path,
    mut have: u64,
    mut hasher: Sha256,
    report: &(dyn Fn(Step) + Send + Sync),
) -> Result<Sha256, FetchError> {
    let mut next = have;
    let mut reads = InFlight::default();
    while have < offer.size {
        while reads.0.len() < DEPTH && next < offer.size {
            let len = (offer.size - next).min(CHUNK as u64) as u32;
            let (client, sha256, offset) = (offer.client.clone(), offer.sha256.clone(), next);
            let read = tokio::spawn(async move {
                client
                    .request(&Message::ReadModelFile {
                        sha256,
                        offset,
                        len,
                    })
                    .await
            });
            reads.0.push_back((offset, len, read));
            next += len as u64;
        }
        let Some((offset, len, read)) = reads.0.pop_front() else {
            break;
        };
        let mut read = read;
        let answer = match tokio::time::timeout(READ_TIMEOUT, &mut read).await {
            Err(_) => {
                read.abort();
                return Err(FetchError::Stalled {
                    peer: offer.peer.clone(),
                });
            }
            Ok(Err(e)) => {
                return Err(FetchError::BadAnswer {
                    peer: offer.peer.clone(),
                    offset,
                    len,
                    got: format!("a failed task ({e})"),
                })
            }
            Ok(Ok(answer)) => answer,
        };
        let data = match answer {
            Ok(Message::ModelBytes { offset: at, data })
                if at == offset && data.len() == len as usize =>
            {
                data
            }
            Ok(other) => {
                return Err(FetchError::BadAnswer {
                    peer: offer.peer.clone(),
                    offset,
                    len,
                    got: describe(&other),
                })
            }
            Err(source) => {
                return Err(FetchError::Peer {
                    peer: offer.peer.clone(),
                    source,
                })
            }
        };
        // Written and hashed at once, on two threads: a chunk costs the
        // slower of the two, not their sum.
        let (f, path, bytes) = (file.clone(), partial.to_owned(), data.clone());
        let write = blocking(move || {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&bytes, offset)
                .map_err(|source| FetchError::Io {
                    what: "cannot write",
                    path,
                    source,
                })
        });
        let hash = blocking(move || {
            hasher.update(&data);
            Ok(hasher)
        });
        let (written, hashed) = tokio::join!(write, hash);
        written?;
        hasher = hashed?;
        have = offset + len as u64;
        report(Step::Fetched(have));
    }
    Ok(hasher)
}

type PendingRead = (u64, u32, JoinHandle<Result<Message, RequestError>>);

/// The reads on the link, oldest first; those still in flight when an
/// attempt ends are aborted with it.
#[derive(Default)]
struct InFlight(VecDeque<PendingRead>);

impl Drop for InFlight {
    fn drop(&mut self) {
        for (_, _, read) in self.0.drain(..) {
            read.abort();
        }
    }
}

fn describe(answer: &Message) -> String {
    match answer {
        Message::ModelBytes { offset, data } => format!("{} bytes at {offset}", data.len()),
        other => format!("a {:?}", other.frame_type()),
    }
}

/// The sha256 state after the first `len` bytes of `file`.
fn hash_prefix(file: &File, len: u64) -> std::io::Result<Sha256> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher)
}

/// The fetched file under the model's name, only if nothing is there: a
/// hard link fails on an existing name where a rename would replace it. A
/// filesystem without hard links gets a rename after a last look.
fn publish(partial: &Path, target: &Path) -> std::io::Result<Published> {
    match std::fs::hard_link(partial, target) {
        Ok(()) => std::fs::remove_file(partial).map(|()| Published::Linked),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Someone put a file (or a link) there meanwhile; it is theirs.
            std::fs::remove_file(partial).map(|()| Published::NameTaken)
        }
        // Not even a dangling symbolic link there; the window between this
        // look and the rename is the one a filesystem without links leaves.
        Err(_) if is_absent(target) => std::fs::rename(partial, target).map(|()| Published::Linked),
        Err(e) => Err(e),
    }
}

/// Nothing at all at `path`, not even a symbolic link to nowhere.
pub fn is_absent(path: &Path) -> bool {
    matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

fn check_space(target: &Path, need: u64) -> Result<(), FetchError> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let Ok(stat) = nix::sys::statvfs::statvfs(dir) else {
        // Unknown: the write itself reports a full disk.
        return Ok(());
    };
    // The field types are the platform's (32-bit block counts on macOS).
    #[allow(clippy::unnecessary_cast)]
    let free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
    if free < need.saturating_add(SPARE_BYTES) {
        return Err(FetchError::NoSpace {
            dir: dir.to_owned(),
            free,
            need,
        });
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FetchError> + Send + 'static,
) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(FetchError::Io {
            what: "a file task failed for",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}
