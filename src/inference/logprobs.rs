//! Log-probabilities of a step's tokens, for OpenAI's `logprobs`: the sampled
//! token's and the `k` likeliest, from the model's own distribution (a softmax
//! of the raw logits, before temperature or `top_p`, as llama.cpp's server
//! reports them by default). The last shard computes them beside the sample
//! and they travel back with the token as one small f32 tensor (docs/PROTOCOL.md
//! §9.3).

use crate::protocol::{self, DType};

/// Most alternatives a request may ask for, as OpenAI's `top_logprobs`.
pub const MAX_TOP: usize = protocol::ring::MAX_TOP_LOGPROBS as usize;

/// Token ids travel as f32, which holds every integer below 2^24 exactly; a
/// vocabulary is far smaller (Gemma's 262 144 is the largest in use).
const MAX_EXACT_ID: u32 = 1 << 24;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The sampled token and its log-probability.
    pub token: (u32, f32),
    /// The likeliest tokens, likeliest first (ties to the lower id).
    pub top: Vec<(u32, f32)>,
}

/// `chosen`'s log-probability and the `k` likeliest tokens' under `logits`.
pub fn of(logits: &[f32], chosen: u32, k: usize) -> TokenLogprobs {
    let finite = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let max = logits
        .iter()
        .copied()
        .map(finite)
        .fold(f32::NEG_INFINITY, f32::max);
    // log Σ exp(l − max), in f64: 262k terms in f32 lose the small ones.
    let sum: f64 = logits
        .iter()
        .map(|&l| f64::from(finite(l) - max).exp())
        .sum();
    let norm = f64::from(max) + sum.ln();
    let logprob = |id: u32| {
        let l = logits
            .get(id as usize)
            .copied()
            .map_or(f32::NEG_INFINITY, finite);
        (f64::from(l) - norm) as f32
    };
    let k = k.min(logits.len());
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let order = |a: &u32, b: &u32| {
        finite(logits[*b as usize])
            .total_cmp(&finite(logits[*a as usize]))
            .then(a.cmp(b))
    };
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, order);
    }
    ids.truncate(k);
    ids.sort_by(order);
    TokenLogprobs {
        token: (chosen, logprob(chosen)),
        top: ids.into_iter().map(|id| (id, logprob(id))).collect(),
    }
}

/// The answer of a last shard asked for log-probabilities: f32 `[k + 1, 2]`,
/// rows of (id, log-probability), the sampled token first.
pub fn to_wire(lp: &TokenLogprobs) -> protocol::Tensor {
    let rows = std::iter::once(&lp.token).chain(&lp.top);
    let data: Vec<u8> = rows
        .flat_map(|&(id, p)| [id as f32, p])
        .flat_map(f32::to_le_bytes)
        .collect();
    protocol::Tensor::new(DType::F32, vec![lp.top.len() as u64 + 1, 2], data)
        .expect("f32 [k + 1, 2] with 8 bytes a row is consistent")
}

/// Reads [`to_wire`]'s tensor back, checking what a peer could get wrong:
/// the shape, `k`, ids that are whole and within the vocabulary, and
/// probabilities that are probabilities.
pub fn from_wire(t: &protocol::Tensor, k: usize, vocab: usize) -> Result<TokenLogprobs, String> {
    // A vocabulary smaller than `k` has only so many alternatives ([`of`]).
    let k = k.min(vocab);
    if t.dtype() != DType::F32 || t.shape() != [k as u64 + 1, 2] {
        return Err(format!(
            "log-probabilities come as f32 [{}, 2], not {} {:?}",
            k + 1,
            t.dtype().name(),
            t.shape()
        ));
    }
    let values: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut rows = Vec::with_capacity(k + 1);
    for pair in values.chunks_exact(2) {
        let (id, p) = (pair[0], pair[1]);
        let whole = id >= 0.0 && id.fract() == 0.0 && (id as u32) < MAX_EXACT_ID;
        if !whole || id as usize >= vocab {
            return Err(format!(
                "token id {id} is not one of the vocabulary's {vocab}"
            ));
        }
        // −∞ is a token the model rules out; NaN or above 0 is no probability.
        if p.is_nan() || p > 1e-3 {
            return Err(format!("{p} is not a log-probability"));
        }
        rows.push((id as u32, p.min(0.0)));
    }
    let token = rows.remove(0);
    Ok(TokenLogprobs { token, top: rows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn probabilities_of_a_known_distribution() {
        // exp(l) ∝ 1, 2, 1: probabilities 1/4, 1/2, 1/4.
        let logits = [0.0, 2f32.ln(), 0.0];
        let lp = of(&logits, 2, 2);
        assert!((lp.token.1 - 0.25f32.ln()).abs() < 1e-6, "{lp:?}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 0]);
        assert!((lp.top[0].1 - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(of(&logits, 0, 0).top, []);
        assert_eq!(of(&logits, 0, 9).top.len(), 3);
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_bad_answer_is_named() {
        let lp = of(&[1.0, 3.0, 2.0], 1, 1);
        let wire = to_wire(&lp);
        assert_eq!(from_wire(&wire, 1, 3), Ok(lp));
        assert!(from_wire(&wire, 2, 3).unwrap_err().contains("[3, 2]"));
        assert!(from_wire(&wire, 1, 1).unwrap_err().contains("vocabulary"));
        let forged =
            protocol::Tensor::new(DType::F32, vec![1, 2], f32_bytes(&[0.5, -1.0])).unwrap();
        assert!(from_wire(&forged, 0, 3).is_err());
        let positive =
            protocol::Tensor::new(DType::F32, vec![1, 2], f32_bytes(&[1.0, 0.7])).unwrap();
        assert!(from_wire(&positive, 0, 3).unwrap_err().contains("0.7"));
    }

    proptest! {
        /// The whole distribution sums to one, the top is ordered and is the
        /// likeliest, and the answer survives the wire.
        #[test]
        fn logprobs_are_a_distribution(
            logits in prop::collection::vec(-30f32..30.0, 1..300),
            k in 0usize..=MAX_TOP,
            pick in any::<prop::sample::Index>(),
        ) {
            let chosen = pick.index(logits.len()) as u32;
            let all = of(&logits, chosen, logits.len());
            let total: f64 = all.top.iter().map(|t| f64::from(t.1).exp()).sum();
            prop_assert!((total - 1.0).abs() < 1e-4, "{total}");
            let lp = of(&logits, chosen, k);
            prop_assert_eq!(&lp.top[..], &all.top[..k.min(logits.len())]);
            for pair in lp.top.windows(2) {
                prop_assert!(pair[0].1 >= pair[1].1);
            }
            // Asked for k, a vocabulary smaller than k answers with all it has.
            prop_assert_eq!(from_wire(&to_wire(&lp), k, logits.len()), Ok(lp));
        }
    }
}
