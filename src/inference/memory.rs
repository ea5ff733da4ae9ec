//! What a shard costs in memory, read off the file's tensor index before
//! anything is loaded: its tensors as this node holds them, and the KV cache
//! each position of a request adds. The origin checks the partition with it
//! (no node is given layers it cannot hold with one full-context request), and
//! every shard admits a request only when the cache it may grow to fits.

use candle_core::quantized::GgmlDType;

use super::gguf::ModelFile;

const MIB: u64 = 1024 * 1024;

/// The memory of one shard: layers `[start, end]`, with the embeddings when it
/// is first and the head when it is last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Bytes of the tensors the shard copies out of the file, as it holds
    /// them, and of the tables it computes.
    pub weights: u64,
    /// Bytes of KV cache one position of one request takes on this shard.
    pub kv_per_position: u64,
}

impl Footprint {
    pub fn of(file: &ModelFile, start: usize, end: usize) -> Footprint {
        let config = file.config();
        let last = end + 1 == config.n_layers;
        let mut weights = 0;
        for (name, info) in file.tensor_infos() {
            let elements = info.shape.elem_count() as u64;
            let stored =
                elements / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64;
            let held = match shard_part(name) {
                Part::Layer(i) if (start..=end).contains(&i) => {
                    held_bytes(name, info.ggml_dtype, elements, stored)
                }
                Part::Layer(_) => 0,
                // The first shard looks rows up in the table as stored where
                // the blocked kernel takes its type, else dequantized.
                Part::Embeddings if start == 0 => {
                    if super::blocked::supports(info.ggml_dtype, config.hidden) {
                        stored
                    } else {
                        elements * 4
                    }
                }
                Part::Head if last => held_bytes(name, info.ggml_dtype, elements, stored),
                Part::Embeddings | Part::Head | Part::Other => 0,
            };
            weights += held;
        }
        // A head tied to the embeddings multiplies by the table as a matrix.
        if last && !file.has_tensor("output.weight") {
            if let Some(info) = file.tensor_infos().get("token_embd.weight") {
                let elements = info.shape.elem_count() as u64;
                let stored = elements / info.ggml_dtype.block_size() as u64
                    * info.ggml_dtype.type_size() as u64;
                weights += held_bytes("token_embd.weight", info.ggml_dtype, elements, stored);
            }
        }
        // The rotary tables, cos and sin in f32 for every position of the
        // context, one set per rope base (Gemma's sliding layers have their own).
        let tables = 1 + u64::from(config.sliding.is_some());
        weights += tables * (config.context_length * config.head_dim) as u64 * 4;
        let layers = (end + 1 - start) as u64;
        // Keys and values, f32, one head_dim-wide row per kv head.
        let kv_per_position = layers * 2 * (config.n_kv_head * config.head_dim) as u64 * 4;
        Footprint {
            weights,
            kv_per_position,
        }
    }

    /// The KV cache of one request of `positions` positions.
    pub fn kv(&self, positions: usize) -> u64 {
        self.kv_per_position.saturating_mul(positions as u64)
    }
}

enum Part {
    Layer(usize),
    Embeddings,
    Head,
    Other,
}

fn shard_part(name: &str) -> Part {
    if let Some(rest) = name.strip_prefix("blk.") {
        if let Some(i) = rest.split('.').next().and_then(|i| i.parse().ok()) {
            return Part::Layer(i);
        }
    }
    match name {
        "token_embd.weight" => Part::Embeddings,
        "output.weight" | "output_norm.weight" => Part::Head,
        _ => Part::Other,
    }
}

/// What a tensor takes once loaded. Norms and biases are dequantized to f32;
/// so are F32/F16/BF16 matrices (candle multiplies by those in f32). Every
/// other matrix stays as stored.
fn held_bytes(name: &str, dtype: GgmlDType, elements: u64, stored: u64) -> u64 {
    let dense = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    if dense || name.ends_with("norm.weight") || name.ends_with(".bias") {
        elements * 4
    } else {
        stored
    }
}

/// Memory the model may use on this machine when the node is not told
/// (`--memory-limit`): three quarters of it, leaving the rest to macOS and
/// the user's apps. On Apple Silicon that is also about the share of unified
/// memory Metal lets one process keep resident (its recommended working set).
pub fn default_limit_mib(physical_mib: u64) -> u64 {
    physical_mib / 4 * 3
}

/// `bytes` for a message: GiB with two decimals above one GiB, else MiB.
pub fn human(bytes: u64) -> String {
    if bytes >= 1024 * MIB {
        format!("{:.2} GiB", bytes as f64 / (1024 * MIB) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

pub fn mib(mib: u64) -> u64 {
    mib.saturating_mul(MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_a_person_would() {
        assert_eq!(human(3 * MIB / 2), "1.5 MiB");
        assert_eq!(human(5 * 1024 * MIB + 512 * MIB), "5.50 GiB");
        assert_eq!(default_limit_mib(16384), 12288);
    }

    #[test]
    fn tensors_count_as_they_are_held_not_as_stored() {
        // Q4_1, Q8_0 and the k-quants stay as stored.
        assert_eq!(
            held_bytes("blk.0.attn_q.weight", GgmlDType::Q4_1, 32, 20),
            20
        );
        assert_eq!(
            held_bytes("blk.0.attn_q.weight", GgmlDType::Q8_0, 32, 34),
            34
        );
        // F16 matrices and every norm are f32 in memory.
        assert_eq!(
            held_bytes("blk.0.ffn_up.weight", GgmlDType::F16, 32, 64),
            128
        );
        assert_eq!(
            held_bytes("blk.0.attn_norm.weight", GgmlDType::F32, 32, 128),
            128
        );
    }
}
