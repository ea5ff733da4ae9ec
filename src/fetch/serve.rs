//! Giving peers the model file this node loaded (docs/PROTOCOL.md §9.8–9.9).
//!
//! The file is the one opened at load, mapped: a peer reads the very inode
//! this node runs, whatever happens to its path since, and no request can
//! name any other file. An answer's bytes are a view of the mapping that the
//! connection writes to the socket straight from the page cache, with no
//! copy and no buffer; the kernel is asked to read ahead what a read will
//! send, so a part of the file not in memory does not stall the writer.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{Advice, Mmap};

use crate::protocol::{ErrorCode, Message};

/// The most one `ReadModelFile` may ask for (§9.9).
pub const MAX_READ: u32 = 16 << 20;

/// The loaded model file, as peers may read it.
#[derive(Debug)]
pub struct ServedFile {
    map: Arc<Mmap>,
    /// The whole mapping as `Bytes`, sliced per answer.
    bytes: Bytes,
    name: String,
    sha256: String,
    size: u64,
}

impl ServedFile {
    /// Opens and maps `path` as the model is opened, before it is hashed; its
    /// sha256 is given once known ([`ServedFile::with_sha256`]). A peer is
    /// offered what this mapping holds.
    pub fn open(path: &Path) -> std::io::Result<ServedFile> {
        let file = File::open(path)?;
        // SAFETY: the mapping is read-only and the node already maps this
        // file for its weights on the same terms: the model is not written
        // while a node runs it.
        let map = Arc::new(unsafe { Mmap::map(&file)? });
        let size = map.len() as u64;
        let bytes = Bytes::from_owner(ArcMap(map.clone()));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(ServedFile {
            map,
            bytes,
            name,
            sha256: String::new(),
            size,
        })
    }

    pub fn with_sha256(self, sha256: &str) -> ServedFile {
        ServedFile {
            sha256: sha256.to_ascii_lowercase(),
            ..self
        }
    }

    /// Whether every non-empty field names this file (§9.8).
    fn matches(&self, sha256: &str, name: &str) -> bool {
        (sha256.is_empty() || sha256.eq_ignore_ascii_case(&self.sha256))
            && (name.is_empty() || name == self.name)
    }

    /// Answers `QueryModelFile` or `ReadModelFile`; `node` names this node in
    /// refusals.
    pub fn answer(&self, request: Message, node: &str) -> Message {
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
                let _ = self
                    .map
                    .advise_range(Advice::WillNeed, offset as usize, len as usize);
                let start = offset as usize;
                Message::ModelBytes {
                    offset,
                    data: self.bytes.slice(start..start + len as usize),
                }
            }
            other => Message::error(
                ErrorCode::UnknownType,
                format!("{:?} is not a model file request", other.frame_type()),
            ),
        }
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

/// The mapping as the owner of a `Bytes`.
struct ArcMap(Arc<Mmap>);

impl AsRef<[u8]> for ArcMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}
