#!/usr/bin/env python3
"""Benchmark tqmetal.sdpa_int4 on an NVIDIA GPU (MLX's CUDA backend) against MLX baselines.

Usage:
    python bench/bench_cuda.py [--quick] [--decode-n N,N,...] [--prefill LxN,...]
                               [--json PATH] [--txt PATH]

One process, every baseline in the same run:
  hbm        measured memory bandwidth: mx.sum over 4 GiB (read) and x + 1 (read + write)
  tq_int4    tqmetal.sdpa_int4, K and V int4 group 64, float16 q/scales/biases
  tq_k5v3    tqmetal.sdpa_int4, 5-bit K and 3-bit V (mx.quantize's bit streams), group 64
  sdpa_fp16  mx.fast.scaled_dot_product_attention, float16 K/V
  deq_fp16   mx.dequantize(K), mx.dequantize(V), then mx.fast SDPA (float16)
  mlxlm_q4   mlx_lm.models.base.quantized_scaled_dot_product_attention (4-bit g64)

Decode (B=1, 32 query / 8 KV heads, D=128): each call uses the next of several
independent caches (total > 4x the 50 MB L2), as a model's layers do, so the figures
are HBM-cold; `reps` calls are queued in one graph and evaluated together (MLX-CUDA
builds one CUDA graph), so per-call host overhead is amortized as in a model's decode
step. GB/s counts the bytes each method must read (and write, for dequantize).
Prefill (causal, bottom-right): L queries over N cached keys, int4 cache vs fp16 K/V;
tq_int4 is the kernel the plan picks, tq_int4_<variant> the others (TQMETAL_CUDA_PREFILL).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import time

import mlx.core as mx

B, H_Q, H_KV, D = 1, 32, 8, 128
GROUP = 64
L2_BYTES = 50 * 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid, few repetitions")
    p.add_argument("--decode-n", default="4096,16384,65536,131072,524288")
    p.add_argument("--prefill", default="4096x32768,16384x131072")
    p.add_argument("--methods", default="tq_int4,tq_k5v3,sdpa_fp16,deq_fp16,mlxlm_q4")
    p.add_argument("--prefill-variants", default="generic,fast4",
                   help="other prefill kernels timed in the same run (TQMETAL_CUDA_PREFILL values)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--txt", metavar="PATH")
    return p.parse_args(argv)


def load_mlxlm_qsdpa():
    """mlx-lm's quantized SDPA; its module imports only mlx, so load the file directly
    when the package (whose __init__ pulls in transformers) cannot be imported."""
    try:
        from mlx_lm.models.base import quantized_scaled_dot_product_attention as f

        return f
    except Exception:
        pass
    for base in sys.path:
        path = os.path.join(base, "mlx_lm", "models", "base.py")
        if os.path.exists(path):
            spec = importlib.util.spec_from_file_location("mlx_lm_models_base", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod.quantized_scaled_dot_product_attention
    return None


def timeit(fn, reps: int, rounds: int) -> float:
    """Median seconds per call: `reps` calls evaluated together, `rounds` times."""
    mx.eval(fn(0))
    mx.synchronize()
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        mx.eval([fn(i) for i in range(reps)])
        mx.synchronize()
        times.append((time.perf_counter() - t0) / reps)
    times.sort()
    return times[len(times) // 2]


def measure_hbm(quick: bool) -> dict:
    n = (1 << 30) if not quick else (1 << 28)  # float32 elements: 4 GiB
    x = mx.random.uniform(shape=(n,), dtype=mx.float32)
    mx.eval(x)
    t_read = timeit(lambda i: mx.sum(x), 5, 5)
    t_copy = timeit(lambda i: x + 1.0, 5, 5)
    del x
    read = 4 * n / t_read
    copy = 8 * n / t_copy
    return {"read_GBps": read / 1e9, "copy_GBps": copy / 1e9, "bytes": 4 * n,
            "hbm_GBps": max(read, copy) / 1e9}


def decode_case(N: int, methods, reps: int, rounds: int, qsdpa, hbm: float) -> dict:
    scale = D ** -0.5
    fp16_cache = 2 * B * H_KV * N * D * 2
    int4_cache = 2 * B * H_KV * N * (D // 2 + 2 * 2 * D // GROUP)
    k5v3_cache = B * H_KV * N * (D * 5 // 8 + D * 3 // 8 + 2 * 2 * 2 * D // GROUP)
    layers = max(1, min(64, math.ceil(4 * L2_BYTES / int4_cache)))
    layers53 = max(1, min(64, math.ceil(4 * L2_BYTES / k5v3_cache)))
    fp_layers = max(1, min(64, math.ceil(4 * L2_BYTES / fp16_cache)))
    qs = [mx.random.normal((B, H_Q, 1, D)).astype(mx.float16) for _ in range(8)]
    res = {"N": N, "layers_int4": layers, "layers_fp16": fp_layers, "layers_k5v3": layers53,
           "bytes_int4": int4_cache, "bytes_fp16": fp16_cache, "bytes_k5v3": k5v3_cache}
    quant = []
    quant53 = []
    fps = []
    for i in range(layers53 if "tq_k5v3" in methods else 0):
        k = mx.random.normal((B, H_KV, N, D)).astype(mx.float16)
        v = mx.random.normal((B, H_KV, N, D)).astype(mx.float16)
        quant53.append((mx.quantize(k, group_size=GROUP, bits=5), mx.quantize(v, group_size=GROUP, bits=3)))
        mx.eval(quant53[-1])
        del k, v
    for i in range(max(layers if {"tq_int4", "deq_fp16", "mlxlm_q4"} & set(methods) else 0, 0)):
        k = mx.random.normal((B, H_KV, N, D)).astype(mx.float16)
        v = mx.random.normal((B, H_KV, N, D)).astype(mx.float16)
        quant.append((mx.quantize(k, group_size=GROUP, bits=4), mx.quantize(v, group_size=GROUP, bits=4)))
        mx.eval(quant[-1])
        del k, v
    if "sdpa_fp16" in methods:
        for i in range(fp_layers):
            k = mx.random.normal((B, H_KV, N, D)).astype(mx.float16)
            v = mx.random.normal((B, H_KV, N, D)).astype(mx.float16)
            mx.eval(k, v)
            fps.append((k, v))

    def tq(i):
        (kq, vq) = quant[i % len(quant)]
        return tqmetal.sdpa_int4(qs[i % 8], kq, vq, scale=scale, group_size=GROUP, bits=4)

    def tq53(i):
        (kq, vq) = quant53[i % len(quant53)]
        return tqmetal.sdpa_int4(qs[i % 8], kq, vq, scale=scale, group_size=GROUP, k_bits=5, v_bits=3)

    def fp(i):
        k, v = fps[i % len(fps)]
        return mx.fast.scaled_dot_product_attention(qs[i % 8], k, v, scale=scale)

    def deq(i):
        (kq, vq) = quant[i % len(quant)]
        k = mx.dequantize(*kq, group_size=GROUP, bits=4)
        v = mx.dequantize(*vq, group_size=GROUP, bits=4)
        return mx.fast.scaled_dot_product_attention(qs[i % 8], k, v, scale=scale)

    def mlxlm(i):
        (kq, vq) = quant[i % len(quant)]
        return qsdpa(mx.array(qs[i % 8]), kq, vq, scale, None, group_size=GROUP, bits=4)

    table = {"tq_int4": (tq, int4_cache), "tq_k5v3": (tq53, k5v3_cache), "sdpa_fp16": (fp, fp16_cache),
             "deq_fp16": (deq, int4_cache + 2 * fp16_cache), "mlxlm_q4": (mlxlm, int4_cache)}
    for m in methods:
        if m == "mlxlm_q4" and qsdpa is None:
            res[m] = {"error": "mlx-lm not importable"}
            continue
        fn, nbytes = table[m]
        try:
            t = timeit(fn, reps, rounds)
            res[m] = {"ms": t * 1e3, "GBps": nbytes / t / 1e9, "frac_hbm": nbytes / t / 1e9 / hbm}
        except Exception as e:  # e.g. out of memory at 512K for a baseline
            res[m] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if "tq_int4" in res and "ms" in res.get("tq_int4", {}) and "ms" in res.get("sdpa_fp16", {}):
        res["speedup_vs_fp16"] = res["sdpa_fp16"]["ms"] / res["tq_int4"]["ms"]
    if "ms" in res.get("tq_k5v3", {}) and "ms" in res.get("sdpa_fp16", {}):
        res["speedup_k5v3_vs_fp16"] = res["sdpa_fp16"]["ms"] / res["tq_k5v3"]["ms"]
    # correctness of what was timed: tq vs fp16 SDPA on the dequantized cache
    res["nmse_vs_deq_sdpa"] = _nmse_vs_dequantized(qs[0], quant[0], 4, 4, tq(0), scale)
    if quant53:
        res["nmse_k5v3_vs_deq_sdpa"] = _nmse_vs_dequantized(qs[0], quant53[0], 5, 3, tq53(0), scale)
    del quant, quant53, fps
    mx.clear_cache()
    return res


def _nmse_vs_dequantized(q, kv, k_bits: int, v_bits: int, out, scale: float) -> float:
    """NMSE of a tqmetal output against fp16 SDPA on the dequantized (packed K, packed V)."""
    kq, vq = kv
    ref = mx.fast.scaled_dot_product_attention(
        q, mx.dequantize(*kq, group_size=GROUP, bits=k_bits), mx.dequantize(*vq, group_size=GROUP, bits=v_bits),
        scale=scale).astype(mx.float32)
    return (mx.mean((out.astype(mx.float32) - ref) ** 2) / mx.mean(ref ** 2)).item()


def prefill_case(L: int, N: int, methods, rounds: int, variants=()) -> dict:
    scale = D ** -0.5
    q = mx.random.normal((B, H_Q, L, D)).astype(mx.float16)
    k = mx.random.normal((B, H_KV, N, D)).astype(mx.float16)
    v = mx.random.normal((B, H_KV, N, D)).astype(mx.float16)
    kq = mx.quantize(k, group_size=GROUP, bits=4)
    vq = mx.quantize(v, group_size=GROUP, bits=4)
    kq53 = vq53 = None
    if "tq_k5v3" in methods:
        kq53, vq53 = mx.quantize(k, group_size=GROUP, bits=5), mx.quantize(v, group_size=GROUP, bits=3)
    mx.eval(q, k, v, kq, vq, kq53, vq53)
    # causal (bottom-right) FLOPs: each query row sees N - L + i + 1 keys
    keys = L * (N - L) + L * (L + 1) / 2
    flops = 4 * B * H_Q * D * keys
    res = {"L": L, "N": N, "flops": flops}

    def tq(i):
        return tqmetal.sdpa_int4(q, kq, vq, scale=scale, mask="causal", group_size=GROUP, bits=4)

    def tq53(i):  # the bit-stream widths: the generic prefill kernel
        return tqmetal.sdpa_int4(q, kq53, vq53, scale=scale, mask="causal", group_size=GROUP, k_bits=5, v_bits=3)

    def fp_full(i):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    def fp_chunked(i, chunk=2048):
        outs = []
        for s in range(0, L, chunk):
            e = min(L, s + chunk)
            n = N - L + e  # keys this chunk's last row sees; bottom-right causal on the prefix
            outs.append(mx.fast.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, :n], v[:, :, :n], scale=scale, mask="causal"))
        return mx.concatenate(outs, axis=2)

    for m, fn in (("tq_int4", tq), ("tq_k5v3", tq53), ("sdpa_fp16", fp_full)):
        if m not in methods:
            continue
        try:
            mx.reset_peak_memory()
            t = timeit(fn, 1, rounds)
            res[m] = {"ms": t * 1e3, "TFLOPs": flops / t / 1e12, "peak_GB": mx.get_peak_memory() / 1e9}
        except Exception as e:
            res[m] = {"error": f"{type(e).__name__}: {e}"[:300]}
            if m == "sdpa_fp16":
                try:
                    mx.clear_cache()
                    mx.reset_peak_memory()
                    t = timeit(fp_chunked, 1, rounds)
                    res["sdpa_fp16_chunked"] = {"ms": t * 1e3, "TFLOPs": flops / t / 1e12,
                                                "peak_GB": mx.get_peak_memory() / 1e9, "chunk": 2048}
                except Exception as e2:
                    res["sdpa_fp16_chunked"] = {"error": f"{type(e2).__name__}: {e2}"[:300]}
    for v in variants:  # the other prefill kernels (the plan's choice overridden), same inputs
        os.environ["TQMETAL_CUDA_PREFILL"] = v
        try:
            t = timeit(tq, 1, rounds)
            res[f"tq_int4_{v}"] = {"ms": t * 1e3, "TFLOPs": flops / t / 1e12}
        except Exception as e:
            res[f"tq_int4_{v}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            del os.environ["TQMETAL_CUDA_PREFILL"]
    base = res.get("sdpa_fp16", {}).get("ms") or res.get("sdpa_fp16_chunked", {}).get("ms")
    if base and "ms" in res.get("tq_int4", {}):
        res["ratio_fp16_over_tq"] = base / res["tq_int4"]["ms"]
    if L * N <= 4096 * 32768:  # check what was timed against fp16 SDPA on the dequantized cache
        ref = mx.fast.scaled_dot_product_attention(
            q, mx.dequantize(*kq, group_size=GROUP, bits=4), mx.dequantize(*vq, group_size=GROUP, bits=4),
            scale=scale, mask="causal")
        out = tq(0)
        err = mx.mean((out.astype(mx.float32) - ref.astype(mx.float32)) ** 2) / mx.mean(ref.astype(mx.float32) ** 2)
        res["nmse_vs_deq_sdpa"] = err.item()
    del q, k, v, kq, vq, kq53, vq53
    mx.clear_cache()
    return res


def main(argv=None):
    args = parse_args(argv)
    methods = args.methods.split(",")
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    info = tqmetal.gpu_info()
    say(f"tqmetal CUDA benchmark, {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    say(f"device: {mx.default_device()}, gpu_info: {info}")
    say(f"mlx {mx.__version__}, python {platform.python_version()}")
    if not (info.get("backend") == "cuda" and info.get("available")):
        say("no CUDA path: nothing to measure")
        return 1
    qsdpa = load_mlxlm_qsdpa()
    reps, rounds = (10, 3) if args.quick else (20, 7)

    hbm = measure_hbm(args.quick)
    say(f"HBM: read {hbm['read_GBps']:.0f} GB/s (mx.sum), copy {hbm['copy_GBps']:.0f} GB/s "
        f"(x + 1, read + write): using {hbm['hbm_GBps']:.0f} GB/s")
    out = {"gpu_info": info, "mlx": mx.__version__, "hbm": hbm, "decode": [], "prefill": []}

    say("\nDecode B=1, Hq=32, Hkv=8, D=128 (ms per call; GB/s on the bytes each reads; % of HBM)")
    say(f"{'N':>7} " + " ".join(f"{m:>26}" for m in methods) + "  speedup  nmse")
    for n in [int(x) for x in args.decode_n.split(",") if x]:
        r = decode_case(n, methods, reps, rounds, qsdpa, hbm["hbm_GBps"])
        out["decode"].append(r)
        cells = []
        for m in methods:
            x = r.get(m, {})
            cells.append(f"{x['ms']:8.4f} {x['GBps']:6.0f} {100 * x['frac_hbm']:4.0f}%" if "ms" in x else f"{'ERR':>26}")
        sp = r.get("speedup_vs_fp16")
        say(f"{n:>7} " + " ".join(f"{c:>26}" for c in cells) +
            f"  {sp:6.2f}x" if sp else f"{n:>7} " + " ".join(f"{c:>26}" for c in cells))
        say(f"        nmse(tq vs dequantize+SDPA) = {r['nmse_vs_deq_sdpa']:.2e}" +
            (f"; k5v3: {r['nmse_k5v3_vs_deq_sdpa']:.2e}, {r['speedup_k5v3_vs_fp16']:.2f}x fp16"
             if "speedup_k5v3_vs_fp16" in r else ""))
        for m in methods:
            if "error" in r.get(m, {}):
                say(f"        {m}: {r[m]['error']}")

    say("\nPrefill, causal (ms; TFLOP/s on the causal FLOPs; peak GB)")
    for spec in [s for s in args.prefill.split(",") if s]:
        L, N = (int(x) for x in spec.lower().split("x"))
        r = prefill_case(L, N, methods, 3 if args.quick else 5,
                         [v for v in args.prefill_variants.split(",") if v])
        out["prefill"].append(r)
        say(f"L={L} N={N}: " + "; ".join(
            f"{m}: {r[m]['ms']:.2f} ms {r[m]['TFLOPs']:.0f} TF/s peak {r[m]['peak_GB']:.1f} GB"
            if "ms" in r[m] else f"{m}: {r[m]['error']}"
            for m in ("tq_int4", "tq_k5v3", "sdpa_fp16", "sdpa_fp16_chunked") if m in r))
        say("        other tq kernels: " + "; ".join(
            f"{m}: {x['ms']:.2f} ms {x['TFLOPs']:.0f} TF/s" if "ms" in x else f"{m}: {x['error']}"
            for m, x in r.items() if m.startswith("tq_int4_")))
        if "ratio_fp16_over_tq" in r:
            say(f"        fp16 time / tq time = {r['ratio_fp16_over_tq']:.2f} (goal >= 0.8)")
        if "nmse_vs_deq_sdpa" in r:
            say(f"        nmse(tq vs dequantize+SDPA) = {r['nmse_vs_deq_sdpa']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.txt:
        with open(args.txt, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


import tqmetal  # noqa: E402  (after mlx)

if __name__ == "__main__":
    sys.exit(main())
