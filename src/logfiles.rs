//! Keeping the jobs' log files bounded. launchd appends a job's output to its
//! `StandardErrorPath` for ever and never rotates it: a tunnel failing
//! authentication adds a line every 2 s, a node logging at debug far more. The
//! node is the one long-running tensorlink process, so it looks after the whole
//! log folder (`--log-dir`): a `.log` file past the limit is renamed to
//! `.log.1` (the previous `.1` goes). launchd opens the path again at each
//! start of a job, so a job that keeps failing — the one that fills a disk —
//! moves to a fresh file at its next restart; the node moves its own output
//! at once. Each log then stays within about twice the limit.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use tensorlink_launchd::rotated_log as rotated_path;
use tokio_util::sync::CancellationToken;

/// A log file larger than this is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 20;
/// How often the folder is looked at.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// Rotates every `.log` file in `dir` larger than `max_bytes`, and moves this
/// process's own stdout and stderr to a fresh file when theirs was rotated.
/// Returns the logs it rotated.
pub fn rotate(dir: &Path, max_bytes: u64) -> io::Result<Vec<PathBuf>> {
    let own = own_output();
    let mut rotated = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.len() <= max_bytes {
            continue;
        }
        // One file that cannot be rotated must not keep the others growing.
        if let Err(e) = std::fs::rename(&path, rotated_path(&path)) {
            tracing::warn!(target: "tensorlink::node", log = %path.display(), "cannot rotate: {e}");
            continue;
        }
        if own == Some((meta.dev(), meta.ino())) {
            if let Err(e) = reopen_own_output(&path) {
                tracing::warn!(target: "tensorlink::node", log = %path.display(), "cannot reopen after rotating: {e}");
            }
        }
        rotated.push(path);
    }
    Ok(rotated)
}

/// The file behind this process's stderr, as (device, inode).
fn own_output() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    let fd = io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    meta.is_file().then(|| (meta.dev(), meta.ino()))
}

/// Points stdout and stderr at a new file at `path`, appending as launchd does.
fn reopen_own_output(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    nix::unistd::dup2_stdout(&file)?;
    nix::unistd::dup2_stderr(&file)?;
    Ok(())
}

/// Rotates `dir` now and every [`INTERVAL`] until `stop`.
pub async fn follow(dir: PathBuf, max_bytes: u64, stop: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (d, max) = (dir.clone(), max_bytes);
        match tokio::task::spawn_blocking(move || rotate(&d, max)).await {
            Ok(Ok(rotated)) => {
                failing = false;
                for log in rotated {
                    tracing::info!(target: "tensorlink::node", log = %log.display(), "log rotated past {max_bytes} bytes");
                }
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(target: "tensorlink::node", dir = %dir.display(), "cannot rotate the logs: {e}");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_large_log_files_rotate_and_the_previous_copy_goes() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("tunnel-mac2.log");
        let small = dir.path().join("node.log");
        let other = dir.path().join("notes.txt");
        std::fs::write(&big, vec![b'x'; 2000]).unwrap();
        std::fs::write(rotated_path(&big), b"older").unwrap();
        std::fs::write(&small, b"fine").unwrap();
        std::fs::write(&other, vec![b'y'; 5000]).unwrap();
        // A log whose rotated name is taken by a folder: skipped, not fatal.
        let stuck = dir.path().join("a-stuck.log");
        std::fs::write(&stuck, vec![b'z'; 2000]).unwrap();
        std::fs::create_dir(rotated_path(&stuck)).unwrap();
        std::fs::write(rotated_path(&stuck).join("x"), b"x").unwrap();
        assert_eq!(
            rotate(dir.path(), 1000).unwrap(),
            std::slice::from_ref(&big)
        );
        assert!(!big.exists());
        assert_eq!(std::fs::read(rotated_path(&big)).unwrap().len(), 2000);
        assert_eq!(std::fs::read(&small).unwrap(), b"fine");
        assert_eq!(std::fs::read(&other).unwrap().len(), 5000, "not a log");
        assert_eq!(rotate(dir.path(), 1000).unwrap(), Vec::<PathBuf>::new());
        assert_eq!(
            rotated_path(Path::new("/a/node.log")),
            Path::new("/a/node.log.1")
        );
    }
}
