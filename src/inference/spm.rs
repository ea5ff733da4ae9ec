//! SentencePiece vocabularies (`tokenizer.ggml.model = llama`: Llama 2,
//! Mistral, Gemma), tokenized as llama.cpp does it (`llm_tokenizer_spm`), which
//! is what the model files were converted for: control and user-defined
//! tokens split out first, longest first; a space before each run of text that
//! starts the prompt or follows a special token (when the file asks for a
//! space prefix); spaces as `▁`; then pairs of symbols merged by the score of
//! the token they form, highest first, and whatever is left that is no token
//! spelled as byte tokens (`<0x41>`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

const SPACE: &str = "\u{2581}";

pub struct Spm {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    /// Text → id; where two ids share a text the later wins, as in llama.cpp.
    ids: HashMap<String, u32>,
    /// Tokens matched whole before the merges, longest text first.
    specials: Vec<u32>,
    add_space_prefix: bool,
}

enum Fragment {
    Text(usize, usize),
    Token(u32),
}

impl Spm {
    pub fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i32>,
        add_space_prefix: bool,
    ) -> Self {
        let ids = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                matches!(
                    types.get(i as usize),
                    Some(&(CONTROL | USER_DEFINED | UNKNOWN))
                ) && !tokens[i as usize].is_empty()
            })
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        Spm {
            tokens,
            scores,
            types,
            ids,
            specials,
            add_space_prefix,
        }
    }

    /// The ids of `text`, special tokens parsed, without BOS or EOS; an error
    /// naming the byte when a text needs a byte the vocabulary has no token
    /// for (llama.cpp fails there too).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for fragment in self.partition(text) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(a, b) => {
                    let mut piece = String::with_capacity(b - a + 1);
                    if self.add_space_prefix && prev_special {
                        piece.push(' ');
                    }
                    piece.push_str(&text[a..b]);
                    Session::new(self, &piece.replace(' ', SPACE))
                        .tokenize(&mut out)
                        .map_err(|b| {
                            format!("the vocabulary has no token for the byte 0x{b:02X}")
                        })?;
                    prev_special = false;
                }
            }
        }
        Ok(out)
    }

    /// The bytes one token stands for, control tokens spelled out: what a
    /// log-probability is shown for.
    pub fn piece(&self, id: u32) -> Vec<u8> {
        let (Some(text), Some(&kind)) = (self.tokens.get(id as usize), self.types.get(id as usize))
        else {
            return Vec::new();
        };
        match kind {
            BYTE => byte_value(text).into_iter().collect(),
            NORMAL => text.replace(SPACE, " ").into_bytes(),
            USER_DEFINED | CONTROL => text.as_bytes().to_vec(),
            _ => Vec::new(),
        }
    }

    /// The text of `ids`; control tokens are left out, byte tokens joined
    /// into the characters they spell (an incomplete one decodes as U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let (Some(text), Some(&kind)) =
                (self.tokens.get(id as usize), self.types.get(id as usize))
            else {
                continue;
            };
            match kind {
                // llama.cpp's token_to_piece without special tokens: only
                // normal, byte and user-defined tokens have text.
                BYTE => bytes.extend(byte_value(text)),
                USER_DEFINED => bytes.extend_from_slice(text.as_bytes()),
                NORMAL => bytes.extend_from_slice(text.replace(SPACE, " ").as_bytes()),
                _ => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// llama.cpp's `tokenizer_st_partition`: each special token in turn (longest
    /// first) splits every text fragment at each of its occurrences.
    fn partition(&self, text: &str) -> Vec<Fragment> {
        let mut fragments = if text.is_empty() {
            Vec::new()
        } else {
            vec![Fragment::Text(0, text.len())]
        };
        for &id in &self.specials {
            let special = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(mut a, b) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(at) = text[a..b].find(special) {
                    if at > 0 {
                        next.push(Fragment::Text(a, a + at));
                    }
                    next.push(Fragment::Token(id));
                    a += at + special.len();
                }
                if a < b {
                    next.push(Fragment::Text(a, b));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// `<0x41>`, or else the byte itself as a one-byte token (only ASCII can
    /// be one: llama.cpp looks the raw byte up).
    fn byte_token(&self, byte: u8) -> Option<u32> {
        self.ids
            .get(&format!("<0x{byte:02X}>"))
            .or_else(|| {
                byte.is_ascii()
                    .then(|| self.ids.get(&(byte as char).to_string()))
                    .flatten()
            })
            .copied()
    }
}

/// `<0x41>` → 0x41.
fn byte_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge; the queue pops the highest score first and, among equal
/// scores, the leftmost (llama.cpp's `llm_bigram_spm::comparator`).
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// One run of text through the merges: llama.cpp's `llm_tokenizer_spm_session`.
struct Session<'a> {
    spm: &'a Spm,
    text: &'a str,
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
    /// The two symbols each merged text was made of, for spelling out a text
    /// that is no token (the last pair recorded for a text wins, as there).
    rev_merge: HashMap<&'a str, (usize, usize)>,
}

impl<'a> Session<'a> {
    fn new(spm: &'a Spm, text: &'a str) -> Self {
        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (start + c.len_utf8() < text.len()).then_some(i + 1),
            });
        }
        Session {
            spm,
            text,
            symbols,
            queue: BinaryHeap::new(),
            rev_merge: HashMap::new(),
        }
    }

    /// Appends the ids; `Err(byte)` for a byte no token spells.
    fn tokenize(mut self, out: &mut Vec<u32>) -> Result<(), u8> {
        if self.symbols.is_empty() {
            return Ok(());
        }
        for i in 1..self.symbols.len() {
            self.try_add_bigram(Some(i - 1), Some(i));
        }
        while let Some(bigram) = self.queue.pop() {
            let (left, right) = (&self.symbols[bigram.left], &self.symbols[bigram.right]);
            // One of the two was merged into something else since.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            let right_next = right.next;
            self.symbols[bigram.left].len += self.symbols[bigram.right].len;
            self.symbols[bigram.right].len = 0;
            self.symbols[bigram.left].next = right_next;
            if let Some(n) = right_next {
                self.symbols[n].prev = Some(bigram.left);
            }
            let prev = self.symbols[bigram.left].prev;
            self.try_add_bigram(prev, Some(bigram.left));
            self.try_add_bigram(Some(bigram.left), right_next);
        }
        let mut i = Some(0);
        while let Some(at) = i {
            self.resegment(at, out, 0)?;
            i = self.symbols[at].next;
        }
        Ok(())
    }

    fn piece(&self, i: usize) -> &'a str {
        let s = &self.symbols[i];
        &self.text[s.start..s.start + s.len]
    }

    fn resegment(&self, i: usize, out: &mut Vec<u32>, depth: usize) -> Result<(), u8> {
        let text = self.piece(i);
        if let Some(&id) = self.spm.ids.get(text) {
            out.push(id);
            return Ok(());
        }
        match self.rev_merge.get(text) {
            // A pair recorded for this text always spells a shorter text, but a
            // vocabulary is input: never recurse without bound on it.
            Some(&(l, r)) if depth < 64 => {
                self.resegment(l, out, depth + 1)?;
                self.resegment(r, out, depth + 1)
            }
            _ => {
                for b in text.bytes() {
                    out.push(self.spm.byte_token(b).ok_or(b)?);
                }
                Ok(())
            }
        }
    }

    fn try_add_bigram(&mut self, left: Option<usize>, right: Option<usize>) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let start = self.symbols[left].start;
        let size = self.symbols[left].len + self.symbols[right].len;
        let text = &self.text[start..start + size];
        let Some(&id) = self.spm.ids.get(text) else {
            return;
        };
        let score = self.spm.scores.get(id as usize).copied().unwrap_or(0.0);
        self.queue.push(Bigram {
            left,
            right,
            score,
            size,
        });
        self.rev_merge.insert(text, (left, right));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary small enough to work by hand: scores decide the merges.
    fn spm(add_space_prefix: bool) -> Spm {
        let vocab: &[(&str, f32, i32)] = &[
            ("<unk>", 0.0, UNKNOWN),
            ("<s>", 0.0, CONTROL),
            ("</s>", 0.0, CONTROL),
            ("<0x21>", 0.0, BYTE),
            ("<0xC3>", 0.0, BYTE),
            ("<0xA9>", 0.0, BYTE),
            ("▁", -1.0, 1),
            ("h", -2.0, 1),
            ("e", -2.0, 1),
            ("l", -2.0, 1),
            ("o", -2.0, 1),
            ("he", -3.0, 1),
            ("ll", -1.5, 1),
            ("▁he", -2.5, 1),
            ("llo", -1.0, 1),
            ("▁hello", -0.5, 1),
            ("<start_of_turn>", 0.0, CONTROL),
            ("<start>", 0.0, CONTROL),
        ];
        Spm::new(
            vocab.iter().map(|v| v.0.to_owned()).collect(),
            vocab.iter().map(|v| v.1).collect(),
            vocab.iter().map(|v| v.2).collect(),
            add_space_prefix,
        )
    }

    #[test]
    fn merges_by_score_then_spells_the_rest_in_bytes() {
        let t = spm(true);
        // " hello" → ▁ h e l l o; "ll" (-1.5) merges first... then "llo" (-1.0),
        // "▁he"... until "▁hello" (-0.5); "!" is no token, but <0x21> is.
        assert_eq!(t.encode("hello!").unwrap(), vec![15, 3]);
        // é is no token and forms none: its two UTF-8 bytes.
        assert_eq!(t.encode("hé").unwrap(), vec![6, 7, 4, 5]);
    }

    #[test]
    fn special_tokens_split_first_longest_first_and_take_a_space_after() {
        let t = spm(true);
        assert_eq!(t.encode("<start_of_turn>hello").unwrap(), vec![16, 15]);
        assert_eq!(t.encode("<start>hello</s>").unwrap(), vec![17, 15, 2]);
        let no_prefix = spm(false);
        assert_eq!(no_prefix.encode("<start>llo").unwrap(), vec![17, 14]);
        assert_eq!(no_prefix.encode("").unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn decodes_spaces_and_bytes_and_leaves_control_tokens_out() {
        let t = spm(true);
        assert_eq!(t.decode(&[1, 15, 4, 5, 3, 2]), " helloé!");
        assert_eq!(t.decode(&[4]), "\u{FFFD}");
        // Unknown tokens have no text, as in llama.cpp without special tokens.
        assert_eq!(t.decode(&[0, 15]), " hello");
    }

    #[test]
    fn a_byte_without_a_token_is_an_error_naming_it() {
        let err = spm(true).encode("hö").unwrap_err();
        assert!(err.contains("byte 0xB6"), "{err}");
    }
}
