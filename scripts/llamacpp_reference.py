#!/usr/bin/env python3
"""llama.cpp's answers for the agreement check of tensorlink's engine.

Run with the python of the venv that scripts/llamacpp-venv makes (llama-cpp-python
built from source). Reads one JSON request on stdin, writes one JSON response on
stdout; llama.cpp's own log goes to stderr only with TENSORLINK_LLAMACPP_VERBOSE=1.

Request:
  {"model": "/path/x.gguf", "threads": 2, "n_predict": 32,
   "n_ctx": 2048,                 # optional
   "first_logits_all": false,     # optional; also settable per case
   "flash_attn": "auto",          # optional: auto | on | off (llama.cpp default: auto)
   "kv_type": "f16",              # optional: f16 | f32 (llama.cpp default: f16)
   "cases": [{"name": "...", "prompt_tokens": [ints], "prompt_text": "optional"}],
   "bench": {"prompt_tokens": [ints], "n_decode": 64, "repeats": 3}}   # optional

Response:
  {"llama_cpp_version": "...", "system_info": "...",
   "model": {n_vocab, add_bos, bos, eog_tokens, flash_attn, kv_type, ...},
   "cases": [{"name", "tokens", "prompt_len", "greedy", "greedy_margins",
              "greedy_text", "stop", "eog_token", "first_logits_top",
              "first_logits_all"}],
   "bench": {"prefill_tokens_per_s", "decode_tokens_per_s", "threads", ...}}

Everything goes through the low-level C API (llama_decode + llama_get_logits_ith)
rather than Llama.generate, so that "greedy" is argmax over the raw logits with
nothing in between: no sampler chain, no repetition penalty, no logit bias (no
sampler means no seed either: the run is deterministic), and only a ctypes call
and an argmax of Python per token in the timed loops. With flash_attn "off" the
greedy tokens equal Llama.generate(temp=0, top_k=1, repeat_penalty=1.0)'s.
"""

import ctypes
import json
import os
import sys
import time

import numpy as np

import llama_cpp as L

VERBOSE = os.environ.get("TENSORLINK_LLAMACPP_VERBOSE") == "1"

# llama.cpp logs through a callback. We keep its lines (the resolved flash
# attention choice is only visible there) and echo them only when asked, so that
# a caller parsing stdout, or a test reading stderr, is not flooded.
_log_lines = []


@L.llama_log_callback
def _log(level, text, user_data):
    line = text.decode("utf-8", errors="replace")
    _log_lines.append(line)
    if VERBOSE:
        sys.stderr.write(line)


L.llama_log_set(_log, ctypes.c_void_p(0))

FLASH_ATTN = {
    "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
KV_TYPE = {"f16": L.GGML_TYPE_F16, "f32": L.GGML_TYPE_F32}


class RequestError(Exception):
    pass


class Model:
    def __init__(self, path, n_ctx, threads, flash_attn, kv_type):
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            raise RequestError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        self.threads = threads
        self.flash_attn = flash_attn
        self.kv_type = kv_type
        # The vocabulary's own end-of-generation set (eos, eot, <|im_end|>, ...
        # as llama.cpp derives it from the GGUF), not a guess from token text.
        self.eog = [t for t in range(self.n_vocab) if L.llama_vocab_is_eog(self.vocab, t)]

    def context(self, n_batch, threads=None):
        """A fresh context: empty KV cache, so every case and every bench
        repeat starts from the same state."""
        threads = threads or self.threads
        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        # The whole prompt in one llama_decode call, as our engine's prefill does.
        cparams.n_batch = max(n_batch, 512)
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = FLASH_ATTN[self.flash_attn]
        cparams.type_k = KV_TYPE[self.kv_type]
        cparams.type_v = KV_TYPE[self.kv_type]
        cparams.no_perf = True
        ctx = L.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise RequestError("llama.cpp could not create a context")
        return ctx

    def tokenize(self, text):
        # add_special=True lets llama.cpp add BOS/EOS only if the GGUF says so
        # (tokenizer.ggml.add_bos_token); parse_special=True turns "<|im_start|>"
        # into its single control token, as a chat prompt needs.
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, True, True)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def detokenize(self, tokens):
        if not tokens:
            return ""
        arr = (L.llama_token * len(tokens))(*tokens)
        cap = 16 * len(tokens) + 64
        while True:
            buf = ctypes.create_string_buffer(cap)
            # Special tokens rendered, so an <|im_end|> at the end is visible.
            n = L.llama_detokenize(self.vocab, arr, len(tokens), buf, cap, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n

    def free(self):
        L.llama_model_free(self.model)


def decode(ctx, tokens):
    """One llama_decode over tokens; only the last position gets logits."""
    arr = (L.llama_token * len(tokens))(*tokens)
    rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
    if rc != 0:
        raise RequestError(f"llama_decode returned {rc}")
    L.llama_synchronize(ctx)


def last_logits(ctx, n_vocab):
    ptr = L.llama_get_logits_ith(ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def argmax(logits):
    # np.argmax takes the lowest id on a tie; the engine must break ties the same way.
    return int(np.argmax(logits))


def run_case(m, case, n_predict, want_all):
    name = case.get("name", "")
    prompt = case.get("prompt_tokens")
    out = {"name": name}
    if "prompt_text" in case and case["prompt_text"] is not None:
        out["tokens"] = m.tokenize(case["prompt_text"])
    if not prompt:
        if "tokens" not in out:
            raise RequestError(f"case {name!r}: needs prompt_tokens or prompt_text")
        # Only prompt_text given: continue llama.cpp's own tokenization of it.
        prompt = out["tokens"]
    if len(prompt) + n_predict > m.n_ctx:
        raise RequestError(f"case {name!r}: {len(prompt)} + {n_predict} tokens exceed n_ctx {m.n_ctx}")

    ctx = m.context(len(prompt))
    try:
        decode(ctx, prompt)
        logits = last_logits(ctx, m.n_vocab)
        # Top 10 by logit, lowest id first among equals, like argmax.
        order = np.lexsort((np.arange(m.n_vocab), -logits))[:10]
        out["first_logits_top"] = [[int(i), float(logits[i])] for i in order]
        if want_all:
            out["first_logits_all"] = [float(x) for x in logits]

        greedy, margins, stop, eog_token = [], [], "n_predict", None
        eog = set(m.eog)
        for step in range(n_predict):
            tok = argmax(logits)
            greedy.append(tok)
            # How far the chosen token led the runner-up: an engine whose greedy
            # run parts from ours right after a tiny margin has met a near-tie,
            # not necessarily a bug.
            margins.append(float(logits[tok] - np.partition(logits, -2)[-2]))
            if tok in eog:
                # The eog token is kept in "greedy": it is what the model chose,
                # and the engine should choose it too.
                stop, eog_token = "eog", tok
                break
            if step + 1 < n_predict:
                decode(ctx, [tok])
                logits = last_logits(ctx, m.n_vocab)
    finally:
        L.llama_free(ctx)

    out["prompt_len"] = len(prompt)
    out["greedy"] = greedy
    out["greedy_margins"] = margins
    out["greedy_text"] = m.detokenize(greedy)
    out["stop"] = stop
    out["eog_token"] = eog_token
    return out


def run_bench(m, bench, default_threads):
    prompt = bench.get("prompt_tokens") or []
    if not prompt:
        raise RequestError("bench: prompt_tokens is empty")
    n_decode = int(bench.get("n_decode", 64))
    repeats = max(1, int(bench.get("repeats", 3)))
    threads = int(bench.get("threads", default_threads))
    if len(prompt) + n_decode > m.n_ctx:
        raise RequestError(f"bench: {len(prompt)} + {n_decode} tokens exceed n_ctx {m.n_ctx}")

    # Figures taken while other work holds the cores (OpenMP threads spin and
    # suffer badly from that) are not worth comparing; the load says so.
    load_before = os.getloadavg()[0]
    best_prefill = best_decode = float("inf")
    # CPU seconds of this process for the same best runs: at threads=1 they
    # approximate the uncontended wall time even on a busy machine.
    cpu_prefill = cpu_decode = float("inf")
    for _ in range(repeats):
        # A fresh context per repeat so that prefill always starts from an empty
        # KV cache; its allocation is not timed.
        ctx = m.context(len(prompt), threads)
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            decode(ctx, prompt)
            best_prefill = min(best_prefill, time.perf_counter() - t0)
            cpu_prefill = min(cpu_prefill, time.process_time() - c0)

            # Decode what greedy decoding would (argmax included in the time,
            # since a real decode loop has to pick its token too). eog does not
            # stop it: the figure is for a fixed number of steps.
            logits = last_logits(ctx, m.n_vocab)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n_decode):
                decode(ctx, [argmax(logits)])
                logits = last_logits(ctx, m.n_vocab)
            best_decode = min(best_decode, time.perf_counter() - t0)
            cpu_decode = min(cpu_decode, time.process_time() - c0)
        finally:
            L.llama_free(ctx)

    return {
        "prefill_tokens_per_s": len(prompt) / best_prefill,
        "decode_tokens_per_s": n_decode / best_decode,
        "prefill_tokens": len(prompt),
        "n_decode": n_decode,
        "repeats": repeats,
        "threads": threads,
        "prefill_s": best_prefill,
        "decode_s": best_decode,
        "prefill_cpu_s": cpu_prefill,
        "decode_cpu_s": cpu_decode,
        "loadavg_1min_before": load_before,
    }


def resolved_flash_attn(requested):
    # With "auto", llama.cpp decides when the first context is set up and says
    # so only in its log ("Flash Attention enabled" / "Flash Attention not
    # supported, set to disabled").
    if requested != "auto":
        return requested
    for line in _log_lines:
        if "Flash Attention enabled" in line:
            return "auto->on"
        if "Flash Attention not supported" in line:
            return "auto->off"
    return "auto->?"


def main():
    req = json.load(sys.stdin)
    threads = int(req.get("threads", 2))
    n_predict = int(req.get("n_predict", 32))
    n_ctx = int(req.get("n_ctx", 2048))
    flash_attn = req.get("flash_attn", "auto")
    kv_type = req.get("kv_type", "f16")
    if flash_attn not in FLASH_ATTN:
        raise RequestError(f"flash_attn must be one of {sorted(FLASH_ATTN)}")
    if kv_type not in KV_TYPE:
        raise RequestError(f"kv_type must be one of {sorted(KV_TYPE)}")

    L.llama_backend_init()
    m = Model(req["model"], n_ctx, threads, flash_attn, kv_type)
    try:
        cases = [
            run_case(m, c, n_predict, bool(c.get("first_logits_all", req.get("first_logits_all", False))))
            for c in req.get("cases", [])
        ]
        resp = {
            "llama_cpp_version": L.__version__,
            "system_info": L.llama_print_system_info().decode().strip(),
            "model": {
                "path": req["model"],
                "n_vocab": m.n_vocab,
                "n_layer": L.llama_model_n_layer(m.model),
                "add_bos": bool(L.llama_vocab_get_add_bos(m.vocab)),
                "bos": L.llama_vocab_bos(m.vocab),
                "eos": L.llama_vocab_eos(m.vocab),
                "eog_tokens": m.eog,
                "n_ctx": n_ctx,
                "threads": threads,
                "flash_attn": resolved_flash_attn(flash_attn),
                "kv_type": kv_type,
            },
            "cases": cases,
        }
        if req.get("bench"):
            resp["bench"] = run_bench(m, req["bench"], threads)
    finally:
        m.free()
        L.llama_backend_free()
    json.dump(resp, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    try:
        main()
    except (RequestError, KeyError, ValueError) as e:
        if not VERBOSE:
            # llama.cpp's own reason (bad GGUF, unknown architecture...) is in its log.
            sys.stderr.write("".join(_log_lines[-10:]))
        sys.stderr.write(f"llamacpp_reference: {type(e).__name__}: {e}\n")
        sys.exit(2)
