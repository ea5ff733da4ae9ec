//! The forward pass of one shard: layers `[start, end]` of a model, with the
//! token embeddings when the shard is first and the final norm and output head
//! when it is last. Written after candle-transformers' quantized llama and
//! qwen models and checked against llama.cpp's graphs (`llm_build_llama`,
//! `llm_build_qwen2`, `llm_build_qwen3`); the difference is that a shard loads
//! and runs only its own layers, and its input and output are whatever crosses
//! the wire: token ids or hidden states.

use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Tensor, D};
use candle_nn::Embedding;

use super::blocked::{self, Kernel};
use super::cache::LayerCache;
use super::config::{Activation, Architecture, ModelConfig, RopeStyle};
use super::gguf::ModelFile;
use super::InferenceError;

/// The token embedding table: kept as stored where the blocked kernel can
/// dequantize its rows (bit-identical to dequantizing the whole table), in
/// f32 otherwise.
enum Embeddings {
    Quantized(Box<dyn Kernel>),
    Dense(Embedding),
}

impl Embeddings {
    /// Token ids `[b, seq]` → `[b, seq, hidden]` on the ids' device.
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let table = match self {
            Embeddings::Dense(e) => return e.forward(ids),
            Embeddings::Quantized(table) => table,
        };
        let (_, hidden) = table.shape();
        let (b, seq) = ids.dims2()?;
        let list: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; list.len() * hidden];
        for (&id, row) in list.iter().zip(out.chunks_exact_mut(hidden)) {
            table.row(id as usize, row)?;
        }
        Tensor::from_vec(out, (b, seq, hidden), ids.device())
    }
}

pub struct ShardModel {
    pub start: usize,
    pub end: usize,
    config: ModelConfig,
    embeddings: Option<Embeddings>,
    layers: Vec<Layer>,
    head: Option<Head>,
    rope: Rope,
    /// Sliding-window layers rotate with their own base (Gemma 3).
    rope_sliding: Option<Rope>,
    device: Device,
}

/// Positions a shard runs through its layers at once; a longer prompt step
/// goes in runs of this many, each appended to the cache before the next. A
/// layer's temporaries are each rows × the feed-forward width in f32 (16 MiB
/// for 512 rows of a 1B llama, 56 MiB of a 70B), five or six alive together:
/// in runs of 128 they are a quarter of that, while every weight row still
/// meets 128 input rows in cache. A peer's steps stay as long as the protocol
/// lets them be (fewer hops).
const RUN_ROWS: usize = 128;

/// cos and sin of every position's angles, `[context, head_dim / 2]`.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    /// qwen2's biases on q, k and v.
    biases: Option<[Tensor; 3]>,
    /// qwen3's RMS norms over each head of q and k, before rotation.
    qk_norms: Option<[Tensor; 2]>,
    wo: Linear,
    /// Gemma's norms of the attention's and the MLP's outputs.
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<Tensor>,
    sliding: bool,
}

struct Head {
    norm: Tensor,
    output: Linear,
}

/// A quantized weight: our CPU kernel where it applies (the common quantized
/// types), candle's matmul otherwise (F16/BF16/F32, and every type on Metal).
enum Linear {
    Blocked(Box<dyn Kernel>),
    Candle(QMatMul),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Blocked(m) => m.forward(x),
            Linear::Candle(m) => m.forward(x),
        }
    }
}

/// Our kernel's copy of a CPU weight, read from the file straight into its
/// blocks (see [`ModelFile::read_into`]); `None` for a type or shape it does
/// not take, or a name the file lacks, which candle's reader then reports.
fn read_kernel(file: &ModelFile, name: &str) -> Result<Option<Box<dyn Kernel>>, InferenceError> {
    let Some(info) = file.tensor_infos().get(name) else {
        return Ok(None);
    };
    let Ok(dims) = info.shape.dims2() else {
        return Ok(None);
    };
    blocked::read(info.ggml_dtype, dims, |bytes| file.read_into(name, bytes))
}

/// What a shard produces: hidden states for the next shard, or the last
/// position's logits when the shard is last.
pub enum ShardOutput {
    Hidden(Tensor),
    Logits(Tensor),
}

impl ShardModel {
    /// Loads layers `[start, end]` (inclusive) and, where the shard needs them,
    /// the embeddings and the head; nothing else of the file is read.
    pub fn load(
        file: &ModelFile,
        start: usize,
        end: usize,
        device: &Device,
    ) -> Result<Self, InferenceError> {
        let config = file.config().clone();
        if start > end || end >= config.n_layers {
            return Err(InferenceError::BadShard(format!(
                "layers {start}–{end} of a {}-layer model",
                config.n_layers
            )));
        }
        let qmatmul = |name: &str| {
            let prepare = |e| InferenceError::Candle {
                what: format!("preparing `{name}`"),
                source: e,
            };
            if device.is_cpu() {
                if let Some(m) = read_kernel(file, name)? {
                    return Ok(Linear::Blocked(m));
                }
            }
            QMatMul::from_qtensor(file.tensor(name, device)?)
                .map(Linear::Candle)
                .map_err(prepare)
        };
        let dense = |name: &str| {
            file.tensor(name, device)?
                .dequantize(device)
                .map_err(|e| InferenceError::Candle {
                    what: format!("dequantizing `{name}`"),
                    source: e,
                })
        };
        let has = |name: &str| file.has_tensor(name);
        let optional = |name: &str| has(name).then(|| dense(name)).transpose();
        let embeddings = if start == 0 {
            // Kept as stored on the CPU, on any device, where our kernel takes
            // its type: a step's rows are a few KiB to upload, the table in
            // f32 would be 4 GB for a 70B model. Other types (F16, Q4_1) are
            // dequantized where the layers run.
            let name = "token_embd.weight";
            Some(match read_kernel(file, name)? {
                Some(rows) => Embeddings::Quantized(rows),
                None => Embeddings::Dense(Embedding::new(dense(name)?, config.hidden)),
            })
        } else {
            None
        };
        let mut layers = Vec::with_capacity(end - start + 1);
        for i in start..=end {
            let p = |what: &str| format!("blk.{i}.{what}.weight");
            layers.push(Layer {
                attn_norm: dense(&p("attn_norm"))?,
                wq: qmatmul(&p("attn_q"))?,
                wk: qmatmul(&p("attn_k"))?,
                wv: qmatmul(&p("attn_v"))?,
                biases: if has(&format!("blk.{i}.attn_q.bias")) {
                    let b = |what: &str| dense(&format!("blk.{i}.{what}.bias"));
                    Some([b("attn_q")?, b("attn_k")?, b("attn_v")?])
                } else {
                    None
                },
                qk_norms: if has(&p("attn_q_norm")) {
                    Some([dense(&p("attn_q_norm"))?, dense(&p("attn_k_norm"))?])
                } else {
                    None
                },
                wo: qmatmul(&p("attn_output"))?,
                post_attn_norm: optional(&p("post_attention_norm"))?,
                ffn_norm: dense(&p("ffn_norm"))?,
                gate: qmatmul(&p("ffn_gate"))?,
                up: qmatmul(&p("ffn_up"))?,
                down: qmatmul(&p("ffn_down"))?,
                post_ffn_norm: optional(&p("post_ffw_norm"))?,
                sliding: config.is_sliding(i),
            });
        }
        let head = if end + 1 == config.n_layers {
            // Models with tied embeddings have no `output.weight`: the head is the
            // (still quantized) embedding table, as llama.cpp does it.
            let output = if has("output.weight") {
                "output.weight"
            } else {
                "token_embd.weight"
            };
            Some(Head {
                norm: dense("output_norm.weight")?,
                output: qmatmul(output)?,
            })
        } else {
            None
        };
        // Llama 3.1 and later carry per-frequency divisors (their "llama3"
        // rope scaling, precomputed by the converter).
        let freq_factors = if has("rope_freqs.weight") && config.architecture == Architecture::Llama
        {
            let t = dense("rope_freqs.weight")?;
            let factors = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| InferenceError::Candle {
                    what: "reading `rope_freqs.weight`".into(),
                    source: e,
                })?;
            if factors.len() != config.head_dim / 2 {
                return Err(InferenceError::BadShard(format!(
                    "`rope_freqs.weight` has {} values for heads {} wide",
                    factors.len(),
                    config.head_dim
                )));
            }
            Some(factors)
        } else {
            None
        };
        let tables = |base: f32, scale: f32, factors: Option<&[f32]>| {
            Rope::new(&config, base, scale, factors, device).map_err(|e| InferenceError::Candle {
                what: "building the rotary tables".into(),
                source: e,
            })
        };
        let rope = tables(
            config.rope_base,
            config.rope_position_scale,
            freq_factors.as_deref(),
        )?;
        let rope_sliding = match &config.sliding {
            Some(s) => Some(tables(s.rope_base, 1.0, None)?),
            None => None,
        };
        Ok(ShardModel {
            start,
            end,
            config,
            embeddings,
            layers,
            head,
            rope,
            rope_sliding,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn is_first(&self) -> bool {
        self.embeddings.is_some()
    }

    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// Runs the shard over `input` (token ids `[1, n]` u32 on the first shard,
    /// hidden states `[1, n, hidden]` f32 elsewhere) whose first token sits at
    /// `position`, appending to `cache`.
    pub fn forward(
        &self,
        input: &Tensor,
        position: usize,
        cache: &mut [LayerCache],
    ) -> candle_core::Result<ShardOutput> {
        let n = input.dim(1)?;
        let mut hidden = Vec::with_capacity(n.div_ceil(RUN_ROWS));
        for from in (0..n).step_by(RUN_ROWS) {
            let rows = input.narrow(1, from, RUN_ROWS.min(n - from))?;
            let x = self.layers(&rows, position + from, cache)?;
            if self.head.is_some() {
                // Only the last position's logits are asked for.
                hidden.clear();
            }
            hidden.push(x);
        }
        let x = match hidden.len() {
            1 => hidden.pop().expect("one run"),
            _ => Tensor::cat(&hidden, 1)?,
        };
        let c = &self.config;
        match &self.head {
            None => Ok(ShardOutput::Hidden(x)),
            Some(head) => {
                let seq_len = x.dim(1)?;
                let last = x.narrow(1, seq_len - 1, 1)?.squeeze(1)?;
                let last = candle_nn::ops::rms_norm(&last, &head.norm, c.rms_eps as f32)?;
                let logits = head.output.forward(&last)?.squeeze(0)?;
                match c.final_logit_softcap {
                    Some(cap) => {
                        let cap = f64::from(cap);
                        Ok(ShardOutput::Logits(((logits / cap)?.tanh()? * cap)?))
                    }
                    None => Ok(ShardOutput::Logits(logits)),
                }
            }
        }
    }

    /// Embeds (on the first shard) and runs every layer over one run of
    /// positions from `position`.
    fn layers(
        &self,
        input: &Tensor,
        position: usize,
        cache: &mut [LayerCache],
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let mut x = match &self.embeddings {
            Some(embeddings) if c.scale_embeddings => {
                (embeddings.forward(input)? * f64::from((c.hidden as f32).sqrt()))?
            }
            Some(embeddings) => embeddings.forward(input)?,
            None => input.clone(),
        };
        let (_, seq_len, _) = x.dims3()?;
        let mask = causal_mask(seq_len, position, None, &self.device)?;
        let window = c.sliding.as_ref().map(|s| s.window);
        let sliding_mask = match window {
            Some(w) if self.layers.iter().any(|l| l.sliding) => {
                causal_mask(seq_len, position, Some(w), &self.device)?
            }
            _ => None,
        };
        for (layer, cache) in self.layers.iter().zip(cache.iter_mut()) {
            let mask = if layer.sliding { &sliding_mask } else { &mask };
            x = self.layer_forward(layer, &x, mask.as_ref(), position, cache)?;
        }
        Ok(x)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        mask: Option<&Tensor>,
        position: usize,
        cache: &mut LayerCache,
    ) -> candle_core::Result<Tensor> {
        let eps = self.config.rms_eps as f32;
        let post_norm = |y: Tensor, norm: &Option<Tensor>| match norm {
            Some(w) => candle_nn::ops::rms_norm(&y, w, eps),
            None => Ok(y),
        };
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, eps)?;
        let attended = self.attention(layer, &h, mask, position, cache)?;
        let x = (post_norm(attended, &layer.post_attn_norm)? + x)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
        let gate = layer.gate.forward(&h)?;
        let gate = match self.config.architecture.activation() {
            Activation::Gelu => gate.gelu()?,
            Activation::Silu => candle_nn::ops::silu(&gate)?,
        };
        let mlp = layer.down.forward(&(gate * layer.up.forward(&h)?)?)?;
        post_norm(mlp, &layer.post_ffn_norm)? + x
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        mask: Option<&Tensor>,
        position: usize,
        cache: &mut LayerCache,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, seq_len, _) = x.dims3()?;
        let (mut q, mut k, mut v) = (
            layer.wq.forward(x)?,
            layer.wk.forward(x)?,
            layer.wv.forward(x)?,
        );
        if let Some([bq, bk, bv]) = &layer.biases {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        let split = |t: Tensor, n: usize| t.reshape((b, seq_len, n, c.head_dim));
        let (mut q, mut k) = (split(q, c.n_head)?, split(k, c.n_kv_head)?);
        if let Some([q_norm, k_norm]) = &layer.qk_norms {
            let eps = c.rms_eps as f32;
            q = candle_nn::ops::rms_norm(&q, q_norm, eps)?;
            k = candle_nn::ops::rms_norm(&k, k_norm, eps)?;
        }
        let heads = |t: Tensor| t.transpose(1, 2)?.contiguous();
        let q = heads(q)?;
        let k = heads(k)?;
        let v = heads(split(v, c.n_kv_head)?)?;
        let rope = match (&self.rope_sliding, layer.sliding) {
            (Some(sliding), true) => sliding,
            _ => &self.rope,
        };
        let q = self.rotate(rope, &q, position)?;
        let k = self.rotate(rope, &k, position)?;
        let (k, v) = cache.append(&k, &v)?;

        // Grouped-query attention without repeating the cache: query head `h`
        // reads kv head `h / group`, so the queries of one kv head are
        // adjacent and `[b, heads, seq, d]` regroups by a reshape into
        // `[b, kv_heads, group · seq, d]`, one matmul per kv head over the
        // cache as it lies.
        let group = c.n_head / c.n_kv_head;
        let total = k.dim(2)?;
        let q = q.reshape((b, c.n_kv_head, group * seq_len, c.head_dim))?;
        let scale = f64::from(c.attention_scale);
        // `heads` kv heads' queries against their keys and values. Each
        // temporary goes as soon as the next exists: scores, masked scores
        // and weights are each heads × group × seq × total floats.
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor, heads: usize| {
            let scores = {
                let raw = (q.matmul(&k.t()?)? * scale)?;
                match mask {
                    Some(mask) => raw
                        .reshape((b, heads, group, seq_len, total))?
                        .broadcast_add(mask)?
                        .reshape((b, heads, group * seq_len, total))?,
                    None => raw,
                }
            };
            candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
        };
        let one_query = if seq_len == 1 {
            // One query sees the whole cache, or in a sliding-window layer
            // its last `window` positions: what `causal_mask`, the only
            // source of `mask`, says of a one-position step, as a range.
            let visible = match (&c.sliding, layer.sliding) {
                (Some(sliding), true) => total.min(sliding.window),
                _ => total,
            };
            let (k, v) = (
                k.narrow(2, total - visible, visible)?,
                v.narrow(2, total - visible, visible)?,
            );
            super::attend::one_query(&q, &k, &v, c.attention_scale)?
        } else {
            None
        };
        let y = if let Some(y) = one_query {
            y
        } else if seq_len == 1 {
            attend(&q, &k, &v, c.n_kv_head)?
        } else {
            // A prompt step attends one kv head at a time: its scores are then
            // 1/kv_heads of every head's (a 512-token step at position 2000 of
            // a 32-head model held 3 × 125 MiB of them at once), for the same
            // arithmetic, element by element.
            let per_head = (0..c.n_kv_head)
                .map(|h| {
                    let one = |t: &Tensor| t.narrow(1, h, 1);
                    attend(&one(&q)?, &one(&k)?, &one(&v)?, 1)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&per_head, 1)?
        };
        let y = y
            .reshape((b, c.n_head, seq_len, c.head_dim))?
            .transpose(1, 2)?
            .reshape((b, seq_len, c.n_head * c.head_dim))?;
        layer.wo.forward(&y)
    }

    /// GGUF stores llama's q and k permuted for llama.cpp's interleaved
    /// rotation (`rope_i`); qwen's are rotated by halves (`rope`).
    fn rotate(&self, rope: &Rope, x: &Tensor, position: usize) -> candle_core::Result<Tensor> {
        let (_, _, seq_len, _) = x.dims4()?;
        let cos = rope.cos.narrow(0, position, seq_len)?;
        let sin = rope.sin.narrow(0, position, seq_len)?;
        match self.config.architecture.rope_style() {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, &cos, &sin),
            RopeStyle::Halves => candle_nn::rotary_emb::rope(x, &cos, &sin),
        }
    }
}

impl Rope {
    /// cos and sin of every position's angles, computed as ggml's rope cache does
    /// (`ggml_rope_cache_init`): the angle starts at the position and is
    /// multiplied by `base^(-2/d)` from one pair to the next, each pair's angle is
    /// divided by its frequency factor and scaled by the position scale. The
    /// repeated multiplication rounds differently from `base.powf(-2i/d)`, so it
    /// is done the same way here to keep the angles llama.cpp's.
    fn new(
        c: &ModelConfig,
        base: f32,
        position_scale: f32,
        freq_factors: Option<&[f32]>,
        device: &Device,
    ) -> candle_core::Result<Rope> {
        let pairs = c.head_dim / 2;
        let theta_scale = base.powf(-2.0 / c.head_dim as f32);
        let mut cos = Vec::with_capacity(c.context_length * pairs);
        let mut sin = Vec::with_capacity(c.context_length * pairs);
        for position in 0..c.context_length {
            let mut theta = position as f32;
            for i in 0..pairs {
                let factor = freq_factors.map_or(1.0, |f| f[i]);
                let angle = position_scale * (theta / factor);
                cos.push(angle.cos());
                sin.push(angle.sin());
                theta *= theta_scale;
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (c.context_length, pairs), device)?,
            sin: Tensor::from_vec(sin, (c.context_length, pairs), device)?,
        })
    }
}

/// `[seq, position + seq]`: 0 where a query may look, -inf where it may not.
/// Queries start at `position`, so they see the whole cache before them, or
/// only its last `window` positions in a sliding-window layer (llama.cpp's
/// `is_masked_swa`: masked when `query - key >= window`). `None` when nothing
/// is masked: one query with no window sees everything.
fn causal_mask(
    seq_len: usize,
    position: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    let total = position + seq_len;
    let window = window.unwrap_or(usize::MAX);
    if seq_len == 1 && total <= window {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            let query = position + i;
            (0..total).map(move |key| {
                if key > query || query - key >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_slice(&mask, (seq_len, total), device).map(Some)
}

/// Greedy choice over logits; ties go to the lower id, as an argmax does.
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
