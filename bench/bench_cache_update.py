#!/usr/bin/env python3
"""Host cost of the KV caches' update_and_fetch, and decode tokens/s, on this machine.

update   per cache kind, a one-layer cache of SmolLM2-135M's KV layout (B=1, 3 KV heads,
         D=64, float16) filled with --ctx random tokens, then --n calls of
         update_and_fetch with one new token: microseconds of Python per call (the
         returned K/V are not evaluated; the cache's state is, after each call, outside
         the timed region, as a decode step does). Kinds: mlx-lm's KVCache ("fp16") and
         tqmetal's caches as make_prompt_cache builds them for kv="int4" and kv="k5v3"
         (the default for SmolLM2), each under tqmetal.patch after one call of the
         patched attention ("patched": what a patched model's decode pays) and unpatched
         ("unpatched": real K/V, what any version pays without the patch).
e2e      greedy decode tokens/s of the bundled SmolLM2-135M (tqmetal.gguf.load_gguf) after
         a --e2e-ctx-token prompt (its matrix products through numpy, tqmetal.blas),
         under tqmetal.patch, with mlx-lm's fp16 caches and tqmetal's default cache
         (--e2e-kv); and the host time per token of building the step's lazy graph
         (the model call before mx.eval, every layer's update_and_fetch included),
         which a GPU does not hide.

Runs against whichever tqmetal is imported (PYTHONPATH picks another build: compare
versions on the same machine, in turn). Prints a table; --json writes the numbers.
"""

import argparse
import json
import platform
import statistics
import subprocess
import time

import mlx.core as mx
from mlx_lm.models import cache as mlc
from mlx_lm.models import llama

import tqmetal
from tqmetal import patch
from tqmetal.cache import make_prompt_cache

H_KV, H_Q, D = 3, 9, 64


def tiny_smollm_layout():
    """A one-layer llama with SmolLM2-135M's heads (make_prompt_cache reads its layers)."""
    args = llama.ModelArgs(model_type="llama", hidden_size=576, num_hidden_layers=1,
                           intermediate_size=64, num_attention_heads=H_Q,
                           num_key_value_heads=H_KV, rms_norm_eps=1e-5, vocab_size=64,
                           head_dim=D, rope_theta=100000.0, tie_word_embeddings=True)
    return llama.Model(args)


def make_cache(kind):
    if kind == "fp16":
        return mlc.KVCache()
    return make_prompt_cache(tiny_smollm_layout(), kv=kind)[0]


def bench_update(kind, mode, ctx, n):
    mx.random.seed(0)
    c = make_cache(kind)
    for i in range(0, ctx, 2048):
        m = min(2048, ctx - i)
        k = mx.random.normal((1, H_KV, m, D)).astype(mx.float16)
        c.update_and_fetch(k, k)
        mx.eval(c.state)
    k1 = mx.random.normal((1, H_KV, 1, D)).astype(mx.float16)
    q1 = mx.random.normal((1, H_Q, 1, D)).astype(mx.float16)
    mx.eval(k1, q1)
    ctxm = patch.patched() if mode == "patched" else None
    if ctxm:
        ctxm.__enter__()
    try:
        # one attention call as the model makes it (the patched one serves tqmetal's
        # caches through the fused op)
        kk, vv = c.update_and_fetch(k1, k1)
        mx.eval(patch.scaled_dot_product_attention(q1, kk, vv, c, D ** -0.5, None)
                if mode == "patched" else
                mx.fast.scaled_dot_product_attention(q1, kk, vv, scale=D ** -0.5))
        del kk, vv
        mx.eval(c.state)
        times = []
        placeholder = None
        for _ in range(n):
            t0 = time.perf_counter()
            kk, vv = c.update_and_fetch(k1, k1)
            t1 = time.perf_counter()
            times.append((t1 - t0) * 1e6)
            if placeholder is None:
                fetched = getattr(tqmetal, "fetched", None)
                placeholder = bool(fetched and fetched.is_placeholder(kk))
            del kk, vv
            mx.eval(c.state)
    finally:
        if ctxm:
            ctxm.__exit__(None, None, None)
    return {"kind": kind, "mode": mode, "median_us": statistics.median(times),
            "mean_us": statistics.fmean(times), "min_us": min(times),
            "placeholders": placeholder}


def bench_e2e(kv, ctx, tokens, warmup=3):
    from tqmetal.blas import numpy_matmuls, set_blas_threads
    from tqmetal.gguf import load_gguf

    model, _ = load_gguf("smollm2-135m")
    # the prefill's matrix products through numpy's BLAS (MLX's CPU ones take minutes
    # for 2K tokens); decode steps keep MLX's own quantized layers
    set_blas_threads(1)
    numpy_matmuls(model)
    out = []
    for kind in ("fp16", kv):
        cache = make_prompt_cache(model, kv=kind)
        mx.random.seed(1)
        prompt = mx.random.randint(0, 49152, (1, ctx))
        with patch.patched():
            for i in range(0, ctx, 512):
                logits = model(prompt[:, i:i + 512], cache=cache)
                mx.eval([c.state for c in cache])
            y = mx.argmax(logits[:, -1], axis=-1)
            mx.eval(y)
            build = 0.0
            for step in range(warmup + tokens):
                if step == warmup:
                    t0, build = time.perf_counter(), 0.0
                tb = time.perf_counter()
                y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
                build += time.perf_counter() - tb
                mx.eval(y)
            dt = time.perf_counter() - t0
        out.append({"kind": kind, "ctx": ctx, "tokens": tokens, "tok_s": tokens / dt,
                    "ms_per_token": dt / tokens * 1e3, "host_ms_per_token": build / tokens * 1e3})
        del cache
    return out


def cpu_name():
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in text.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=8192, help="tokens in the cache (update)")
    ap.add_argument("--n", type=int, default=200, help="update_and_fetch calls timed")
    ap.add_argument("--kinds", default="fp16,int4,k5v3")
    ap.add_argument("--e2e-ctx", type=int, default=2048)
    ap.add_argument("--e2e-tokens", type=int, default=32)
    ap.add_argument("--e2e-kv", default="k5v3", help="tqmetal cache of the e2e run")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--label", default="", help="a name for this build in the output")
    ap.add_argument("--json")
    a = ap.parse_args()

    res = {"label": a.label, "tqmetal": tqmetal.__file__, "cpu": cpu_name(),
           "device": str(mx.default_device()), "ctx": a.ctx, "n": a.n, "update": [], "e2e": []}
    print(f"# {a.label or tqmetal.__file__}: {res['cpu']}, {res['device']}")
    print(f"# update_and_fetch of 1 token on {a.ctx} cached (B=1, {H_KV} KV heads, D={D}, "
          f"float16), {a.n} calls, us per call")
    print(f"{'kind':6} {'mode':10} {'median':>8} {'mean':>8} {'min':>8}  placeholders")
    for kind in a.kinds.split(","):
        for mode in (("patched",) if kind == "fp16" else ("patched", "unpatched")):
            r = bench_update(kind, mode, a.ctx, a.n)
            res["update"].append(r)
            print(f"{kind:6} {mode:10} {r['median_us']:8.1f} {r['mean_us']:8.1f} "
                  f"{r['min_us']:8.1f}  {r['placeholders']}", flush=True)
    if not a.no_e2e:
        print(f"# decode, SmolLM2-135M (bundled GGUF), {a.e2e_ctx}-token prompt, patched, "
              f"{a.e2e_tokens} greedy tokens")
        for r in bench_e2e(a.e2e_kv, a.e2e_ctx, a.e2e_tokens):
            res["e2e"].append(r)
            print(f"{r['kind']:6} {r['tok_s']:8.2f} tok/s {r['ms_per_token']:8.2f} ms/token, "
                  f"of which {r['host_ms_per_token']:6.2f} ms building the step's graph (host)",
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
