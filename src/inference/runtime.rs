//! A node's part in inference: the model it holds, the layers it has loaded,
//! the caches of the requests passing through, and the answer to a step from
//! a peer: run this node's layers, then sample or pass the result on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};

use super::cache::{CacheError, Caches, RequestState, StepAsk};
use super::chat::ChatTemplate;
use super::fingerprint;
use super::gguf::ModelFile;
use super::logprobs::{self, TokenLogprobs};
use super::memory::{self, Footprint};
use super::model::{ShardModel, ShardOutput};
use super::sampler::Sampler;
use super::tokenizer::ModelTokenizer;
use super::{candle, InferenceError, Ring};
use crate::fetch::serve::ServedFile;
use crate::net::client::RequestError;
use crate::net::sync::lock;
use crate::protocol::{self, DType, ErrorCode, InferenceState, Message, RingContext, Shard};
use crate::topology::ModelInfo;

/// A request whose origin vanished without ending it frees its caches after this.
const IDLE_REQUEST: Duration = Duration::from_secs(300);
/// Requests one node serves at once; each holds a KV cache.
const MAX_REQUESTS: usize = 64;
/// Positions one step may carry. Attention's scores grow with the square of
/// a step's length, so the origin feeds a long prompt in steps of this size
/// and a peer may not send more.
pub const MAX_STEP_TOKENS: usize = 512;

/// Ends a request on a shard: sent by the origin as `SendOpaqueStatus`.
pub const END_STATUS: &str = r#"{"type":"end"}"#;

#[derive(Clone)]
pub struct Inference {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: String,
    file: ModelFile,
    /// The same file, as peers may copy it.
    served: ServedFile,
    info: ModelInfo,
    tokenizer: ModelTokenizer,
    template: Option<ChatTemplate>,
    device: Device,
    shard: tokio::sync::Mutex<Option<Arc<ShardModel>>>,
    caches: Mutex<Caches>,
    /// One forward pass at a time, taken in arrival order (see [`Inference::run`]).
    compute: Arc<tokio::sync::Semaphore>,
    /// The footprint of the layers steps last asked for: a first step needs it
    /// to reserve its cache, and the split rarely changes.
    footprint: Mutex<Option<((usize, usize), Footprint)>>,
}

/// How a node loads its model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Bounds the positions of a request (see [`ModelFile::limit_context`]).
    pub ctx_size: Option<usize>,
    /// The MiB this node lends the model, its layers and every request's
    /// cache together (`--memory-limit`) [default:
    /// [`memory::default_limit_mib`] of this machine's memory].
    pub memory_limit_mib: Option<u64>,
    /// Where the model's sha256 is remembered between starts (see
    /// [`fingerprint`]); `None` reads the whole file at every load.
    pub hash_records: Option<std::path::PathBuf>,
    /// The sha256 the file must have (`--model-sha256`); another file is refused.
    pub expected_sha256: Option<String>,
}

impl LoadOptions {
    pub fn memory_limit_mib(&self) -> u64 {
        self.memory_limit_mib
            .unwrap_or_else(|| memory::default_limit_mib(crate::capabilities::detect().memory))
    }
}

/// What a step comes back with: the token the last shard sampled and, when
/// the request asked, log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct StepAnswer {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

impl StepAnswer {
    /// i32 `[1, 1]`, or with log-probabilities [`logprobs::to_wire`]'s tensor.
    fn to_wire(&self) -> protocol::Tensor {
        match &self.logprobs {
            None => token_tensor(&[self.token]),
            Some(lp) => logprobs::to_wire(lp),
        }
    }

    /// The answer as [`StepAnswer::to_wire`] wrote it, for a request that
    /// asked for `top_logprobs` (or not) of a `vocab`-token model.
    fn from_wire(
        t: &protocol::Tensor,
        top_logprobs: Option<usize>,
        vocab: usize,
    ) -> Result<Self, String> {
        match top_logprobs {
            None if t.dtype() == DType::I32 && t.data().len() == 4 => {
                let b = t.data();
                Ok(StepAnswer {
                    token: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    logprobs: None,
                })
            }
            None => Err(format!(
                "a token comes as i32 [1, 1], not {} {:?}",
                t.dtype().name(),
                t.shape()
            )),
            Some(k) => {
                let lp = logprobs::from_wire(t, k, vocab)?;
                Ok(StepAnswer {
                    token: lp.token.0,
                    logprobs: Some(lp),
                })
            }
        }
    }
}

impl Inference {
    /// Opens and hashes the model; layers are loaded when the first step says
    /// which ones this node runs.
    pub fn load(
        node_id: &str,
        path: &std::path::Path,
        options: &LoadOptions,
    ) -> Result<Self, InferenceError> {
        let mut file = ModelFile::open(path)?;
        let served = ServedFile::open(path).map_err(|e| InferenceError::Io {
            what: format!("cannot open {} to give it to peers", path.display()),
            source: e,
        })?;
        file.limit_context(options.ctx_size)?;
        // 0 MiB is "unknown" (the machine's memory could not be read), as in
        // the capabilities peers see: there is nothing to check against.
        let limit = match options.memory_limit_mib() {
            0 => u64::MAX,
            mib => memory::mib(mib),
        };
        let hashing = std::time::Instant::now();
        let fingerprint = fingerprint::sha256(path, options.hash_records.as_deref())?;
        let ms = hashing.elapsed().as_millis() as u64;
        if fingerprint.remembered {
            tracing::info!(ms, "the model's sha256 is remembered from an earlier start");
        } else {
            tracing::info!(ms, "hashed the model");
        }
        let sha256 = fingerprint.sha256;
        if let Some(expected) = options.expected_sha256.as_deref() {
            if !sha256.eq_ignore_ascii_case(expected) {
                return Err(InferenceError::WrongModel(format!(
                    "{} has sha256 {sha256}, but the cluster's model is {expected} (--model-sha256, \
                     from cluster.toml's [model] sha256): put the cluster's file there, or correct \
                     the sha256 in cluster.toml and run the installer again",
                    path.display()
                )));
            }
        }
        let served = served.with_sha256(&sha256);
        let tokenizer = ModelTokenizer::from_gguf(file.metadata())?;
        let template = ChatTemplate::from_gguf(file.metadata(), &tokenizer)?;
        let info = ModelInfo {
            name: file.display_name(),
            sha256,
            n_layers: file.config().n_layers as u32,
        };
        Ok(Inference {
            inner: Arc::new(Inner {
                node_id: node_id.to_owned(),
                file,
                served,
                info,
                tokenizer,
                template,
                device: device(),
                shard: tokio::sync::Mutex::new(None),
                caches: Mutex::new(Caches::new(IDLE_REQUEST, MAX_REQUESTS, limit)),
                compute: Arc::new(tokio::sync::Semaphore::new(1)),
                footprint: Mutex::new(None),
            }),
        })
    }

    /// [`Inference::load`] on a blocking thread, for a caller on the async
    /// runtime, logged as this node's model once it is ready.
    pub async fn load_in_background(
        node_id: &str,
        path: &std::path::Path,
        options: &LoadOptions,
    ) -> Result<Self, InferenceError> {
        let began = std::time::Instant::now();
        tracing::info!("loading {}", path.display());
        let (id, file, opts) = (node_id.to_owned(), path.to_owned(), options.clone());
        let inference = tokio::task::spawn_blocking(move || Inference::load(&id, &file, &opts))
            .await
            .unwrap_or_else(|e| {
                Err(InferenceError::Internal(format!(
                    "loading the model failed: {e}"
                )))
            })?;
        let info = inference.info();
        tracing::info!(
            model = %info.name, sha256 = %info.sha256, layers = info.n_layers,
            ms = began.elapsed().as_millis() as u64, "model ready"
        );
        Ok(inference)
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// `metal` or `cpu`: where this node's layers run.
    pub fn device_name(&self) -> &'static str {
        if self.inner.device.is_metal() {
            "metal"
        } else {
            "cpu"
        }
    }

    /// The loaded file, for a peer that fetches it.
    pub fn served_file(&self) -> &ServedFile {
        &self.inner.served
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    pub fn tokenizer(&self) -> &ModelTokenizer {
        &self.inner.tokenizer
    }

    pub fn template(&self) -> Option<&ChatTemplate> {
        self.inner.template.as_ref()
    }

    pub(crate) fn file(&self) -> &ModelFile {
        &self.inner.file
    }

    pub fn context_length(&self) -> usize {
        self.inner.file.config().context_length
    }

    /// Requests holding a cache on this node right now.
    pub fn active_requests(&self) -> usize {
        lock(&self.inner.caches).len()
    }

    /// Ends a request here: its caches are freed.
    pub fn end_request(&self, request_id: &str) {
        lock(&self.inner.caches).remove(request_id);
    }

    /// The model for layers `[start, end]`, loading it when the partition has
    /// changed. Loading replaces the old shard and its caches, which belong to
    /// requests that cannot continue on a different split anyway.
    async fn shard(&self, start: usize, end: usize) -> Result<Arc<ShardModel>, InferenceError> {
        let mut loaded = self.inner.shard.lock().await;
        if let Some(model) = loaded.as_ref().filter(|m| (m.start, m.end) == (start, end)) {
            return Ok(model.clone());
        }
        *loaded = None;
        lock(&self.inner.caches).clear_resting();
        let inner = self.inner.clone();
        let began = std::time::Instant::now();
        let model = tokio::task::spawn_blocking(move || {
            ShardModel::load(&inner.file, start, end, &inner.device)
        })
        .await
        .map_err(|e| {
            InferenceError::Internal(format!(
                "node `{}` failed loading layers {start}–{end}: {e}",
                self.node_id()
            ))
        })??;
        tracing::info!(target: "tensorlink::inference", start, end, ms = began.elapsed().as_millis() as u64, "loaded layers");
        let model = Arc::new(model);
        *loaded = Some(model.clone());
        Ok(model)
    }

    /// Runs one step of a request on this node's layers and on every later
    /// shard of the ring; returns what the last shard sampled.
    pub async fn step(
        &self,
        ring: &dyn Ring,
        shard: &Shard,
        input: protocol::Tensor,
        request_id: &str,
        state: &InferenceState,
    ) -> Result<StepAnswer, InferenceError> {
        // Everything a peer sent is checked, its cache included, before the
        // shard is touched: a bad step must not make this node reload layers
        // or drop other requests' caches.
        let step = self.check(shard, input, state)?;
        lock(&self.inner.caches)
            .admits(request_id, &step.ask)
            .map_err(|e| self.cache_error(e))?;
        let model = self.shard(step.ask.layers.0, step.ask.layers.1).await?;
        let (output, mut cache, held) = self.run(&model, step.x, &step.ask, request_id).await?;
        cache.position = step.ask.end;
        // A first step brings the context (checked); a later one finds it
        // with the cache its first step built, which `take` gave only to a
        // step at the position it holds.
        let ctx = step.ctx.or_else(|| cache.context.clone()).ok_or_else(|| {
            InferenceError::Internal(format!(
                "node `{}` holds request `{request_id}` without its ring context",
                self.node_id()
            ))
        })?;
        cache.context = Some(ctx.clone());
        match output {
            // On the GPU a greedy step without log-probabilities reads back
            // only the token: the logits (up to a MiB a token) stay there.
            ShardOutput::Logits(logits)
                if self.inner.device.is_metal()
                    && ctx.sampling.is_greedy()
                    && ctx.top_logprobs.is_none() =>
            {
                let token = super::model::argmax(&logits).map_err(candle("choosing the token"))?;
                held.put(cache);
                Ok(StepAnswer {
                    token,
                    logprobs: None,
                })
            }
            ShardOutput::Logits(logits) => {
                let logits: Vec<f32> = logits.to_vec1().map_err(candle("reading the logits"))?;
                let token = cache
                    .sampler
                    .get_or_insert_with(|| Sampler::new(ctx.sampling))
                    .sample(&logits);
                held.put(cache);
                // Over a 262k vocabulary this is a pass or two over the logits:
                // only for requests that ask.
                let logprobs = ctx
                    .top_logprobs
                    .map(|k| logprobs::of(&logits, token, k as usize));
                Ok(StepAnswer { token, logprobs })
            }
            ShardOutput::Hidden(hidden) => {
                held.put(cache);
                self.pass_on(ring, &ctx, shard, &hidden, request_id, state)
                    .await
            }
        }
    }

    /// A step as a peer sent it, checked against this node's model: the right
    /// file, an input these layers take, positions within the context. Only
    /// a request's first step carries its ring context; later steps use the
    /// one its cache keeps.
    fn check(
        &self,
        shard: &Shard,
        input: protocol::Tensor,
        state: &InferenceState,
    ) -> Result<CheckedStep, InferenceError> {
        let not_understood = |why: String| {
            InferenceError::BadRequest(format!(
                "the step's inference state is not understood: {why}"
            ))
        };
        let ctx = match (&state.context, state.position) {
            (Some(ctx), 0) => {
                ctx.validate(shard).map_err(not_understood)?;
                Some(Arc::new(ctx.clone()))
            }
            (None, 0) => {
                return Err(not_understood(
                    "a request's first step (position 0) carries its ring context".into(),
                ))
            }
            (Some(_), _) => {
                return Err(not_understood(
                    "only a request's first step (position 0) carries its ring context".into(),
                ))
            }
            (None, _) => None,
        };
        let info = &self.inner.info;
        if shard.model_sha256 != info.sha256 || shard.n_layers != info.n_layers {
            let origin = match &ctx {
                Some(ctx) => format!("node `{}`", ctx.origin),
                None => "the request's origin".into(),
            };
            return Err(InferenceError::WrongModel(format!(
                "node `{}` holds `{}` (sha256 {}), but {origin} runs a model with sha256 {}: \
                 every node must hold the same model file",
                self.node_id(),
                info.name,
                short(&info.sha256),
                short(&shard.model_sha256)
            )));
        }
        let layers = (shard.start_layer as usize, shard.end_layer as usize);
        let x = self.input_tensor(layers.0 == 0, layers, input)?;
        let n = x.dim(1).map_err(candle("reading the input"))?;
        let context = self.context_length();
        let position = usize::try_from(state.position).unwrap_or(usize::MAX);
        let reach = ctx
            .as_ref()
            .and_then(|c| c.max_positions)
            .map_or(context, |n| usize::try_from(n).unwrap_or(usize::MAX));
        match position.checked_add(n) {
            Some(end) if end <= context => {
                let ask = StepAsk {
                    position,
                    end,
                    layers,
                    reach: reach.min(context),
                    footprint: self.footprint(layers),
                };
                Ok(CheckedStep { ctx, x, ask })
            }
            _ => Err(InferenceError::BadRequest(format!(
                "the step at position {position} with {n} tokens goes beyond the model's context of {context}"
            ))),
        }
    }

    /// What layers `[start, end]` cost on this node, remembered for the
    /// layers asked last.
    fn footprint(&self, layers: (usize, usize)) -> Footprint {
        let mut memo = lock(&self.inner.footprint);
        match *memo {
            Some((for_layers, footprint)) if for_layers == layers => footprint,
            _ => {
                let footprint = Footprint::of(&self.inner.file, layers.0, layers.1);
                *memo = Some((layers, footprint));
                footprint
            }
        }
    }

    /// A cache refusal as the error the origin reports: a full node is
    /// `busy` (HTTP 429), and says which node it is.
    fn cache_error(&self, e: CacheError) -> InferenceError {
        match e {
            CacheError::Full(_) | CacheError::NoMemory { .. } => {
                InferenceError::Busy(format!("node `{}`: {e}", self.node_id()))
            }
            other => InferenceError::Cache(other),
        }
    }

    /// The forward pass through this node's layers, off the async threads,
    /// with the request's cache; the cache comes back held for the request.
    async fn run<'a>(
        &'a self,
        model: &Arc<ShardModel>,
        x: Tensor,
        ask: &StepAsk,
        request_id: &'a str,
    ) -> Result<(ShardOutput, RequestState, InStep<'a>), InferenceError> {
        let position = ask.position;
        let mut cache = lock(&self.inner.caches)
            .take(request_id, ask)
            .map_err(|e| self.cache_error(e))?;
        // However this step ends (an error, or its caller dropping it), the
        // request does not stay counted as "in a step".
        let held = InStep {
            caches: &self.inner.caches,
            id: request_id,
        };
        let run = model.clone();
        // On one of rayon's own threads, not a blocking thread of tokio's:
        // every parallel matmul called from outside rayon's pool queues its
        // work and sleeps its caller on a condvar until it is done, hundreds
        // of sleeps and wake-ups a token (40% of a SmolLM2 decode's time,
        // profiled); from inside the pool the caller works on its share. One
        // pass at a time, in the order steps arrive: a rayon thread waiting
        // inside a matmul takes any queued job, so a second queued pass would
        // run on top of the first and hold it up to its end.
        let permit = self
            .inner
            .compute
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| {
                InferenceError::Internal(format!("node `{}` is shutting down", self.node_id()))
            })?;
        let (done, ran) = tokio::sync::oneshot::channel();
        rayon::spawn(move || {
            let _permit = permit;
            if done.is_closed() {
                return; // the step was given up while it waited
            }
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run.forward(&x, position, &mut cache.layers)
            }));
            let _ = done.send((out, cache));
        });
        // Words for a failure only: no string is made for a step that runs.
        let layers = || format!("layers {}–{}", model.start, model.end);
        let failed = |why: String| {
            InferenceError::Internal(format!(
                "node `{}` failed running {}: {why}",
                self.node_id(),
                layers()
            ))
        };
        match ran.await {
            Ok((Ok(Ok(output)), cache)) => Ok((output, cache, held)),
            Ok((Ok(Err(e)), _)) => Err(InferenceError::Candle {
                what: format!("node `{}` running {}", self.node_id(), layers()),
                source: e,
            }),
            Ok((Err(panic), _)) => Err(failed(format!(
                "it panicked: {}",
                crate::server::panic_message(panic.as_ref())
            ))),
            Err(_) => Err(failed("the forward pass ended without an answer".into())),
        }
    }

    /// Sends the hidden states to the node that runs the next layers.
    async fn pass_on(
        &self,
        ring: &dyn Ring,
        ctx: &RingContext,
        shard: &Shard,
        hidden: &Tensor,
        request_id: &str,
        state: &InferenceState,
    ) -> Result<StepAnswer, InferenceError> {
        let next = ctx.after(shard.end_layer).ok_or_else(|| {
            InferenceError::BadRequest(format!(
                "the ring names no node for layer {}",
                shard.end_layer + 1
            ))
        })?;
        let message = Message::SendTensor {
            shard: Shard {
                start_layer: next.start_layer,
                end_layer: next.end_layer,
                ..shard.clone()
            },
            tensor: hidden_to_wire(hidden)?,
            request_id: request_id.to_owned(),
            inference_state: Some(state.clone()),
        };
        let top = ctx.top_logprobs.map(|k| k as usize);
        self.send_step(ring, &next.node_id, message, top).await
    }

    /// The step's input as a tensor for layers `range`: token ids for the
    /// first shard, hidden states for the others, at most [`MAX_STEP_TOKENS`].
    fn input_tensor(
        &self,
        first: bool,
        range: (usize, usize),
        t: protocol::Tensor,
    ) -> Result<Tensor, InferenceError> {
        let config = self.inner.file.config();
        let dev = &self.inner.device;
        let shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
        let bad = |want: &str| {
            InferenceError::BadRequest(format!(
                "layers {}–{} take {want}, not {} {:?}",
                range.0,
                range.1,
                t.dtype().name(),
                t.shape()
            ))
        };
        if shape.len() < 2 || shape[0] != 1 || shape[1] == 0 || shape[1] > MAX_STEP_TOKENS {
            return Err(bad(&format!(
                "a batch of 1 and 1 to {MAX_STEP_TOKENS} positions"
            )));
        }
        if first {
            if t.dtype() != DType::I32 || shape.len() != 2 {
                return Err(bad("token ids (i32 [1, n])"));
            }
            let vocab = config.vocab_size as u32;
            let ids: Vec<u32> = t
                .data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if let Some(bad_id) = ids.iter().find(|&&id| id >= vocab) {
                return Err(InferenceError::BadRequest(format!(
                    "token id {bad_id} is outside the vocabulary of {vocab}"
                )));
            }
            Tensor::from_vec(ids, (1, shape[1]), dev).map_err(candle("reading token ids"))
        } else {
            let hidden = config.hidden;
            if t.dtype() != DType::F32 || shape.len() != 3 || shape[2] != hidden {
                return Err(bad(&format!("hidden states (f32 [1, n, {hidden}])")));
            }
            let values: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(values, (1, shape[1], hidden), dev)
                .map_err(candle("reading hidden states"))
        }
    }
}

/// A step that passed [`Inference::check`].
struct CheckedStep {
    /// Only on a request's first step.
    ctx: Option<Arc<RingContext>>,
    x: Tensor,
    ask: StepAsk,
}

/// A request's state out of the caches for one step.
struct InStep<'a> {
    caches: &'a Mutex<Caches>,
    id: &'a str,
}

impl InStep<'_> {
    fn put(self, state: RequestState) {
        lock(self.caches).put(self.id.to_owned(), state);
        std::mem::forget(self);
    }
}

impl Drop for InStep<'_> {
    fn drop(&mut self) {
        lock(self.caches).abandon(self.id);
    }
}

impl Inference {
    /// Sends a step to a peer and reads its answer, or turns its failure into
    /// an error that says which link or node failed.
    pub(crate) async fn send_step(
        &self,
        ring: &dyn Ring,
        to: &str,
        message: Message,
        top_logprobs: Option<usize>,
    ) -> Result<StepAnswer, InferenceError> {
        let me = self.node_id();
        let sent = ring.send(to, message).ok_or_else(|| {
            InferenceError::Unavailable(format!("node `{me}` has no link to node `{to}`"))
        })?;
        let vocab = self.inner.file.config().vocab_size;
        match sent.await {
            Ok(Message::TensorResult(Some(t))) => StepAnswer::from_wire(&t, top_logprobs, vocab)
                .map_err(|why| InferenceError::Remote {
                    code: ErrorCode::Internal,
                    message: format!("node `{to}` answered a step wrongly: {why}"),
                }),
            Ok(other) => Err(InferenceError::Remote {
                code: ErrorCode::Internal,
                message: format!("node `{to}` answered a step with {:?}", other.frame_type()),
            }),
            Err(RequestError::Remote { code, message }) => {
                Err(InferenceError::Remote { code, message })
            }
            Err(RequestError::Closed(why)) => Err(InferenceError::Unavailable(format!(
                "node `{me}` lost its link to node `{to}` mid-request: {why}"
            ))),
            Err(e) => Err(InferenceError::Unavailable(format!(
                "node `{me}` could not send the step to node `{to}`: {e}"
            ))),
        }
    }
}

pub(crate) fn token_tensor(ids: &[u32]) -> protocol::Tensor {
    let data: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    protocol::Tensor::new(DType::I32, vec![1, ids.len() as u64], data)
        .expect("i32 [1, n] with 4·n bytes is consistent")
}

fn hidden_to_wire(hidden: &Tensor) -> Result<protocol::Tensor, InferenceError> {
    let (b, n, h) = hidden.dims3().map_err(candle("shaping hidden states"))?;
    let values: Vec<f32> = hidden
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(candle("reading hidden states"))?;
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    protocol::Tensor::new(DType::F32, vec![b as u64, n as u64, h as u64], data)
        .map_err(|e| InferenceError::Internal(e.to_string()))
}

impl Inference {
    /// Answers an inference request from a peer: a step (`SendTensor`, or
    /// `SendPrompt` whose text this node tokenizes first) with the sampled
    /// token, or an `Error` that says whose fault it was.
    pub async fn answer(&self, request: Message, ring: Arc<dyn Ring>) -> Message {
        // The server polls this once on the connection's read loop: give the
        // loop back at once, so that checking and converting the step's tensor
        // (up to 512 positions of hidden states) happens in the request's task.
        tokio::task::yield_now().await;
        let from_prompt = matches!(request, Message::SendPrompt { .. });
        let (shard, input, request_id, state) = match request {
            Message::SendTensor {
                shard,
                tensor,
                request_id,
                inference_state: Some(state),
            } => (shard, tensor, request_id, state),
            Message::SendPrompt {
                shard,
                prompt,
                request_id,
                inference_state: Some(state),
            } => match self.tokenize(prompt).await {
                Ok(ids) if !ids.is_empty() => (shard, token_tensor(&ids), request_id, state),
                Ok(_) => return Message::error(ErrorCode::Malformed, "the prompt is empty"),
                Err(e) => return Message::error(e.code(), e.to_string()),
            },
            Message::SendTensor { .. } | Message::SendPrompt { .. } => {
                return Message::error(
                    ErrorCode::Malformed,
                    "a step needs its inference state (position and ring)",
                )
            }
            other => {
                return Message::error(
                    ErrorCode::UnknownType,
                    format!(
                        "node `{}` runs inference only; {:?} (training) is not implemented",
                        self.node_id(),
                        other.frame_type()
                    ),
                )
            }
        };
        match self.step(&*ring, &shard, input, &request_id, &state).await {
            Ok(answer) if from_prompt => Message::PromptResult(Some(answer.to_wire())),
            Ok(answer) => Message::TensorResult(Some(answer.to_wire())),
            Err(e) => Message::error(e.code(), e.to_string()),
        }
    }

    /// A `SendOpaqueStatus` from a peer: the origin ending a request.
    pub fn status(&self, request_id: &str, status: &str) {
        if status == END_STATUS {
            self.end_request(request_id);
        }
    }

    /// A prompt (up to the peer's metadata limit, a MiB by default) as token
    /// ids, on a blocking thread: the server polls [`Inference::answer`] on
    /// the connection's read loop until its first await.
    async fn tokenize(&self, prompt: String) -> Result<Vec<u32>, InferenceError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.tokenizer().encode(&prompt))
            .await
            .map_err(|e| InferenceError::Internal(format!("tokenizing the prompt failed: {e}")))?
            .map_err(InferenceError::from)
    }
}

/// The first 12 hex digits: enough to tell files apart in a message.
pub fn short(sha256: &str) -> String {
    let head: String = sha256.chars().take(12).collect();
    format!("{head}…")
}

/// The GPU where candle has a backend for it and the build asked for it.
fn device() -> Device {
    #[cfg(all(feature = "metal", target_vendor = "apple"))]
    // candle 0.9 finds the GPU through MTLCreateSystemDefaultDevice, which
    // Apple does not support outside an interactive session (a LaunchDaemon
    // before anyone logs in may get none) and then panics rather than erring.
    match std::panic::catch_unwind(|| Device::new_metal(0)) {
        Ok(Ok(d)) => return d,
        Ok(Err(e)) => {
            tracing::warn!(target: "tensorlink::inference", "Metal unavailable, running on the CPU: {e}")
        }
        Err(_) => tracing::warn!(
            target: "tensorlink::inference",
            "Metal unavailable (no GPU device in this session), running on the CPU"
        ),
    }
    Device::Cpu
}
