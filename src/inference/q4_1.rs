//! A CPU matmul for Q4_1 weights. candle runs Q4_1 only through its scalar
//! fallback (it has SIMD kernels for Q4_0, Q8_0 and the k-quants), which made
//! Q4_1 models several times slower than llama.cpp here. This is the same
//! arithmetic as candle's and llama.cpp's `vec_dot_q4_1_q8_1` — activations
//! rounded to Q8_1 blocks, integer dot products, then `sumi·d_w·d_x + m_w·s_x`
//! in that order — so its results are bit-identical to candle's; only the
//! integer part is vectorized (AVX2 when the CPU has it), and the loops are
//! arranged so that a prompt's rows reuse each weight row while it is in cache.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;

const BLOCK: usize = 32;
/// Bytes per block in the GGUF file: f16 scale, f16 min, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;

pub struct Q41Matrix {
    /// Output features (rows of the weight).
    n: usize,
    /// Input features.
    k: usize,
    scale: Vec<f32>,
    min: Vec<f32>,
    /// 16 bytes per block: value j is the low nibble of byte j, value j + 16 the high one.
    nibbles: Vec<u8>,
}

/// Activations rounded to Q8_1, one row after another.
struct Q81 {
    qs: Vec<i8>,
    scale: Vec<f32>,
    /// `scale · Σqs`, rounded through f16 as ggml stores it.
    sum: Vec<f32>,
}

impl Q41Matrix {
    /// The weight as this kernel wants it, when it is Q4_1 on the CPU.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q4_1 || !matches!(t.device(), Device::Cpu) {
            return Ok(None);
        }
        let (n, k) = t.shape().dims2()?;
        if k % BLOCK != 0 {
            return Ok(None);
        }
        let data = t.data()?;
        let blocks = n * k / BLOCK;
        if data.len() != blocks * BLOCK_BYTES {
            candle_core::bail!("Q4_1 tensor of {blocks} blocks holds {} bytes", data.len());
        }
        let mut m = Q41Matrix {
            n,
            k,
            scale: Vec::with_capacity(blocks),
            min: Vec::with_capacity(blocks),
            nibbles: Vec::with_capacity(blocks * 16),
        };
        for b in data.chunks_exact(BLOCK_BYTES) {
            m.scale.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            m.min.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
            m.nibbles.extend_from_slice(&b[4..20]);
        }
        Ok(Some(m))
    }

    /// `x · Wᵀ` for `x` of shape `[.., k]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("Q4_1 matmul: input {:?} does not end in {}", dims, self.k);
        }
        let rows = x.elem_count() / self.k;
        if rows == 0 {
            *dims.last_mut().expect("checked above") = self.n;
            return Tensor::zeros(dims, candle_core::DType::F32, x.device());
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let q = quantize(&xs, self.k);
        let nb = self.k / BLOCK;
        let out = super::blocked::by_columns(self.n, rows, |col, row| self.dot(col, &q, row, nb));
        *dims.last_mut().expect("checked above") = self.n;
        Tensor::from_vec(out, dims, x.device())
    }

    #[inline]
    fn dot(&self, col: usize, q: &Q81, row: usize, nb: usize) -> f32 {
        let w = col * nb;
        let a = row * nb;
        let mut sum = 0f32;
        for b in 0..nb {
            let nibbles: &[u8; 16] = self.nibbles[(w + b) * 16..][..16]
                .try_into()
                .expect("16 bytes");
            let qs: &[i8; 32] = q.qs[(a + b) * BLOCK..][..BLOCK]
                .try_into()
                .expect("32 values");
            let sumi = block_dot(nibbles, qs);
            sum +=
                sumi as f32 * self.scale[w + b] * q.scale[a + b] + self.min[w + b] * q.sum[a + b];
        }
        sum
    }
}

/// ggml's `quantize_row_q8_1`, as candle writes it.
fn quantize(xs: &[f32], k: usize) -> Q81 {
    let blocks = xs.len() / BLOCK;
    let mut q = Q81 {
        qs: vec![0; xs.len()],
        scale: Vec::with_capacity(blocks),
        sum: Vec::with_capacity(blocks),
    };
    debug_assert_eq!(xs.len() % k, 0);
    for (x, out) in xs.chunks_exact(BLOCK).zip(q.qs.chunks_exact_mut(BLOCK)) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in out.iter_mut().zip(x) {
            *o = (v * id).round() as i8;
            sum += i32::from(*o);
        }
        let d16 = f16::from_f32(d);
        q.scale.push(d16.to_f32());
        q.sum.push((f16::from_f32(sum as f32) * d16).to_f32());
    }
    q
}

#[inline]
fn block_dot(nibbles: &[u8; 16], qs: &[i8; 32]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected on this CPU just above.
            return unsafe { block_dot_avx2(nibbles, qs) };
        }
    }
    block_dot_portable(nibbles, qs)
}

#[inline]
fn block_dot_portable(nibbles: &[u8; 16], qs: &[i8; 32]) -> i32 {
    let mut sum = 0i32;
    for j in 0..16 {
        sum += i32::from(nibbles[j] & 0x0F) * i32::from(qs[j])
            + i32::from(nibbles[j] >> 4) * i32::from(qs[j + 16]);
    }
    sum
}

/// 32 products in a handful of instructions: nibbles as unsigned bytes times
/// the Q8 values as signed bytes (`maddubs`, pairwise into i16, which cannot
/// overflow: 2·15·127), then pairwise into i32 and a horizontal sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_dot_avx2(nibbles: &[u8; 16], qs: &[i8; 32]) -> i32 {
    use std::arch::x86_64::*;
    let packed = _mm_loadu_si128(nibbles.as_ptr().cast());
    let low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
    let high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
    let w = _mm256_set_m128i(high, low);
    let x = _mm256_loadu_si256(qs.as_ptr().cast());
    let pairs = _mm256_maddubs_epi16(w, x);
    let quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(quads),
        _mm256_extracti128_si256(quads, 1),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    #[test]
    fn the_vector_dot_equals_the_portable_one_for_every_extreme() {
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..2000 {
            let nibbles: [u8; 16] = std::array::from_fn(|_| rng.u8(..));
            let qs: [i8; 32] = std::array::from_fn(|_| rng.i8(..));
            assert_eq!(block_dot(&nibbles, &qs), block_dot_portable(&nibbles, &qs));
        }
        let all = block_dot(&[0xFF; 16], &[-128; 32]);
        assert_eq!(all, 15 * -128 * 32);
    }

    #[test]
    fn bit_identical_to_candle_on_one_row_and_on_many() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (96, 256), &dev).unwrap();
        let qw = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let ours = Q41Matrix::from_qtensor(&qw).unwrap().unwrap();
        let theirs = QMatMul::from_qtensor(qw).unwrap();
        let empty = Tensor::zeros((1, 0, 256), candle_core::DType::F32, &dev).unwrap();
        assert_eq!(ours.forward(&empty).unwrap().dims(), [1, 0, 96]);
        for rows in [1, 7] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 256), &dev).unwrap();
            let a: Vec<f32> = ours
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = theirs
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "{rows} rows");
        }
    }
}
