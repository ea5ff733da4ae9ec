//! Choosing the next token from logits, as OpenAI's parameters describe it.
//! Temperature 0 is greedy (argmax, the reproducible mode the tests rely on);
//! otherwise softmax at the temperature, cut to the `top_p` nucleus, and a draw
//! from a generator seeded per request, so a given `seed` repeats its answer.

pub use crate::protocol::SamplingParams;

pub struct Sampler {
    params: SamplingParams,
    rng: fastrand::Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: fastrand::Rng::with_seed(params.seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() || logits.len() < 2 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        // Highest first; ids break ties so the order (and the draw) is reproducible.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let top_p = self.params.top_p.clamp(0.0, 1.0);
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1 / total;
            if mass >= top_p {
                break;
            }
        }
        let probs = &probs[..kept];
        let kept_mass: f32 = probs.iter().map(|p| p.1).sum();
        let mut draw = self.rng.f32() * kept_mass;
        for p in probs {
            if draw < p.1 {
                return p.0;
            }
            draw -= p.1;
        }
        probs[kept - 1].0
    }
}

/// The first index of the largest logit; NaNs never win.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_zero_is_argmax_with_first_index_on_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn a_seed_repeats_its_draws_and_top_p_cuts_the_tail() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
        };
        let logits = [1.0, 1.1, 0.9, 1.05];
        let a: Vec<u32> = (0..50)
            .map({
                let mut s = Sampler::new(params);
                move |_| s.sample(&logits)
            })
            .collect();
        let b: Vec<u32> = (0..50)
            .map({
                let mut s = Sampler::new(params);
                move |_| s.sample(&logits)
            })
            .collect();
        assert_eq!(a, b);
        assert!(
            a.iter().collect::<std::collections::BTreeSet<_>>().len() > 1,
            "{a:?}"
        );

        // One token holds ~97% of the mass: a nucleus of 0.9 keeps only it.
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.9,
            ..params
        });
        let peaked = [0.0, 6.0, 1.0, 2.0];
        assert!((0..200).all(|_| s.sample(&peaked) == 1));
    }
}
