//! The tokenizer, rebuilt from the GGUF metadata (tokens, merges or scores,
//! types and special ids), so a model file is all a node needs: byte-level BPE
//! with the `tokenizers` crate, its pre-tokenizer llama.cpp's choice for the
//! file's `tokenizer.ggml.pre`; SentencePiece with our port of llama.cpp's
//! ([`super::spm`]).

use std::collections::HashMap;

use super::spm::Spm;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's token types.
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// Texts llama.cpp treats as end of generation when the file marks them as
/// control tokens, whatever the file's eos id says.
const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    // Fill-in-the-middle pad and repository markers, which llama.cpp also ends on.
    "<|fim_pad|>",
    "<fim_pad>",
    "<|repo_name|>",
    "<reponame>",
];

pub struct ModelTokenizer {
    inner: Vocabulary,
    tokens: Vec<String>,
    types: Vec<i32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    add_bos: bool,
    end_of_generation: Vec<u32>,
}

/// llama.cpp's two vocabulary types that the models we run use.
enum Vocabulary {
    /// `gpt2`: byte-level BPE with a pre-tokenizer (Llama 3, SmolLM, Qwen).
    Bpe(Box<Tokenizer>),
    /// `llama`: SentencePiece (Llama 2, Mistral, Gemma).
    Spm(Spm),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the model's tokenizer: {0}")]
    Unsupported(String),
    #[error("the model's tokenizer: {0}")]
    Tokenizers(String),
}

impl ModelTokenizer {
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        let unsupported = |m: String| TokenizerError::Unsupported(m);
        let string = |key: &str| md.get(key).and_then(|v| v.to_string().ok()).cloned();
        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let flag = |key: &str| md.get(key).and_then(|v| v.to_bool().ok());
        let array = |key: &str| match md.get(key) {
            Some(Value::Array(a)) => Ok(a),
            _ => Err(unsupported(format!("`{key}` is missing"))),
        };
        let tokens: Vec<String> = array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned().unwrap_or_default())
            .collect();
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let kind = string("tokenizer.ggml.model").unwrap_or_default();
        // llama.cpp's defaults where the file is silent (`llama_vocab::impl::load`).
        let (inner, bos, eos, add_bos) = match kind.as_str() {
            "gpt2" => {
                let pre = string("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
                // llama.cpp's LLAMA3 pre-tokenizer takes a word that is itself a
                // token whole, without merging (`ignore_merges`), and adds a BOS
                // unless the file says otherwise.
                let llama3 = matches!(pre.as_str(), "llama3" | "llama-v3" | "llama-bpe");
                let bpe = bpe(&tokens, &types, array("tokenizer.ggml.merges")?, &pre, llama3)?;
                (Vocabulary::Bpe(Box::new(bpe)), None, None, llama3)
            }
            "llama" => {
                let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
                    // llama.cpp also takes scores stored as integers.
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| v.to_f32().or_else(|_| v.to_i32().map(|i| i as f32)).unwrap_or(0.0))
                        .collect(),
                    _ => vec![0.0; tokens.len()],
                };
                let prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let spm = Spm::new(tokens.clone(), scores, types.clone(), prefix);
                (Vocabulary::Spm(spm), Some(1), Some(2), true)
            }
            other => {
                return Err(unsupported(format!(
                    "`{other}` vocabularies are not supported; byte-level BPE (`gpt2`: Llama 3, SmolLM, Qwen) \
                     and SentencePiece (`llama`: Llama 2, Mistral, Gemma) are"
                )))
            }
        };
        // An id beyond the vocabulary is dropped, as llama.cpp does, rather
        // than failing every request at the embedding lookup.
        let in_vocab = |i: Option<u32>| i.filter(|&i| (i as usize) < tokens.len());
        let bos = in_vocab(id("tokenizer.ggml.bos_token_id").or(bos));
        let eos = in_vocab(id("tokenizer.ggml.eos_token_id").or(eos));
        let mut end_of_generation: Vec<u32> = [eos, in_vocab(id("tokenizer.ggml.eot_token_id"))]
            .into_iter()
            .flatten()
            .collect();
        for (i, (text, &t)) in tokens.iter().zip(&types).enumerate() {
            if t == CONTROL && END_OF_GENERATION.contains(&text.as_str()) {
                end_of_generation.push(i as u32);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Ok(ModelTokenizer {
            inner,
            tokens,
            types,
            bos,
            eos,
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(add_bos),
            end_of_generation,
        })
    }

    /// Tokenizes a rendered prompt, special tokens parsed, BOS added when the
    /// file asks for it (as llama.cpp's `tokenize(text, add_special, parse_special)`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        match &self.inner {
            Vocabulary::Bpe(bpe) => {
                let encoding = bpe
                    .encode_fast(text, false)
                    .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
                ids.extend_from_slice(encoding.get_ids());
            }
            Vocabulary::Spm(spm) => {
                ids.extend(spm.encode(text).map_err(TokenizerError::Unsupported)?)
            }
        }
        Ok(ids)
    }

    /// Whether [`encode`](Self::encode) puts a BOS first.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Text of generated tokens, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match &self.inner {
            Vocabulary::Bpe(bpe) => bpe
                .decode(ids, true)
                .map_err(|e| TokenizerError::Tokenizers(e.to_string())),
            Vocabulary::Spm(spm) => Ok(spm.decode(ids)),
        }
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The bytes token `id` stands for, control tokens spelled out (as
    /// llama.cpp's `token_to_piece` with `special`): what OpenAI's `logprobs`
    /// show for a token. A byte token is one byte, not yet a character.
    pub fn piece(&self, id: u32) -> Vec<u8> {
        match &self.inner {
            Vocabulary::Spm(spm) => spm.piece(id),
            Vocabulary::Bpe(_) => {
                let Some(text) = self.tokens.get(id as usize) else {
                    return Vec::new();
                };
                match self.types.get(id as usize) {
                    Some(&CONTROL | &USER_DEFINED) => text.as_bytes().to_vec(),
                    _ => byte_level_bytes(text),
                }
            }
        }
    }
}

/// GPT-2's byte-level alphabet read back: printable bytes stand for
/// themselves, the other 68 for U+0100 onwards, in byte order.
fn byte_level_bytes(text: &str) -> Vec<u8> {
    let printable = |b: u32| matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
    let mut out = Vec::with_capacity(text.len());
    for ch in text.chars() {
        let c = ch as u32;
        if c < 0x100 && printable(c) {
            out.push(c as u8);
        } else if let Some(b) = (0u32..0x100)
            .filter(|&b| !printable(b))
            .nth(c.wrapping_sub(0x100) as usize)
            .filter(|_| c >= 0x100)
        {
            out.push(b as u8);
        } else {
            // Not of the alphabet (a file's own added token): its UTF-8.
            out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
        }
    }
    out
}

/// A byte-level BPE from the file's tokens and merges, with llama.cpp's
/// pre-tokenizer for `pre`.
fn bpe(
    tokens: &[String],
    types: &[i32],
    merges: &[Value],
    pre: &str,
    ignore_merges: bool,
) -> Result<Tokenizer, TokenizerError> {
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|v| v.to_string().ok())
        .filter_map(|m| m.split_once(' '))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
    let mut inner = Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    // Control and user-defined tokens are matched whole before the BPE runs,
    // so `<|im_start|>` in a chat prompt is one token, as llama.cpp parses it.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED)
        .map(|(text, &t)| AddedToken::from(text.clone(), t == CONTROL))
        .collect();
    inner.add_special_tokens(&added);
    Ok(inner)
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(split.into())
    };
    let bytes_only = ByteLevel::new(false, false, false).into();
    Ok(match pre {
        // GPT-2's own regex inside the byte-level step.
        "default" | "gpt2" => ByteLevel::new(false, false, true).into(),
        // Digits one by one, then GPT-2's regex (llama.cpp's SMOLLM/STARCODER).
        "smollm" | "starcoder" | "refact" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, false, true).into(),
        ])
        .into(),
        "llama-bpe" | "llama3" | "llama-v3" => Sequence::new(vec![
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")?,
            bytes_only,
        ])
        .into(),
        "qwen2" => Sequence::new(vec![
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")?,
            bytes_only,
        ])
        .into(),
        other => {
            return Err(TokenizerError::Unsupported(format!(
                "pre-tokenizer `{other}` is not supported yet (supported: gpt2, smollm, llama-bpe, qwen2)"
            )))
        }
    })
}

/// Turns generated ids into text as it grows, for streaming: holds back bytes
/// that are not yet a whole character and text that may be the start of a stop
/// string, and ends at a stop string without sending it.
pub struct TextStream {
    ids: Vec<u32>,
    /// Tokens before this one are in `text` for good and need no decoding again.
    prefix_offset: usize,
    /// Tokens from here on are not in `text` yet (an incomplete character).
    read_offset: usize,
    /// The whole characters decoded so far.
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    stops: Vec<String>,
}

pub enum Emit {
    /// New text to send (may be empty while characters are incomplete).
    Text(String),
    /// A stop string was reached: the last text before it.
    Stopped(String),
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        TextStream {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            sent: 0,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Decodes only the last few tokens each time, not the whole answer: the
    /// window starts at the last token whose text was complete.
    pub fn push(&mut self, tokenizer: &ModelTokenizer, id: u32) -> Result<Emit, TokenizerError> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        // An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives.
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            self.text
                .push_str(now.get(before.len()..).unwrap_or_default());
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        // A stop string can only end in the new text, so it starts at most its
        // length before what was already searched.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
        {
            let tail = self.text.get(self.sent..at).unwrap_or_default().to_owned();
            self.sent = at;
            return Ok(Emit::Stopped(tail));
        }
        // Hold back what may be the start of a stop string.
        let complete = self.text.len();
        let mut ready = complete;
        for stop in &self.stops {
            let longest_prefix = (1..stop.len())
                .rev()
                .find(|&k| stop.is_char_boundary(k) && self.text.ends_with(&stop[..k]));
            if let Some(k) = longest_prefix {
                ready = ready.min(complete - k);
            }
        }
        if ready <= self.sent {
            return Ok(Emit::Text(String::new()));
        }
        let out = self.text[self.sent..ready].to_owned();
        self.sent = ready;
        Ok(Emit::Text(out))
    }

    /// Whatever was held back, once generation has ended without a stop string.
    pub fn finish(&mut self, tokenizer: &ModelTokenizer) -> Result<String, TokenizerError> {
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.text
            .push_str(now.get(before.len()..).unwrap_or_default());
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        let out = self.text.get(self.sent..).unwrap_or_default().to_owned();
        self.sent = self.text.len();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::gguf::ModelFile;

    /// The test model's tokenizer (scripts/fetch-test-model fetches it once).
    fn tokenizer() -> ModelTokenizer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fetch-test-model");
        let out = std::process::Command::new(script).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = String::from_utf8(out.stdout).unwrap();
        let file = ModelFile::open(std::path::Path::new(path.trim())).unwrap();
        ModelTokenizer::from_gguf(file.metadata()).unwrap()
    }

    fn stream(t: &ModelTokenizer, ids: &[u32], stops: &[&str]) -> (String, bool) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for &id in ids {
            match s.push(t, id).unwrap() {
                Emit::Text(piece) => out.push_str(&piece),
                Emit::Stopped(piece) => return (out + &piece, true),
            }
        }
        out.push_str(&s.finish(t).unwrap());
        (out, false)
    }

    #[test]
    fn pieces_are_the_bytes_the_tokens_decode_to() {
        let t = tokenizer();
        let text = "Héllo wörld — 日本語 🚀 tabs\tand\nlines";
        let ids = t.encode(text).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| t.piece(id)).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), t.decode(&ids).unwrap());
        // A control token is spelled out.
        let im_end = t.encode("<|im_end|>").unwrap();
        assert_eq!(t.piece(*im_end.last().unwrap()), b"<|im_end|>");
    }

    #[test]
    fn streamed_text_equals_decoding_everything_at_once_and_stops_before_a_stop_string() {
        let t = tokenizer();
        let text = "Héllo wörld — ünïcode ✓ 日本語 tokens, then stop here and more.";
        let ids = t.encode(text).unwrap();
        assert!(ids.len() > 10);
        let whole = t.decode(&ids).unwrap();
        assert_eq!(stream(&t, &ids, &[]), (whole.clone(), false));
        let (cut, stopped) = stream(&t, &ids, &["stop here", "never"]);
        assert!(stopped);
        assert_eq!(cut, &whole[..whole.find("stop here").unwrap()]);
    }
}
