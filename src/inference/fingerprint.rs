//! The model file's sha256, remembered between starts. Nodes prove they hold
//! byte-identical weights by their sha256, and hashing a 40 GB file takes
//! minutes; so the hash is kept beside what identifies the file on disk — its
//! path, device, inode, size, modification time and status-change time — and
//! trusted again while all are unchanged. A file replaced by another (a new
//! download renamed over it) has another inode; one written in place has a
//! new status-change time, which unlike the modification time no tool can set
//! back (`touch -r`, `cp -p` and `rsync -t` restore only the latter). What
//! this cannot see is a change below the filesystem (a failing disk): a
//! record is trusted for what the file was when it was hashed. The file's
//! identity is taken again after hashing and nothing is recorded if it moved
//! meanwhile.
//!
//! One small JSON record per model path, written to a temporary file and
//! renamed, so nodes sharing a cache directory never read half a record. A
//! record that is missing, unreadable or for another file is ignored: the file
//! is hashed again and the record rewritten.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::InferenceError;

/// Overrides where records live: a directory, or `off` for none.
pub const DIR_ENV: &str = "TENSORLINK_HASH_RECORDS";

/// Where the records live: [`DIR_ENV`] when set, else the user's cache
/// directory (~/Library/Caches on macOS, $XDG_CACHE_HOME elsewhere), which
/// the system may clear at will.
pub fn default_dir() -> Option<PathBuf> {
    match std::env::var_os(DIR_ENV) {
        Some(v) if v == "off" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => dirs::cache_dir().map(|d| d.join("tensorlink").join("sha256")),
    }
}

/// A file's sha256 and whether it came from a record rather than a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub sha256: String,
    pub remembered: bool,
}

/// What identifies a file's contents on disk, short of reading them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    path: PathBuf,
    size: u64,
    modified_s: u64,
    modified_ns: u32,
    /// Device, inode and status-change time (seconds, nanoseconds).
    inode: [i64; 4],
}

#[derive(Serialize, Deserialize)]
struct Record {
    #[serde(flatten)]
    identity: Identity,
    sha256: String,
}

/// The sha256 of the model at `path`: from the record in `dir` when it is
/// for this very file, else read in full (and recorded, when `dir` is given).
/// Failing to write the record costs the next start a read, nothing more, so
/// it is not an error.
pub fn sha256(path: &Path, dir: Option<&Path>) -> Result<Fingerprint, InferenceError> {
    let before = identity(path)?;
    let record = dir.map(|d| d.join(record_name(&before.path)));
    if let Some(sha256) = record.as_deref().and_then(|r| remembered(r, &before)) {
        return Ok(Fingerprint {
            sha256,
            remembered: true,
        });
    }
    let sha256 = sha256_file(path)?;
    let unchanged = before == identity(path)?;
    if let Some(record) = record.filter(|_| unchanged) {
        if let Err(e) = remember(&record, before, &sha256) {
            tracing::warn!(
                "cannot record the model's sha256 in {} ({e}); the next start hashes it again",
                record.display()
            );
        }
    }
    Ok(Fingerprint {
        sha256,
        remembered: false,
    })
}

/// Remembers `sha256` for the file at `path` as it is now, in `dir`: for a
/// file whose digest was taken as it was written (a fetched model), so that
/// loading it does not read it all again.
pub fn record(path: &Path, dir: &Path, sha256: &str) -> Result<(), InferenceError> {
    let identity = identity(path)?;
    let record = dir.join(record_name(&identity.path));
    remember(&record, identity, sha256).map_err(|e| InferenceError::Io {
        what: format!("cannot record the sha256 in {}", record.display()),
        source: e,
    })
}

/// sha256 of the whole file, streamed: every node must hold byte-identical
/// weights, and a name or a size says nothing about that.
pub fn sha256_file(path: &Path) -> Result<String, InferenceError> {
    let io = |e| InferenceError::Io {
        what: format!("cannot read the model {} to hash it", path.display()),
        source: e,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn identity(path: &Path) -> Result<Identity, InferenceError> {
    let io = |e| InferenceError::Io {
        what: format!("cannot read the model {}", path.display()),
        source: e,
    };
    let path = fs::canonicalize(path).map_err(io)?;
    let meta = fs::metadata(&path).map_err(io)?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    Ok(Identity {
        path,
        size: meta.len(),
        modified_s: modified.as_secs(),
        modified_ns: modified.subsec_nanos(),
        inode: inode(&meta),
    })
}

#[cfg(unix)]
fn inode(meta: &fs::Metadata) -> [i64; 4] {
    use std::os::unix::fs::MetadataExt;
    // Device and inode numbers are reinterpreted, not converted: only
    // equality matters.
    [
        meta.dev() as i64,
        meta.ino() as i64,
        meta.ctime(),
        meta.ctime_nsec(),
    ]
}

/// Without inodes the size and modification time must do.
#[cfg(not(unix))]
fn inode(_: &fs::Metadata) -> [i64; 4] {
    [0; 4]
}

/// One record per canonical path, named by a hash of it so any path makes a
/// valid file name.
fn record_name(path: &Path) -> String {
    let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.json")
}

fn remembered(record: &Path, identity: &Identity) -> Option<String> {
    let text = fs::read_to_string(record).ok()?;
    let record: Record = serde_json::from_str(&text).ok()?;
    (record.identity == *identity && is_sha256(&record.sha256)).then_some(record.sha256)
}

/// 64 hexadecimal digits, as a sha256 is written.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn remember(record: &Path, identity: Identity, sha256: &str) -> std::io::Result<()> {
    let dir = record.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(&Record {
        identity,
        sha256: sha256.to_owned(),
    })?;
    // Named by process, so two nodes recording at once never share one.
    let partial = record.with_extension(format!("{}.partial", std::process::id()));
    fs::write(&partial, text)
        .and_then(|()| fs::rename(&partial, record))
        .inspect_err(|_| {
            let _ = fs::remove_file(&partial);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256 of "tensorlink\n", as `sha256sum` prints it.
    const KNOWN: &str = "d2af964b31b86ff1454cd99ec504c6e04d2e4abb7ba618a85dfbc4ba20ea4c5f";

    fn setup(contents: &[u8]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model.gguf");
        fs::write(&model, contents).unwrap();
        let dir = tmp.path().join("cache");
        (tmp, model, dir)
    }

    #[test]
    fn the_second_start_remembers_what_the_first_read() {
        let (_tmp, model, dir) = setup(b"tensorlink\n");
        let first = sha256(&model, Some(&dir)).unwrap();
        assert!(!first.remembered);
        assert_eq!(first.sha256, sha256_file(&model).unwrap());
        let second = sha256(&model, Some(&dir)).unwrap();
        assert_eq!(second.sha256, first.sha256);
        assert!(second.remembered, "the record was not used");
    }

    #[test]
    fn a_changed_file_is_read_again() {
        let (_tmp, model, dir) = setup(b"tensorlink\n");
        let first = sha256(&model, Some(&dir)).unwrap();
        // Same size, new contents: the modification time (or, on filesystems
        // with coarse times, nothing else) tells; make it tell.
        fs::write(&model, b"tensorlinK\n").unwrap();
        let file = File::options().write(true).open(&model).unwrap();
        file.set_modified(UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            .unwrap();
        let second = sha256(&model, Some(&dir)).unwrap();
        assert!(!second.remembered);
        assert_ne!(second.sha256, first.sha256);
        assert_eq!(second.sha256, sha256_file(&model).unwrap());
    }

    #[test]
    fn a_rewrite_that_restores_the_modification_time_is_read_again() {
        let (_tmp, model, dir) = setup(b"tensorlink\n");
        let first = sha256(&model, Some(&dir)).unwrap();
        let modified = fs::metadata(&model).unwrap().modified().unwrap();
        // Same size, same modification time (as `cp -p` or `touch -r` leave
        // it), other bytes: only the status-change time tells. The kernel
        // stamps it from a coarse clock (a tick, ~4 ms), so the rewrite is
        // repeated until the stamp has moved on from the recorded one.
        use std::os::unix::fs::MetadataExt;
        let changed = |m: &fs::Metadata| (m.ctime(), m.ctime_nsec());
        let recorded = changed(&fs::metadata(&model).unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            fs::write(&model, b"tensorlinK\n").unwrap();
            File::options()
                .write(true)
                .open(&model)
                .unwrap()
                .set_modified(modified)
                .unwrap();
            if changed(&fs::metadata(&model).unwrap()) != recorded {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the status-change time never moved"
            );
        }
        let second = sha256(&model, Some(&dir)).unwrap();
        assert!(!second.remembered, "a rewrite in place reused the record");
        assert_ne!(second.sha256, first.sha256);
    }

    #[test]
    fn a_file_renamed_over_the_model_is_read_again() {
        let (tmp, model, dir) = setup(b"tensorlink\n");
        sha256(&model, Some(&dir)).unwrap();
        let other = tmp.path().join("download.partial");
        fs::write(&other, b"different!!").unwrap();
        let meta = fs::metadata(&model).unwrap();
        File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(meta.modified().unwrap())
            .unwrap();
        fs::rename(&other, &model).unwrap();
        let after = sha256(&model, Some(&dir)).unwrap();
        assert!(!after.remembered, "a new inode must not reuse the record");
        assert_eq!(after.sha256, sha256_file(&model).unwrap());
    }

    #[test]
    fn a_damaged_record_costs_a_read_not_an_error() {
        let (_tmp, model, dir) = setup(b"tensorlink\n");
        sha256(&model, Some(&dir)).unwrap();
        for entry in fs::read_dir(&dir).unwrap() {
            fs::write(entry.unwrap().path(), b"{\"sha256\": 12").unwrap();
        }
        let again = sha256(&model, Some(&dir)).unwrap();
        assert!(!again.remembered);
        assert!(
            sha256(&model, Some(&dir)).unwrap().remembered,
            "not rewritten"
        );
    }

    #[test]
    fn the_hash_is_sha256() {
        let (_tmp, model, _) = setup(b"tensorlink\n");
        assert_eq!(sha256(&model, None).unwrap().sha256, KNOWN);
    }
}
