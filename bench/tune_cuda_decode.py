"""Decode tuning sweep on an NVIDIA GPU: tqmetal decode (B=1, 32/8 heads, D=128, group 64; int4, or
the K and V widths of --kv-bits, e.g. 5,3 for mx.quantize's 5-bit K / 3-bit V bit streams)
for several TQMETAL_CUDA_DECODE settings ("TL,PF,MINB,CTAS,PIPE": 16-token tiles per warp
step, L2 prefetch distance in steps, launch-bound CTAs per SM, CTAs per SM the split aims
at, register pipeline of the loads), separated by ';', in
one process with MLX-CUDA fp16 SDPA as the baseline. HBM-cold like bench/bench_cuda.py."""

import argparse
import json
import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
import bench_cuda as bc  # noqa: E402
import tqmetal  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="16384,131072")
    ap.add_argument("--configs", default="default;1,0,4,4,0;1,4,3,3,1;2,4,3,3,0")
    ap.add_argument("--kv-bits", default="4,4", help="K and V widths")
    ap.add_argument("--json")
    a = ap.parse_args()
    kb, vb = (int(x) for x in a.kv_bits.split(","))
    configs = a.configs.split(";")
    hbm = bc.measure_hbm(True)["hbm_GBps"]
    print(f"HBM {hbm:.0f} GB/s", flush=True)
    out = {"hbm_GBps": hbm, "k_bits": kb, "v_bits": vb, "rows": []}
    for N in [int(x) for x in a.n.split(",")]:
        int4 = bc.B * bc.H_KV * N * (bc.D * (kb + vb) // 8 + 2 * 2 * 2 * bc.D // bc.GROUP)  # bytes read
        fp16 = 2 * bc.B * bc.H_KV * N * bc.D * 2
        layers = max(1, min(64, -(-4 * bc.L2_BYTES // int4)))
        qs = [mx.random.normal((bc.B, bc.H_Q, 1, bc.D)).astype(mx.float16) for _ in range(8)]
        quant, fps = [], []
        for i in range(layers):
            k = mx.random.normal((bc.B, bc.H_KV, N, bc.D)).astype(mx.float16)
            v = mx.random.normal((bc.B, bc.H_KV, N, bc.D)).astype(mx.float16)
            quant.append((mx.quantize(k, group_size=bc.GROUP, bits=kb), mx.quantize(v, group_size=bc.GROUP, bits=vb)))
            mx.eval(quant[-1])
        for i in range(max(1, min(64, -(-4 * bc.L2_BYTES // fp16)))):
            k = mx.random.normal((bc.B, bc.H_KV, N, bc.D)).astype(mx.float16)
            v = mx.random.normal((bc.B, bc.H_KV, N, bc.D)).astype(mx.float16)
            mx.eval(k, v)
            fps.append((k, v))
        scale = bc.D ** -0.5
        t_fp = bc.timeit(lambda i: mx.fast.scaled_dot_product_attention(qs[i % 8], *fps[i % len(fps)], scale=scale), 20, 5)
        print(f"N={N}: fp16 SDPA {t_fp * 1e3:.4f} ms ({fp16 / t_fp / 1e9:.0f} GB/s)", flush=True)
        kq, vq = quant[0]
        ref = mx.fast.scaled_dot_product_attention(
            qs[0], mx.dequantize(*kq, group_size=bc.GROUP, bits=kb), mx.dequantize(*vq, group_size=bc.GROUP, bits=vb),
            scale=scale).astype(mx.float32)
        for cfg in configs:
            if cfg == "default":
                os.environ.pop("TQMETAL_CUDA_DECODE", None)
            else:
                os.environ["TQMETAL_CUDA_DECODE"] = cfg

            def tq(i):
                kq, vq = quant[i % len(quant)]
                return tqmetal.sdpa_int4(qs[i % 8], kq, vq, scale=scale, group_size=bc.GROUP, k_bits=kb, v_bits=vb)

            try:
                t = bc.timeit(tq, 20, 5)
                o = tq(0).astype(mx.float32)
                nmse = (mx.mean((o - ref) ** 2) / mx.mean(ref ** 2)).item()
                row = {"N": N, "config": cfg, "ms": t * 1e3, "GBps": int4 / t / 1e9, "frac_hbm": int4 / t / 1e9 / hbm,
                       "vs_fp16": t_fp / t, "fp16_ms": t_fp * 1e3, "nmse": nmse}
                print(f"  {cfg:>10}: {t * 1e3:.4f} ms {int4 / t / 1e9:6.0f} GB/s {100 * int4 / t / 1e9 / hbm:4.1f}% "
                      f"{t_fp / t:.2f}x fp16  nmse {nmse:.1e}", flush=True)
            except Exception as e:
                row = {"N": N, "config": cfg, "error": str(e)[:300]}
                print(f"  {cfg}: ERROR {e}", flush=True)
            out["rows"].append(row)
        del quant, fps
        mx.clear_cache()
    os.environ.pop("TQMETAL_CUDA_DECODE", None)
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
