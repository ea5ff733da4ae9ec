//! A CPU matmul for the common quantized types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
//! and the k-quants), arranged for prompts. candle's
//! own loop takes one input row at a time and fans that row's columns out to
//! the thread pool, so a 512-token prompt step is 512 rounds of scheduling
//! per matrix, each streaming the whole weight from memory again. Here every
//! thread takes a run of weight rows and multiplies each against every input
//! row while it is in cache, a few rows at a time (`dots`). The dot product is
//! candle's arithmetic (`GgmlType::vec_dot`, over activations rounded by its
//! `from_float`), so each output is bit-identical to candle's (tested below).

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::GgmlDType;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::dots::{Rows, ROWS};

/// Weight rows per job: enough work to be worth a hand-off, few enough that
/// two threads share a small matrix.
const RUN: usize = 16;

/// A weight this kernel runs, of any of its types.
pub trait Kernel: Send + Sync {
    /// `x · Wᵀ` for `x` of shape `[.., k]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Rows, input features.
    fn shape(&self) -> (usize, usize);
    /// Row `i` in f32, as candle dequantizes it: an embedding table looks its
    /// rows up here and stays quantized.
    fn row(&self, i: usize, out: &mut [f32]) -> Result<()>;
}

/// Whether [`read`] takes a CPU weight of `dtype` with rows `k` wide:
/// the memory estimate counts such a table as stored, not in f32.
pub fn supports(dtype: GgmlDType, k: usize) -> bool {
    use GgmlDType::*;
    matches!(
        dtype,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    ) && k % dtype.block_size() == 0
}

struct Blocked<T: Rows> {
    /// Output features (rows of the weight).
    n: usize,
    /// Input features.
    k: usize,
    blocks: Vec<T>,
}

/// A `dtype` weight of `n` rows `k` wide, when it is one of ours, whose
/// stored bytes `fill` writes straight into the kernel's own blocks: a model
/// file copies into them without a copy in between.
pub fn read<E>(
    dtype: GgmlDType,
    (n, k): (usize, usize),
    fill: impl FnOnce(&mut [u8]) -> std::result::Result<(), E>,
) -> std::result::Result<Option<Box<dyn Kernel>>, E> {
    match dtype {
        GgmlDType::Q4_0 => read_as::<BlockQ4_0, E>(n, k, fill),
        GgmlDType::Q4_1 => read_as::<BlockQ4_1, E>(n, k, fill),
        GgmlDType::Q5_0 => read_as::<BlockQ5_0, E>(n, k, fill),
        GgmlDType::Q5_1 => read_as::<BlockQ5_1, E>(n, k, fill),
        GgmlDType::Q8_0 => read_as::<BlockQ8_0, E>(n, k, fill),
        GgmlDType::Q2K => read_as::<BlockQ2K, E>(n, k, fill),
        GgmlDType::Q3K => read_as::<BlockQ3K, E>(n, k, fill),
        GgmlDType::Q4K => read_as::<BlockQ4K, E>(n, k, fill),
        GgmlDType::Q5K => read_as::<BlockQ5K, E>(n, k, fill),
        GgmlDType::Q6K => read_as::<BlockQ6K, E>(n, k, fill),
        _ => Ok(None),
    }
}

fn read_as<T: Rows + 'static, E>(
    n: usize,
    k: usize,
    fill: impl FnOnce(&mut [u8]) -> std::result::Result<(), E>,
) -> std::result::Result<Option<Box<dyn Kernel>>, E> {
    if k % T::BLCK_SIZE != 0 || T::BLCK_SIZE != T::VecDotType::BLCK_SIZE {
        return Ok(None);
    }
    let count = n * k / T::BLCK_SIZE;
    let mut blocks = vec![T::zeros(); count];
    // SAFETY: the blocks are ggml's `repr(C)` structs of f16 and u8 fields
    // (arrays of them), laid out without padding, as the assertion below
    // checks against ggml's block size: every byte is initialised by
    // `zeros()`, and every bit pattern is a value, so `fill` may write any
    // bytes. The slice covers exactly `blocks`' own allocation and lives
    // only for this call.
    debug_assert_eq!(std::mem::size_of::<T>(), T::DTYPE.type_size());
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            blocks.as_mut_ptr().cast::<u8>(),
            count * std::mem::size_of::<T>(),
        )
    };
    fill(bytes)?;
    Ok(Some(Box::new(Blocked { n, k, blocks })))
}

impl<T: Rows> Kernel for Blocked<T> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("matmul: input {:?} does not end in {}", dims, self.k);
        }
        let rows = x.elem_count() / self.k;
        *dims.last_mut().expect("checked above") = self.n;
        if rows == 0 {
            return Tensor::zeros(dims, candle_core::DType::F32, x.device());
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let per_row = self.k / T::BLCK_SIZE;
        let mut quantized = vec![T::VecDotType::zeros(); rows * per_row];
        for (x, q) in xs
            .chunks_exact(self.k)
            .zip(quantized.chunks_exact_mut(per_row))
        {
            super::dots::quantize(x, q);
        }
        let out = by_columns(self.n, rows, |cols, row, out| {
            let mut w: [&[T]; ROWS] = [&[]; ROWS];
            let count = cols.len();
            for (w, col) in w.iter_mut().zip(cols) {
                *w = &self.blocks[col * per_row..(col + 1) * per_row];
            }
            let q = &quantized[row * per_row..(row + 1) * per_row];
            T::dots(self.k, &w[..count], q, out);
        });
        Tensor::from_vec(out, dims, x.device())
    }

    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn row(&self, i: usize, out: &mut [f32]) -> Result<()> {
        if i >= self.n {
            candle_core::bail!("row {i} is outside the table's {} rows", self.n);
        }
        if out.len() != self.k {
            candle_core::bail!("a row is {} values wide, not {}", self.k, out.len());
        }
        let per_row = self.k / T::BLCK_SIZE;
        T::to_float(&self.blocks[i * per_row..(i + 1) * per_row], out);
        Ok(())
    }
}

/// `rows × n` outputs, row-major, where `dots(cols, row, out)` writes those
/// of up to [`ROWS`] weight rows (output columns) against one input row: each
/// thread takes a run of weight rows and computes them against every input
/// row while those weight rows are in cache.
fn by_columns(
    n: usize,
    rows: usize,
    dots: impl Fn(std::ops::Range<usize>, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut by_column = vec![0f32; n * rows];
    by_column
        .par_chunks_mut(RUN * rows)
        .enumerate()
        .for_each(|(run, out)| {
            let mut group = [0f32; ROWS];
            for (g, group_out) in out.chunks_mut(ROWS * rows).enumerate() {
                let first = run * RUN + g * ROWS;
                let cols = group_out.len() / rows;
                for row in 0..rows {
                    dots(first..first + cols, row, &mut group[..cols]);
                    for (c, v) in group[..cols].iter().enumerate() {
                        group_out[c * rows + row] = *v;
                    }
                }
            }
        });
    // One row (every decode step) is already in output order.
    if rows == 1 {
        return by_column;
    }
    let mut out = vec![0f32; rows * n];
    for (col, values) in by_column.chunks(rows).enumerate() {
        for (r, v) in values.iter().enumerate() {
            out[r * n + col] = *v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::Device;
    use candle_core::Module;

    /// The weight as this kernel wants it, when its type is one of ours and it
    /// lives on the CPU: candle's quantizer makes the tests' weights.
    fn from_qtensor(t: &QTensor) -> Result<Option<Box<dyn Kernel>>> {
        if !matches!(t.device(), Device::Cpu) {
            return Ok(None);
        }
        let (n, k) = t.shape().dims2()?;
        let data = t.data()?;
        read(t.dtype(), (n, k), |blocks| {
            if data.len() != blocks.len() {
                candle_core::bail!(
                    "a {:?} tensor of this shape needs {} bytes, and this one holds {}",
                    t.dtype(),
                    blocks.len(),
                    data.len()
                );
            }
            blocks.copy_from_slice(&data);
            Ok(())
        })
    }

    #[test]
    fn bit_identical_to_candle_for_every_type_on_one_row_and_on_many() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (42, 512), &dev).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let qw = QTensor::quantize(&w, dtype).unwrap();
            assert!(
                supports(dtype, 512) && !supports(dtype, 512 + 16),
                "{dtype:?}"
            );
            let ours = from_qtensor(&qw).unwrap().expect("a type of ours");
            // Its rows are candle's dequantization of the same blocks.
            let dense: Vec<Vec<f32>> = qw.dequantize(&dev).unwrap().to_vec2().unwrap();
            assert_eq!(ours.shape(), (42, 512));
            for i in [0, 17, 41] {
                let mut row = vec![0f32; 512];
                ours.row(i, &mut row).unwrap();
                assert_eq!(row, dense[i], "{dtype:?} row {i}");
            }
            assert!(ours.row(42, &mut vec![0f32; 512]).is_err());
            let theirs = QMatMul::from_qtensor(qw).unwrap();
            let empty = Tensor::zeros((1, 0, 512), candle_core::DType::F32, &dev).unwrap();
            assert_eq!(ours.forward(&empty).unwrap().dims(), [1, 0, 42]);
            for rows in [1, 9] {
                let x = Tensor::randn(0f32, 1.0, (1, rows, 512), &dev).unwrap();
                let values =
                    |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
                let a = values(ours.forward(&x).unwrap());
                let b = values(theirs.forward(&x).unwrap());
                assert_eq!(a, b, "{dtype:?}, {rows} rows");
            }
        }
    }

    #[test]
    fn types_it_cannot_run_are_left_to_candle() {
        let w = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu).unwrap();
        let f16 = QTensor::quantize(&w, GgmlDType::F16).unwrap();
        assert!(from_qtensor(&f16).unwrap().is_none());
        assert!(!supports(GgmlDType::F16, 64) && !supports(GgmlDType::Q4_1, 48));
    }
}
