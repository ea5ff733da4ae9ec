//! The key/value cache: per request, per shard, per layer. Each request owns
//! its own, so concurrent chats never see each other's context, and the cache
//! knows how many positions it holds, so a step that arrives out of order is
//! refused instead of silently attending to the wrong past.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::sampler::Sampler;

#[derive(Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Appends this step's keys and values (`[b, kv_heads, seq, head_dim]`) and
    /// returns everything cached so far.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = match self.kv.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// What one shard keeps for one request between steps.
pub struct RequestState {
    pub layers: Vec<LayerCache>,
    /// The number of positions the cache holds: the next step must start here.
    pub position: usize,
    /// Only on the last shard, which samples.
    pub sampler: Option<Sampler>,
    /// The layers the cache is for: a step for other layers cannot use it.
    layers_range: (usize, usize),
    last_used: Instant,
}

/// The caches of the requests a shard is serving. Requests end with a message
/// from their origin; one whose origin vanished is dropped after `idle`.
pub struct Caches {
    requests: HashMap<String, RequestState>,
    /// Requests ended while one of their steps was running: the step's state
    /// is dropped when it comes back instead of living on until `idle`.
    ended: HashMap<String, Instant>,
    /// Requests whose state is out for a step right now.
    in_step: HashSet<String>,
    idle: Duration,
    max_requests: usize,
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
}

impl Caches {
    pub fn new(idle: Duration, max_requests: usize) -> Self {
        Caches {
            requests: HashMap::new(),
            ended: HashMap::new(),
            in_step: HashSet::new(),
            idle,
            max_requests,
        }
    }

    /// Whether [`Caches::take`] would hand the request's state out for a step
    /// at `position` on layers `layers_range`, without taking it: a step is
    /// checked whole before it loads layers or touches any cache.
    pub fn admits(
        &mut self,
        id: &str,
        position: usize,
        layers_range: (usize, usize),
    ) -> Result<(), CacheError> {
        self.expire();
        let out_of_order = |held: Option<&RequestState>| CacheError::OutOfOrder {
            id: id.to_owned(),
            got: position,
            held: held.map_or(0, |s| s.position),
        };
        if self.ended.contains_key(id) {
            return Err(CacheError::Ended(id.to_owned()));
        }
        if self.in_step.contains(id) {
            return Err(out_of_order(self.requests.get(id)));
        }
        if position == 0 {
            // A fresh start replaces the request's own state, if it has one.
            let others = self.len() - usize::from(self.requests.contains_key(id));
            if others >= self.max_requests {
                return Err(CacheError::Full(self.max_requests));
            }
            return Ok(());
        }
        match self.requests.get(id) {
            Some(state) if state.layers_range != layers_range => {
                Err(CacheError::PartitionChanged(id.to_owned()))
            }
            Some(state) if state.position == position => Ok(()),
            held => Err(out_of_order(held)),
        }
    }

    /// The request's state for a step, as [`Caches::admits`] decides; it is
    /// "in a step" until [`Caches::put`] or [`Caches::abandon`]. A state built
    /// for other layers is dropped.
    pub fn take(
        &mut self,
        id: &str,
        position: usize,
        layers_range: (usize, usize),
    ) -> Result<RequestState, CacheError> {
        if let Err(e) = self.admits(id, position, layers_range) {
            if matches!(e, CacheError::PartitionChanged(_)) {
                self.requests.remove(id);
            }
            return Err(e);
        }
        self.in_step.insert(id.to_owned());
        let held = self.requests.remove(id);
        match held {
            Some(state) if position > 0 => Ok(state),
            _ => {
                let (start, end) = layers_range;
                Ok(RequestState {
                    layers: (start..=end).map(|_| LayerCache::default()).collect(),
                    position: 0,
                    sampler: None,
                    layers_range,
                    last_used: Instant::now(),
                })
            }
        }
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

    #[test]
    fn steps_must_follow_on_and_an_end_during_a_step_frees_it() {
        let mut caches = Caches::new(Duration::from_secs(60), 2);
        let mut state = caches.take("r", 0, (0, 2)).unwrap();
        state.position = 5;
        caches.put("r".into(), state);
        let err = caches.take("r", 4, (0, 2)).err().unwrap().to_string();
        assert!(
            err.contains("position 4") && err.contains("holds 5"),
            "{err}"
        );
        // The refused step did not cost the request its cache.
        let state = caches.take("r", 5, (0, 2)).unwrap();
        caches.put("r".into(), state);
        assert!(matches!(
            caches.take("r", 5, (0, 9)),
            Err(CacheError::PartitionChanged(_))
        ));

        let mut state = caches.take("q", 0, (0, 2)).unwrap();
        caches.remove("q"); // the origin ends the request mid-step
        assert_eq!(caches.len(), 0, "ended, though its step is still out");
        state.position = 1;
        caches.put("q".into(), state);
        assert_eq!(caches.len(), 0);
        assert!(matches!(
            caches.take("q", 1, (0, 2)),
            Err(CacheError::Ended(_))
        ));
        // An end that overtakes the request's first step refuses it.
        caches.remove("early");
        assert!(matches!(
            caches.take("early", 0, (0, 2)),
            Err(CacheError::Ended(_))
        ));
    }

    #[test]
    fn refuses_more_requests_than_it_holds() {
        let mut caches = Caches::new(Duration::from_secs(60), 1);
        let s = caches.take("a", 0, (0, 0)).unwrap();
        caches.put("a".into(), s);
        assert!(matches!(
            caches.take("b", 0, (0, 0)),
            Err(CacheError::Full(1))
        ));
    }
}
