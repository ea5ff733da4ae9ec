//! The key/value cache: per request, per shard, per layer. Each request owns
//! its own, so concurrent chats never see each other's context, and the cache
//! knows how many positions it holds, so a step that arrives out of order is
//! refused instead of silently attending to the wrong past.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::memory::{human, Footprint};
use super::sampler::Sampler;
use crate::protocol::RingContext;

/// One layer's keys and values for one request, `[b, kv_heads, reach,
/// head_dim]` each, set aside at the request's first step for every position
/// it may reach: a step writes its own positions in place, so no step copies
/// what the steps before it cached (growing by concatenation copied the whole
/// cache of every layer at every token). The allocation is zeroed, so on the
/// CPU its pages are only committed as positions are written.
pub struct LayerCache {
    reach: usize,
    kv: Option<(Tensor, Tensor)>,
    len: usize,
}

impl LayerCache {
    /// A cache for up to `reach` positions; nothing is allocated before the
    /// first step, which tells the shape.
    pub fn new(reach: usize) -> Self {
        LayerCache {
            reach,
            kv: None,
            len: 0,
        }
    }

    /// Writes this step's keys and values (`[b, kv_heads, seq, head_dim]`)
    /// after the positions already held and returns views of everything
    /// cached so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, heads, seq, width) = k.dims4()?;
        if self.len + seq > self.reach {
            candle_core::bail!(
                "the cache holds {} positions and was set aside for {}: {seq} more do not fit",
                self.len,
                self.reach
            );
        }
        let (keys, values) = match &self.kv {
            Some(kv) => kv,
            None => {
                let shape = (b, heads, self.reach, width);
                let zeros = || Tensor::zeros(shape, k.dtype(), k.device());
                self.kv.insert((zeros()?, zeros()?))
            }
        };
        keys.slice_set(&k.contiguous()?, 2, self.len)?;
        values.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += seq;
        Ok((keys.narrow(2, 0, self.len)?, values.narrow(2, 0, self.len)?))
    }
}

/// What one shard keeps for one request between steps.
pub struct RequestState {
    pub layers: Vec<LayerCache>,
    /// The number of positions the cache holds: the next step must start here.
    pub position: usize,
    /// Only on the last shard, which samples.
    pub sampler: Option<Sampler>,
    /// The ring context the request's first step brought: later steps
    /// travel without it.
    pub context: Option<Arc<RingContext>>,
    /// The layers the cache is for: a step for other layers cannot use it.
    layers_range: (usize, usize),
    /// The positions the request may grow to, and the bytes of KV cache set
    /// aside for them.
    reach: usize,
    reserved: u64,
    last_used: Instant,
}

/// The caches of the requests a shard is serving. Requests end with a message
/// from their origin; one whose origin vanished is dropped after `idle`.
pub struct Caches {
    requests: HashMap<String, RequestState>,
    /// Requests ended while one of their steps was running: the step's state
    /// is dropped when it comes back instead of living on until `idle`.
    ended: HashMap<String, Instant>,
    /// Requests whose state is out for a step right now, with what they reserved.
    in_step: HashMap<String, u64>,
    idle: Duration,
    max_requests: usize,
    /// Bytes this node lends the model: its layers and every request's cache.
    limit: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "request `{id}` arrived at position {got}, but this shard holds {held} positions of it"
    )]
    OutOfOrder { id: String, got: usize, held: usize },
    #[error("this shard already serves {0} requests; try again when one finishes")]
    Full(usize),
    #[error("request `{0}` has ended on this shard")]
    Ended(String),
    #[error(
        "request `{0}` began on another split of the layers; the partition changed mid-request"
    )]
    PartitionChanged(String),
    #[error("request `{id}` reserved {reach} positions on this shard; a step up to {end} goes beyond them")]
    BeyondReach {
        id: String,
        reach: usize,
        end: usize,
    },
    #[error(
        "a request of up to {positions} positions needs {} of KV cache here, but only {} of \
         the {} this node lends the model is free ({} hold its layers, {} the caches of \
         {requests} other requests): try again when one finishes, ask for fewer tokens \
         (max_tokens), or give the node more memory (--memory-limit)",
        human(*.need), human(*.free), human(*.limit), human(*.weights), human(*.held)
    )]
    NoMemory {
        positions: usize,
        need: u64,
        free: u64,
        limit: u64,
        weights: u64,
        held: u64,
        requests: usize,
    },
}

/// What a step asks of a shard's caches.
#[derive(Debug, Clone, Copy)]
pub struct StepAsk {
    /// The first position the step carries, and the one after its last.
    pub position: usize,
    pub end: usize,
    /// The layers it runs.
    pub layers: (usize, usize),
    /// The positions its request may grow to: what a first step reserves.
    pub reach: usize,
    /// What those layers cost.
    pub footprint: Footprint,
}

impl Caches {
    /// `limit`: the bytes this node lends the model (`--memory-limit`).
    pub fn new(idle: Duration, max_requests: usize, limit: u64) -> Self {
        Caches {
            requests: HashMap::new(),
            ended: HashMap::new(),
            in_step: HashMap::new(),
            idle,
            max_requests,
            limit,
        }
    }

    /// Whether [`Caches::take`] would hand the request's state out for this
    /// step, without taking it: a step is checked whole before it loads
    /// layers or touches any cache. A first step must find room for its
    /// request's whole cache beside the layers and every other request's.
    pub fn admits(&mut self, id: &str, ask: &StepAsk) -> Result<(), CacheError> {
        self.expire();
        let position = ask.position;
        let out_of_order = |held: Option<&RequestState>| CacheError::OutOfOrder {
            id: id.to_owned(),
            got: position,
            held: held.map_or(0, |s| s.position),
        };
        if self.ended.contains_key(id) {
            return Err(CacheError::Ended(id.to_owned()));
        }
        if self.in_step.contains_key(id) {
            return Err(out_of_order(self.requests.get(id)));
        }
        let beyond = |reach: usize| CacheError::BeyondReach {
            id: id.to_owned(),
            reach,
            end: ask.end,
        };
        if position == 0 {
            if ask.end > ask.reach {
                return Err(beyond(ask.reach));
            }
            // A fresh start replaces the request's own state, if it has one.
            let others = self.len() - usize::from(self.requests.contains_key(id));
            if others >= self.max_requests {
                return Err(CacheError::Full(self.max_requests));
            }
            let held: u64 = self
                .requests
                .iter()
                .filter(|(other, _)| other.as_str() != id)
                .map(|(_, s)| s.reserved)
                .chain(self.in_step.values().copied())
                .sum();
            let need = ask.footprint.kv(ask.reach);
            let weights = ask.footprint.weights;
            let free = self.limit.saturating_sub(weights).saturating_sub(held);
            if need > free {
                return Err(CacheError::NoMemory {
                    positions: ask.reach,
                    need,
                    free,
                    limit: self.limit,
                    weights,
                    held,
                    requests: others,
                });
            }
            return Ok(());
        }
        match self.requests.get(id) {
            Some(state) if state.layers_range != ask.layers => {
                Err(CacheError::PartitionChanged(id.to_owned()))
            }
            Some(state) if state.position != position => Err(out_of_order(Some(state))),
            Some(state) if ask.end > state.reach => Err(beyond(state.reach)),
            Some(_) => Ok(()),
            held => Err(out_of_order(held)),
        }
    }

    /// The request's state for a step, as [`Caches::admits`] decides; it is
    /// "in a step" until [`Caches::put`] or [`Caches::abandon`]. A state built
    /// for other layers is dropped.
    pub fn take(&mut self, id: &str, ask: &StepAsk) -> Result<RequestState, CacheError> {
        if let Err(e) = self.admits(id, ask) {
            if matches!(e, CacheError::PartitionChanged(_)) {
                self.requests.remove(id);
            }
            return Err(e);
        }
        let state = match self.requests.remove(id) {
            Some(state) if ask.position > 0 => state,
            _ => {
                let (start, end) = ask.layers;
                RequestState {
                    layers: (start..=end).map(|_| LayerCache::new(ask.reach)).collect(),
                    position: 0,
                    sampler: None,
                    context: None,
                    layers_range: ask.layers,
                    reach: ask.reach,
                    reserved: ask.footprint.kv(ask.reach),
                    last_used: Instant::now(),
                }
            }
        };
        self.in_step.insert(id.to_owned(), state.reserved);
        Ok(state)
    }

    /// Puts a request's state back after its step, unless the request ended
    /// meanwhile.
    pub fn put(&mut self, id: String, mut state: RequestState) {
        self.in_step.remove(&id);
        if self.ended.contains_key(&id) {
            return;
        }
        state.last_used = Instant::now();
        self.requests.insert(id, state);
        self.expire();
    }

    /// A step that failed after `take`: its state is gone with it.
    pub fn abandon(&mut self, id: &str) {
        self.in_step.remove(id);
    }

    /// Ends a request. A step of it still running finds it ended when it
    /// comes back, and its state is dropped then.
    /// The end may arrive before the request's first step does (the origin
    /// ends a request on every node at once): remembered, it refuses that step.
    pub fn remove(&mut self, id: &str) {
        self.requests.remove(id);
        self.in_step.remove(id);
        self.ended.insert(id.to_owned(), Instant::now());
        self.expire();
    }

    /// Drops the caches resting between steps (the layers they were for are
    /// gone). Steps in flight find out when they come back: their state no
    /// longer matches the layers asked for.
    pub fn clear_resting(&mut self) {
        self.requests.clear();
    }

    /// Requests held, whether resting between steps or in one.
    pub fn len(&self) -> usize {
        self.requests.len() + self.in_step.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expire(&mut self) {
        let idle = self.idle;
        self.requests.retain(|_, s| s.last_used.elapsed() < idle);
        self.ended.retain(|_, at| at.elapsed() < idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// 1 MiB of layers; 1 KiB of cache a position.
    fn ask(position: usize, layers: (usize, usize)) -> StepAsk {
        StepAsk {
            position,
            end: position + 1,
            layers,
            reach: 1024,
            footprint: Footprint {
                weights: MIB,
                kv_per_position: 1024,
            },
        }
    }

    fn caches(max_requests: usize) -> Caches {
        Caches::new(Duration::from_secs(60), max_requests, 64 * MIB)
    }

    #[test]
    fn steps_must_follow_on_and_an_end_during_a_step_frees_it() {
        let mut caches = caches(2);
        let mut state = caches.take("r", &ask(0, (0, 2))).unwrap();
        state.position = 5;
        caches.put("r".into(), state);
        let err = caches.take("r", &ask(4, (0, 2))).err().unwrap().to_string();
        assert!(
            err.contains("position 4") && err.contains("holds 5"),
            "{err}"
        );
        // The refused step did not cost the request its cache.
        let state = caches.take("r", &ask(5, (0, 2))).unwrap();
        caches.put("r".into(), state);
        assert!(matches!(
            caches.take("r", &ask(5, (0, 9))),
            Err(CacheError::PartitionChanged(_))
        ));

        let mut state = caches.take("q", &ask(0, (0, 2))).unwrap();
        caches.remove("q"); // the origin ends the request mid-step
        assert_eq!(caches.len(), 0, "ended, though its step is still out");
        state.position = 1;
        caches.put("q".into(), state);
        assert_eq!(caches.len(), 0);
        assert!(matches!(
            caches.take("q", &ask(1, (0, 2))),
            Err(CacheError::Ended(_))
        ));
        // An end that overtakes the request's first step refuses it.
        caches.remove("early");
        assert!(matches!(
            caches.take("early", &ask(0, (0, 2))),
            Err(CacheError::Ended(_))
        ));
    }

    #[test]
    fn refuses_more_requests_than_it_holds() {
        let mut caches = caches(1);
        let s = caches.take("a", &ask(0, (0, 0))).unwrap();
        caches.put("a".into(), s);
        assert!(matches!(
            caches.take("b", &ask(0, (0, 0))),
            Err(CacheError::Full(1))
        ));
    }

    #[test]
    fn a_request_is_admitted_only_when_its_whole_cache_fits() {
        // 64 MiB lent, 1 MiB of layers: room for 63 MiB of caches.
        let mut caches = caches(64);
        let big = |position| StepAsk {
            reach: 30 * 1024, // 30 MiB at 1 KiB a position
            ..ask(position, (0, 0))
        };
        let a = caches.take("a", &big(0)).unwrap();
        // Out for its step, it still holds its reservation.
        let _b = caches.take("b", &big(0)).unwrap();
        let err = caches.take("c", &big(0)).err().unwrap();
        assert!(
            matches!(err, CacheError::NoMemory { requests: 2, .. }),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("30.0 MiB")
                && message.contains("3.0 MiB of")
                && message.contains("--memory-limit"),
            "{message}"
        );
        // A small request still fits beside them.
        let small = caches.take("d", &ask(0, (0, 0))).unwrap();
        caches.put("d".into(), small);
        caches.put("a".into(), a);
        caches.abandon("b");
        caches.take("c", &big(0)).unwrap();
        // The same request started afresh does not count against itself.
        caches.take("a", &big(0)).unwrap();
    }

    #[test]
    fn a_step_beyond_what_its_request_reserved_is_refused() {
        let mut caches = caches(4);
        let mut state = caches.take("r", &ask(0, (0, 0))).unwrap();
        state.position = 1000;
        caches.put("r".into(), state);
        let step = StepAsk {
            end: 1025,
            ..ask(1000, (0, 0))
        };
        assert!(matches!(
            caches.take("r", &step),
            Err(CacheError::BeyondReach {
                reach: 1024,
                end: 1025,
                ..
            })
        ));
        let first = StepAsk {
            end: 2000,
            ..ask(0, (0, 0))
        };
        assert!(matches!(
            caches.admits("s", &first),
            Err(CacheError::BeyondReach { .. })
        ));
    }
}
