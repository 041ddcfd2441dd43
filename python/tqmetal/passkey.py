"""`tqmetal passkey`: long-context retrieval on each KV cache (a number hidden in filler).

    tqmetal passkey --model gemma3-270m --lengths 4096,16384,32768 --depths 0.1,0.5,0.9
    tqmetal passkey --lengths 4096,8192 --json passkey.json          # SmolLM2 (8K context)

The passkey test of Mohtashami & Jaggi (2023, "Landmark Attention"), in its
usual wording: an instruction, a filler paragraph repeated to the requested
length with one sentence "The pass key is N. Remember it. N is the pass key."
put at the requested depth (a fraction of the filler), then "What is the pass
key? The pass key is". The prompt is prefilled in chunks of ``--chunk``
tokens through each cache (the configs of ``tqmetal eval``; ``fp16`` is the
unquantized reference cache) and ``--answer-tokens`` tokens are generated
greedily; a cell counts as retrieved when the key's digits appear in them.
What matters is that a quantized cache retrieves what the reference retrieves:
a small base model fails some cells on its own. So each cell also scores the
key itself, teacher-forced from a copy of the cache taken after the prefill:
log P(" <key>" | prompt) in nats, and the rank of the key's first token at
the answer position. Where the model does not say the key, these still show
whether a quantized cache moved it (the reference's log-probability is the
baseline).

On the CPU the model's matrix products go through numpy's BLAS, as in
``tqmetal eval``; only the last prompt position goes through the output layer.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import List, Sequence

import mlx.core as mx
import numpy as np

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize them. I will quiz you about the important information there.")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"

DEFAULT_CONFIGS = "fp16,k5v3-g64-rot-vrot-center-abq,int4-g64-rot-center-abq,k8v4-vrot-center-abq,int8,mlx4-g64"


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple:
    """(token ids of about ``length`` tokens, index of the needle's first token)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = list(tokenizer.encode(INTRO + "\n", add_special_tokens=True))
    tail = list(tokenizer.encode("\n" + QUESTION, add_special_tokens=False))
    needle = list(tokenizer.encode(" " + NEEDLE.format(key=key) + " ", add_special_tokens=False))
    unit = list(tokenizer.encode(" " + FILLER, add_special_tokens=False))
    room = length - len(head) - len(tail) - len(needle)
    if room < len(unit):
        raise ValueError(f"length {length} is too short for the prompt")
    reps = room // len(unit)
    before = int(round(depth * reps))
    ids = head + unit * before + needle + unit * (reps - before) + tail
    return ids, len(head) + before * len(unit)


def prefill(model, ids: Sequence[int], cache, chunk: int):
    """All of ``ids`` but the last through the model's body only (no output layer)."""
    toks = mx.array(list(ids[:-1]), dtype=mx.int32)
    body = model.model
    for start in range(0, len(ids) - 1, chunk):
        mx.eval(body(toks[start:start + chunk][None], cache=cache))
        _eval_cache(cache)


# MLX dtypes cannot be copied (nor pickled): deepcopy keeps them as they are
_DTYPES = [getattr(mx, n) for n in ("bool_", "uint8", "uint16", "uint32", "uint64", "int8",
                                    "int16", "int32", "int64", "float16", "bfloat16",
                                    "float32", "float64", "complex64") if hasattr(mx, n)]


def copy_cache(cache):
    """A copy of a prompt cache (a list of layer caches) that later updates of
    either leave the other alone. MLX arrays are values: the copy shares their
    buffers until one side writes."""
    return copy.deepcopy(cache, {id(d): d for d in _DTYPES})


def key_score(model, last_id: int, cache, key_ids: Sequence[int]) -> tuple:
    """(log P(key_ids | prompt) in nats, rank of key_ids[0] at the answer position:
    0 = the model's first choice), teacher-forced after the prompt's last token."""
    toks = mx.array([last_id, *key_ids[:-1]], dtype=mx.int32)[None]
    logits = model(toks, cache=cache)[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ids = mx.array(list(key_ids), dtype=mx.int32)
    total = mx.take_along_axis(logp, ids[:, None], axis=-1).sum()
    rank = (logits[0] > logits[0, key_ids[0]]).sum()
    mx.eval(total, rank)
    return float(total.item()), int(rank.item())


def greedy_answer(model, last_id: int, cache, n: int) -> List[int]:
    """``n`` greedy tokens after the prompt's last token, from a cache that
    :func:`prefill` filled with the rest of the prompt."""
    y = mx.array([last_id], dtype=mx.int32)
    out = []
    for _ in range(n):
        logits = model(y[None], cache=cache)[0, -1]
        y = mx.argmax(logits, keepdims=True).astype(mx.int32)
        mx.eval(y)
        out.append(int(y.item()))
    return out


def _eval_cache(cache):
    from .fidelity import _eval_cache as ev

    ev(cache)


def run_grid(model, tokenizer, lengths, depths, configs, answer_tokens=8, chunk=512,
             seed=0, progress=None, on_cell=None) -> list:
    """One row per (config, length, depth): key, answer text, retrieved."""
    rng = np.random.default_rng(seed)
    keys = {(L, d): int(rng.integers(10000, 100000)) for L in lengths for d in depths}
    rows = []
    total, done = len(lengths) * len(depths) * len(configs), 0
    for L in lengths:
        for d in depths:
            key = keys[(L, d)]
            ids, at = passkey_prompt(tokenizer, L, d, key)
            key_ids = list(tokenizer.encode(f" {key}", add_special_tokens=False))
            for c in configs:
                t0 = time.perf_counter()
                cache = c.make_cache(model)
                prefill(model, ids, cache, chunk)
                # the answer and the score each extend a cache: the score gets a copy
                # (MLX arrays are values: the copy shares buffers until one is written)
                scored = copy_cache(cache)
                answer = greedy_answer(model, ids[-1], cache, answer_tokens)
                logp, rank = key_score(model, ids[-1], scored, key_ids)
                del cache, scored
                text = tokenizer.decode(answer)
                row = {"config": c.name, "length": L, "tokens": len(ids), "depth": d,
                       "needle_at": at, "key": key, "answer": text,
                       "retrieved": str(key) in text.replace(" ", ""),
                       "key_logprob": round(logp, 4), "key_rank": rank,
                       "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                done += 1
                if on_cell is not None:
                    on_cell(rows)
                if progress is not None:
                    progress(done, total, row)
    return rows


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def format_grid(rows: list) -> str:
    """Per config, a depth x length table of retrieved (Y) / missed (n), and one of
    the key's log-probability where the rows have it."""
    configs = list(dict.fromkeys(r["config"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    w = max(len(c) for c in configs)

    def table(title, width, sep, value):
        head = title.ljust(w) + "  depth  " + sep.join(_length_label(L).rjust(width) for L in lengths)
        out = [head, "-" * len(head)]
        for c in configs:
            for d in depths:
                out.append(c.ljust(w) + f"  {d:5.2f}  " + sep.join(value((c, L, d)) for L in lengths))
        return out

    cell = {(r["config"], r["length"], r["depth"]): r["retrieved"] for r in rows}
    lines = table("config", 4, "  ",
                  lambda k: "   Y" if cell.get(k) else ("   n" if k in cell else "   -"))
    if all("key_logprob" in r for r in rows):
        lp = {(r["config"], r["length"], r["depth"]): r["key_logprob"] for r in rows}
        lines += [""] + table("log P(key), nats", 7, " ",
                              lambda k: f"{lp[k]:7.2f}" if k in lp else "      -")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tqmetal passkey",
        description="Passkey retrieval grid (depth x length) on the reference and quantized "
                    "KV caches.",
    )
    p.add_argument("--model", default=None,
                   help="as tqmetal eval (default SmolLM2-135M; gemma3-270m for Gemma 3)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"tqmetal eval config names (default {DEFAULT_CONFIGS})")
    p.add_argument("--lengths", default="4096,16384,32768",
                   help="prompt lengths in tokens, comma-separated (default 4096,16384,32768; "
                        "longer than the model's context are skipped)")
    p.add_argument("--depths", default="0.1,0.5,0.9",
                   help="needle depths as fractions of the filler (default 0.1,0.5,0.9)")
    p.add_argument("--answer-tokens", type=int, default=8, help="greedy tokens (default 8)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the rows as JSON (rewritten after every cell)")
    p.add_argument("--numpy-matmul", choices=("auto", "on", "off"), default="auto",
                   help="as tqmetal eval")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="as tqmetal eval (default 1; 0 keeps OpenBLAS's own choice)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    from .fidelity import environment, numpy_matmuls, parse_configs

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = parse_configs(args.configs)
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        depths = [float(x) for x in args.depths.split(",") if x.strip()]
    except ValueError as e:
        parser.error(str(e))
    if not lengths or min(lengths) < 256 or not depths or not all(0 <= d <= 1 for d in depths):
        parser.error("--lengths must be >= 256 tokens and --depths in [0, 1]")
    if args.answer_tokens < 1 or args.chunk < 1:
        parser.error("--answer-tokens and --chunk must be positive")

    from . import generate as _gen
    from .patch import patched

    t0 = time.perf_counter()
    try:
        model, tokenizer = _gen.load_model(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"tqmetal passkey: {e}", file=sys.stderr)
        return 1
    context = getattr(model.args, "max_position_embeddings", None)
    if context:
        skipped = [L for L in lengths if L > context]
        lengths = [L for L in lengths if L <= context]
        if skipped:
            print(f"skipping lengths {skipped}: longer than the model's context ({context})",
                  file=sys.stderr)
        if not lengths:
            parser.error("no length fits the model's context")
    if args.numpy_matmul == "on" or (args.numpy_matmul == "auto" and mx.default_device() == mx.cpu):
        numpy_matmuls(model)
        if args.blas_threads > 0:
            from .blas import set_blas_threads

            set_blas_threads(args.blas_threads)
    if not args.quiet:
        print(f"model loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    def report(rows, partial):
        if args.json:
            out = {"model": args.model or "default (SmolLM2-135M-Instruct GGUF)",
                   "lengths": lengths, "depths": depths, "answer_tokens": args.answer_tokens,
                   "chunk": args.chunk, "seed": args.seed, **environment(), "rows": rows}
            if partial:
                out["partial"] = f"{len(rows)} cells (run still going)"
            Path(args.json).write_text(json.dumps(out, indent=1))

    def progress(done, total, row):
        if not args.quiet:
            print(f"[{done}/{total}] {row['config']} {row['length']} tokens depth {row['depth']}"
                  f": {'retrieved' if row['retrieved'] else 'missed'} ({row['answer']!r}, "
                  f"key {row['key']}, log P {row['key_logprob']:.2f}, rank {row['key_rank']}, "
                  f"{row['seconds']}s)", file=sys.stderr, flush=True)

    with patched():
        rows = run_grid(model, tokenizer, lengths, depths, configs, args.answer_tokens,
                        args.chunk, args.seed, progress=progress,
                        on_cell=lambda r: report(r, True))
    report(rows, False)
    print(format_grid(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
