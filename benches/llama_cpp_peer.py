#!/usr/bin/env python3
"""llama.cpp beside `candor bench generate`: the same GGUF, prompts, thread count and batch size.

Reads the rendered chat prompts (a JSON array of strings, as `candor bench generate
--print-prompts` prints them), tokenizes them with llama.cpp, and decodes greedily with
llama.cpp's own batched decoding through the low-level API of llama-cpp-python, as llama.cpp's
`batched` example does: B sequences with their own sequence ids share one `llama_batch`; one
`llama_decode` prefills all B prompts at once, then one `llama_decode` per step advances every
sequence by one token. Requests run in waves of B; every sequence decodes exactly
--max-new-tokens tokens (end-of-turn is ignored), like the Candor side. Greedy sampling is an
argmax over each sequence's logits (numpy), and is timed as part of each pass, as on the Candor
side.

Prints one JSON line with the same fields as `candor --json bench generate`. Peak RSS is this
process's (getrusage), so run one process per batch size. Not run by CI.
"""

import argparse
import ctypes
import json
import resource
import sys
import time

import numpy as np
import llama_cpp as L


def tokenize(vocab, text):
    raw = text.encode("utf-8")
    cap = len(raw) + 16
    buf = (L.llama_token * cap)()
    # add_special=False: the ChatML text is the whole prompt (Candor adds no BOS either);
    # parse_special=True: <|im_start|> and <|im_end|> are control tokens.
    n = L.llama_tokenize(vocab, raw, len(raw), buf, cap, False, True)
    if n < 0:
        raise RuntimeError(f"tokenize failed ({n})")
    return list(buf[:n])


def piece(vocab, tok):
    buf = ctypes.create_string_buffer(64)
    n = L.llama_token_to_piece(vocab, tok, buf, 64, 0, False)
    return buf.raw[: max(n, 0)]


def fill(batch, entries):
    """entries: (token, position, sequence id, wants logits)."""
    for i, (tok, pos, seq, logits) in enumerate(entries):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if logits else 0
    batch.n_tokens = len(entries)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts-json", required=True, help="file with a JSON array of prompt texts")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    B, T = max(1, args.batch), args.max_new_tokens
    texts = json.load(open(args.prompts_json))

    L.llama_backend_init()
    global _quiet  # the callback must outlive every call into llama.cpp
    _quiet = L.llama_log_callback(lambda level, text, user: None)
    L.llama_log_set(_quiet, None)
    t0 = time.perf_counter()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args.gguf.encode(), mparams)
    if not model:
        sys.exit(f"cannot load {args.gguf}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    prompts = [tokenize(vocab, t) for t in texts]
    waves = [list(range(i, min(i + B, len(prompts)))) for i in range(0, len(prompts), B)]
    longest = max(len(p) for p in prompts) + T + 8
    widest = max(sum(len(prompts[j]) for j in w) for w in waves)

    cparams = L.llama_context_default_params()
    cparams.n_seq_max = B
    cparams.n_ctx = B * (((longest + 255) // 256) * 256)  # per-sequence streams of this size / B
    cparams.n_batch = max(widest, B, 512)
    cparams.n_threads = args.threads
    cparams.n_threads_batch = args.threads
    cparams.no_perf = True
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        sys.exit("cannot create a llama.cpp context")
    mem = L.llama_get_memory(ctx)
    load_secs = time.perf_counter() - t0
    batch = L.llama_batch_init(max(widest, B), 0, B)

    def argmax(i):
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
        return int(logits.argmax())

    def decode():
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            sys.exit(f"llama_decode failed ({rc})")

    # Warm-up (thread pool, first-touch allocations), not part of any figure.
    fill(batch, [(t, p, 0, p == len(prompts[0]) - 1) for p, t in enumerate(prompts[0])])
    decode()
    L.llama_memory_clear(mem, True)

    stats = dict(prefill_tokens=0, prefill_secs=0.0, decode_tokens=0, decode_secs=0.0, generated=0)
    first_tokens = []
    wall0 = time.perf_counter()
    for wave in waves:
        L.llama_memory_clear(mem, True)
        entries, last = [], []
        for s, j in enumerate(wave):
            p = prompts[j]
            entries += [(tok, pos, s, pos == len(p) - 1) for pos, tok in enumerate(p)]
            last.append(len(entries) - 1)
        t = time.perf_counter()
        fill(batch, entries)
        decode()
        nxt = [argmax(i) for i in last]
        stats["prefill_secs"] += time.perf_counter() - t
        stats["prefill_tokens"] += len(entries)
        stats["generated"] += len(wave)
        if wave[0] == 0:
            first_tokens.append(nxt[0])
        pos = [len(prompts[j]) for j in wave]
        for _ in range(T - 1):
            t = time.perf_counter()
            fill(batch, [(nxt[s], pos[s], s, True) for s in range(len(wave))])
            decode()
            nxt = [argmax(s) for s in range(len(wave))]
            stats["decode_secs"] += time.perf_counter() - t
            stats["decode_tokens"] += len(wave)
            stats["generated"] += len(wave)
            pos = [p + 1 for p in pos]
            if wave[0] == 0:
                first_tokens.append(nxt[0])
    wall = time.perf_counter() - wall0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    first = b"".join(piece(vocab, t) for t in first_tokens).decode("utf-8", "replace")
    print(json.dumps({
        "engine": "llama.cpp", "version": L.__version__, "batch": B, "threads": args.threads,
        "prompts": len(prompts), "max_new_tokens": T, "prompt_tokens": stats["prefill_tokens"],
        "prefill_secs": stats["prefill_secs"],
        "prefill_tok_s": stats["prefill_tokens"] / max(stats["prefill_secs"], 1e-9),
        "decode_tokens": stats["decode_tokens"], "decode_secs": stats["decode_secs"],
        "decode_tok_s": stats["decode_tokens"] / max(stats["decode_secs"], 1e-9),
        "generated_tokens": stats["generated"], "aggregate_tok_s": stats["generated"] / wall,
        "wall_secs": wall, "peak_rss_mib": peak, "load_secs": load_secs, "first_output": first,
    }))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
