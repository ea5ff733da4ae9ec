#!/usr/bin/env python3
"""Small GGUF models of each architecture tensorlink runs, written from seeds.

  python synthetic_models.py OUT_DIR BPE_VOCAB.gguf SPM_VOCAB.gguf [NAME ...]
  python synthetic_models.py --list

writes OUT_DIR/NAME.gguf.partial for each NAME (all listed ones by default).

Run by scripts/synthetic-models, which pins gguf and numpy so that a seed gives
the same bytes on every machine (each file's sha256 is recorded beside
llama.cpp's answers in tests/fixtures/llamacpp/). The weights are random but
shaped like the real thing: the vocabulary (tokens, merges or scores, types,
special ids) is SmolLM2's byte-level BPE or Gemma 3's SentencePiece, widths are
multiples of 256 so that every quantization applies, and each architecture
carries the tensors and keys that make it what it is:

  llama3  grouped-query attention 4:1, `rope_freqs.weight` as Llama 3.1's
          converter writes it (its "llama3" scaling, with a short original
          context so that the factors bite at the positions a test reaches),
          the `llama-bpe` pre-tokenizer, an untied output head;
  qwen2   biases on q, k and v, tied embeddings, the `qwen2` pre-tokenizer;
  qwen3   RMS norms on q and k heads, heads 128 wide in a 256-wide model
          (`key_length` != embedding / heads), an untied head;
  gemma3  Gemma 3's vocabulary and layer (scaled embeddings, norms before and
          after attention and MLP, q/k norms, GELU), heads 128 wide, one
          sliding-window layer (window 8, so short prompts cross it) and one
          global layer, tied embeddings;
  llama-spm  a Llama 2 / Mistral-style model on a SentencePiece vocabulary
          (Gemma 3's, with the space prefix those models ask for), full
          multi-head attention, tied embeddings.

Quantized files are written by gguf-py's quantizers (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, F16, BF16), which reproduce ggml's reference quantization bit for bit,
and the k-quants (Q2_K ... Q6_K) by ggml's own quantize_row_q*_K_ref, built by
scripts/ggml-quants and passed in TENSORLINK_GGML_QUANTS;
scripts/record-llamacpp-fixtures checks every file against llama.cpp's own
quantizer before recording anything from it. 1-D tensors (norms,
biases, rope factors) stay F32 in every file, as llama.cpp's quantizer leaves
them.
"""

import ctypes
import math
import os
import sys

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

SHAPES = {
    "llama3": dict(arch="llama", hidden=256, ffn=768, layers=2, heads=4, kv_heads=1,
                   head_dim=64, rope_base=500000.0, pre="llama-bpe", tied=False,
                   rope_freqs=True, seed=1003),
    "qwen2": dict(arch="qwen2", hidden=256, ffn=768, layers=2, heads=4, kv_heads=2,
                  head_dim=64, rope_base=1000000.0, pre="qwen2", tied=True,
                  biases=True, seed=2002),
    "qwen3": dict(arch="qwen3", hidden=256, ffn=768, layers=2, heads=4, kv_heads=2,
                  head_dim=128, rope_base=1000000.0, pre="qwen2", tied=False,
                  qk_norm=True, seed=3003),
    "gemma3": dict(arch="gemma3", hidden=256, ffn=768, layers=2, heads=4, kv_heads=1,
                   head_dim=128, rope_base=1000000.0, vocab="spm", tied=True, qk_norm=True,
                   post_norms=True, sliding_window=8, sliding_pattern=2,
                   space_prefix=False, seed=4004),
    "llama-spm": dict(arch="llama", hidden=256, ffn=768, layers=2, heads=4, kv_heads=4,
                      head_dim=64, rope_base=10000.0, vocab="spm", tied=True,
                      space_prefix=True, seed=5005),
}

# Shapes for scripts/bench only, never recorded against llama.cpp: a ~1B-class
# llama-3 (weight-bound where SmolLM2 is overhead-bound), written in F16 for
# llama.cpp's quantizer to make the types a user downloads (Q4_K_M, ...).
BENCH_SHAPES = {
    "llama3-1b": dict(arch="llama", hidden=2048, ffn=8192, layers=16, heads=32, kv_heads=8,
                      head_dim=64, rope_base=500000.0, pre="llama-bpe", tied=False,
                      rope_freqs=True, context=4096, seed=6006),
}

TYPES = {
    "F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0,
    "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1, "Q5_0": Q.Q5_0, "Q5_1": Q.Q5_1,
    "Q2_K": Q.Q2_K, "Q3_K": Q.Q3_K, "Q4_K": Q.Q4_K, "Q5_K": Q.Q5_K, "Q6_K": Q.Q6_K,
}
K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

# llama.cpp's `llama_ftype` for general.file_type, so tools that read it agree.
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
             "Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "BF16": 32}

# Which quantizations each architecture is written in: every type on llama3,
# the common ones on the others.
MODELS = {f"llama3-{t}": ("llama3", t) for t in TYPES}
MODELS.update({f"qwen2-{t}": ("qwen2", t) for t in ("Q4_K", "Q6_K")})
MODELS.update({f"qwen2-{t}": ("qwen2", t) for t in ("F32", "F16", "Q8_0", "Q4_0")})
MODELS.update({f"qwen3-{t}": ("qwen3", t) for t in ("F32", "F16", "Q8_0", "Q5_1")})
MODELS.update({f"gemma3-{t}": ("gemma3", t) for t in ("Q8_0", "Q4_1")})
MODELS.update({f"llama-spm-{t}": ("llama-spm", t) for t in ("Q8_0", "Q5_0")})
# Written only to check the quantized files against llama.cpp's quantizer
# when recording: the F32 originals of the shapes above that have none listed.
REFERENCES = {f"{shape}-F32": (shape, "F32") for shape in SHAPES
              if f"{shape}-F32" not in MODELS}
BENCH = {f"{shape}-F16": (shape, "F16") for shape in BENCH_SHAPES}
SHAPES.update(BENCH_SHAPES)


def k_quantize(data, qtype):
    """ggml's quantize_row_*_ref over the rows of `data`, as llama_model_quantize
    runs it without an importance matrix."""
    lib_path = os.environ.get("TENSORLINK_GGML_QUANTS")
    if not lib_path:
        raise SystemExit("k-quants need TENSORLINK_GGML_QUANTS (scripts/ggml-quants builds it)")
    lib = ctypes.CDLL(lib_path)
    fn = getattr(lib, f"quantize_row_{qtype.name.lower().replace('_k', '_K')}_ref")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(data, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros((rows, n // block * size), dtype=np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def llama3_rope_factors(head_dim, base, factor=8.0, low=1.0, high=4.0, original_context=64):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, verbatim in effect."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = original_context / low
    high_wavelen = original_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def vocabulary(path):
    r = gguf.GGUFReader(path)
    f = lambda k: r.fields[k].contents() if k in r.fields else None
    return dict(model=f("tokenizer.ggml.model"), tokens=f("tokenizer.ggml.tokens"),
                types=f("tokenizer.ggml.token_type"), merges=f("tokenizer.ggml.merges"),
                scores=f("tokenizer.ggml.scores"), bos=f("tokenizer.ggml.bos_token_id"),
                eos=f("tokenizer.ggml.eos_token_id"), unk=f("tokenizer.ggml.unknown_token_id"),
                pad=f("tokenizer.ggml.padding_token_id"))


def weights(shape, vocab_size):
    """Every tensor, in the order llama.cpp's converter writes them, from the seed."""
    s = SHAPES[shape]
    rng = np.random.default_rng(s["seed"])
    normal = lambda *dims, std: (rng.standard_normal(dims, dtype=np.float32) * std)
    linear = lambda n_out, n_in: normal(n_out, n_in, std=1.0 / math.sqrt(n_in))
    norm = lambda n: 1.0 + normal(n, std=0.1)
    h, f, d = s["hidden"], s["ffn"], s["head_dim"]
    q_width, kv_width = s["heads"] * d, s["kv_heads"] * d
    out = [("token_embd.weight", normal(vocab_size, h, std=0.25))]
    if s.get("rope_freqs"):
        out.append(("rope_freqs.weight", llama3_rope_factors(d, s["rope_base"])))
    for i in range(s["layers"]):
        p = f"blk.{i}."
        out.append((p + "attn_norm.weight", norm(h)))
        out.append((p + "attn_q.weight", linear(q_width, h)))
        out.append((p + "attn_k.weight", linear(kv_width, h)))
        out.append((p + "attn_v.weight", linear(kv_width, h)))
        if s.get("biases"):
            out.append((p + "attn_q.bias", normal(q_width, std=0.5)))
            out.append((p + "attn_k.bias", normal(kv_width, std=0.5)))
            out.append((p + "attn_v.bias", normal(kv_width, std=0.5)))
        if s.get("qk_norm"):
            out.append((p + "attn_q_norm.weight", norm(d)))
            out.append((p + "attn_k_norm.weight", norm(d)))
        out.append((p + "attn_output.weight", linear(h, q_width)))
        if s.get("post_norms"):
            out.append((p + "post_attention_norm.weight", norm(h)))
        out.append((p + "ffn_norm.weight", norm(h)))
        out.append((p + "ffn_gate.weight", linear(f, h)))
        out.append((p + "ffn_up.weight", linear(f, h)))
        out.append((p + "ffn_down.weight", linear(h, f)))
        if s.get("post_norms"):
            out.append((p + "post_ffw_norm.weight", norm(h)))
    out.append(("output_norm.weight", norm(h)))
    if not s["tied"]:
        out.append(("output.weight", normal(vocab_size, h, std=0.25)))
    return out


def write(name, out_path, vocabs):
    shape, type_name = {**MODELS, **REFERENCES, **BENCH}[name]
    s = SHAPES[shape]
    arch = s["arch"]
    w = gguf.GGUFWriter(out_path, arch)
    w.add_name(f"tensorlink synthetic {name}")
    w.add_block_count(s["layers"])
    w.add_context_length(s.get("context", 2048))
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_rope_freq_base(s["rope_base"])
    w.add_layer_norm_rms_eps(1e-6)
    if s.get("sliding_window"):
        w.add_sliding_window(s["sliding_window"])
        w.add_sliding_window_pattern(s["sliding_pattern"])
    w.add_file_type(FILE_TYPE[type_name])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = vocabs[s.get("vocab", "bpe")]
    w.add_tokenizer_model(vocab["model"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["model"] == "gpt2":
        w.add_tokenizer_pre(s["pre"])
        w.add_token_merges(vocab["merges"])
        w.add_add_bos_token(arch == "llama")
    else:
        w.add_tokenizer_pre("default")
        w.add_token_scores(vocab["scores"])
        w.add_unk_token_id(vocab["unk"])
        w.add_pad_token_id(vocab["pad"])
        w.add_add_bos_token(True)
        w.add_add_space_prefix(s["space_prefix"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    qtype = TYPES[type_name]
    for tensor_name, data in weights(shape, len(vocab["tokens"])):
        if data.ndim == 1 or qtype == Q.F32:
            w.add_tensor(tensor_name, data)
        elif type_name in K_QUANTS:
            w.add_tensor(tensor_name, k_quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv):
    if argv[:1] == ["--list"]:
        print("\n".join(MODELS))
        return 0
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir, bpe_path, spm_path, names = argv[0], argv[1], argv[2], argv[3:] or list(MODELS)
    unknown = [n for n in names if n not in MODELS and n not in REFERENCES and n not in BENCH]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}",
              file=sys.stderr)
        return 2
    vocabs = {"bpe": vocabulary(bpe_path), "spm": vocabulary(spm_path)}
    for name in names:
        path = f"{out_dir}/{name}.gguf.partial"
        write(name, path, vocabs)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
