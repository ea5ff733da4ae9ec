//! Dot products of several weight rows against one row of activations, for
//! the 32-value block types (Q4_0, Q4_1, Q8_0). candle's `vec_dot` takes one
//! weight row at a time, so every row loads the activations again and waits
//! on its own chain of additions, and candle has no vector kernel for Q4_1 at
//! all (its scalar fallback made Q4_1 models several times slower than
//! llama.cpp). Here [`ROWS`] rows run together: each activation block is
//! loaded once for all of them, and their chains overlap. Where the CPU has
//! AVX-VNNI, one `vpdpbusd` replaces the two pairwise sums of AVX2.
//!
//! The arithmetic is candle's, operation for operation — the same integer sum
//! in each lane of 8, the same float operations in the same order (ggml's AVX2
//! kernels for Q4_0 and Q8_0, its scalar `vec_dot_q4_1_q8_1` for Q4_1) — so
//! every output is bit-identical to candle's `vec_dot` (tested below and in
//! `blocked`). Like candle, the vector code is chosen when the build targets
//! AVX2; other builds (and Apple's NEON) use candle's own `vec_dot`.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};

/// Weight rows per call: four chains of additions are enough to hide an
/// FMA's latency, and four rows of a 2048-wide Q8_0 matrix (9 KiB) stay in L1.
pub const ROWS: usize = 4;

/// A block type's dot products, several weight rows at a time.
pub trait Rows: GgmlType {
    /// `out[i] = vec_dot(k, w[i], y)` for every row of `w` (at most
    /// [`ROWS`]), each row `k / BLCK_SIZE` blocks.
    fn dots(k: usize, w: &[&[Self]], y: &[Self::VecDotType], out: &mut [f32]) {
        one_by_one(k, w, y, out);
    }
}

fn one_by_one<T: GgmlType>(k: usize, w: &[&[T]], y: &[T::VecDotType], out: &mut [f32]) {
    for (o, w) in out.iter_mut().zip(w) {
        *o = T::vec_dot(k, w, y);
    }
}

// The k-quants and Q5 types keep candle's kernels: their 256-value blocks
// already amortise the per-block work that the small blocks pay for.
impl Rows for BlockQ5_0 {}
impl Rows for BlockQ5_1 {}
impl Rows for BlockQ2K {}
impl Rows for BlockQ3K {}
impl Rows for BlockQ4K {}
impl Rows for BlockQ5K {}
impl Rows for BlockQ6K {}

impl Rows for BlockQ4_0 {
    fn dots(k: usize, w: &[&[Self]], y: &[Self::VecDotType], out: &mut [f32]) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
        if let Ok(rows) = <&[&[Self]; ROWS]>::try_from(w) {
            let (rows, y) = (rows.map(bytes), bytes(y));
            let nb = k / Self::BLCK_SIZE;
            let sums = if x86::has_vnni() {
                // SAFETY: AVX-VNNI was detected just above, AVX2 and FMA are
                // in the build's target; the rows and `y` hold `nb` blocks each
                // (the caller's slices of `k / 32` blocks).
                unsafe { x86::q4_0_vnni(rows, y, nb) }
            } else {
                // SAFETY: AVX2 and FMA are in the build's target; sizes as above.
                unsafe { x86::q4_0_avx2(rows, y, nb) }
            };
            out.copy_from_slice(&sums);
            return;
        }
        one_by_one(k, w, y, out);
    }
}

impl Rows for BlockQ8_0 {
    fn dots(k: usize, w: &[&[Self]], y: &[Self::VecDotType], out: &mut [f32]) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
        if let Ok(rows) = <&[&[Self]; ROWS]>::try_from(w) {
            let (rows, y) = (rows.map(bytes), bytes(y));
            let nb = k / Self::BLCK_SIZE;
            let sums = if x86::has_vnni() {
                // SAFETY: as for Q4_0.
                unsafe { x86::q8_0_vnni(rows, y, nb) }
            } else {
                // SAFETY: as for Q4_0.
                unsafe { x86::q8_0_avx2(rows, y, nb) }
            };
            out.copy_from_slice(&sums);
            return;
        }
        one_by_one(k, w, y, out);
    }
}

impl Rows for BlockQ4_1 {
    fn dots(k: usize, w: &[&[Self]], y: &[Self::VecDotType], out: &mut [f32]) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
        {
            let y = bytes(y);
            let nb = k / Self::BLCK_SIZE;
            for (rows, out) in w.chunks(ROWS).zip(out.chunks_mut(ROWS)) {
                let mut four = [rows[0]; ROWS];
                four[..rows.len()].copy_from_slice(rows);
                let four = four.map(bytes);
                let sums = if x86::has_vnni() {
                    // SAFETY: as for Q4_0; a short group repeats its first
                    // row, whose results are dropped.
                    unsafe { x86::q4_1_vnni(four, y, nb) }
                } else {
                    // SAFETY: as for Q4_0.
                    unsafe { x86::q4_1_avx2(four, y, nb) }
                };
                out.copy_from_slice(&sums[..out.len()]);
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
        one_by_one(k, w, y, out);
    }
}

/// The stored bytes of ggml blocks.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
fn bytes<T: GgmlType>(blocks: &[T]) -> &[u8] {
    debug_assert_eq!(std::mem::size_of::<T>(), T::DTYPE.type_size());
    // SAFETY: the blocks are ggml's `repr(C)` structs of f16, u8 and i8
    // fields without padding (candle asserts each size against ggml's), so
    // every byte is initialised; the slice borrows `blocks` for its lifetime.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

// The workspace's rust-version (1.85) is that of the Apple type-check's
// toolchain, Debian's rustc-web, which never compiles this module; AVX-VNNI's
// intrinsics and detection are stable since 1.89, which x86 builds need.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[allow(clippy::incompatible_msrv)]
mod x86 {
    //! Block layouts (ggml's): Q4_0 `d: f16, qs: [u8; 16]` (18 bytes), Q4_1
    //! `d, m: f16, qs: [u8; 16]` (20), Q8_0 `d: f16, qs: [i8; 32]` (34), Q8_1
    //! `d, s: f16, qs: [i8; 32]` (36). Nibble byte `j` holds value `j` low and
    //! value `j + 16` high.
    use super::ROWS;
    use half::f16;
    use std::arch::x86_64::*;

    pub fn has_vnni() -> bool {
        std::is_x86_feature_detected!("avxvnni")
    }

    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        f16::from_le_bytes([*p, *p.add(1)]).to_f32()
    }

    /// 32 nibbles as bytes, values 0–15 in the low half, 16–31 in the high
    /// one (candle's `bytes_from_nibbles_32`).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let tmp = _mm_loadu_si128(p.cast());
        let both =
            _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4));
        _mm256_and_si256(_mm256_set1_epi8(0x0F), both)
    }

    /// candle's `hsum_float_8`, the same additions in the same order.
    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let res = _mm256_extractf128_ps(x, 1);
        let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    /// The totals of four vectors of lane sums (exact: integers).
    #[inline(always)]
    unsafe fn totals(v: [__m256i; ROWS]) -> [i32; ROWS] {
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        let mut out = [0i32; ROWS];
        _mm_storeu_si128(out.as_mut_ptr().cast(), s);
        out
    }

    /// Unsigned bytes `u` times signed bytes `s`, four adjacent products
    /// summed into each of 8 lanes: `maddubs` then `madd` on AVX2 (no pair
    /// can saturate for the values used here: |u| ≤ 128, |s| ≤ 128 with at
    /// most one of them 128), one `vpdpbusd` with VNNI.
    trait Lanes {
        unsafe fn lanes(u: __m256i, s: __m256i) -> __m256i;
    }
    struct Avx2;
    struct Vnni;
    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn lanes(u: __m256i, s: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(u, s))
        }
    }
    impl Lanes for Vnni {
        #[inline(always)]
        unsafe fn lanes(u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
        }
    }

    /// Q4_0 × Q8_0. candle: `bx = nibbles − 8`, lanes of `|bx| · sign(y, bx)`.
    /// Here the lanes of `nibbles · y` less 8 × the lanes of `y`, which are
    /// the same integers, the correction computed once for all rows.
    #[inline(always)]
    unsafe fn q4_0<L: Lanes>(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
        assert!(y.len() >= nb * 34 && w.iter().all(|w| w.len() >= nb * 18));
        let mut acc = [_mm256_setzero_ps(); ROWS];
        for b in 0..nb {
            let yb = y.as_ptr().add(b * 34);
            let dy = f16_at(yb);
            let qy = _mm256_loadu_si256(yb.add(2).cast());
            let offset = _mm256_slli_epi32::<3>(L::lanes(_mm256_set1_epi8(1), qy));
            for r in 0..ROWS {
                let wb = w[r].as_ptr().add(b * 18);
                let d = _mm256_set1_ps(f16_at(wb) * dy);
                let lanes = _mm256_sub_epi32(L::lanes(nibbles(wb.add(2)), qy), offset);
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r]);
            }
        }
        acc.map(|a| hsum(a))
    }

    /// Q8_0 × Q8_0: lanes of `|x| · sign(y, x)`, as candle.
    #[inline(always)]
    unsafe fn q8_0<L: Lanes>(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
        assert!(y.len() >= nb * 34 && w.iter().all(|w| w.len() >= nb * 34));
        let mut acc = [_mm256_setzero_ps(); ROWS];
        for b in 0..nb {
            let yb = y.as_ptr().add(b * 34);
            let dy = f16_at(yb);
            let qy = _mm256_loadu_si256(yb.add(2).cast());
            for r in 0..ROWS {
                let wb = w[r].as_ptr().add(b * 34);
                let d = _mm256_set1_ps(f16_at(wb) * dy);
                let qx = _mm256_loadu_si256(wb.add(2).cast());
                let lanes = L::lanes(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r]);
            }
        }
        acc.map(|a| hsum(a))
    }

    /// Q4_1 × Q8_1: the integer sum of a block, then candle's scalar
    /// `sumf += sumi · d_x · d_y + m_x · s_y`.
    #[inline(always)]
    unsafe fn q4_1<L: Lanes>(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
        assert!(y.len() >= nb * 36 && w.iter().all(|w| w.len() >= nb * 20));
        let mut sum = [0f32; ROWS];
        for b in 0..nb {
            let yb = y.as_ptr().add(b * 36);
            let (dy, sy) = (f16_at(yb), f16_at(yb.add(2)));
            let qy = _mm256_loadu_si256(yb.add(4).cast());
            let wb = w.map(|w| w.as_ptr().add(b * 20));
            let sumi = totals(wb.map(|wb| L::lanes(nibbles(wb.add(4)), qy)));
            for r in 0..ROWS {
                let (d, m) = (f16_at(wb[r]), f16_at(wb[r].add(2)));
                sum[r] += sumi[r] as f32 * d * dy + m * sy;
            }
        }
        sum
    }

    macro_rules! variants {
        ($($kernel:ident: $avx2:ident, $vnni:ident;)*) => {$(
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn $avx2(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
                $kernel::<Avx2>(w, y, nb)
            }
            #[target_feature(enable = "avx2,fma,avxvnni")]
            pub unsafe fn $vnni(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
                $kernel::<Vnni>(w, y, nb)
            }
        )*};
    }
    variants! {
        q4_0: q4_0_avx2, q4_0_vnni;
        q8_0: q8_0_avx2, q8_0_vnni;
        q4_1: q4_1_avx2, q4_1_vnni;
    }
}

#[cfg(all(test, target_arch = "x86_64", target_feature = "avx2"))]
mod tests {
    use super::*;

    /// Blocks of type `T` holding `values` as candle's quantizer rounds them.
    fn blocks<T: GgmlType>(values: &[f32]) -> Vec<T> {
        let mut out = vec![T::zeros(); values.len() / T::BLCK_SIZE];
        T::from_float(values, &mut out);
        out
    }

    /// Rows with every extreme the kernels must survive: the largest
    /// magnitudes, zeros (a zero scale), and random values.
    fn rows(seed: u64, k: usize) -> Vec<Vec<f32>> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut rows: Vec<Vec<f32>> = (0..ROWS)
            .map(|_| (0..k).map(|_| rng.f32() * 8.0 - 4.0).collect())
            .collect();
        rows[1][..32].fill(0.0);
        rows[2][32..64].fill(-1e4);
        rows[3][64..96]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = if i % 2 == 0 { 3e3 } else { -3e3 });
        rows
    }

    type Variant = unsafe fn([&[u8]; ROWS], &[u8], usize) -> [f32; ROWS];

    fn check<T: Rows>(kernels: &[(&str, Variant)])
    where
        T::VecDotType: GgmlType,
    {
        let k = 256;
        for seed in 0..20 {
            let w: Vec<Vec<T>> = rows(seed, k).iter().map(|r| blocks(r)).collect();
            let x = &rows(seed + 100, k)[(seed % 4) as usize];
            let y: Vec<T::VecDotType> = blocks(x);
            let theirs: Vec<f32> = w.iter().map(|w| T::vec_dot(k, w, &y)).collect();
            let refs: Vec<&[T]> = w.iter().map(|w| w.as_slice()).collect();
            let mut ours = vec![0f32; ROWS];
            T::dots(k, &refs, &y, &mut ours);
            assert_eq!(ours, theirs, "{:?} seed {seed}", T::DTYPE);
            for (name, kernel) in kernels {
                if name.ends_with("vnni") && !x86::has_vnni() {
                    continue;
                }
                let rows: [&[u8]; ROWS] = std::array::from_fn(|i| bytes(&w[i]));
                // SAFETY: the test runs only on AVX2 builds; VNNI is checked above.
                let sums = unsafe { kernel(rows, bytes(&y), k / 32) };
                assert_eq!(sums.to_vec(), theirs, "{name} seed {seed}");
            }
            // Fewer rows than a group: each its own dot product.
            let mut two = vec![0f32; 2];
            T::dots(k, &refs[1..3], &y, &mut two);
            assert_eq!(two, theirs[1..3], "{:?} two rows", T::DTYPE);
        }
    }

    #[test]
    fn every_variant_is_bit_identical_to_candles_vec_dot() {
        check::<BlockQ4_0>(&[("q4_0_avx2", x86::q4_0_avx2), ("q4_0_vnni", x86::q4_0_vnni)]);
        check::<BlockQ8_0>(&[("q8_0_avx2", x86::q8_0_avx2), ("q8_0_vnni", x86::q8_0_vnni)]);
        // candle's Q4_1 vec_dot is its portable loop: the reference here.
        check::<BlockQ4_1>(&[("q4_1_avx2", x86::q4_1_avx2), ("q4_1_vnni", x86::q4_1_vnni)]);
    }
}
