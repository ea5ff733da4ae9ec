#!/usr/bin/env python3
"""Records llama.cpp's answers on the synthetic models as committed fixtures.

Run by scripts/record-llamacpp-fixtures with the python of scripts/llamacpp-venv
(llama-cpp-python built from source, plus gguf-py to read tensors):

  python record_llamacpp_fixtures.py FIXTURE_DIR SOURCE:NAME:PATH...

SOURCE says where the test finds the file again: `synthetic` (written by
scripts/synthetic-models; the same shape's F32 file lies beside it) or the
command, under scripts/, that fetches a published file (`fetch-test-model
gemma3`). For each:
  1. a synthetic file's quantized tensors must be byte for byte what llama.cpp's
     own quantizer (llama_model_quantize, `pure`, from the same shape's F32
     file) makes of the same weights; otherwise nothing is recorded for it;
  2. llama.cpp tokenizes the corpus below, and runs the prompts greedily with
     flash attention off and an f32 KV cache (the arithmetic tensorlink does),
     on 2 threads, through scripts/llamacpp_reference.py;
  3. FIXTURE_DIR/NAME.json gets the file's sha256, llama.cpp's version, the
     token ids of each corpus text, and for each prompt its ids, the top-20
     first-position logits and the greedy tokens with their margins.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile

import gguf
import llama_cpp as L

HERE = os.path.dirname(os.path.abspath(__file__))

# Texts whose tokenization must equal llama.cpp's: spaces, tabs and newlines in
# runs, accents and scripts beyond Latin, emoji, digits in every grouping,
# code, contractions, and the vocabulary's control tokens in running text.
CORPUS = [
    "Hello world",
    " ",
    "  leading spaces\tand\ttabs\n\n\nnewlines   trailing  ",
    "Zürich, naïve café — 日本語のテキスト, emoji 🚀🔥, Ελληνικά, русский",
    "Numbers: 3.14159, 1234567890, 2026-12-02, 1e-9, 12 345",
    'fn main() {\n    println!("{}", x + 1); // comment\n}\n',
    "def f(x):\n\treturn x**2  # squared\n",
    "don't won't I'm we've they'll she'd IT'S",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
]

PROMPTS = [
    ("chat", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
    ("code", 'fn main() {\n    println!("{}", x + 1); // comment\n}\n'),
    ("unicode", "Zürich, naïve café — 日本語のテキスト, emoji 🚀🔥"),
    # Longer than a shard's run of 128 positions (src/inference/model.rs), so
    # the prompt crosses runs as llama.cpp takes it in one batch.
    ("long", "Two Macs on a Thunderbolt cable split one model by its layers, and each keeps its own cache. " * 8),
]

N_PREDICT = 16
TOP = 10

FTYPE = {
    "F16": L.LLAMA_FTYPE_MOSTLY_F16,
    "BF16": L.LLAMA_FTYPE_MOSTLY_BF16,
    "Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": L.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q5_0": L.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q5_1": L.LLAMA_FTYPE_MOSTLY_Q5_1,
    # With `pure`, each of these writes every tensor in its base type.
    "Q2_K": L.LLAMA_FTYPE_MOSTLY_Q2_K,
    "Q3_K": L.LLAMA_FTYPE_MOSTLY_Q3_K_S,
    "Q4_K": L.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q5_K": L.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "Q6_K": L.LLAMA_FTYPE_MOSTLY_Q6_K,
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors(path):
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in r.tensors}


def check_quantizer(path, name):
    """Quantizes the shape's F32 file with llama.cpp and compares every tensor."""
    shape, kind = name.rsplit("-", 1)
    if kind == "F32":
        return "F32: nothing quantized"
    source = os.path.join(os.path.dirname(path), f"{shape}-F32.gguf")
    ours = tensors(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "q.gguf")
        params = L.llama_model_quantize_default_params()
        params.ftype = FTYPE[kind]
        params.pure = True
        params.nthread = 2
        rc = L.llama_model_quantize(source.encode(), out.encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize({source}, {kind}) returned {rc}")
        theirs = tensors(out)
    if set(ours) != set(theirs):
        raise SystemExit(f"{name}: tensor names differ from llama.cpp's quantized file")
    for t, (qtype, data) in ours.items():
        their_type, their_data = theirs[t]
        if qtype != their_type or data != their_data:
            raise SystemExit(
                f"{name}: tensor {t} is {qtype.name} with {len(data)} bytes; llama.cpp's "
                f"quantizer made {their_type.name} with {len(their_data)} bytes, or other bytes"
            )
    return f"{len(ours)} tensors byte-identical to llama_model_quantize(pure) from {shape}-F32"


def reference(path, cases, n_predict):
    request = {"model": path, "threads": 2, "n_predict": n_predict, "n_ctx": 512,
               "flash_attn": "off", "kv_type": "f32", "cases": cases}
    run = subprocess.run([sys.executable, os.path.join(HERE, "llamacpp_reference.py")],
                         input=json.dumps(request), capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"llamacpp_reference.py on {path} failed:\n{run.stderr}")
    return json.loads(run.stdout)


def record(fixture_dir, source, name, path):
    if source == "synthetic":
        quantizer = check_quantizer(path, name)
    else:
        quantizer = "as published"
    tokenized = reference(path, [{"name": f"corpus{i}", "prompt_text": t}
                                 for i, t in enumerate(CORPUS)], 1)
    runs = reference(path, [{"name": n, "prompt_text": t} for n, t in PROMPTS], N_PREDICT)
    fixture = {
        "model": name,
        "source": source,
        "sha256": sha256(path),
        "recorded_with": {
            "llama_cpp_python": runs["llama_cpp_version"],
            "system_info": runs["system_info"],
            "flash_attn": runs["model"]["flash_attn"],
            "kv_type": runs["model"]["kv_type"],
            "threads": runs["model"]["threads"],
            "quantizer": quantizer,
        },
        "corpus": [{"text": t, "tokens": c["tokens"]}
                   for t, c in zip(CORPUS, tokenized["cases"])],
        "prompts": [
            {
                "name": c["name"],
                "text": text,
                "tokens": c["tokens"],
                "first_logits_top": c["first_logits_top"][:TOP],
                "greedy": c["greedy"],
                "greedy_margins": [round(m, 5) for m in c["greedy_margins"]],
            }
            for (_, text), c in zip(PROMPTS, runs["cases"])
        ],
    }
    with open(os.path.join(fixture_dir, f"{name}.json"), "w") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{name}: {quantizer}; recorded", file=sys.stderr)


def main(argv):
    fixture_dir = argv[0]
    for item in argv[1:]:
        source, name, path = item.split(":", 2)
        record(fixture_dir, source, name, path)


if __name__ == "__main__":
    main(sys.argv[1:])
