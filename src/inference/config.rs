//! A model's hyper-parameters, read from its GGUF metadata the way llama.cpp
//! reads them (`<arch>.*` keys), for the architectures tensorlink runs. What a
//! file asks for that we cannot do (another architecture, experts, a rope
//! scaling we do not implement) is refused here, at start-up, by name: a model
//! that loads and answers wrongly is worse than one that does not load.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

/// llama.cpp's `LLAMA_MAX_LAYERS`.
const MAX_LAYERS: usize = 512;
/// Wider than any model's heads (256 in Gemma 3); a file that says more is
/// lying, and would make the rotary tables enormous.
const MAX_HEAD_DIM: usize = 1024;

/// The decoder-only transformers tensorlink runs. They share one layer shape
/// (pre-norm attention and a gated MLP) and differ in the details below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1–3, Mistral, SmolLM, DeepSeek-R1-Distill-Llama.
    Llama,
    /// Qwen 2 and 2.5: biases on q, k and v; rotation by halves.
    Qwen2,
    /// Qwen 3: RMS norms on each head of q and k; no biases.
    Qwen3,
    /// Gemma 3: scaled embeddings, norms after attention and MLP as well as
    /// before, q/k norms, GELU, and five sliding-window layers of every six
    /// with a rope base of their own.
    Gemma3,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "llama, qwen2, qwen3, gemma3";

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Architecture::Llama),
            "qwen2" => Some(Architecture::Qwen2),
            "qwen3" => Some(Architecture::Qwen3),
            "gemma3" => Some(Architecture::Gemma3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma3 => "gemma3",
        }
    }

    /// The gate's activation in the MLP: llama.cpp's LLM_FFN_GELU (tanh
    /// approximation) for Gemma, LLM_FFN_SILU for the others.
    pub fn activation(self) -> Activation {
        match self {
            Architecture::Gemma3 => Activation::Gelu,
            Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3 => Activation::Silu,
        }
    }

    /// How q and k are rotated: llama.cpp's `LLAMA_ROPE_TYPE_NORM` (pairs of
    /// adjacent values, the layout GGUF's converter permutes llama's q and k
    /// into) or `LLAMA_ROPE_TYPE_NEOX` (the first half with the second).
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Architecture::Llama => RopeStyle::Interleaved,
            Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Gemma3 => RopeStyle::Halves,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Gelu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    Halves,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    /// Width of one head of q and k (and v: files where they differ are
    /// refused). Not always `hidden / n_head`: Mistral Nemo and Qwen3-32B differ.
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    /// Positions are multiplied by this before rotation (`rope.scaling.type =
    /// linear`: 1 / factor); 1 without scaling.
    pub rope_position_scale: f32,
    pub context_length: usize,
    pub vocab_size: usize,
    /// Scores are `q·k * attention_scale`: `1/sqrt(head_dim)` but for Gemma 3
    /// 27B, whose reference scales by the model width per head.
    pub attention_scale: f32,
    /// The sliding-window layers (Gemma 3): a position sees only the last
    /// `window` positions, and the rotation uses its own base, unscaled.
    pub sliding: Option<SlidingWindow>,
    /// Gemma's inputs are the embeddings times `sqrt(hidden)`.
    pub scale_embeddings: bool,
    /// `tanh(logits / cap) * cap` on the output, where the file asks for it.
    pub final_logit_softcap: Option<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    pub window: usize,
    /// One entry per layer: true where the layer slides.
    pub layers: Vec<bool>,
    pub rope_base: f32,
}

impl ModelConfig {
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding
            .as_ref()
            .is_some_and(|s| s.layers.get(layer).copied().unwrap_or(false))
    }
}

impl ModelConfig {
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self, String> {
        let name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("unknown");
        let architecture = Architecture::from_name(name).ok_or_else(|| {
            format!(
                "its architecture is `{name}`; tensorlink runs {}",
                Architecture::SUPPORTED
            )
        })?;
        let key = |k: &str| format!("{name}.{k}");
        let num = |k: &str| -> Result<Option<u64>, String> {
            let k = key(k);
            md.get(&k).map(|v| integer(v, &k)).transpose()
        };
        let required = |k: &str| -> Result<u64, String> {
            num(k)?.ok_or_else(|| format!("its metadata lacks `{}`", key(k)))
        };
        let float = |k: &str| -> Result<Option<f64>, String> {
            let k = key(k);
            md.get(&k)
                .map(|v| {
                    v.to_f32()
                        .map(f64::from)
                        .or_else(|_| v.to_f64())
                        .map_err(|_| format!("`{k}` is not a number"))
                })
                .transpose()
        };
        let string = |k: &str| md.get(&key(k)).and_then(|v| v.to_string().ok()).cloned();

        if let Some(experts) = num("expert_count")?.filter(|&n| n > 0) {
            return Err(format!(
                "it is a mixture-of-experts model ({experts} experts), which tensorlink does not run; \
                 dense models of the {} architectures are supported",
                Architecture::SUPPORTED
            ));
        }
        let n_head = required("attention.head_count")? as usize;
        let n_kv_head = num("attention.head_count_kv")?.map_or(n_head, |n| n as usize);
        let hidden = required("embedding_length")? as usize;
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(format!(
                "its heads do not divide: {n_head} heads, {n_kv_head} kv heads"
            ));
        }
        let head_dim = match num("attention.key_length")? {
            Some(k) => k as usize,
            None if hidden % n_head == 0 => hidden / n_head,
            None => {
                return Err(format!(
                    "its heads do not divide: {hidden} wide, {n_head} heads, and no `{}`",
                    key("attention.key_length")
                ))
            }
        };
        // llama.cpp's default for the value width is the embedding per head.
        let value_dim = num("attention.value_length")?
            .map(|v| v as usize)
            .or((hidden % n_head == 0).then(|| hidden / n_head));
        if let Some(v) = value_dim {
            if v != head_dim {
                return Err(format!(
                    "its value heads are {v} wide and its key heads {head_dim}; tensorlink needs them equal"
                ));
            }
        }
        if head_dim > MAX_HEAD_DIM {
            return Err(format!(
                "its heads are {head_dim} wide; tensorlink takes at most {MAX_HEAD_DIM}"
            ));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!(
                "its heads are {head_dim} wide; rotation needs an even width"
            ));
        }
        if let Some(rotated) = num("rope.dimension_count")? {
            if rotated as usize != head_dim {
                return Err(format!(
                    "it rotates {rotated} of each head's {head_dim} values (partial RoPE), which is not supported"
                ));
            }
        }
        let rope_position_scale = rope_scaling(
            string("rope.scaling.type").as_deref(),
            float("rope.scaling.factor")?,
            float("rope.scale_linear")?,
        )?;
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => return Err("its metadata has no token list".into()),
        };
        let n_layers = required("block_count")? as usize;
        if n_layers == 0 || n_layers > MAX_LAYERS {
            return Err(format!(
                "it has {n_layers} layers; a model has 1 to {MAX_LAYERS} (llama.cpp's limit)"
            ));
        }
        let gemma = architecture == Architecture::Gemma3;
        let sliding = match num("attention.sliding_window")? {
            Some(window) if gemma && window > 0 => Some(SlidingWindow {
                window: window as usize,
                layers: sliding_layers(md.get(&key("attention.sliding_window_pattern")), n_layers)?,
                rope_base: float("rope.freq_base_swa")?.unwrap_or(10_000.0) as f32,
            }),
            _ => None,
        };
        // llama.cpp's gemma3: the 62-layer (27B) model scales by width per head.
        let attention_scale = if gemma && n_layers == 62 {
            1.0 / ((hidden / n_head) as f32).sqrt()
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
        Ok(ModelConfig {
            architecture,
            n_layers,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            rms_eps: float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_base: float("rope.freq_base")?.unwrap_or(10_000.0) as f32,
            rope_position_scale,
            context_length: num("context_length")?.unwrap_or(4096) as usize,
            vocab_size,
            attention_scale,
            sliding,
            scale_embeddings: gemma,
            final_logit_softcap: float("final_logit_softcapping")?
                .filter(|&c| c > 0.0)
                .map(|c| c as f32),
        })
    }
}

/// Which layers slide: the file's per-layer list, or one in every `n` layers
/// global (the last of each group), 6 by default, as llama.cpp's
/// `set_swa_pattern`.
fn sliding_layers(pattern: Option<&Value>, n_layers: usize) -> Result<Vec<bool>, String> {
    match pattern {
        Some(Value::Array(flags)) => {
            let flags: Vec<bool> = flags.iter().map(|v| v.to_bool().unwrap_or(false)).collect();
            if flags.len() < n_layers {
                return Err(format!(
                    "its sliding-window pattern lists {} layers of {n_layers}",
                    flags.len()
                ));
            }
            Ok(flags[..n_layers].to_vec())
        }
        other => {
            let n = match other {
                Some(v) => integer(v, "attention.sliding_window_pattern")? as usize,
                None => 6,
            };
            Ok((0..n_layers).map(|i| n == 0 || i % n < n - 1).collect())
        }
    }
}

fn integer(v: &Value, key: &str) -> Result<u64, String> {
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
        .or_else(|_| v.to_i64().map(|x| x.max(0) as u64))
        .map_err(|_| format!("`{key}` is not an integer"))
}

/// The position scale for a file's rope scaling. llama.cpp divides positions by
/// `rope.scaling.factor` (or the older `rope.scale_linear`) whatever the type;
/// for `none` and `linear` that is all there is. YaRN and LongRoPE also
/// reshape the frequencies, which we do not implement, so such files are
/// refused rather than run with half their recipe.
fn rope_scaling(
    kind: Option<&str>,
    factor: Option<f64>,
    scale_linear: Option<f64>,
) -> Result<f32, String> {
    let factor = factor.or(scale_linear).filter(|&f| f != 0.0).unwrap_or(1.0);
    match kind.unwrap_or("linear") {
        "none" | "linear" if factor.is_finite() && factor > 0.0 => Ok((1.0 / factor) as f32),
        "none" | "linear" => Err(format!(
            "its rope scaling factor {factor} is not a positive number"
        )),
        other => Err(format!(
            "it uses `{other}` rope scaling, which tensorlink does not implement (supported: none, linear)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(entries: &[(&str, Value)]) -> HashMap<String, Value> {
        let mut md: HashMap<String, Value> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        md.entry("tokenizer.ggml.tokens".into())
            .or_insert_with(|| Value::Array(vec![Value::String("a".into()); 10]));
        md
    }

    fn base(arch: &str) -> Vec<(String, Value)> {
        vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (format!("{arch}.block_count"), Value::U32(2)),
            (format!("{arch}.embedding_length"), Value::U32(256)),
            (format!("{arch}.attention.head_count"), Value::U32(4)),
            (format!("{arch}.attention.head_count_kv"), Value::U32(2)),
        ]
    }

    fn config(arch: &str, extra: &[(&str, Value)]) -> Result<ModelConfig, String> {
        let mut entries = base(arch);
        entries.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let refs: Vec<(&str, Value)> = entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        ModelConfig::from_metadata(&md(&refs))
    }

    #[test]
    fn head_width_comes_from_key_length_when_the_file_gives_it() {
        assert_eq!(config("llama", &[]).unwrap().head_dim, 64);
        let c = config(
            "qwen3",
            &[
                ("qwen3.attention.key_length", Value::U32(128)),
                ("qwen3.attention.value_length", Value::U32(128)),
            ],
        )
        .unwrap();
        assert_eq!(
            (c.head_dim, c.architecture.rope_style()),
            (128, RopeStyle::Halves)
        );
        let err = config(
            "llama",
            &[
                ("llama.attention.key_length", Value::U32(128)),
                ("llama.attention.value_length", Value::U32(64)),
            ],
        )
        .unwrap_err();
        assert!(err.contains("value heads are 64"), "{err}");
    }

    #[test]
    fn rope_scaling_is_linear_or_refused_by_name() {
        let linear = [
            ("llama.rope.scaling.type", Value::String("linear".into())),
            ("llama.rope.scaling.factor", Value::F32(4.0)),
        ];
        assert_eq!(config("llama", &linear).unwrap().rope_position_scale, 0.25);
        let old = [("llama.rope.scale_linear", Value::F32(2.0))];
        assert_eq!(config("llama", &old).unwrap().rope_position_scale, 0.5);
        assert_eq!(config("llama", &[]).unwrap().rope_position_scale, 1.0);
        let yarn = [
            ("llama.rope.scaling.type", Value::String("yarn".into())),
            ("llama.rope.scaling.factor", Value::F32(4.0)),
        ];
        let err = config("llama", &yarn).unwrap_err();
        assert!(err.contains("`yarn` rope scaling"), "{err}");
    }

    #[test]
    fn gemma3_slides_five_layers_of_six_with_their_own_rope_base() {
        let mut extra = vec![("gemma3.attention.sliding_window", Value::U32(512))];
        let c = config("gemma3", &extra).unwrap();
        assert!(c.scale_embeddings);
        let s = c.sliding.as_ref().unwrap();
        assert_eq!((s.window, s.rope_base), (512, 10_000.0));
        assert_eq!(s.layers, vec![true, true]);
        extra.push(("gemma3.block_count", Value::U32(12)));
        let c = config("gemma3", &extra).unwrap();
        let global: Vec<usize> = (0..12).filter(|&i| !c.is_sliding(i)).collect();
        assert_eq!(global, vec![5, 11]);
        assert!(config("llama", &[]).unwrap().sliding.is_none());
    }

    #[test]
    fn other_architectures_and_experts_are_refused_by_name() {
        let err = config("gpt2", &[]).unwrap_err();
        assert!(
            err.contains("`gpt2`") && err.contains("llama, qwen2, qwen3, gemma3"),
            "{err}"
        );
        let err = config("llama", &[("llama.expert_count", Value::U32(8))]).unwrap_err();
        assert!(
            err.contains("mixture-of-experts model (8 experts)"),
            "{err}"
        );
    }
}
