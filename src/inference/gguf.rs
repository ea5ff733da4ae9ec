//! A GGUF model file: mapped, not read. The header (metadata and the tensor
//! index) is parsed once; a shard later copies out only the tensors of its own
//! layers, so a node holding layers 0–14 of a 40 GB model touches ~20 GB of it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::InferenceError;

pub struct ModelFile {
    path: PathBuf,
    map: Mmap,
    content: Content,
    config: LlamaConfig,
}

/// The hyper-parameters of a llama-architecture model, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    pub context_length: usize,
    pub vocab_size: usize,
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
        // SAFETY: the map is read-only and private to this process; a model file
        // rewritten while a node runs is outside what we promise (the hash check
        // between nodes would not save us from it either).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| InferenceError::Io {
            what: format!("cannot map the model {}", path.display()),
            source: e,
        })?;
        let content = Content::read(&mut Cursor::new(&map[..]))
            .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
        let config = LlamaConfig::from_metadata(&content.metadata).map_err(bad)?;
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
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Copies one tensor out of the mapping; only its pages are touched.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<QTensor, InferenceError> {
        self.content
            .tensor(&mut Cursor::new(&self.map[..]), name, device)
            .map_err(|e| InferenceError::BadModel {
                path: self.path.clone(),
                why: format!("tensor `{name}`: {e}"),
            })
    }

    /// The name a user recognises: the file name without `.gguf`.
    pub fn display_name(&self) -> String {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        name.strip_suffix(".gguf").unwrap_or(&name).to_owned()
    }
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

impl LlamaConfig {
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self, String> {
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("unknown");
        if arch != "llama" {
            return Err(format!(
                "its architecture is `{arch}`; tensorlink runs the `llama` architecture"
            ));
        }
        let num = |key: &str| -> Result<u64, String> {
            let v = md
                .get(key)
                .ok_or_else(|| format!("its metadata lacks `{key}`"))?;
            v.to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                .map_err(|_| format!("`{key}` is not an integer"))
        };
        let float = |key: &str, default: f64| -> Result<f64, String> {
            match md.get(key) {
                None => Ok(default),
                Some(v) => v
                    .to_f32()
                    .map(f64::from)
                    .or_else(|_| v.to_f64())
                    .map_err(|_| format!("`{key}` is not a number")),
            }
        };
        let n_head = num("llama.attention.head_count")? as usize;
        let n_kv_head = match md.get("llama.attention.head_count_kv") {
            Some(_) => num("llama.attention.head_count_kv")? as usize,
            None => n_head,
        };
        let hidden = num("llama.embedding_length")? as usize;
        if n_head == 0 || n_kv_head == 0 || hidden % n_head != 0 || n_head % n_kv_head != 0 {
            return Err(format!(
                "its heads do not divide: {hidden} wide, {n_head} heads, {n_kv_head} kv heads"
            ));
        }
        let head_dim = hidden / n_head;
        if md.contains_key("llama.rope.dimension_count")
            && num("llama.rope.dimension_count")? as usize != head_dim
        {
            return Err(
                "it rotates only part of each head (partial RoPE), which is not supported".into(),
            );
        }
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => return Err("its metadata has no token list".into()),
        };
        let n_layers = num("llama.block_count")? as usize;
        if n_layers == 0 {
            return Err("it has no layers".into());
        }
        Ok(LlamaConfig {
            n_layers,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            rms_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_base: float("llama.rope.freq_base", 10_000.0)? as f32,
            context_length: num("llama.context_length").unwrap_or(4096) as usize,
            vocab_size,
        })
    }
}
