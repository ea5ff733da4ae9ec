//! The primitive field encoding every metadata block is built from.
//!
//! Kept separate from the message definitions so that the rules a second
//! implementation must follow (little-endian integers, `u32`-prefixed strings and
//! lists, one-byte booleans and option tags) live in one short file. Reading is
//! bounds-checked everywhere: a count read from the wire is never used to size an
//! allocation before the bytes it promises have been seen to exist.

use super::ProtocolError;

/// A cursor over a metadata block. Every read checks that the bytes exist first.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(ProtocolError::Truncated(what))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn f32(&mut self, what: &'static str) -> Result<f32, ProtocolError> {
        Ok(f32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn bool(&mut self, what: &'static str) -> Result<bool, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtocolError::Malformed(what)),
        }
    }

    pub(crate) fn str(&mut self, what: &'static str) -> Result<String, ProtocolError> {
        let len = self.u32(what)? as usize;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::Malformed(what))
    }

    /// An option tag: `0` absent, `1` present.
    pub(crate) fn present(&mut self, what: &'static str) -> Result<bool, ProtocolError> {
        self.bool(what)
    }

    /// A list count, checked against the bytes left so that a hostile count cannot
    /// make us reserve more than the block could possibly describe.
    pub(crate) fn count(
        &mut self,
        min_item_len: usize,
        what: &'static str,
    ) -> Result<usize, ProtocolError> {
        let n = self.u32(what)? as usize;
        let left = self.buf.len() - self.pos;
        if n.saturating_mul(min_item_len.max(1)) > left {
            return Err(ProtocolError::Truncated(what));
        }
        Ok(n)
    }

    /// Trailing bytes are an error: they would mean the two sides disagree on layout.
    pub(crate) fn finish(self, what: &'static str) -> Result<(), ProtocolError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes(what))
        }
    }
}

/// Appends fields in wire order.
#[derive(Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_prefix(prefix: &[u8]) -> Self {
        Writer {
            buf: prefix.to_vec(),
        }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn f32(&mut self, v: f32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }

    pub(crate) fn str(&mut self, v: &str) {
        self.count(v.len());
        self.buf.extend_from_slice(v.as_bytes());
    }

    pub(crate) fn count(&mut self, n: usize) {
        // Lengths beyond u32 cannot pass the metadata limit anyway; saturate so the
        // receiver rejects the frame instead of misreading it.
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
}
