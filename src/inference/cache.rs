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

    /// Takes a request's state out for one step (a step runs without the lock).
    /// Position 0 starts a request afresh, replacing any state of the same id.
    pub fn take(
        &mut self,
        id: &str,
        position: usize,
        n_layers: usize,
    ) -> Result<RequestState, CacheError> {
        self.expire();
        if position == 0 {
            self.requests.remove(id);
            self.ended.remove(id);
            if self.len() >= self.max_requests {
                return Err(CacheError::Full(self.max_requests));
            }
            self.in_step.insert(id.to_owned());
            return Ok(RequestState {
                layers: (0..n_layers).map(|_| LayerCache::default()).collect(),
                position: 0,
                sampler: None,
                last_used: Instant::now(),
            });
        }
        match self.requests.remove(id) {
            Some(state) if state.position == position => {
                self.in_step.insert(id.to_owned());
                Ok(state)
            }
            Some(state) => Err(CacheError::OutOfOrder {
                id: id.to_owned(),
                got: position,
                held: state.position,
            }),
            None => Err(CacheError::OutOfOrder {
                id: id.to_owned(),
                got: position,
                held: 0,
            }),
        }
    }

    pub fn put(&mut self, id: String, mut state: RequestState) {
        self.in_step.remove(&id);
        if self.ended.remove(&id).is_some() {
            return;
        }
        state.last_used = Instant::now();
        self.requests.insert(id, state);
    }

    /// A step that failed after `take`: its state is gone with it.
    pub fn abandon(&mut self, id: &str) {
        self.in_step.remove(id);
        self.ended.remove(id);
    }

    /// Ends a request. A step of it still running finds it ended when it
    /// comes back, and its state is dropped then.
    pub fn remove(&mut self, id: &str) {
        self.requests.remove(id);
        if self.in_step.remove(id) {
            self.ended.insert(id.to_owned(), Instant::now());
        }
    }

    pub fn clear(&mut self) {
        self.requests.clear();
        self.ended.clear();
        self.in_step.clear();
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
        let mut state = caches.take("r", 0, 3).unwrap();
        state.position = 5;
        caches.put("r".into(), state);
        let err = caches.take("r", 4, 3).err().unwrap().to_string();
        assert!(
            err.contains("position 4") && err.contains("holds 5"),
            "{err}"
        );

        let mut state = caches.take("q", 0, 3).unwrap();
        caches.remove("q"); // the origin ends the request mid-step
        assert_eq!(caches.len(), 0, "ended, though its step is still out");
        state.position = 1;
        caches.put("q".into(), state);
        assert!(caches.is_empty());
        assert!(caches.take("q", 1, 3).is_err());
    }

    #[test]
    fn refuses_more_requests_than_it_holds() {
        let mut caches = Caches::new(Duration::from_secs(60), 1);
        let s = caches.take("a", 0, 1).unwrap();
        caches.put("a".into(), s);
        assert!(matches!(caches.take("b", 0, 1), Err(CacheError::Full(1))));
    }
}
