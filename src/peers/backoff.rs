//! Redial delays: exponential from a small base, capped, with jitter.
//!
//! The cap is what bounds how long a peer stays unlinked after it becomes
//! reachable again, so it is kept well under a second. Jitter spreads the redials
//! of several nodes that lost the same peer at the same moment.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            next: base,
        }
    }

    /// The delay before the next attempt: the current step scaled by a random
    /// factor in [0.5, 1.0], so it never exceeds the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.cap);
        step.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let cap = Duration::from_millis(400);
        let mut b = Backoff::new(Duration::from_millis(50), cap);
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= cap));
        assert!(delays[0] <= Duration::from_millis(50));
        assert!(delays[9] >= cap / 2, "reaches the cap: {delays:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(50));
    }
}
