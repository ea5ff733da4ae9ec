//! The origin's side of a request: plan the ring from the topology, then drive
//! it one step at a time, turning tokens into text as they arrive. The loop
//! stops at an end-of-generation token, a stop string, `max_tokens`, an error
//! anywhere in the ring, or when whoever asked stops listening; in every case
//! each node of the ring is told, so its caches go with the request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::logprobs::TokenLogprobs;
use super::memory::{human, mib, Footprint};
use super::partition::{memory_weighted, Assignment};
use super::runtime::{short, token_tensor, END_STATUS, MAX_STEP_TOKENS};
use super::sampler::SamplingParams;
use super::tokenizer::{Emit, TextStream};
use super::{Inference, InferenceError, Ring};
use crate::protocol::{InferenceState, Message, RingContext, Shard};
use crate::topology::Topology;

/// Longest a step may take, prompt included, before the request fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Log-probabilities of each generated token and of this many
    /// alternatives ([`super::logprobs::MAX_TOP`] at most); none when absent.
    pub top_logprobs: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Every generated id, end-of-generation token included.
    pub tokens: Vec<u32>,
    /// Prompt in, first token out.
    pub prefill: Duration,
    /// The steps after the first.
    pub decode: Duration,
}

#[derive(Debug)]
pub enum StreamEvent {
    /// New text and, when the request asked, the log-probabilities of the
    /// tokens that made it (a token whose bytes end no character yet is
    /// listed with the text that completes it).
    Text {
        text: String,
        logprobs: Vec<TokenLogprobs>,
    },
    Done(Summary),
    Failed(InferenceError),
}

/// A started request: its events, ending with `Done` or `Failed`. Dropping it
/// cancels the request on every node.
pub struct Generation {
    pub ring: Vec<Assignment>,
    pub events: mpsc::Receiver<StreamEvent>,
}

impl Inference {
    /// Plans the ring and starts the request. Errors that mean it cannot run at
    /// all (a node missing or holding another file) come back here, before
    /// anything is streamed.
    pub async fn generate(
        &self,
        ring: Arc<dyn Ring>,
        request: GenerateRequest,
    ) -> Result<Generation, InferenceError> {
        if request.prompt.is_empty() {
            return Err(InferenceError::BadRequest("the prompt is empty".into()));
        }
        let room = self.context_length().saturating_sub(request.prompt.len());
        if room == 0 {
            return Err(InferenceError::BadRequest(format!(
                "the prompt has {} tokens; this cluster's context holds {} (--ctx-size)",
                request.prompt.len(),
                self.context_length()
            )));
        }
        let topology = ring.topology().await;
        let plan = self.plan(&topology)?;
        let (tx, events) = mpsc::channel(64);
        let request = GenerateRequest {
            max_tokens: request.max_tokens.min(room),
            ..request
        };
        let this = self.clone();
        let hops = plan.clone();
        tokio::spawn(async move {
            let request_id = format!("{}-{:016x}", this.node_id(), fastrand::u64(..));
            let outcome = this.drive(&*ring, &hops, &request_id, request, &tx).await;
            this.end_everywhere(&*ring, &hops, &request_id);
            match outcome {
                Ok(Some(summary)) => {
                    let _ = tx.send(StreamEvent::Done(summary)).await;
                }
                Ok(None) => {
                    tracing::debug!(target: "tensorlink::inference", %request_id, "cancelled: the client left")
                }
                Err(e) => {
                    tracing::warn!(target: "tensorlink::inference", %request_id, "request failed: {e}");
                    let _ = tx.send(StreamEvent::Failed(e)).await;
                }
            }
        });
        Ok(Generation { ring: plan, events })
    }

    /// The ring for this topology: every node must hold this very file, and
    /// each node must be linked to the next. Layers follow memory.
    pub fn plan(&self, topology: &Topology) -> Result<Vec<Assignment>, InferenceError> {
        let me = self.node_id();
        let mine = self.info();
        for id in topology.nodes.keys() {
            match topology.models.get(id) {
                None => {
                    return Err(InferenceError::Unavailable(format!(
                        "node `{id}` reports no model: start it with --model {} (or it did not answer in time)",
                        mine.name
                    )))
                }
                Some(theirs) if theirs.sha256 != mine.sha256 => {
                    return Err(InferenceError::WrongModel(format!(
                        "node `{id}` holds `{}` (sha256 {}) but node `{me}` holds `{}` (sha256 {}): \
                         every node must hold the same model file",
                        theirs.name,
                        short(&theirs.sha256),
                        mine.name,
                        short(&mine.sha256)
                    )))
                }
                Some(_) => {}
            }
        }
        let nodes: Vec<(String, u64)> = topology
            .nodes
            .iter()
            .map(|(id, caps)| (id.clone(), caps.memory))
            .collect();
        let ring = memory_weighted(&nodes, mine.n_layers);
        self.check_fits(topology, &ring)?;
        let linked = |from: &str, to: &str| {
            from == to || topology.edges().any(|e| e.from_id == from && e.to_id == to)
        };
        let hops = std::iter::once(me).chain(ring.iter().map(|a| a.node_id.as_str()));
        let ids: Vec<&str> = hops.collect();
        for pair in ids.windows(2) {
            if !linked(pair[0], pair[1]) {
                return Err(InferenceError::Unavailable(format!(
                    "node `{}` has no link to node `{}`, the next in the ring",
                    pair[0], pair[1]
                )));
            }
        }
        Ok(ring)
    }

    /// Every node of the ring holds its layers and the cache of one request
    /// of the whole context within the memory it offers: otherwise no request
    /// could be sure to finish, and the user learns now what to change.
    fn check_fits(&self, topology: &Topology, ring: &[Assignment]) -> Result<(), InferenceError> {
        let context = self.context_length();
        for hop in ring {
            let Some(offered) = topology.nodes.get(&hop.node_id).map(|c| c.memory) else {
                continue;
            };
            // Memory a node does not report is not checked.
            if offered == 0 {
                continue;
            }
            let footprint = Footprint::of(
                self.file(),
                hop.start_layer as usize,
                hop.end_layer as usize,
            );
            let need = footprint.weights.saturating_add(footprint.kv(context));
            if need > mib(offered) {
                return Err(InferenceError::Unavailable(format!(
                    "node `{}` would run layers {}–{}: {} of weights and {} of KV cache for one \
                     request of {context} positions, more than the {} it offers: add a node, use a \
                     smaller quantization, lower --ctx-size, or raise its --memory-limit",
                    hop.node_id,
                    hop.start_layer,
                    hop.end_layer,
                    human(footprint.weights),
                    human(footprint.kv(context)),
                    human(mib(offered)),
                )));
            }
        }
        Ok(())
    }

    /// Runs the steps; `Ok(None)` when the listener went away.
    async fn drive(
        &self,
        links: &dyn Ring,
        ring: &[Assignment],
        request_id: &str,
        request: GenerateRequest,
        tx: &mpsc::Sender<StreamEvent>,
    ) -> Result<Option<Summary>, InferenceError> {
        let ctx = RingContext {
            origin: self.node_id().to_owned(),
            ring: ring.to_vec(),
            sampling: request.sampling,
            max_positions: Some((request.prompt.len() + request.max_tokens) as u64),
            top_logprobs: request.top_logprobs.map(|k| k as u32),
        };
        let first = &ring[0];
        let shard = Shard {
            model_sha256: self.info().sha256.clone(),
            start_layer: first.start_layer,
            end_layer: first.end_layer,
            n_layers: self.info().n_layers,
        };
        let tokenizer = self.tokenizer();
        let mut text = TextStream::new(request.stop.clone());
        let mut generated = Vec::new();
        // The prompt goes in steps of at most MAX_STEP_TOKENS; the token the
        // last shard samples after a part of it is not an answer yet.
        let mut prompt_left: &[u32] = &request.prompt;
        let mut input: Vec<u32>;
        let mut position = 0u64;
        let started = Instant::now();
        let mut prefill = Duration::ZERO;
        let mut finish = FinishReason::Length;
        let mut stopped_by_string = false;
        // Log-probabilities of tokens whose text is not out yet.
        let mut pending: Vec<TokenLogprobs> = Vec::new();
        let text_event = |text: String, pending: &mut Vec<TokenLogprobs>| StreamEvent::Text {
            text,
            logprobs: std::mem::take(pending),
        };

        while generated.len() < request.max_tokens {
            input = match generated.last() {
                _ if !prompt_left.is_empty() => {
                    let (now, rest) = prompt_left.split_at(prompt_left.len().min(MAX_STEP_TOKENS));
                    prompt_left = rest;
                    now.to_vec()
                }
                Some(&token) => vec![token],
                None => unreachable!("the prompt is not empty, so the first step takes part of it"),
            };
            // The context goes with the first step only: every shard keeps it
            // with the request's cache.
            let state = InferenceState {
                position,
                context: (position == 0).then(|| ctx.clone()),
            };
            let step = async {
                if first.node_id == self.node_id() {
                    self.step(links, &shard, token_tensor(&input), request_id, &state)
                        .await
                } else {
                    let message = Message::SendTensor {
                        shard: shard.clone(),
                        tensor: token_tensor(&input),
                        request_id: request_id.to_owned(),
                        inference_state: Some(state.clone()),
                    };
                    self.send_step(links, &first.node_id, message, request.top_logprobs)
                        .await
                }
            };
            // A live link to a node that stopped answering would otherwise hold
            // the request for good; a dead one fails the step at once.
            let step = tokio::time::timeout(STEP_TIMEOUT, step);
            let answer = tokio::select! {
                answer = step => answer.map_err(|_| InferenceError::Unavailable(format!(
                    "the ring {} did not answer a step within {} s",
                    ring.iter().map(|a| a.node_id.as_str()).collect::<Vec<_>>().join(" → "),
                    STEP_TIMEOUT.as_secs()
                )))??,
                _ = tx.closed() => return Ok(None),
            };
            position += input.len() as u64;
            if !prompt_left.is_empty() {
                continue;
            }
            if generated.is_empty() {
                prefill = started.elapsed();
            }
            let token = answer.token;
            generated.push(token);
            if tokenizer.is_end_of_generation(token) {
                finish = FinishReason::Stop;
                break;
            }
            pending.extend(answer.logprobs);
            match text.push(tokenizer, token)? {
                Emit::Text(t) if t.is_empty() => {}
                Emit::Text(t) => {
                    if tx.send(text_event(t, &mut pending)).await.is_err() {
                        return Ok(None);
                    }
                }
                Emit::Stopped(t) => {
                    // The tokens that spelled only the stop string are not
                    // part of the answer, nor are their log-probabilities.
                    keep_within(&mut pending, t.len(), |id| tokenizer.piece(id).len());
                    let out = !t.is_empty() || !pending.is_empty();
                    if out && tx.send(text_event(t, &mut pending)).await.is_err() {
                        return Ok(None);
                    }
                    finish = FinishReason::Stop;
                    stopped_by_string = true;
                    break;
                }
            }
        }
        // What was held back as a possible stop string or half a character.
        if !stopped_by_string {
            let rest = text.finish(tokenizer)?;
            let out = !rest.is_empty() || !pending.is_empty();
            if out && tx.send(text_event(rest, &mut pending)).await.is_err() {
                return Ok(None);
            }
        }
        Ok(Some(Summary {
            finish,
            prompt_tokens: request.prompt.len(),
            completion_tokens: generated.len(),
            tokens: generated,
            prefill,
            decode: started.elapsed().saturating_sub(prefill),
        }))
    }

    /// Tells every node of the ring that the request is over, without waiting:
    /// a node that is gone has nothing to free.
    fn end_everywhere(&self, links: &dyn Ring, ring: &[Assignment], request_id: &str) {
        self.end_request(request_id);
        for hop in ring.iter().filter(|a| a.node_id != self.node_id()) {
            let message = Message::SendOpaqueStatus {
                request_id: request_id.to_owned(),
                status: END_STATUS.to_owned(),
            };
            if let Some(sent) = links.send(&hop.node_id, message) {
                tokio::spawn(sent);
            }
        }
    }
}

/// Drops the entries of `pending` (the tokens not yet sent, in order) whose
/// text begins at or after byte `len` of the text they decode to: what a stop
/// string cut off.
fn keep_within(pending: &mut Vec<TokenLogprobs>, len: usize, bytes: impl Fn(u32) -> usize) {
    let mut at = 0;
    let kept = pending
        .iter()
        .take_while(|lp| {
            let starts = at;
            at += bytes(lp.token.0);
            starts < len
        })
        .count();
    pending.truncate(kept);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(ids: &[u32]) -> Vec<TokenLogprobs> {
        ids.iter()
            .map(|&id| TokenLogprobs {
                token: (id, -1.0),
                top: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_stop_string_takes_the_logprobs_of_the_tokens_that_spelled_it() {
        // Tokens of 3, 2 and 4 bytes: "abc" "de" "STOP"; the answer is "abcde".
        let width = |id: u32| [3, 2, 4][id as usize];
        let mut pending = entries(&[0, 1, 2]);
        keep_within(&mut pending, 5, width);
        assert_eq!(
            pending.iter().map(|l| l.token.0).collect::<Vec<_>>(),
            [0, 1]
        );
        // A token that begins inside the answer and runs into the stop string stays.
        let mut pending = entries(&[0, 1, 2]);
        keep_within(&mut pending, 4, width);
        assert_eq!(pending.len(), 2);
        let mut pending = entries(&[0, 1, 2]);
        keep_within(&mut pending, 0, width);
        assert!(pending.is_empty());
    }
}
