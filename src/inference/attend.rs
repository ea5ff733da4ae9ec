//! Attention of one new position (a decode step) over the cache, on the CPU.
//! candle's path is two f32 gemms per kv head, scores then weights × values,
//! with a softmax between: with one query row per head, the gemm copies
//! ("packs") its operand, the cache, on every call. At position 2000 of
//! SmolLM2 that packing and the gemm took 37% of a token's profile, more than
//! all its matmuls of quantized weights. Here each job takes a run of one kv
//! head's positions and reads its keys and values once, as they lie in the
//! cache, for all the queries of the head's group, keeping a running maximum
//! and sum (flash-decoding's split), so the runs of a long cache go to every
//! thread and are joined exactly as one softmax. With the rows a few
//! positions ahead asked for as it reads (the CPU's prefetcher alone left the
//! loads waiting), SmolLM2's decode at position 2000 went from 29.8 to 44.8
//! tokens/s; what remains is reading an f32 cache, twice the bytes of
//! llama.cpp's f16 one.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Positions per job: enough for the hand-off to be worth it, and a
/// 2000-position cache still splits into several jobs per kv head.
const RUN: usize = 256;

/// `softmax(q · kᵀ · scale) · v` for `q` of shape `[b, kv_heads, group,
/// head_dim]` and the cache's `k` and `v` of shape `[b, kv_heads, total,
/// head_dim]` (views into it: each position's row contiguous), as the same
/// shape as `q`. `None` when the tensors are not f32 on the CPU, or not laid
/// out so: candle's path takes those.
pub fn one_query(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Option<Tensor>> {
    let (b, heads, group, width) = q.dims4()?;
    let total = k.dim(2)?;
    if k.dims4()? != (b, heads, total, width) || v.dims4()? != (b, heads, total, width) {
        candle_core::bail!(
            "attention: queries {:?} do not match keys {:?} and values {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let q = q.contiguous()?;
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (Some(qs), Some(ks), Some(vs)) = (
        rows(&q_storage, q_layout),
        rows(&k_storage, k_layout),
        rows(&v_storage, v_layout),
    ) else {
        return Ok(None);
    };
    if total == 0 {
        candle_core::bail!("attention over an empty cache");
    }

    // One job per (batch, kv head, run of positions); each returns, for every
    // query of the group, its maximum score, its sum of exponentials and its
    // weighted sum of values, relative to that maximum.
    let runs = total.div_ceil(RUN);
    let jobs: Vec<Vec<f32>> = (0..b * heads * runs)
        .into_par_iter()
        .map(|job| {
            let (bh, run) = (job / runs, job % runs);
            let (bi, h) = (bh / heads, bh % heads);
            let positions = run * RUN..total.min((run + 1) * RUN);
            let queries = &qs.data[qs.at(bi, h, 0)..][..group * width];
            let keys = |t: usize| &ks.data[ks.at(bi, h, t)..][..width];
            let values = |t: usize| &vs.data[vs.at(bi, h, t)..][..width];
            partial(queries, group, width, scale, positions, keys, values)
        })
        .collect();

    let mut out = vec![0f32; b * heads * group * width];
    for (bh, out) in out.chunks_exact_mut(group * width).enumerate() {
        let parts = &jobs[bh * runs..(bh + 1) * runs];
        for (g, out) in out.chunks_exact_mut(width).enumerate() {
            join(
                parts.iter().map(|p| &p[g * (width + 2)..][..width + 2]),
                out,
            );
        }
    }
    drop((q_storage, k_storage, v_storage));
    Tensor::from_vec(out, (b, heads, group, width), q.device()).map(Some)
}

/// An f32 CPU tensor of shape `[b, heads, positions, width]` whose rows of
/// `width` are contiguous.
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    stride: [usize; 3],
}

impl Rows<'_> {
    fn at(&self, b: usize, head: usize, position: usize) -> usize {
        self.start + b * self.stride[0] + head * self.stride[1] + position * self.stride[2]
    }
}

fn rows<'a>(storage: &'a Storage, layout: &Layout) -> Option<Rows<'a>> {
    let Storage::Cpu(CpuStorage::F32(data)) = storage else {
        return None;
    };
    match *layout.stride() {
        [s0, s1, s2, 1] => Some(Rows {
            data,
            start: layout.start_offset(),
            stride: [s0, s1, s2],
        }),
        _ => None,
    }
}

/// For each of the `group` queries (rows of `width` in `queries`), over
/// `positions`: `[max, Σ exp(s − max), Σ exp(s − max) · v...]`.
fn partial<'a>(
    queries: &[f32],
    group: usize,
    width: usize,
    scale: f32,
    positions: std::ops::Range<usize>,
    keys: impl Fn(usize) -> &'a [f32],
    values: impl Fn(usize) -> &'a [f32],
) -> Vec<f32> {
    let len = positions.len();
    // Scores by query: each key row is read once for the whole group.
    let mut scores = vec![0f32; group * len];
    let end = positions.end;
    for (i, t) in positions.clone().enumerate() {
        if t + AHEAD < end {
            prefetch(keys(t + AHEAD));
        }
        let key = keys(t);
        for (g, query) in queries.chunks_exact(width).enumerate() {
            scores[g * len + i] = dot(query, key) * scale;
        }
    }
    let mut out = vec![0f32; group * (width + 2)];
    for (g, scores) in scores.chunks_exact_mut(len).enumerate() {
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        out[g * (width + 2)] = max;
        out[g * (width + 2) + 1] = sum;
    }
    for (i, t) in positions.enumerate() {
        if t + AHEAD < end {
            prefetch(values(t + AHEAD));
        }
        let value = values(t);
        for (g, acc) in out.chunks_exact_mut(width + 2).enumerate() {
            let weight = scores[g * len + i];
            for (a, v) in acc[2..].iter_mut().zip(value) {
                *a += weight * v;
            }
        }
    }
    out
}

/// Rows ahead whose lines are asked for (8 and 16 measured the same).
const AHEAD: usize = 8;

#[inline(always)]
fn prefetch(row: &[f32]) {
    // A row need not start on a line: its last value may be on one more.
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16).chain(row.last().map(std::slice::from_ref)) {
        // SAFETY: a prefetch reads nothing and cannot fault; the pointer is
        // to a live slice.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// One query's output from its runs' partials: each rescaled to the largest
/// maximum, summed, and divided by the total weight.
fn join<'a>(parts: impl Iterator<Item = &'a [f32]> + Clone, out: &mut [f32]) {
    let max = parts
        .clone()
        .map(|p| p[0])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    out.fill(0.0);
    for p in parts {
        let factor = (p[0] - max).exp();
        sum += p[1] * factor;
        for (o, v) in out.iter_mut().zip(&p[2..]) {
            *o += v * factor;
        }
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// A dot product in 16 independent lanes, which the compiler keeps in vector
/// registers (a single running sum would be one chain of dependent additions).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a16.zip(b16) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// candle's own path, as the model ran it before.
    fn candles(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    #[test]
    fn agrees_with_candles_softmax_and_matmuls_over_views_of_a_cache() {
        let dev = Device::Cpu;
        // Short and long caches (one run, several, and a partial last run),
        // groups of 1 and 3, a width with a tail past 16 lanes.
        for (b, heads, group, width, total) in
            [(1, 3, 3, 64, 2000), (1, 1, 4, 72, 7), (2, 2, 1, 16, 513)]
        {
            let reach = total + 5;
            // Queries as the model has them before they are made contiguous.
            let q = Tensor::randn(0f32, 1.0, (b, group, heads, width), &dev)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            // Keys large enough that the scores span a wide range.
            let cache_k =
                (Tensor::randn(0f32, 1.0, (b, heads, reach, width), &dev).unwrap() * 3.0).unwrap();
            let cache_v = Tensor::randn(0f32, 1.0, (b, heads, reach, width), &dev).unwrap();
            // Views that start inside the cache, as a sliding window's do.
            let k = cache_k.narrow(2, 5, total).unwrap();
            let v = cache_v.narrow(2, 5, total).unwrap();
            let scale = 1.0 / (width as f64).sqrt();
            let ours = one_query(&q, &k, &v, scale as f32)
                .unwrap()
                .expect("f32 on the CPU");
            let theirs = candles(&q, &k, &v, scale);
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - &theirs)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(D::Minus1)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff < 1e-5,
                "{b}×{heads}×{group}×{width} over {total}: {diff}"
            );
        }
    }

    #[test]
    fn tensors_it_cannot_read_are_left_to_candle() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 1, 1, 8), candle_core::DType::F16, &dev).unwrap();
        let k = Tensor::zeros((1, 1, 4, 8), candle_core::DType::F16, &dev).unwrap();
        assert!(one_query(&q, &k, &k, 1.0).unwrap().is_none());
        // Keys whose rows are not contiguous (a transposed view).
        let q = Tensor::zeros((1, 1, 1, 4), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 1, 4, 4), candle_core::DType::F32, &dev)
            .unwrap()
            .t()
            .unwrap();
        assert!(one_query(&q, &k, &k, 1.0).unwrap().is_none());
    }
}
