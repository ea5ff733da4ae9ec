//! A request's ring context (docs/PROTOCOL.md §9.3): who started it, which
//! node runs which layers, how the last shard samples, and how far the request
//! may grow. It rides on a request's first step only; every shard keeps it
//! with the request's cache, so a generated token costs no parsing.

use serde::{Deserialize, Serialize};

use super::codec::{Reader, Writer};
use super::handshake::MAX_NODE_ID;
use super::message::Shard;
use super::ProtocolError;

/// The most alternatives a step may ask log-probabilities for (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// One node's layers `[start_layer, end_layer]` in a ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub node_id: String,
    pub start_layer: u32,
    /// Inclusive, as in exo and the wire's `Shard`.
    pub end_layer: u32,
}

/// OpenAI's sampling parameters, as the last shard applies them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingParams {
    /// Temperature 0: the likeliest token, no draw.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// OpenAI's ranges, which the API holds a request to and every shard a
    /// ring context to: the parameter out of range, and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err((
                "temperature",
                format!(
                    "`temperature` must be between 0 and 2, not {}",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err((
                "top_p",
                format!("`top_p` must be above 0 and at most 1, not {}", self.top_p),
            ));
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// What every shard of a request needs beyond its own step's input.
#[derive(Debug, Clone, PartialEq)]
pub struct RingContext {
    /// The node that started the request (named in errors).
    pub origin: String,
    /// The whole ring in layer order.
    pub ring: Vec<Assignment>,
    pub sampling: SamplingParams,
    /// The positions the request may grow to, prompt and answer: what each
    /// shard reserves for its cache at the first step. `None`: the context.
    pub max_positions: Option<u64>,
    /// OpenAI's `top_logprobs`: the last shard answers with the sampled
    /// token's log-probability and this many alternatives'.
    pub top_logprobs: Option<u32>,
}

impl RingContext {
    /// The rules of §9.3: sampling within its ranges, and a ring that covers
    /// every layer of `shard`'s model once, in order, with `shard` itself one
    /// of its entries.
    pub fn validate(&self, shard: &Shard) -> Result<(), String> {
        self.sampling.check().map_err(|(_, why)| why)?;
        // A shard keeps the context as long as the request: ids are held to
        // a hello's bounds, so a context costs at most a few KiB.
        for id in std::iter::once(&self.origin).chain(self.ring.iter().map(|h| &h.node_id)) {
            if id.is_empty() || id.len() > MAX_NODE_ID {
                return Err(format!(
                    "node ids are 1 to {MAX_NODE_ID} bytes, not {}",
                    id.len()
                ));
            }
        }
        if self.max_positions == Some(0) {
            return Err("`max_positions` must be at least 1".into());
        }
        if let Some(k) = self.top_logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(format!(
                "`top_logprobs` is at most {MAX_TOP_LOGPROBS}, not {k}"
            ));
        }
        let mut next = 0u32;
        for hop in &self.ring {
            if hop.start_layer != next || hop.end_layer < hop.start_layer {
                return Err(format!(
                    "the ring's entry for `{}` covers layers {}–{} where layer {next} comes next",
                    hop.node_id, hop.start_layer, hop.end_layer
                ));
            }
            next = hop.end_layer.saturating_add(1);
        }
        if next != shard.n_layers {
            return Err(format!(
                "the ring covers layers up to {next}, not all {} of the model",
                shard.n_layers
            ));
        }
        if !self
            .ring
            .iter()
            .any(|h| (h.start_layer, h.end_layer) == (shard.start_layer, shard.end_layer))
        {
            return Err(format!(
                "the ring has no entry for layers {}–{}, which this step names",
                shard.start_layer, shard.end_layer
            ));
        }
        Ok(())
    }

    /// The entry that runs the layers after `end_layer`.
    pub fn after(&self, end_layer: u32) -> Option<&Assignment> {
        self.ring
            .iter()
            .find(|a| Some(a.start_layer) == end_layer.checked_add(1))
    }
}

pub(crate) fn write_context(w: &mut Writer, c: &RingContext) {
    w.str(&c.origin);
    w.count(c.ring.len());
    for hop in &c.ring {
        w.str(&hop.node_id);
        w.u32(hop.start_layer);
        w.u32(hop.end_layer);
    }
    w.f32(c.sampling.temperature);
    w.f32(c.sampling.top_p);
    w.u64(c.sampling.seed);
    w.bool(c.max_positions.is_some());
    if let Some(n) = c.max_positions {
        w.u64(n);
    }
    w.bool(c.top_logprobs.is_some());
    if let Some(k) = c.top_logprobs {
        w.u32(k);
    }
}

pub(crate) fn read_context(r: &mut Reader<'_>) -> Result<RingContext, ProtocolError> {
    let origin = r.str("ring origin")?;
    // An entry is at least an empty id and two layer numbers: 4 + 4 + 4 bytes.
    let n = r.count(12, "ring entries")?;
    let mut ring = Vec::with_capacity(n);
    for _ in 0..n {
        ring.push(Assignment {
            node_id: r.str("ring node id")?,
            start_layer: r.u32("ring start layer")?,
            end_layer: r.u32("ring end layer")?,
        });
    }
    let sampling = SamplingParams {
        temperature: r.f32("temperature")?,
        top_p: r.f32("top_p")?,
        seed: r.u64("seed")?,
    };
    let max_positions = match r.present("max positions tag")? {
        true => Some(r.u64("max positions")?),
        false => None,
    };
    let top_logprobs = match r.present("top logprobs tag")? {
        true => Some(r.u32("top logprobs")?),
        false => None,
    };
    Ok(RingContext {
        origin,
        ring,
        sampling,
        max_positions,
        top_logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(id: &str, start: u32, end: u32) -> Assignment {
        Assignment {
            node_id: id.into(),
            start_layer: start,
            end_layer: end,
        }
    }

    fn context(ring: Vec<Assignment>) -> RingContext {
        RingContext {
            origin: "mac1".into(),
            ring,
            sampling: SamplingParams::default(),
            max_positions: Some(80),
            top_logprobs: None,
        }
    }

    fn shard(start: u32, end: u32, n: u32) -> Shard {
        Shard {
            model_sha256: "0".repeat(64),
            start_layer: start,
            end_layer: end,
            n_layers: n,
        }
    }

    #[test]
    fn a_ring_must_cover_every_layer_once_in_order_and_name_the_step() {
        let two = context(vec![hop("mac1", 0, 14), hop("mac2", 15, 29)]);
        assert_eq!(two.validate(&shard(15, 29, 30)), Ok(()));
        assert_eq!(two.after(14).map(|a| a.node_id.as_str()), Some("mac2"));
        assert_eq!(two.after(29), None);
        assert_eq!(two.after(u32::MAX), None);
        let why = two.validate(&shard(0, 29, 30)).unwrap_err();
        assert!(why.contains("no entry for layers 0–29"), "{why}");
        let why = two.validate(&shard(0, 14, 31)).unwrap_err();
        assert!(why.contains("up to 30, not all 31"), "{why}");
        let gap = context(vec![hop("mac1", 0, 13), hop("mac2", 15, 29)]);
        let why = gap.validate(&shard(0, 13, 30)).unwrap_err();
        assert!(
            why.contains("`mac2` covers layers 15–29 where layer 14"),
            "{why}"
        );
        let long = context(vec![hop(&"m".repeat(MAX_NODE_ID + 1), 0, 29)]);
        let why = long.validate(&shard(0, 29, 30)).unwrap_err();
        assert!(why.contains("1 to 255 bytes, not 256"), "{why}");
        let nameless = context(vec![hop("", 0, 29)]);
        assert!(nameless.validate(&shard(0, 29, 30)).is_err());
        let wrapped = context(vec![hop("mac1", 0, u32::MAX)]);
        assert!(wrapped.validate(&shard(0, 0, 1)).is_err());
    }

    #[test]
    fn sampling_and_limits_are_held_to_their_ranges() {
        let mut c = context(vec![hop("mac1", 0, 29)]);
        let s = shard(0, 29, 30);
        c.sampling.temperature = 2.5;
        assert!(c.validate(&s).unwrap_err().contains("temperature"));
        c.sampling = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert!(c.validate(&s).unwrap_err().contains("top_p"));
        c.sampling = SamplingParams::default();
        c.max_positions = Some(0);
        assert!(c.validate(&s).unwrap_err().contains("max_positions"));
        c.max_positions = None;
        c.top_logprobs = Some(MAX_TOP_LOGPROBS + 1);
        assert!(c.validate(&s).unwrap_err().contains("at most 20, not 21"));
        c.top_logprobs = Some(MAX_TOP_LOGPROBS);
        assert_eq!(c.validate(&s), Ok(()));
    }
}
