#!/usr/bin/env python3
"""Where a decode step's time goes beside attention: the KV caches' update path.

SmolLM2-135M's configuration (bench_cuda_e2e.build_model, random weights), a context of
--ctx tokens in every layer's cache, then per cache kind (mlx-lm's fp16 KVCache,
tqmetal's int4 cache):

  graph      primitives (nodes) in one decode step's graph (mx.export_to_dot of the
             logits), in all and per layer: each is one kernel launch on MLX-CUDA
  update     ms per token for every layer's cache.update_and_fetch of one new token
             (what the model calls), evaluated together, no attention
  attention  ms per token for every layer's attention over its cache (mx.fast SDPA on
             the fp16 cache; tqmetal.sdpa_int4 on the int4 cache's views)
  step       ms per whole decode step (model forward + argmax)

Runs on any MLX device (default device); on a CUDA machine the figures are the GPU's.
"""

import argparse
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cuda_e2e as e2e  # noqa: E402

e2e.stub_missing()

import mlx.core as mx  # noqa: E402


def timeit(fn, reps):
    fn()
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    mx.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def count_nodes(arr):
    with tempfile.NamedTemporaryFile("w+", suffix=".dot", delete=False) as f:
        path = f.name
    mx.export_to_dot(path, arr)
    text = open(path).read()
    os.unlink(path)
    names = re.findall(r'label\s*=\s*"?([A-Za-z0-9_]+)', text)
    ops = [n for n in names if not re.fullmatch(r"[a-z]?\d+|array", n)]
    hist = {}
    for n in ops:
        hist[n] = hist.get(n, 0) + 1
    return len(ops), dict(sorted(hist.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--json")
    a = ap.parse_args()
    from tqmetal.patch import patched

    model, desc = e2e.build_model(None, a.layers)
    out = {"model": desc, "ctx": a.ctx, "device": str(mx.default_device()), "kinds": {}}
    Hkv, D = 3, 64
    for kind in ("fp16", "tq_int4"):
        cache = e2e.make_cache(model, kind)
        mx.random.seed(1)
        prompt = mx.random.randint(0, 49152, (1, a.ctx))
        ctxm = patched() if kind == "tq_int4" else None
        if ctxm:
            ctxm.__enter__()
        try:
            for i in range(0, a.ctx, 2048):
                model(prompt[:, i:min(i + 2048, a.ctx)], cache=cache)
                mx.eval([c.state for c in cache])
            tok = prompt[:, -1:]
            logits = model(tok, cache=cache)
            n, hist = count_nodes(logits)
            mx.eval(logits)
            r = {"graph_nodes": n, "graph_nodes_per_layer": n / a.layers, "graph_ops": hist}

            def step():
                mx.eval(mx.argmax(model(tok, cache=cache)[:, -1, :], axis=-1))

            r["step_ms"] = timeit(step, a.reps)
            k1 = mx.random.normal((1, Hkv, 1, D)).astype(mx.float16)
            v1 = mx.random.normal((1, Hkv, 1, D)).astype(mx.float16)
            mx.eval(k1, v1)

            def update():
                outs = [c.update_and_fetch(k1, v1) for c in cache]
                mx.eval([c.state for c in cache])
                del outs

            r["update_ms"] = timeit(update, a.reps)
            q1 = mx.random.normal((1, 9, 1, D)).astype(mx.float16)
            mx.eval(q1)
            if kind == "fp16":
                kvs = [(c.keys[..., :c.offset, :], c.values[..., :c.offset, :]) for c in cache]

                def attend():
                    mx.eval([mx.fast.scaled_dot_product_attention(q1, k, v, scale=D ** -0.5) for k, v in kvs])
            else:
                import tqmetal
                views = [c._quantized_views() for c in cache]
                if any(v is None or v[0] is None for v in views):
                    views = None  # (a context inside the window: nothing quantized yet)

                def attend():
                    mx.eval([tqmetal.sdpa_int4(q1, tuple(qk), tuple(qv), scale=D ** -0.5, group_size=64, bits=4)
                             for qk, qv in views])
            r["attention_ms"] = timeit(attend, a.reps) if kind == "fp16" or views else None
        finally:
            if ctxm:
                ctxm.__exit__(None, None, None)
        out["kinds"][kind] = r
        print(kind, {k: v for k, v in r.items() if k != "graph_ops"}, flush=True)
        print("   ops:", list(r["graph_ops"].items())[:25], flush=True)
        del cache
        mx.clear_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
