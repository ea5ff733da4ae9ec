//! The forward pass of one shard: layers `[start, end]` of a llama model, with
//! the token embeddings when the shard is first and the final norm and output
//! head when it is last. Written after candle-transformers' quantized llama;
//! the difference is that a shard loads and runs only its own layers, and its
//! input and output are whatever crosses the wire: token ids or hidden states.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Embedding;

use super::cache::LayerCache;
use super::gguf::{LlamaConfig, ModelFile};
use super::q4_1::Q41Matrix;
use super::InferenceError;

pub struct ShardModel {
    pub start: usize,
    pub end: usize,
    config: LlamaConfig,
    embeddings: Option<Embedding>,
    layers: Vec<Layer>,
    head: Option<Head>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Head {
    norm: Tensor,
    output: Linear,
}

/// A quantized weight: our Q4_1 kernel where it applies, candle's otherwise.
enum Linear {
    Q41(Q41Matrix),
    Candle(QMatMul),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Q41(m) => m.forward(x),
            Linear::Candle(m) => m.forward(x),
        }
    }
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
            let tensor = file.tensor(name, device)?;
            match Q41Matrix::from_qtensor(&tensor).map_err(prepare)? {
                Some(m) => Ok(Linear::Q41(m)),
                None => QMatMul::from_qtensor(tensor)
                    .map(Linear::Candle)
                    .map_err(prepare),
            }
        };
        let dense = |name: &str| {
            file.tensor(name, device)?
                .dequantize(device)
                .map_err(|e| InferenceError::Candle {
                    what: format!("dequantizing `{name}`"),
                    source: e,
                })
        };
        let embeddings = if start == 0 {
            let table = dense("token_embd.weight")?;
            Some(Embedding::new(table, config.hidden))
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
                wo: qmatmul(&p("attn_output"))?,
                ffn_norm: dense(&p("ffn_norm"))?,
                gate: qmatmul(&p("ffn_gate"))?,
                up: qmatmul(&p("ffn_up"))?,
                down: qmatmul(&p("ffn_down"))?,
            });
        }
        let head = if end + 1 == config.n_layers {
            // Models with tied embeddings have no `output.weight`: the head is the
            // (still quantized) embedding table, as llama.cpp does it.
            let output = if file.has_tensor("output.weight") {
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
        let (cos, sin) = rope_tables(&config, device).map_err(|e| InferenceError::Candle {
            what: "building the rotary tables".into(),
            source: e,
        })?;
        Ok(ShardModel {
            start,
            end,
            config,
            embeddings,
            layers,
            head,
            cos,
            sin,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
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
        let mut x = match &self.embeddings {
            Some(embeddings) => embeddings.forward(input)?,
            None => input.clone(),
        };
        let (_, seq_len, _) = x.dims3()?;
        let mask = if seq_len > 1 {
            Some(causal_mask(seq_len, position, &self.device)?)
        } else {
            None
        };
        for (layer, cache) in self.layers.iter().zip(cache.iter_mut()) {
            x = self.layer_forward(layer, &x, mask.as_ref(), position, cache)?;
        }
        match &self.head {
            None => Ok(ShardOutput::Hidden(x)),
            Some(head) => {
                let x = candle_nn::ops::rms_norm(&x, &head.norm, self.config.rms_eps as f32)?;
                let last = x.narrow(1, seq_len - 1, 1)?.squeeze(1)?;
                let logits = head.output.forward(&last)?.squeeze(0)?;
                Ok(ShardOutput::Logits(logits))
            }
        }
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
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, eps)?;
        let x = (self.attention(layer, &h, mask, position, cache)? + x)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
        let gated = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
        layer.down.forward(&gated)? + x
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
        let (b, seq_len, hidden) = x.dims3()?;
        let heads = |t: Tensor, n: usize| {
            t.reshape((b, seq_len, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(layer.wq.forward(x)?, c.n_head)?;
        let k = heads(layer.wk.forward(x)?, c.n_kv_head)?;
        let v = heads(layer.wv.forward(x)?, c.n_kv_head)?;
        let q = self.rotate(&q, position)?;
        let k = self.rotate(&k, position)?;
        let (k, v) = cache.append(k, v)?;

        let group = c.n_head / c.n_kv_head;
        let k = repeat_kv(&k, group)?;
        let v = repeat_kv(&v, group)?;
        let scores = (q.matmul(&k.t()?)? / (c.head_dim as f64).sqrt())?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = weights.matmul(&v)?;
        let y = y.transpose(1, 2)?.reshape((b, seq_len, hidden))?;
        layer.wo.forward(&y)
    }

    /// GGUF stores q and k permuted for llama.cpp's interleaved rotation, so
    /// the interleaved variant (`rope_i`) is the right one here.
    fn rotate(&self, x: &Tensor, position: usize) -> candle_core::Result<Tensor> {
        let (_, _, seq_len, _) = x.dims4()?;
        let cos = self.cos.narrow(0, position, seq_len)?;
        let sin = self.sin.narrow(0, position, seq_len)?;
        candle_nn::rotary_emb::rope_i(x, &cos, &sin)
    }
}

fn rope_tables(c: &LlamaConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = (0..c.head_dim)
        .step_by(2)
        .map(|i| 1.0 / c.rope_base.powf(i as f32 / c.head_dim as f32))
        .collect();
    let inv_freq = Tensor::new(inv_freq.as_slice(), device)?;
    let positions = Tensor::arange(0u32, c.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((c.context_length, 1))?;
    let angles = positions.broadcast_mul(&inv_freq.reshape((1, c.head_dim / 2))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// `[seq, position + seq]`: 0 where a query may look, -inf where it may not.
/// Queries start at `position`, so they see the whole cache before them.
fn causal_mask(seq_len: usize, position: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = position + seq_len;
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > position + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_slice(&mask, (seq_len, total), device)
}

fn repeat_kv(x: &Tensor, group: usize) -> candle_core::Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (b, n_kv, seq, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, n_kv, group, seq, d))?
        .reshape((b, n_kv * group, seq, d))
}

/// Greedy choice over logits; ties go to the lower id, as an argmax does.
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
