//! Which ggml types a GGUF file's tensors use, read from its header before
//! candle parses it. candle refuses a type it does not know with "unknown dtype
//! for tensor 19"; a user holding an IQ4_XS file needs to hear which type, in
//! which tensor, and what would work instead. Sans-IO: a pure walk over bytes.

/// ggml's type ids (ggml.h `enum ggml_type`) and their names.
const NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

/// The types candle's quantized backend runs (its `GgmlDType`).
const RUNNABLE: &[u32] = &[0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

pub const SUPPORTED: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

pub fn name(id: u32) -> String {
    NAMES
        .iter()
        .find(|(i, _)| *i == id)
        .map_or_else(|| format!("type {id}"), |(_, n)| (*n).to_owned())
}

/// The first tensor whose type we cannot run, with a sentence that names it,
/// how many tensors share the type, and what is supported. `None` when every
/// tensor is runnable or the header is not one we can walk (candle's own
/// parse then says what is wrong with it).
pub fn unsupported(header: &[u8]) -> Option<String> {
    let tensors = tensor_types(header)?;
    let (tensor, id) = tensors.iter().find(|(_, id)| !RUNNABLE.contains(id))?;
    let same = tensors.iter().filter(|(_, t)| t == id).count();
    Some(format!(
        "tensor `{tensor}` is {} ({same} of its {} tensors are), which tensorlink cannot run; \
         use a file quantized as one of {SUPPORTED} (Q4_K_M and Q8_0 are the common ones)",
        name(*id),
        tensors.len()
    ))
}

/// (name, ggml type id) of every tensor, in file order; `None` if `bytes` is
/// not a GGUF v2/v3 header or ends inside it.
pub fn tensor_types(bytes: &[u8]) -> Option<Vec<(String, u32)>> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != b"GGUF" {
        return None;
    }
    if !matches!(r.u32()?, 2 | 3) {
        return None;
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    for _ in 0..n_kv {
        r.string()?;
        let kind = r.u32()?;
        r.skip_value(kind, 0)?;
    }
    // Each tensor's info is at least 24 bytes; a count beyond that is a lie.
    if n_tensors > (bytes.len() / 24) as u64 {
        return None;
    }
    let mut out = Vec::with_capacity((n_tensors as usize).min(4096));
    for _ in 0..n_tensors {
        let name = String::from_utf8_lossy(r.string()?).into_owned();
        let dims = r.u32()?;
        for _ in 0..dims {
            r.u64()?;
        }
        let kind = r.u32()?;
        r.u64()?;
        out.push((name, kind));
    }
    Some(out)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        let end = self.at.checked_add(usize::try_from(n).ok()?)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u64()?;
        self.take(len)
    }

    /// Skips one metadata value of GGUF type `kind`; arrays nest, but not
    /// deeper than a file could mean.
    fn skip_value(&mut self, kind: u32, depth: u8) -> Option<()> {
        let size = match kind {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                self.string()?;
                return Some(());
            }
            9 if depth < 4 => {
                let item = self.u32()?;
                let count = self.u64()?;
                if let Some(width) = match item {
                    0 | 1 | 7 => Some(1u64),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    _ => None,
                } {
                    self.take(count.checked_mul(width)?)?;
                } else {
                    for _ in 0..count {
                        self.skip_value(item, depth + 1)?;
                    }
                }
                return Some(());
            }
            _ => return None,
        };
        self.take(size)?;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header as the format's spec lays it out, written by hand.
    fn header(kvs: &[(&str, u32, Vec<u8>)], tensors: &[(&str, u32)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (key, kind, value) in kvs {
            string(&mut b, key);
            b.extend(kind.to_le_bytes());
            b.extend(value);
        }
        for (name, kind) in tensors {
            string(&mut b, name);
            b.extend(2u32.to_le_bytes());
            b.extend(256u64.to_le_bytes());
            b.extend(4u64.to_le_bytes());
            b.extend(kind.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        b
    }

    fn string_array(items: &[&str]) -> Vec<u8> {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        for s in items {
            v.extend((s.len() as u64).to_le_bytes());
            v.extend(s.as_bytes());
        }
        v
    }

    #[test]
    fn names_the_first_tensor_of_a_type_candle_cannot_run() {
        let arch = {
            let mut v = 5u64.to_le_bytes().to_vec();
            v.extend(b"llama");
            v
        };
        let kvs = [
            ("general.architecture", 8, arch),
            ("tokenizer.ggml.tokens", 9, string_array(&["a", "bc"])),
            ("llama.block_count", 4, 2u32.to_le_bytes().to_vec()),
            ("llama.rope.freq_base", 6, 1e4f32.to_le_bytes().to_vec()),
        ];
        let tensors = [
            ("token_embd.weight", 12),
            ("blk.0.attn_q.weight", 23),
            ("blk.1.attn_q.weight", 23),
            ("output_norm.weight", 0),
        ];
        let h = header(&kvs, &tensors);
        assert_eq!(
            tensor_types(&h).unwrap(),
            tensors
                .iter()
                .map(|(n, t)| (n.to_string(), *t))
                .collect::<Vec<_>>()
        );
        let why = unsupported(&h).unwrap();
        assert!(
            why.starts_with("tensor `blk.0.attn_q.weight` is IQ4_XS (2 of its 4 tensors are)"),
            "{why}"
        );
        assert!(why.contains("Q4_K, Q5_K, Q6_K"), "{why}");
        let fine = header(&kvs, &tensors[..1]);
        assert_eq!(unsupported(&fine), None);
    }

    #[test]
    fn a_cut_or_foreign_header_is_left_to_candle() {
        let h = header(&[], &[("a", 39)]);
        for cut in 0..h.len() {
            assert_eq!(tensor_types(&h[..cut]), None, "cut at {cut}");
        }
        assert!(unsupported(&h).unwrap().contains("is MXFP4"));
        assert_eq!(tensor_types(b"GGML\x03\0\0\0"), None);
    }
}
