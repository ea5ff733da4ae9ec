//! Tensors on the wire: a dtype and a shape in the metadata, raw little-endian
//! element bytes in the frame's payload.
//!
//! The payload is kept as [`Bytes`] so a received tensor is a view into the one
//! buffer the socket read into, and a sent tensor is handed to a vectored write
//! without being copied next to its header.

use bytes::Bytes;

use super::codec::{Reader, Writer};
use super::ProtocolError;

/// The most dimensions a tensor may have. Hidden states are rank 2 or 3; eight
/// leaves room without letting a peer describe absurd shapes.
pub const MAX_DIMS: usize = 8;

/// Element types. The discriminants are the wire codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
    I8 = 3,
    U8 = 4,
    I32 = 5,
    I64 = 6,
}

impl DType {
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F16,
        DType::Bf16,
        DType::I8,
        DType::U8,
        DType::I32,
        DType::I64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::F16 | DType::Bf16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
        }
    }

    pub fn from_code(code: u8) -> Result<Self, ProtocolError> {
        DType::ALL
            .into_iter()
            .find(|d| *d as u8 == code)
            .ok_or(ProtocolError::UnknownDType(code))
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }
}

/// A dense tensor. `data.len()` always equals the product of `shape` times the
/// element size: [`Tensor::new`] refuses anything else, and so does the decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<u64>,
    data: Bytes,
}

impl Tensor {
    pub fn new(
        dtype: DType,
        shape: Vec<u64>,
        data: impl Into<Bytes>,
    ) -> Result<Self, ProtocolError> {
        let data = data.into();
        let expected = byte_len(dtype, &shape)?;
        if expected != data.len() as u64 {
            return Err(ProtocolError::ShapeMismatch {
                expected,
                actual: data.len() as u64,
            });
        }
        Ok(Tensor { dtype, shape, data })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    pub fn data(&self) -> &Bytes {
        &self.data
    }
}

/// The byte length a shape implies, refusing shapes whose size overflows.
pub fn byte_len(dtype: DType, shape: &[u64]) -> Result<u64, ProtocolError> {
    if shape.len() > MAX_DIMS {
        return Err(ProtocolError::TooManyDims(shape.len()));
    }
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
        .ok_or(ProtocolError::ShapeOverflow)
}

/// What the metadata says about a tensor before its bytes are taken from the payload.
#[derive(Debug)]
pub(crate) struct TensorDesc {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub len: u64,
}

pub(crate) fn write_desc(w: &mut Writer, t: &Tensor) {
    w.u8(t.dtype as u8);
    w.u8(t.shape.len() as u8);
    for &d in &t.shape {
        w.u64(d);
    }
}

pub(crate) fn read_desc(r: &mut Reader<'_>) -> Result<TensorDesc, ProtocolError> {
    let dtype = DType::from_code(r.u8("tensor dtype")?)?;
    let ndim = r.u8("tensor rank")? as usize;
    if ndim > MAX_DIMS {
        return Err(ProtocolError::TooManyDims(ndim));
    }
    let shape = (0..ndim)
        .map(|_| r.u64("tensor dimension"))
        .collect::<Result<Vec<_>, _>>()?;
    let len = byte_len(dtype, &shape)?;
    Ok(TensorDesc { dtype, shape, len })
}

/// Hands out consecutive slices of a frame's payload to the tensors its metadata
/// describes, so that every payload byte belongs to exactly one tensor.
pub(crate) struct PayloadCursor {
    payload: Bytes,
    pos: u64,
}

impl PayloadCursor {
    pub(crate) fn new(payload: Bytes) -> Self {
        PayloadCursor { payload, pos: 0 }
    }

    pub(crate) fn take(&mut self, desc: TensorDesc) -> Result<Tensor, ProtocolError> {
        let total = self.payload.len() as u64;
        let end = self
            .pos
            .checked_add(desc.len)
            .filter(|&end| end <= total)
            .ok_or(ProtocolError::ShapeMismatch {
                expected: self.pos.saturating_add(desc.len),
                actual: total,
            })?;
        let data = self.payload.slice(self.pos as usize..end as usize);
        self.pos = end;
        Ok(Tensor {
            dtype: desc.dtype,
            shape: desc.shape,
            data,
        })
    }

    /// The payload bytes not yet taken: a message whose payload is raw bytes
    /// rather than tensors.
    pub(crate) fn rest(&mut self) -> Bytes {
        let rest = self.payload.slice(self.pos as usize..);
        self.pos = self.payload.len() as u64;
        rest
    }

    /// Every payload byte must belong to a tensor.
    pub(crate) fn finish(self) -> Result<(), ProtocolError> {
        let total = self.payload.len() as u64;
        if self.pos == total {
            Ok(())
        } else {
            Err(ProtocolError::ShapeMismatch {
                expected: self.pos,
                actual: total,
            })
        }
    }
}
