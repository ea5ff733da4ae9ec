//! A GGUF model file: mapped, not read. The header (metadata and the tensor
//! index) is parsed once; a shard later copies out only the tensors of its own
//! layers, so a node holding layers 0–14 of a 40 GB model touches ~20 GB of it.

use std::collections::HashMap;
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use memmap2::Mmap;

use super::config::ModelConfig;
use super::{tensor_types, InferenceError};

/// Positions a request may fill when `--ctx-size` does not say.
pub const DEFAULT_CONTEXT: usize = 8192;

pub struct ModelFile {
    path: PathBuf,
    map: Mmap,
    content: Content,
    config: ModelConfig,
}

impl ModelFile {
    pub fn open(path: &Path) -> Result<Self, InferenceError> {
        let bad = |why: String| InferenceError::BadModel {
            path: path.to_owned(),
            why,
        };
        let file = File::open(path).map_err(|e| InferenceError::Io {
            what: format!("cannot open the model {}", path.display()),
            source: e,
        })?;
        // SAFETY: the map is read-only and never written by us; a model file
        // rewritten while a node runs is outside what we promise (the hash check
        // between nodes would not save us from it either).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| InferenceError::Io {
            what: format!("cannot map the model {}", path.display()),
            source: e,
        })?;
        if let Some(why) = tensor_types::unsupported(&map) {
            return Err(bad(why));
        }
        let content = Content::read(&mut Cursor::new(&map[..]))
            .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
        let config = ModelConfig::from_metadata(&content.metadata).map_err(bad)?;
        let file = ModelFile {
            path: path.to_owned(),
            map,
            content,
            config,
        };
        for name in ["token_embd.weight", "output_norm.weight"] {
            if !file.content.tensor_infos.contains_key(name) {
                return Err(bad(format!("it has no tensor `{name}`")));
            }
        }
        // Before anything reads or hashes it: a file still being copied in
        // is refused at once, naming what is missing.
        for name in file.content.tensor_infos.keys() {
            file.span(name)?;
        }
        Ok(file)
    }

    /// Bounds the positions a request may use to `positions` (`--ctx-size`),
    /// or by default to the trained context but at most [`DEFAULT_CONTEXT`]:
    /// a 128k-context file would otherwise build rotary tables and admit
    /// caches for 128k positions on every node. Beyond the trained context a
    /// model answers nonsense, so that is refused.
    pub fn limit_context(&mut self, positions: Option<usize>) -> Result<(), InferenceError> {
        let trained = self.config.context_length;
        self.config.context_length = match positions {
            None => trained.min(DEFAULT_CONTEXT),
            Some(n) if n <= trained => n,
            Some(n) => {
                return Err(InferenceError::BadModel {
                    path: self.path.clone(),
                    why: format!(
                        "--ctx-size {n} is beyond the {trained} positions it was trained for"
                    ),
                })
            }
        };
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn tensor_infos(&self) -> &HashMap<String, TensorInfo> {
        &self.content.tensor_infos
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Copies one tensor out of the mapping; only its pages are touched, and
    /// they are handed back at once: mapped pages count in the process's
    /// resident memory as long as they stay mapped in, so a shard would
    /// otherwise show its weights twice, the copy and the file's pages.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<QTensor, InferenceError> {
        let tensor = self
            .content
            .tensor(&mut Cursor::new(&self.map[..]), name, device)
            .map_err(|e| self.bad(format!("tensor `{name}`: {e}")))?;
        if let Ok((start, len)) = self.span(name) {
            self.release(start, len);
        }
        Ok(tensor)
    }

    /// Copies one tensor's stored bytes into `out`, which must be exactly
    /// their size, a few MiB at a time, handing each run of pages back as it
    /// is copied. Through [`Self::tensor`] a weight exists three times at
    /// once (the file's pages, candle's read buffer, its typed copy), and a
    /// kernel's own copy of it makes four: for a 200 MB output matrix that is
    /// the shard's loading peak.
    pub fn read_into(&self, name: &str, out: &mut [u8]) -> Result<(), InferenceError> {
        const RUN: usize = 8 << 20;
        let (start, len) = self.span(name)?;
        if out.len() != len {
            return Err(self.bad(format!(
                "tensor `{name}` holds {len} bytes, not the {} its shape needs",
                out.len()
            )));
        }
        for (i, run) in out.chunks_mut(RUN).enumerate() {
            let from = start + i * RUN;
            run.copy_from_slice(&self.map[from..from + run.len()]);
            self.release(from, run.len());
        }
        Ok(())
    }

    /// Where a tensor's bytes lie in the file, checked to be inside it.
    fn span(&self, name: &str) -> Result<(usize, usize), InferenceError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.bad(format!("it has no tensor `{name}`")))?;
        let dtype = info.ggml_dtype;
        let overflow = || self.bad(format!("tensor `{name}`'s offset or size overflows"));
        let len = (info.shape.elem_count() / dtype.block_size())
            .checked_mul(dtype.type_size())
            .ok_or_else(overflow)?;
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(overflow)?;
        let end = start.checked_add(len).ok_or_else(overflow)?;
        if end > self.map.len() {
            return Err(self.bad(format!(
                "tensor `{name}` ends at byte {end}, but the file has {} bytes: it is cut short \
                 (still being copied?)",
                self.map.len()
            )));
        }
        Ok((start, len))
    }

    fn bad(&self, why: String) -> InferenceError {
        InferenceError::BadModel {
            path: self.path.clone(),
            why,
        }
    }

    /// Drops a range's pages from this process (they stay in the system's
    /// file cache). Only a hint: when it fails, memory is merely counted twice.
    #[cfg(unix)]
    fn release(&self, start: usize, len: usize) {
        // SAFETY: the map is a read-only shared mapping of a file that is
        // never written through it, and no borrow of it outlives the copy
        // made before this call (the parsed header owns its data). Dropping
        // such pages cannot change what the map reads: a later access, this
        // thread's or a concurrent load's, faults them in again from the page
        // cache, byte for byte the same. The range is widened to whole pages,
        // so the neighbours' edge pages go too, to the same effect. (On macOS
        // MADV_DONTNEED only makes file pages the first to be reclaimed.)
        let _ = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
        };
    }

    #[cfg(not(unix))]
    fn release(&self, _: usize, _: usize) {}

    /// The name a user recognises: the file name without `.gguf`.
    pub fn display_name(&self) -> String {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        name.strip_suffix(".gguf").unwrap_or(&name).to_owned()
    }
}
