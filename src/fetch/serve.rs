//! Giving peers the model file this node loaded (docs/PROTOCOL.md §9.8–9.9).
//!
//! The file is the one opened at load, held open: a peer reads the very
//! inode this node runs, whatever happens to its path since, and no request
//! can name any other file. Reads happen on tokio's blocking threads, a few
//! megabytes at a time, so a fetch never holds up the protocol's tasks.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::protocol::{ErrorCode, Message};

/// The most one `ReadModelFile` may ask for (§9.9).
pub const MAX_READ: u32 = 16 << 20;

/// The loaded model file, as peers may read it.
#[derive(Debug)]
pub struct ServedFile {
    file: File,
    name: String,
    sha256: String,
    size: u64,
}

impl ServedFile {
    /// Opens `path`, whose sha256 the caller computed. The size is taken now:
    /// a peer is offered what was loaded.
    pub fn open(path: &Path, sha256: &str) -> std::io::Result<ServedFile> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(ServedFile {
            file,
            name,
            sha256: sha256.to_ascii_lowercase(),
            size,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether every non-empty field names this file (§9.8).
    fn matches(&self, sha256: &str, name: &str) -> bool {
        (sha256.is_empty() || sha256.eq_ignore_ascii_case(&self.sha256))
            && (name.is_empty() || name == self.name)
    }

    /// Answers `QueryModelFile` or `ReadModelFile`; `node` names this node in
    /// refusals.
    pub async fn answer(self: &Arc<Self>, request: Message, node: &str) -> Message {
        match request {
            Message::QueryModelFile { sha256, name } => {
                if !self.matches(&sha256, &name) {
                    return self.not_this(node, &sha256, &name);
                }
                Message::ModelFileInfo {
                    name: self.name.clone(),
                    sha256: self.sha256.clone(),
                    size: self.size,
                }
            }
            Message::ReadModelFile {
                sha256,
                offset,
                len,
            } => {
                if sha256.is_empty() || !self.matches(&sha256, "") {
                    return self.not_this(node, &sha256, "");
                }
                if len == 0 || len > MAX_READ {
                    return Message::error(
                        ErrorCode::Malformed,
                        format!("a read asks for 1 to {MAX_READ} bytes, not {len}"),
                    );
                }
                if offset
                    .checked_add(len as u64)
                    .is_none_or(|end| end > self.size)
                {
                    return Message::error(
                        ErrorCode::Malformed,
                        format!(
                            "bytes {offset}..+{len} lie beyond the end of {} ({} bytes)",
                            self.name, self.size
                        ),
                    );
                }
                let served = self.clone();
                let read = tokio::task::spawn_blocking(move || served.read(offset, len)).await;
                match read {
                    Ok(Ok(data)) => Message::ModelBytes {
                        offset,
                        data: data.into(),
                    },
                    Ok(Err(e)) => Message::error(
                        ErrorCode::Internal,
                        format!(
                            "node `{node}` cannot read {} at byte {offset} any more: {e}",
                            self.name
                        ),
                    ),
                    Err(e) => Message::error(
                        ErrorCode::Internal,
                        format!("reading the model file failed: {e}"),
                    ),
                }
            }
            other => Message::error(
                ErrorCode::UnknownType,
                format!("{:?} is not a model file request", other.frame_type()),
            ),
        }
    }

    fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut data = vec![0u8; len as usize];
        self.file.read_exact_at(&mut data, offset)?;
        Ok(data)
    }

    fn not_this(&self, node: &str, sha256: &str, name: &str) -> Message {
        let asked = match (sha256.is_empty(), name.is_empty()) {
            (false, false) => format!("{name} with sha256 {sha256}"),
            (false, true) => format!("sha256 {sha256}"),
            (true, false) => name.to_owned(),
            (true, true) => "any file".to_owned(),
        };
        Message::error(
            ErrorCode::WrongModel,
            format!(
                "node `{node}` gives only the model it runs, {} (sha256 {}), not {asked}",
                self.name, self.sha256
            ),
        )
    }
}
