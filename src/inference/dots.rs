//! Dot products of several weight rows against one row of activations.
//! candle's `vec_dot` takes one weight row at a time, so every row loads the
//! activations again and waits on its own chain of additions, and for Q4_1,
//! Q5_0 and Q5_1 candle has no vector kernel at all (its scalar loops made
//! models in those types, and the Q4_K_M files whose narrow rows fall back to
//! Q5_0, several times slower than llama.cpp). Here [`ROWS`] rows run
//! together: each activation block is loaded once for all of them, work that
//! depends on the activations alone is done once, and the rows' chains
//! overlap. Where the CPU has AVX-VNNI, one `vpdpbusd` replaces AVX2's two
//! pairwise sums, and one `vpdpwssd` a scaled sum and its addition.
//!
//! The arithmetic is candle's, operation for operation — the same integer sum
//! in each lane of 8, the same float operations in the same order (ggml's AVX2
//! kernels for Q4_0, Q8_0, Q4_K and Q6_K, its scalar loops for Q4_1, Q5_0 and
//! Q5_1) — so every output is bit-identical to candle's `vec_dot` (tested
//! below and in `blocked`). Like candle, the vector code is chosen when the
//! build targets AVX2; other builds (and Apple's NEON) use candle's own
//! `vec_dot`.

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

// Q4_K_M files are Q4_K and Q6_K (with Q5_0 and Q8_0 where rows are
// narrow); these rarer k-quants keep candle's one-row kernels.
impl Rows for BlockQ2K {}
impl Rows for BlockQ3K {}
impl Rows for BlockQ5K {}

/// `Rows` for a block type through a four-row kernel and its AVX-VNNI
/// variant, on builds that target AVX2 and FMA (as candle's kernels are
/// chosen, at compile time).
macro_rules! four_rows {
    ($($block:ty: $avx2:ident, $vnni:ident;)*) => {$(
        impl Rows for $block {
            fn dots(k: usize, w: &[&[Self]], y: &[Self::VecDotType], out: &mut [f32]) {
                #[cfg(all(
                    target_arch = "x86_64",
                    target_feature = "avx2",
                    target_feature = "fma"
                ))]
                in_fours(k / Self::BLCK_SIZE, w, y, out, [x86::$avx2, x86::$vnni]);
                #[cfg(not(all(
                    target_arch = "x86_64",
                    target_feature = "avx2",
                    target_feature = "fma"
                )))]
                one_by_one(k, w, y, out);
            }
        }
    )*};
}
four_rows! {
    BlockQ4_0: q4_0_avx2, q4_0_vnni;
    BlockQ4_1: q4_1_avx2, q4_1_vnni;
    BlockQ5_0: q5_0_avx2, q5_0_vnni;
    BlockQ5_1: q5_1_avx2, q5_1_vnni;
    BlockQ8_0: q8_0_avx2, q8_0_vnni;
    BlockQ4K: q4k_avx2, q4k_vnni;
    BlockQ6K: q6k_avx2, q6k_vnni;
}

/// Runs a kernel, its VNNI variant where the CPU has AVX-VNNI, over groups of
/// [`ROWS`] rows of `nb` blocks each; a short last group repeats its first
/// row, whose extra results are dropped.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn in_fours<T: GgmlType>(
    nb: usize,
    w: &[&[T]],
    y: &[T::VecDotType],
    out: &mut [f32],
    [avx2, vnni]: [x86::Kernel; 2],
) {
    debug_assert_eq!(w.len(), out.len());
    let kernel = if x86::has_vnni() { vnni } else { avx2 };
    let y = bytes(y);
    for (rows, out) in w.chunks(ROWS).zip(out.chunks_mut(ROWS)) {
        let mut four = [rows[0]; ROWS];
        four[..rows.len()].copy_from_slice(rows);
        // SAFETY: AVX2 and FMA are in the build's target (this function's
        // `cfg`), and the VNNI variant runs only where AVX-VNNI was detected
        // just above. Each kernel asserts that the rows and `y` hold `nb`
        // blocks.
        let sums = unsafe { kernel(four.map(bytes), y, nb) };
        out.copy_from_slice(&sums[..out.len()]);
    }
}

/// The stored bytes of ggml blocks.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn bytes<T: GgmlType>(blocks: &[T]) -> &[u8] {
    debug_assert_eq!(std::mem::size_of::<T>(), T::DTYPE.type_size());
    // SAFETY: the blocks are ggml's `repr(C)` structs of f32, f16, i16, u8
    // and i8 fields without padding (candle asserts each size against ggml's), so
    // every byte is initialised; the slice borrows `blocks` for its lifetime.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

/// Activations rounded into `V` blocks, as candle's `from_float` rounds them,
/// with a vector loop for Q8_0: candle's is scalar, with a libm `roundf` per
/// value, and took 9.1% of a prompt step's profile on smollm2-Q4_0.
pub fn quantize<V: GgmlType>(xs: &[f32], ys: &mut [V]) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if V::DTYPE == candle_core::quantized::GgmlDType::Q8_0 && xs.len() == ys.len() * 32 {
        debug_assert_eq!(std::mem::size_of::<V>(), 34);
        // SAFETY: Q8_0 blocks are `repr(C)` `{ d: f16, qs: [i8; 32] }`, 34
        // bytes without padding, for which every bit pattern is a value; the
        // slice covers exactly `ys` and lives only for this call.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(ys.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(ys))
        };
        // SAFETY: AVX2 and FMA are in the build's target (this block's
        // `cfg`); the kernel asserts the sizes.
        unsafe { x86::q8_0_from_float(xs, bytes) };
        return;
    }
    V::from_float(xs, ys);
}

// The workspace's rust-version (1.85) is that of the Apple type-check's
// toolchain, Debian's rustc-web, which never compiles this module; AVX-VNNI's
// intrinsics and detection are stable since 1.89, which x86 builds need.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[allow(clippy::incompatible_msrv)]
mod x86 {
    //! Block layouts (ggml's): Q4_0 `d: f16, qs: [u8; 16]` (18 bytes), Q4_1
    //! `d, m: f16, qs: [u8; 16]` (20), Q5_0 `d: f16, qh: u32, qs: [u8; 16]`
    //! (22), Q5_1 `d, m: f16, qh: u32, qs: [u8; 16]` (24; `qh` is stored as 4
    //! bytes, read little-endian), Q8_0 `d: f16, qs:
    //! [i8; 32]` (34), Q8_1 `d, s: f16, qs: [i8; 32]` (36). Nibble byte `j`
    //! holds value `j` low and value `j + 16` high; bit `j` of `qh` is value
    //! `j`'s fifth bit. The k-quants' 256-value blocks: Q4_K `d, dmin: f16,
    //! scales: [u8; 12], qs: [u8; 128]` (144), Q6_K `ql: [u8; 128], qh: [u8;
    //! 64], scales: [i8; 16], d: f16` (210), Q8_K `d: f32, qs: [i8; 256],
    //! bsums: [i16; 16]` (292).
    use super::ROWS;
    use half::f16;
    use std::arch::x86_64::*;

    /// Four rows (the weight's bytes) against `y`, `nb` blocks each.
    pub type Kernel = unsafe fn([&[u8]; ROWS], &[u8], usize) -> [f32; ROWS];

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

    /// Asks the cache for block `b` (`size` bytes, at `wb`) of the row
    /// [`ROWS`] rows on, which the next group reads: a matrix's rows lie one
    /// after another. The CPU's own prefetcher follows the four interleaved
    /// rows of a group poorly: on llama3-1b-Q4_K_M this took decode from 15.8
    /// to 20.7 tok/s. Every line is asked for once (a block under 64 bytes
    /// every `64 / size` blocks); a prefetch never faults, so the last group's,
    /// past the matrix, is harmless.
    #[inline(always)]
    unsafe fn ahead(wb: *const u8, b: usize, size: usize, nb: usize) {
        let next = wb.wrapping_add(ROWS * nb * size);
        if size >= 64 {
            for line in (0..size).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line).cast());
            }
        } else if b % (64 / size) == 0 {
            _mm_prefetch::<_MM_HINT_T0>(next.cast());
        }
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
        /// `acc` plus the lanes of `a · b` over pairs of i16, exact: `madd`
        /// then `add` on AVX2, one `vpdpwssd` with VNNI.
        unsafe fn add_pairs(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
    }
    struct Avx2;
    struct Vnni;
    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn lanes(u: __m256i, s: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(u, s))
        }
        #[inline(always)]
        unsafe fn add_pairs(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
            _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
        }
    }
    impl Lanes for Vnni {
        #[inline(always)]
        unsafe fn lanes(u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
        }
        #[inline(always)]
        unsafe fn add_pairs(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
            _mm256_dpwssd_avx_epi32(acc, a, b)
        }
    }

    /// Q4_0 × Q8_0 and Q8_0 × Q8_0 (blocks of `size` bytes), candle's AVX2
    /// kernels: per block, 8 lanes of integers, `lanes(block, qy, shared)`,
    /// converted and multiplied by `d_x · d_y` into 8 float lanes. `shared`
    /// is what `per_block(qy)` derives from the activations alone, once for
    /// all rows.
    #[inline(always)]
    unsafe fn by_lanes(
        w: [&[u8]; ROWS],
        y: &[u8],
        nb: usize,
        size: usize,
        per_block: impl Fn(__m256i) -> __m256i,
        lanes: impl Fn(*const u8, __m256i, __m256i) -> __m256i,
    ) -> [f32; ROWS] {
        assert!(y.len() >= nb * 34 && w.iter().all(|w| w.len() >= nb * size));
        let mut acc = [_mm256_setzero_ps(); ROWS];
        for b in 0..nb {
            let yb = y.as_ptr().add(b * 34);
            let dy = f16_at(yb);
            let qy = _mm256_loadu_si256(yb.add(2).cast());
            let shared = per_block(qy);
            for r in 0..ROWS {
                let wb = w[r].as_ptr().add(b * size);
                ahead(wb, b, size, nb);
                let d = _mm256_set1_ps(f16_at(wb) * dy);
                let lanes = lanes(wb, qy, shared);
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r]);
            }
        }
        acc.map(|a| hsum(a))
    }

    /// candle: `bx = nibbles − 8`, lanes of `|bx| · sign(y, bx)`. Here the
    /// lanes of `nibbles · y` less 8 × the lanes of `y`, which are the same
    /// integers, the correction shared by the rows.
    #[inline(always)]
    unsafe fn q4_0<L: Lanes>(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
        by_lanes(
            w,
            y,
            nb,
            18,
            |qy| _mm256_slli_epi32::<3>(L::lanes(_mm256_set1_epi8(1), qy)),
            |wb, qy, offset| _mm256_sub_epi32(L::lanes(nibbles(wb.add(2)), qy), offset),
        )
    }

    /// Lanes of `|x| · sign(y, x)`, as candle.
    #[inline(always)]
    unsafe fn q8_0<L: Lanes>(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
        by_lanes(
            w,
            y,
            nb,
            34,
            |_| _mm256_setzero_si256(),
            |wb, qy, _| {
                let qx = _mm256_loadu_si256(wb.add(2).cast());
                L::lanes(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx))
            },
        )
    }

    /// Q4_1 × Q8_1 and Q5_1 × Q8_1 (blocks of `size` bytes, whose 32
    /// unsigned values `values` reads): the integer sum of a block, then
    /// candle's scalar `sumf += sumi · d_x · d_y + m_x · s_y`.
    #[inline(always)]
    unsafe fn with_min<L: Lanes>(
        w: [&[u8]; ROWS],
        y: &[u8],
        nb: usize,
        size: usize,
        values: impl Fn(*const u8) -> __m256i,
    ) -> [f32; ROWS] {
        assert!(y.len() >= nb * 36 && w.iter().all(|w| w.len() >= nb * size));
        let mut sum = [0f32; ROWS];
        for b in 0..nb {
            let yb = y.as_ptr().add(b * 36);
            let (dy, sy) = (f16_at(yb), f16_at(yb.add(2)));
            let qy = _mm256_loadu_si256(yb.add(4).cast());
            let wb = w.map(|w| w.as_ptr().add(b * size));
            for wb in wb {
                ahead(wb, b, size, nb);
            }
            let sumi = totals(wb.map(|wb| L::lanes(values(wb), qy)));
            for r in 0..ROWS {
                let (d, m) = (f16_at(wb[r]), f16_at(wb[r].add(2)));
                sum[r] += sumi[r] as f32 * d * dy + m * sy;
            }
        }
        sum
    }

    #[inline(always)]
    unsafe fn q4_1<L: Lanes>(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
        with_min::<L>(w, y, nb, 20, |wb| nibbles(wb.add(4)))
    }

    #[inline(always)]
    unsafe fn q5_1<L: Lanes>(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
        with_min::<L>(w, y, nb, 24, |wb| {
            _mm256_or_si256(nibbles(wb.add(8)), fifth_bits(wb.add(4)))
        })
    }

    /// 32 bytes, `0x10` where bit `j` of the little-endian u32 at `p` is set
    /// (the fifth bit of value `j` in Q5_0 and Q5_1).
    #[inline(always)]
    unsafe fn fifth_bits(p: *const u8) -> __m256i {
        let qh = u32::from_le_bytes(p.cast::<[u8; 4]>().read_unaligned());
        // Byte j takes byte j / 8 of qh, then keeps bit j % 8 of it.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh as i32),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Q5_0 × Q8_0, candle's scalar `vec_dot`: the integer sum of a block of
    /// `(v − 16) · y`, here the lanes of `v · y` less 16 × the lanes of `y`
    /// (the same integer), then `sumf += sumi · d_x · d_y`.
    #[inline(always)]
    unsafe fn q5_0<L: Lanes>(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
        assert!(y.len() >= nb * 34 && w.iter().all(|w| w.len() >= nb * 22));
        let mut sum = [0f32; ROWS];
        for b in 0..nb {
            let yb = y.as_ptr().add(b * 34);
            let dy = f16_at(yb);
            let qy = _mm256_loadu_si256(yb.add(2).cast());
            let offset = _mm256_slli_epi32::<4>(L::lanes(_mm256_set1_epi8(1), qy));
            let wb = w.map(|w| w.as_ptr().add(b * 22));
            for wb in wb {
                ahead(wb, b, 22, nb);
            }
            let sumi = totals(wb.map(|wb| {
                let v = _mm256_or_si256(nibbles(wb.add(6)), fifth_bits(wb.add(2)));
                _mm256_sub_epi32(L::lanes(v, qy), offset)
            }));
            for r in 0..ROWS {
                sum[r] += sumi[r] as f32 * f16_at(wb[r]) * dy;
            }
        }
        sum
    }

    /// The f32 scale of a Q8_K block.
    #[inline(always)]
    unsafe fn f32_at(p: *const u8) -> f32 {
        f32::from_le_bytes(p.cast::<[u8; 4]>().read_unaligned())
    }

    /// A Q4_K block's eight 6-bit scales then eight 6-bit mins, one per byte
    /// (candle's `utmp` unpacking).
    #[inline(always)]
    unsafe fn q4k_scales(p: *const u8) -> __m128i {
        const KMASK1: u32 = 0x3f3f3f3f;
        const KMASK2: u32 = 0x0f0f0f0f;
        const KMASK3: u32 = 0x03030303;
        let word = |i: usize| u32::from_le_bytes(p.add(4 * i).cast::<[u8; 4]>().read_unaligned());
        let (u0, u1, u2) = (word(0), word(1), word(2));
        let u3 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
        let scales_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
        _mm_set_epi32(
            u3 as i32,
            (u1 & KMASK1) as i32,
            scales_hi as i32,
            (u0 & KMASK1) as i32,
        )
    }

    /// Q4_K × Q8_K, candle's AVX2 kernel (ggml's): per block, the lanes of
    /// `scale · (q4 · q8)` over its eight sub-blocks of 32, one FMA by
    /// `d_y · d` into 8 float lanes, and the mins' `Σ min · bsum` by
    /// `−d_y · dmin` into 4 more; both summed at the end as candle does.
    #[inline(always)]
    unsafe fn q4k<L: Lanes>(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
        assert!(y.len() >= nb * 292 && w.iter().all(|w| w.len() >= nb * 144));
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); ROWS];
        let mut acc_m = [_mm_setzero_ps(); ROWS];
        for b in 0..nb {
            let yb = y.as_ptr().add(b * 292);
            let dy = f32_at(yb);
            let q8sums = _mm256_loadu_si256(yb.add(260).cast());
            let q8s = _mm_hadd_epi16(
                _mm256_castsi256_si128(q8sums),
                _mm256_extracti128_si256::<1>(q8sums),
            );
            let wb = w.map(|w| w.as_ptr().add(b * 144));
            for wb in wb {
                ahead(wb, b, 144, nb);
            }
            let mut scales = [_mm256_setzero_si256(); ROWS];
            for r in 0..ROWS {
                let dmin = -dy * f16_at(wb[r].add(2));
                let mins_and_scales = _mm256_cvtepu8_epi16(q4k_scales(wb[r].add(4)));
                let prod = _mm_madd_epi16(_mm256_extracti128_si256::<1>(mins_and_scales), q8s);
                acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[r]);
                let sc = _mm256_castsi256_si128(mins_and_scales);
                scales[r] = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(sc), sc);
            }
            let mut sumi = [_mm256_setzero_si256(); ROWS];
            for j in 0..4 {
                let q8l = _mm256_loadu_si256(yb.add(4 + 64 * j).cast());
                let q8h = _mm256_loadu_si256(yb.add(4 + 64 * j + 32).cast());
                // The i16 scale of sub-block 2j, then 2j + 1, in every lane.
                let pick = |s: usize| {
                    _mm256_set1_epi16(i16::from_le_bytes([2 * s as u8, 2 * s as u8 + 1]))
                };
                let (pick_l, pick_h) = (pick(2 * j), pick(2 * j + 1));
                for r in 0..ROWS {
                    let q4bits = _mm256_loadu_si256(wb[r].add(16 + 32 * j).cast());
                    let q4l = _mm256_and_si256(q4bits, m4);
                    let q4h = _mm256_and_si256(_mm256_srli_epi16::<4>(q4bits), m4);
                    let scale_l = _mm256_shuffle_epi8(scales[r], pick_l);
                    let scale_h = _mm256_shuffle_epi8(scales[r], pick_h);
                    sumi[r] = L::add_pairs(sumi[r], scale_l, _mm256_maddubs_epi16(q4l, q8l));
                    sumi[r] = L::add_pairs(sumi[r], scale_h, _mm256_maddubs_epi16(q4h, q8h));
                }
            }
            for r in 0..ROWS {
                let d = _mm256_set1_ps(dy * f16_at(wb[r]));
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        std::array::from_fn(|r| {
            let m = acc_m[r];
            let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_add_ss(m, _mm_movehdup_ps(m));
            hsum(acc[r]) + _mm_cvtss_f32(m)
        })
    }

    /// Q6_K × Q8_K, candle's AVX2 kernel (ggml's): 6-bit values `q` from
    /// four bits in `ql` and two in `qh`, the lanes of `scale · (q · q8 −
    /// 32 · q8)` over sixteen sub-blocks of 16, one FMA by `d_y · d` a block.
    /// `32 · q8` is the activations' alone, computed once for the four rows.
    #[inline(always)]
    unsafe fn q6k<L: Lanes>(w: [&[u8]; ROWS], y: &[u8], nb: usize) -> [f32; ROWS] {
        assert!(y.len() >= nb * 292 && w.iter().all(|w| w.len() >= nb * 210));
        let (m4, m2, m32s) = (
            _mm256_set1_epi8(0xF),
            _mm256_set1_epi8(3),
            _mm256_set1_epi8(32),
        );
        let mut acc = [_mm256_setzero_ps(); ROWS];
        for b in 0..nb {
            let yb = y.as_ptr().add(b * 292);
            let wb = w.map(|w| w.as_ptr().add(b * 210));
            for wb in wb {
                ahead(wb, b, 210, nb);
            }
            let scales = wb.map(|wb| _mm_loadu_si128(wb.add(192).cast()));
            let mut sumi = [_mm256_setzero_si256(); ROWS];
            for j in 0..2 {
                for i in 0..4 {
                    let q8 = _mm256_loadu_si256(yb.add(4 + 128 * j + 32 * i).cast());
                    let q8s = _mm256_maddubs_epi16(m32s, q8);
                    // Scales 2s and 2s + 1 of the block, each over 16 values.
                    let s = (4 * j + i) as i64;
                    let pick = _mm_set_epi64x(
                        (2 * s + 1) * 0x0101_0101_0101_0101,
                        2 * s * 0x0101_0101_0101_0101,
                    );
                    let shift = _mm_cvtsi32_si128(2 * i as i32);
                    for r in 0..ROWS {
                        let ql = _mm256_loadu_si256(wb[r].add(64 * j + 32 * (i % 2)).cast());
                        let ql = if i < 2 {
                            ql
                        } else {
                            _mm256_srli_epi16::<4>(ql)
                        };
                        let qh = _mm256_loadu_si256(wb[r].add(128 + 32 * j).cast());
                        let high = _mm256_slli_epi16::<4>(_mm256_and_si256(
                            _mm256_srl_epi16(qh, shift),
                            m2,
                        ));
                        let q = _mm256_or_si256(_mm256_and_si256(ql, m4), high);
                        let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(q, q8), q8s);
                        let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales[r], pick));
                        sumi[r] = L::add_pairs(sumi[r], scale, p16);
                    }
                }
            }
            let dy = f32_at(yb);
            for r in 0..ROWS {
                let d = _mm256_set1_ps(dy * f16_at(wb[r].add(208)));
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        acc.map(|a| hsum(a))
    }

    /// candle's `BlockQ8_0::from_float`, 8 values at a time: the block's
    /// largest magnitude (NaN skipped, as `f32::max` skips it), `d = amax /
    /// 127`, and each value times `1 / d` rounded half away from zero as
    /// `f32::round` does, then cast as `as i8` casts (saturating, NaN to 0).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q8_0_from_float(xs: &[f32], out: &mut [u8]) {
        let nb = xs.len() / 32;
        assert!(xs.len() == nb * 32 && out.len() == nb * 34);
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let (lowest, highest) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..nb {
            let x = xs.as_ptr().add(32 * b);
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.add(8 * i)));
            // `max(|x|, acc)` returns `acc` where |x| is NaN.
            let mut most = _mm256_setzero_ps();
            for v in v {
                most = _mm256_max_ps(_mm256_and_ps(v, magnitude), most);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), most);
            let amax = lanes.iter().fold(0f32, |a, &l| a.max(l));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = v.map(|v| {
                let v = _mm256_mul_ps(v, _mm256_set1_ps(id));
                let whole = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
                let fraction = _mm256_and_ps(_mm256_sub_ps(v, whole), magnitude);
                let up = _mm256_cmp_ps::<_CMP_GE_OQ>(fraction, half);
                let step = _mm256_or_ps(_mm256_and_ps(v, sign), one);
                let rounded = _mm256_add_ps(whole, _mm256_and_ps(up, step));
                let clamped = _mm256_max_ps(_mm256_min_ps(rounded, highest), lowest);
                let number = _mm256_cmp_ps::<_CMP_ORD_Q>(v, v);
                _mm256_cvttps_epi32(_mm256_and_ps(clamped, number))
            });
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let block = out.as_mut_ptr().add(34 * b);
            block
                .cast::<[u8; 2]>()
                .write_unaligned(f16::from_f32(d).to_le_bytes());
            _mm256_storeu_si256(
                block.add(2).cast(),
                _mm256_permutevar8x32_epi32(packed, order),
            );
        }
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
        q5_0: q5_0_avx2, q5_0_vnni;
        q5_1: q5_1_avx2, q5_1_vnni;
        q4k: q4k_avx2, q4k_vnni;
        q6k: q6k_avx2, q6k_vnni;
    }
}

#[cfg(all(
    test,
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
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
        // A whole k-quant block of zeros: its scales, mins and `d` all zero.
        rows[1][k - 256..].fill(0.0);
        rows[2][32..64].fill(-1e4);
        rows[3][64..96]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = if i % 2 == 0 { 3e3 } else { -3e3 });
        rows
    }

    fn check<T: Rows>(kernels: &[(&str, x86::Kernel)])
    where
        T::VecDotType: GgmlType,
    {
        let k = 512;
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
                    eprintln!("{name}: not checked, this CPU has no AVX-VNNI");
                    continue;
                }
                let rows: [&[u8]; ROWS] = std::array::from_fn(|i| bytes(&w[i]));
                // SAFETY: the test runs only on AVX2 and FMA builds; VNNI is
                // checked above.
                let sums = unsafe { kernel(rows, bytes(&y), k / T::BLCK_SIZE) };
                assert_eq!(sums.to_vec(), theirs, "{name} seed {seed}");
            }
            // Fewer rows than a group: each its own dot product.
            let mut two = vec![0f32; 2];
            T::dots(k, &refs[1..3], &y, &mut two);
            assert_eq!(two, theirs[1..3], "{:?} two rows", T::DTYPE);
        }
    }

    #[test]
    fn q8_0_rounding_is_candles_byte_for_byte() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut xs: Vec<f32> = (0..32 * 64).map(|_| rng.f32() * 8.0 - 4.0).collect();
        // Ties: with 127 the largest magnitude, `d` is 1 and every x.5 is a
        // tie that rounds away from zero.
        for (i, x) in xs[..32].iter_mut().enumerate() {
            *x = i as f32 - 15.5;
        }
        xs[31] = 127.0;
        xs[32..64].fill(0.0);
        xs[64..96].fill(-0.0);
        xs[96] = f32::NAN;
        xs[128] = f32::INFINITY;
        xs[160] = f32::NEG_INFINITY;
        // A block of subnormals, whose 1 / d overflows to infinity.
        for (i, x) in xs[192..224].iter_mut().enumerate() {
            *x = f32::from_bits(i as u32 + 1) * if i % 2 == 0 { 1.0 } else { -1.0 };
        }
        xs[224..256].fill(1e30);
        xs[256] = -1e-38;
        let mut theirs = vec![BlockQ8_0::zeros(); xs.len() / 32];
        BlockQ8_0::from_float(&xs, &mut theirs);
        let mut ours = vec![BlockQ8_0::zeros(); xs.len() / 32];
        quantize(&xs, &mut ours);
        for (b, (o, t)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(
                bytes(std::slice::from_ref(o)),
                bytes(std::slice::from_ref(t)),
                "block {b}"
            );
        }
    }

    #[test]
    fn every_variant_is_bit_identical_to_candles_vec_dot() {
        check::<BlockQ4_0>(&[("q4_0_avx2", x86::q4_0_avx2), ("q4_0_vnni", x86::q4_0_vnni)]);
        check::<BlockQ8_0>(&[("q8_0_avx2", x86::q8_0_avx2), ("q8_0_vnni", x86::q8_0_vnni)]);
        // candle's Q4_1, Q5_0 and Q5_1 vec_dot are its portable loops: the
        // references here.
        check::<BlockQ4_1>(&[("q4_1_avx2", x86::q4_1_avx2), ("q4_1_vnni", x86::q4_1_vnni)]);
        check::<BlockQ5_0>(&[("q5_0_avx2", x86::q5_0_avx2), ("q5_0_vnni", x86::q5_0_vnni)]);
        check::<BlockQ5_1>(&[("q5_1_avx2", x86::q5_1_avx2), ("q5_1_vnni", x86::q5_1_vnni)]);
        check::<BlockQ4K>(&[("q4k_avx2", x86::q4k_avx2), ("q4k_vnni", x86::q4k_vnni)]);
        check::<BlockQ6K>(&[("q6k_avx2", x86::q6k_avx2), ("q6k_vnni", x86::q6k_vnni)]);
    }
}
