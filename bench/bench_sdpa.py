#!/usr/bin/env python3
"""Benchmark tqmetal.sdpa_int4 against MLX baselines on the CPU backend.

Usage:
    python bench/bench_sdpa.py [--quick] [--long] [--json PATH] [--txt PATH]
                               [--openblas PATH]

Methods (all timed in the same process):
  tq_int4    tqmetal.sdpa_int4, K and V int4 g64 (float16 q/scales/biases)
  tq_k8v4    tqmetal.sdpa_int4, K int8 g64, V int4 g64
  sdpa_fp16  mx.fast.scaled_dot_product_attention, float16 K/V
  sdpa_fp32  mx.fast.scaled_dot_product_attention, float32 q/K/V
  deq_fp16   mx.dequantize(K), mx.dequantize(V), then mx.fast SDPA (float16)
  mlxlm_q4   mlx_lm.models.base.quantized_scaled_dot_product_attention (4-bit g64)

Decode timings are cache-cold by default: each method gets enough independent
"layer" caches that their total size exceeds ~2x the L3 cache, and each call
uses the next layer (as a model does).  A warm figure (same layer repeatedly)
is also reported.  See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

_REEXEC_ENV = "TQBENCH_OPENBLAS_PRELOADED"

B, H_Q, H_KV, D = 1, 32, 8, 128
GROUP = 64


# --------------------------------------------------------------------------
# argument parsing / OpenBLAS re-exec (must happen before importing mlx)
# --------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced grid and repetitions (smoke test, < 1 min)")
    p.add_argument("--long", action="store_true",
                   help="add decode N=131072 (slow baselines take ~30 s/call)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON")
    p.add_argument("--txt", metavar="PATH", help="also write the printed report here")
    p.add_argument("--openblas", metavar="PATH",
                   help="re-exec with LD_PRELOAD=PATH (a libopenblas.so exposing "
                        "cblas_sgemm) so MLX's float32 matmuls use it")
    p.add_argument("--decode-n", metavar="N,N,...",
                   help="override decode cache lengths (comma separated)")
    p.add_argument("--prefill", metavar="LxN,LxN,...",
                   help="override prefill shapes, e.g. 512x4096,512x16384; "
                        "'none' disables prefill")
    p.add_argument("--methods", metavar="KEY,KEY,...",
                   help="subset of methods: " + ",".join(METHOD_KEYS))
    p.add_argument("--cold-bytes", type=float, default=None,
                   help="bytes of layer caches to cycle through per method "
                        "(default: max(2.2 x L3, 1 GiB))")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip a method at a size where one call is estimated to "
                        "take longer than this (default 60, quick 5)")
    p.add_argument("--no-warm", action="store_true", help="skip warm decode figures")
    p.add_argument("--bw-gb", type=float, default=None,
                   help="size of the bandwidth-test array in GB (default 2.15, quick 1.1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def maybe_reexec_with_openblas(args):
    """Re-exec this script with LD_PRELOAD=<openblas> (once)."""
    if not args.openblas:
        return
    path = os.path.abspath(args.openblas)
    if os.environ.get(_REEXEC_ENV) == path:
        return  # already the re-exec'd child
    if not os.path.exists(path):
        sys.exit(f"--openblas: {path} does not exist")
    env = dict(os.environ)
    env[_REEXEC_ENV] = path
    prev = env.get("LD_PRELOAD")
    env["LD_PRELOAD"] = path + (":" + prev if prev else "")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable,
              [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


METHOD_KEYS = ["tq_int4", "tq_k8v4", "sdpa_fp16", "sdpa_fp32", "deq_fp16", "mlxlm_q4"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def fmt_t(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms" if s < 0.1 else f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_b(n):
    if n is None:
        return "-"
    a = abs(n)
    if a >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if a >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if a >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{n:.0f} B"


def stats(ts):
    ts = sorted(ts)
    n = len(ts)
    out = {"n": n, "median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1],
           "mean_s": statistics.fmean(ts)}
    if n >= 4:
        q = statistics.quantiles(ts, n=4, method="inclusive")
        out["q1_s"], out["q3_s"] = q[0], q[2]
    return out


def read_first(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def parse_size(s):
    if s is None:
        return None
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    if s.endswith("B"):
        return parse_size(s[:-1])
    return int(s)


def machine_info():
    info = {"platform": platform.platform(),
            "python": platform.python_version()}
    model = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        lscpu = {}
        for line in out.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                lscpu[k.strip()] = v.strip()
        model = lscpu.get("Model name")
        for k in ["Architecture", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
                  "Socket(s)", "L1d cache", "L2 cache", "L3 cache", "Hypervisor vendor",
                  "CPU family", "Model", "Stepping", "BogoMIPS", "CPU max MHz"]:
            if k in lscpu:
                info["lscpu_" + k.replace("(s)", "s").replace(" ", "_").lower()] = lscpu[k]
        flags = lscpu.get("Flags", "").split()
        info["isa_flags"] = [f for f in ["avx2", "fma", "f16c", "avx512f", "avx512bw",
                                         "avx512_fp16", "avx512_bf16", "avx_vnni", "amx_tile"]
                             if f in flags]
    except Exception:
        pass
    if model is None:
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    info["cpu_model"] = model
    info["logical_cpus"] = os.cpu_count()
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    l3 = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            if read_first(f"{base}/{idx}/level") == "3":
                l3 = parse_size(read_first(f"{base}/{idx}/size"))
    except OSError:
        pass
    info["l3_bytes"] = l3
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_total_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return info


def measure_bandwidth(gb, repeats=4):
    """Read bandwidth: numpy float64 sum over a >= gb GB array (1 and 2 threads)."""
    import numpy as np
    n = int(gb * 1e9) // 8
    a = np.ones(n, dtype=np.float64)  # np.ones touches every page
    res = {"array_bytes": a.nbytes, "repeats": repeats, "method": "numpy float64 sum, "
           "array split evenly across threads (numpy releases the GIL), best of repeats"}
    for nt in (1, 2):
        chunks = np.array_split(a, nt)
        out = [None] * nt

        def work(i):
            out[i] = chunks[i].sum()

        best = float("inf")
        for _ in range(repeats):
            ths = [threading.Thread(target=work, args=(i,)) for i in range(nt)]
            t0 = time.perf_counter()
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            best = min(best, time.perf_counter() - t0)
        res[f"gbps_{nt}t"] = a.nbytes / best / 1e9
    del a
    res["gbps"] = max(res["gbps_1t"], res["gbps_2t"])
    return res


def cblas_sgemm_provider():
    """Which shared object the global symbol cblas_sgemm resolves to (or None)."""
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        fn = ctypes.CDLL(None).cblas_sgemm
    except AttributeError:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        info = DlInfo()
        if libc.dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)):
            return info.dli_fname.decode()
    except Exception:
        pass
    return "?"


def mapped_libs(substr):
    try:
        with open("/proc/self/maps") as f:
            return sorted({l.split()[-1] for l in f if substr in l and "/" in l})
    except OSError:
        return []


# --------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        import mlx.core as mx
        import numpy as np

        self.mx, self.np, self.args = mx, np, args
        quick = args.quick
        self.quick = quick
        mx.random.seed(args.seed)

        self.machine = machine_info()
        l3 = self.machine.get("l3_bytes") or 32 * 1024 ** 2
        self.l3 = l3
        self.cold_bytes = args.cold_bytes or max(2.2 * l3, 1024 ** 3)
        self.max_call_s = args.max_call_s or (2.0 if quick else 60.0)
        # a first call slower than this is used as the single sample (no extra reps)
        self.single_shot_s = 1.0 if quick else 15.0
        # warm figure of a method whose cold call takes longer than this: one
        # call on the layer the cold run used last (such methods are compute-bound)
        self.warm_single_s = 0.5 if quick else 3.0
        self.budget_cold = 0.5 if quick else 5.0
        self.budget_warm = 0.25 if quick else 2.5
        self.max_reps = 10 if quick else 50

        if args.decode_n:
            self.decode_ns = [int(x) for x in args.decode_n.split(",") if x]
        elif quick:
            self.decode_ns = [4096, 16384]
        else:
            self.decode_ns = [4096, 16384, 65536] + ([131072] if args.long else [])
        if args.prefill:
            self.prefills = [] if args.prefill == "none" else [
                tuple(int(v) for v in s.lower().split("x")) for s in args.prefill.split(",")]
        elif quick:
            self.prefills = [(16, 1024)]
        else:
            # main shape L=512, N=16384; the small one gives every method at
            # least one prefill timing (mlx-lm's quantized path costs about
            # L x a decode call, ~2 h at the main shape)
            self.prefills = [(16, 4096), (512, 16384)]

        self.methods = METHOD_KEYS if not args.methods else [
            m for m in args.methods.split(",") if m]
        for m in self.methods:
            if m not in METHOD_KEYS:
                sys.exit(f"unknown method {m}; choose from {METHOD_KEYS}")

        # tqmetal / mlx-lm availability
        self.tq = None
        self.tq_error = None
        try:
            import tqmetal
            tqmetal.sdpa_int4  # noqa: B018
            self.tq = tqmetal
        except Exception as e:  # noqa: BLE001
            self.tq_error = f"{type(e).__name__}: {e}"
        self.mlxlm_qsdpa = None
        self.mlxlm_error = None
        try:
            from mlx_lm.models.base import quantized_scaled_dot_product_attention
            self.mlxlm_qsdpa = quantized_scaled_dot_product_attention
        except Exception as e:  # noqa: BLE001
            self.mlxlm_error = f"{type(e).__name__}: {e}"

        self.versions = self._versions()
        self.records = []      # one per (phase, L, N, method, mode)
        self.checks = []       # correctness checks
        self.notes = []
        self.per_unit = {}     # (method, phase) -> seconds per unit of work (for estimates)

    # ---------------------------------------------------------------- setup
    def _versions(self):
        from importlib import metadata
        v = {"mlx": self.mx.__version__, "numpy": self.np.__version__}
        for pkg in ["mlx-cpu", "mlx-lm", "tqmetal"]:
            try:
                v[pkg] = metadata.version(pkg)
            except Exception:  # noqa: BLE001
                v[pkg] = None
        if self.tq is not None:
            v["tqmetal_module"] = getattr(self.tq, "__version__", None)
            v["tqmetal_file"] = getattr(self.tq, "__file__", None)
            v["tqmetal_cpu_isa"] = self.tq.cpu_isa()  # the kernel variant timed
            try:
                d = os.path.dirname(self.tq.__file__)
                v["tqmetal_ext"] = [
                    dict(name=f, bytes=os.path.getsize(os.path.join(d, f)),
                         mtime=datetime.datetime.fromtimestamp(
                             os.path.getmtime(os.path.join(d, f)),
                             datetime.timezone.utc).isoformat(timespec="seconds"))
                    for f in sorted(os.listdir(d)) if f.endswith(".so")]
            except Exception:  # noqa: BLE001
                pass
        return v

    def method_info(self):
        return {
            "tq_int4": dict(label="tqmetal int4 g64", kind="q4", baseline=False),
            "tq_k8v4": dict(label="tqmetal K8V4 g64", kind="k8v4", baseline=False),
            "sdpa_fp16": dict(label="mx.fast SDPA fp16", kind="fp16", baseline=True),
            "sdpa_fp32": dict(label="mx.fast SDPA fp32", kind="fp32", baseline=True),
            "deq_fp16": dict(label="dequant+SDPA fp16", kind="q4", baseline=True),
            "mlxlm_q4": dict(label="mlx-lm quant SDPA q4", kind="q4", baseline=True),
        }

    def unavailable(self, key):
        if key.startswith("tq_") and self.tq is None:
            return "tqmetal not importable (" + (self.tq_error or "") + ")"
        if key == "mlxlm_q4" and self.mlxlm_qsdpa is None:
            return "mlx_lm not importable (" + (self.mlxlm_error or "") + ")"
        return None

    def make_fn(self, key, scale, mask):
        mx = self.mx
        if key == "tq_int4":
            tq = self.tq
            return lambda q, k, v: tq.sdpa_int4(q, k, v, scale=scale, mask=mask,
                                                group_size=GROUP, bits=4)
        if key == "tq_k8v4":
            tq = self.tq
            return lambda q, k, v: tq.sdpa_int4(q, k, v, scale=scale, mask=mask,
                                                group_size=GROUP, k_bits=8, v_bits=4)
        if key in ("sdpa_fp16", "sdpa_fp32"):
            return lambda q, k, v: mx.fast.scaled_dot_product_attention(
                q, k, v, scale=scale, mask=mask)
        if key == "deq_fp16":
            def f(q, k, v):
                kd = mx.dequantize(*k, group_size=GROUP, bits=4)
                vd = mx.dequantize(*v, group_size=GROUP, bits=4)
                return mx.fast.scaled_dot_product_attention(q, kd, vd, scale=scale, mask=mask)
            return f
        if key == "mlxlm_q4":
            qs = self.mlxlm_qsdpa
            # NB: it does `queries *= scale`; run_cell passes a fresh array object.
            return lambda q, k, v: qs(q, k, v, scale=scale, mask=mask,
                                      group_size=GROUP, bits=4)
        raise KeyError(key)

    def base_kv(self, N):
        """float16 K and V for one layer; every cache set of this shape derives from it."""
        mx = self.mx
        if getattr(self, "_base_n", None) != N:
            self._base = None
            k = mx.random.normal((B, H_KV, N, D)).astype(mx.float16)
            v = mx.random.normal((B, H_KV, N, D)).astype(mx.float16)
            mx.eval(k, v)
            self._base, self._base_n = (k, v), N
        return self._base

    def build_layers(self, kind, N, L):
        """Independent per-layer caches of total size >= cold_bytes (>= 2 layers)."""
        mx = self.mx
        qdtype = mx.float32 if kind == "fp32" else mx.float16
        kbits, vbits = {"q4": (4, 4), "k8v4": (8, 4)}.get(kind, (None, None))
        t0 = time.perf_counter()
        k16, v16 = self.base_kv(N)
        if kbits is None:
            kb, vb = k16.astype(qdtype), v16.astype(qdtype)
        else:
            kb = tuple(mx.quantize(k16, GROUP, kbits))
            vb = tuple(mx.quantize(v16, GROUP, vbits))
        mx.eval(kb, vb)

        def nbytes(c):
            return sum(a.nbytes for a in c) if isinstance(c, tuple) else c.nbytes

        layer_bytes = nbytes(kb) + nbytes(vb)
        n_layers = max(2, math.ceil(self.cold_bytes / layer_bytes))
        utype = {2: mx.uint16, 4: mx.uint32}

        def flip(a, i):
            # a distinct buffer with slightly different contents: xor low bits
            # (for floats: the lowest mantissa bits, so no inf/nan is created)
            if a.dtype == mx.uint32:
                return mx.bitwise_xor(a, mx.array((i * 0x9E3779B9) & 0xFFFFFFFF, mx.uint32))
            ut = utype[a.dtype.size]
            return mx.view(mx.bitwise_xor(mx.view(a, ut), mx.array(i % 8, ut)), a.dtype)

        def variant(c, i):
            return tuple(flip(a, i) for a in c) if isinstance(c, tuple) else flip(c, i)

        layers = [(kb, vb)]
        for i in range(1, n_layers):
            lay = (variant(kb, i), variant(vb, i))
            mx.eval(lay)
            layers.append(lay)
        n_q = min(n_layers, 16)
        qs = [mx.random.normal((B, H_Q, L, D)).astype(qdtype) for _ in range(n_q)]
        mx.eval(qs)
        log(f"    built {n_layers} x {fmt_b(layer_bytes)} '{kind}' layer caches "
            f"({fmt_b(n_layers * layer_bytes)}) in {time.perf_counter() - t0:.1f} s")
        # cursor is shared by all methods using this set, so every cold call
        # touches the least recently used layer
        return {"layers": layers, "qs": qs, "layer_bytes": layer_bytes,
                "n_layers": n_layers, "cursor": 0}

    # ---------------------------------------------------------------- timing
    def min_reps(self, t):
        if self.quick:
            return 3 if t < 0.1 else (2 if t < 0.5 else 1)
        return 5 if t < 0.5 else (3 if t < 3.0 else 2)

    def run_cell(self, key, fn, cache, mode, slow_prev=None):
        """Time `fn` on a cache set.  mode 'cold': each call uses the next layer
        (cursor shared by all methods on this set); 'warm': the layer used last.
        Returns (stats dict, (layer index, output) of the first call)."""
        mx = self.mx
        layers, qs = cache["layers"], cache["qs"]
        nl, nq = len(layers), len(qs)
        copy_q = key == "mlxlm_q4"
        peak = {}
        first = []

        def call(measure_peak=False):
            if mode == "cold":
                i = cache["cursor"] % nl
                cache["cursor"] += 1
            else:
                i = cache["warm_layer"]
            k, v = layers[i]
            q = qs[i % nq]
            if copy_q:
                q = mx.array(q)  # new array object: `queries *= scale` must not touch ours
            if measure_peak:
                mx.reset_peak_memory()
                before = mx.get_active_memory()
            t0 = time.perf_counter()
            out = fn(q, k, v)
            mx.eval(out)
            dt = time.perf_counter() - t0
            if measure_peak:
                peak["extra_bytes"] = mx.get_peak_memory() - before
                peak["output_bytes"] = out.nbytes
            if not first:
                first.append((i, out))
            cache["last_layer"] = i
            return dt

        info = {}
        if mode == "warm" and slow_prev is not None and slow_prev >= self.warm_single_s:
            # slow, compute-bound method: the layer was just used by the cold run
            samples = [call(measure_peak=True)]
            info["note"] = "single call on the layer just used (no separate warm-up)"
            info["warmup_calls"] = 0
        else:
            t_first = call(measure_peak=True)
            if t_first >= self.single_shot_s:
                samples = [t_first]
                info["note"] = "single call (first call used as the sample)"
                info["warmup_calls"] = 0
            else:
                nwarm = 1
                if t_first < 0.2:
                    for _ in range(2):
                        call()
                        nwarm += 1
                budget = self.budget_cold if mode == "cold" else self.budget_warm
                reps = max(self.min_reps(t_first), min(self.max_reps, int(budget / t_first)))
                samples = [call() for _ in range(reps - 1)]
                samples.append(call(measure_peak=True))
                info["warmup_calls"] = nwarm
        info.update(stats(samples))
        info["times_s"] = samples
        info.update(peak)
        return info, first[0]

    # ---------------------------------------------------------------- driver
    def estimate(self, key, phase, L, N):
        """Seconds per call, extrapolated linearly in L*N from the last measurement
        (for the first prefill shape: from decode, i.e. L x a decode call)."""
        pu = self.per_unit.get((key, phase))
        if pu is None and phase == "prefill":
            pu = self.per_unit.get((key, "decode"))
        return None if pu is None else pu * L * N

    def run_shape(self, phase, L, N):
        mx = self.mx
        scale = 1.0 / math.sqrt(D)
        mask = None if phase == "decode" else "causal"
        minfo = self.method_info()
        log(f"== {phase} L={L} N={N}")
        by_kind = {}
        for key in self.methods:
            by_kind.setdefault(minfo[key]["kind"], []).append(key)
        kind_order = [k for k in ["q4", "k8v4", "fp16", "fp32"] if k in by_kind]
        # estimates of the baselines: the fastest one (and any within 20% of it)
        # is timed even above the limit (up to 4x), so the speedup against the
        # best baseline is always a measured one
        base_est = [e for e in (self.estimate(k, phase, L, N) for k in self.methods
                                if minfo[k]["baseline"] and self.unavailable(k) is None)
                    if e is not None]
        best_est = min(base_est) if base_est else None
        forced = {}
        for kind in kind_order:
            runnable = []
            for key in by_kind[kind]:
                why = self.unavailable(key)
                est = self.estimate(key, phase, L, N)
                if why is None and est is not None and est > self.max_call_s:
                    near_best = (minfo[key]["baseline"] and est <= 1.2 * best_est
                                 and est <= 4 * self.max_call_s)
                    if not near_best:
                        why = (f"skipped: est. {est:.0f} s/call > {self.max_call_s:g} s "
                               f"limit")
                    else:
                        forced[key] = est
                if why is not None:
                    self.records.append(dict(phase=phase, L=L, N=N, method=key,
                                             label=minfo[key]["label"], mode="cold",
                                             skipped=why, est_call_s=est))
                    log(f"  {key}: {why}")
                else:
                    runnable.append(key)
            if not runnable:
                continue
            cache = self.build_layers(kind, N, L)
            firsts = {}
            for key in runnable:
                fn = self.make_fn(key, scale, mask)
                modes = ["cold"] + (["warm"] if phase == "decode" and not self.args.no_warm else [])
                slow = None
                for mode in modes:
                    cache["warm_layer"] = cache.get("last_layer", 0)
                    log(f"  {key} {mode} ...")
                    t0 = time.perf_counter()
                    info, first = self.run_cell(key, fn, cache, mode, slow_prev=slow)
                    if mode == "cold":
                        slow = info["median_s"]
                        self.per_unit[(key, phase)] = info["median_s"] / (L * N)
                        firsts[key] = first
                    rec = dict(phase=phase, L=L, N=N, method=key, label=minfo[key]["label"],
                               mode=mode, cache_kind=kind, layer_bytes=cache["layer_bytes"],
                               n_layers=(cache["n_layers"] if mode == "cold" else 1),
                               cycled_bytes=(cache["n_layers"] * cache["layer_bytes"]
                                             if mode == "cold" else cache["layer_bytes"]),
                               layer_exceeds_l3=cache["layer_bytes"] > self.l3, **info)
                    if key in forced and mode == "cold":
                        rec["note"] = "; ".join(x for x in [rec.get("note"), (
                            f"timed although est. {forced[key]:.0f} s > limit "
                            f"(fastest baseline here)")] if x)
                    rec["eff_gbps"] = cache["layer_bytes"] / rec["median_s"] / 1e9
                    rec["frac_of_measured_bw"] = rec["eff_gbps"] / self.bw["gbps"]
                    if "extra_bytes" in rec:
                        rec["extra_frac_of_cache"] = rec["extra_bytes"] / cache["layer_bytes"]
                    self.records.append(rec)
                    log(f"    {fmt_t(rec['median_s'])} median of {rec['n']} "
                        f"[{fmt_t(rec['min_s'])} .. {fmt_t(rec['max_s'])}] "
                        f"({time.perf_counter() - t0:.1f} s)")
            # correctness checks (untimed)
            if "tq_int4" in firsts and "deq_fp16" in firsts:
                i, ref = firsts["deq_fp16"]
                k, v = cache["layers"][i]
                out = self.make_fn("tq_int4", scale, mask)(cache["qs"][i % len(cache["qs"])], k, v)
                self._check(phase, L, N, "tq_int4", f"deq_fp16 (layer {i})", out, ref)
            if "tq_k8v4" in firsts and (phase, N) == ("decode", min(self.decode_ns)):
                i, out = firsts["tq_k8v4"]
                k, v = cache["layers"][i]
                ref = mx.fast.scaled_dot_product_attention(
                    cache["qs"][i % len(cache["qs"])],
                    mx.dequantize(*k, group_size=GROUP, bits=8),
                    mx.dequantize(*v, group_size=GROUP, bits=4), scale=scale, mask=mask)
                self._check(phase, L, N, "tq_k8v4", "dequant(K8,V4)+SDPA fp16", out, ref)
            del cache, firsts
            mx.clear_cache()
        self._base = self._base_n = None
        mx.clear_cache()

    def _check(self, phase, L, N, key, against, out, ref):
        mx = self.mx
        o, r = out.astype(mx.float32), ref.astype(mx.float32)
        err = mx.abs(o - r).max().item()
        ref_max = mx.abs(r).max().item()
        ok = bool(err <= 2e-2 * max(ref_max, 1e-3) + 2e-3) and out.shape == ref.shape
        c = dict(phase=phase, L=L, N=N, method=key, against=against,
                 max_abs_err=err, ref_max_abs=ref_max, shape_ok=out.shape == ref.shape,
                 dtype=str(out.dtype), ok=ok)
        self.checks.append(c)
        log(f"  check {key} vs {against}: max|err|={err:.3g} (ref max {ref_max:.3g}) "
            f"{'ok' if ok else 'MISMATCH'}")

    def run(self):
        mx = self.mx
        t_start = time.perf_counter()
        self.load_start = os.getloadavg()
        self.openblas = {
            "requested": self.args.openblas,
            "ld_preload": os.environ.get("LD_PRELOAD"),
            "mapped": mapped_libs("openblas"),
            "cblas_sgemm_from": cblas_sgemm_provider(),
        }
        self.openblas["active"] = bool(self.openblas["mapped"]) and \
            "openblas" in (self.openblas["cblas_sgemm_from"] or "")
        # fp32 matmul throughput: shows whether a fast BLAS is in use
        a = mx.random.normal((512, 512))
        mx.eval(a @ a)
        t0 = time.perf_counter()
        mx.eval(a @ a)
        dt = time.perf_counter() - t0
        self.openblas["fp32_matmul_512_gflops"] = 2 * 512 ** 3 / dt / 1e9
        log(f"machine: {self.machine.get('cpu_model')}, {self.machine.get('logical_cpus')} cpus, "
            f"L3 {fmt_b(self.machine.get('l3_bytes'))}; load {self.load_start}")
        log(f"tqmetal: {'available' if self.tq else self.tq_error}; "
            f"mlx-lm: {'available' if self.mlxlm_qsdpa else self.mlxlm_error}; "
            f"openblas active: {self.openblas['active']}")
        log("measuring read bandwidth ...")
        self.bw = measure_bandwidth(self.args.bw_gb or (1.1 if self.quick else 2.15))
        log(f"  {self.bw['gbps']:.1f} GB/s (1 thread {self.bw['gbps_1t']:.1f}, "
            f"2 threads {self.bw['gbps_2t']:.1f})")
        for N in self.decode_ns:
            self.run_shape("decode", 1, N)
        for L, N in self.prefills:
            self.run_shape("prefill", L, N)
        log("measuring read bandwidth again ...")
        bw_end = measure_bandwidth(self.args.bw_gb or (1.1 if self.quick else 2.15))
        self.bw["gbps_start"] = self.bw["gbps"]
        self.bw["gbps_end"] = bw_end["gbps"]
        self.bw["end"] = bw_end
        log(f"  {bw_end['gbps']:.1f} GB/s")
        self.load_end = os.getloadavg()
        self.elapsed = time.perf_counter() - t_start

    # ---------------------------------------------------------------- output
    def speedups(self):
        res = []
        shapes = []
        for r in self.records:
            s = (r["phase"], r["L"], r["N"])
            if s not in shapes:
                shapes.append(s)
        for phase, L, N in shapes:
            for mode in ("cold", "warm"):
                recs = {r["method"]: r for r in self.records
                        if (r["phase"], r["L"], r["N"], r["mode"]) == (phase, L, N, mode)
                        and "median_s" in r}
                base = {k: r for k, r in recs.items() if self.method_info()[k]["baseline"]}
                for tk in ("tq_int4", "tq_k8v4"):
                    if tk not in recs:
                        continue
                    t = recs[tk]["median_s"]
                    vs = {k: base[k]["median_s"] / t for k in METHOD_KEYS if k in base}
                    best = min(base, key=lambda k: base[k]["median_s"]) if base else None
                    res.append(dict(phase=phase, L=L, N=N, mode=mode, method=tk,
                                    median_s=t, vs=vs, best_baseline=best,
                                    vs_best=(base[best]["median_s"] / t) if best else None))
        return res

    def report_lines(self):
        m = self.machine
        lines = []
        P = lines.append
        P("tqmetal sdpa_int4 benchmark (MLX CPU backend)")
        P(f"date: {self.date}   elapsed: {self.elapsed:.0f} s   mode: "
          f"{'quick' if self.quick else 'full'}")
        P(f"cpu: {m.get('cpu_model')} | {m.get('logical_cpus')} logical cpus "
          f"({m.get('lscpu_cores_per_socket', '?')} cores/socket, "
          f"{m.get('lscpu_threads_per_core', '?')} thr/core) | "
          f"L2 {m.get('lscpu_l2_cache', '?')} | L3 {(m.get('l3_bytes') or 0) / 2**20:.0f} MiB | "
          f"RAM {fmt_b(m.get('mem_total_bytes'))} | {m.get('lscpu_hypervisor_vendor', 'bare metal?')}"
          f" hypervisor")
        v = self.versions
        ext = v.get("tqmetal_ext") or []
        built = f" (ext built {ext[0]['mtime']})" if ext else ""
        P(f"versions: mlx {v['mlx']} (mlx-cpu {v.get('mlx-cpu')}), numpy {v['numpy']}, "
          f"mlx-lm {v.get('mlx-lm')}, tqmetal {v.get('tqmetal') or v.get('tqmetal_module')}"
          f"{built}, CPU kernel {v.get('tqmetal_cpu_isa')}")
        ob = self.openblas
        P(f"BLAS: openblas preload {'ON (' + str(ob['requested']) + ')' if ob['active'] else 'off'}; "
          f"cblas_sgemm from {ob['cblas_sgemm_from'] or 'bundled reference BLAS (local scope)'}; "
          f"fp32 512^3 matmul {ob['fp32_matmul_512_gflops']:.1f} GFLOP/s")
        bw = self.bw
        P(f"measured read bandwidth: {bw['gbps']:.1f} GB/s  (numpy float64 sum over "
          f"{fmt_b(bw['array_bytes'])}: 1 thread {bw['gbps_1t']:.1f}, 2 threads "
          f"{bw['gbps_2t']:.1f} GB/s, best of {bw['repeats']}; %BW below uses this; "
          f"re-measured at the end: {bw.get('gbps_end', float('nan')):.1f} GB/s)")
        ncpu = m.get("logical_cpus") or 1
        busy = max(self.load_start[0], self.load_end[0]) > 0.5 * ncpu
        P(f"load average at start {self.load_start[0]:.2f}, at end {self.load_end[0]:.2f}"
          + ("  ** machine was busy with other work: timings are noisy/pessimistic **"
             if busy else ""))
        P(f"shapes: B={B} H_q={H_Q} H_kv={H_KV} D={D}; group_size={GROUP}; q float16 "
          f"(float32 for sdpa_fp32); prefill mask = causal (bottom-right)")
        P(f"cold = cycle through >= {fmt_b(self.cold_bytes)} of per-layer caches "
          f"(>= 2 layers), next layer each call; warm = one layer repeatedly")
        P("times: median [min .. max] (n samples) after warm-up; eff GB/s = bytes of the "
          "method's own per-layer K+V cache / median; extra mem = peak active memory during "
          "a call minus memory live before it (temporaries + output), also as x cache bytes")
        P("")
        shapes = []
        for r in self.records:
            s = (r["phase"], r["L"], r["N"])
            if s not in shapes:
                shapes.append(s)
        hdr = (f"  {'method':<22} {'mode':<5} {'median':>9} {'[min .. max]':>23} {'n':>3} "
               f"{'cache/layer':>11} {'eff GB/s':>8} {'%BW':>5} {'extra mem':>10} {'x cache':>7}")
        for phase, L, N in shapes:
            recs = [r for r in self.records if (r["phase"], r["L"], r["N"]) == (phase, L, N)]
            P(f"== {phase}: L={L} N={N}" + ("  causal" if phase == "prefill" else ""))
            P(hdr)
            order = {k: i for i, k in enumerate(METHOD_KEYS)}
            recs.sort(key=lambda r: (order[r["method"]], r["mode"]))
            for r in recs:
                if "skipped" in r:
                    P(f"  {r['label']:<22} {'-':<5} {r['skipped']}")
                    continue
                mode = r["mode"]
                if mode == "warm" and r.get("layer_exceeds_l3"):
                    mode = "warm*"
                rng = f"[{fmt_t(r['min_s'])} .. {fmt_t(r['max_s'])}]"
                pct = f"{100 * r['frac_of_measured_bw']:.0f}%" if "frac_of_measured_bw" in r else "-"
                xc = f"{r['extra_frac_of_cache']:.2f}" if "extra_frac_of_cache" in r else "-"
                P(f"  {r['label']:<22} {mode:<5} {fmt_t(r['median_s']):>9} {rng:>23} "
                  f"{r['n']:>3} {fmt_b(r['layer_bytes']):>11} {r['eff_gbps']:>8.2f} {pct:>5} "
                  f"{fmt_b(r.get('extra_bytes')):>10} {xc:>7}")
            notes = sorted({r['note'] for r in recs if r.get('note')})
            for nt in notes:
                who = ", ".join(f"{r['method']}/{r['mode']}" for r in recs if r.get("note") == nt)
                P(f"    note: {who}: {nt}")
            if any(r.get("layer_exceeds_l3") and r["mode"] == "warm" for r in recs):
                P("    warm*: one layer's cache is larger than L3, so 'warm' is not cache-resident")
            for s in self.speedup_list:
                if (s["phase"], s["L"], s["N"]) != (phase, L, N):
                    continue
                parts = ", ".join(f"{k} {x:.1f}x" for k, x in s["vs"].items())
                best = (f"; vs best baseline ({s['best_baseline']}) {s['vs_best']:.1f}x"
                        if s["best_baseline"] else "; no baseline timed")
                P(f"  speedup {s['method']} ({s['mode']}): {parts}{best}")
            for c in self.checks:
                if (c["phase"], c["L"], c["N"]) == (phase, L, N):
                    P(f"  check {c['method']} vs {c['against']}: max|err| {c['max_abs_err']:.3g} "
                      f"(|ref| max {c['ref_max_abs']:.3g}) {'ok' if c['ok'] else 'MISMATCH'}")
            P("")
        # summary
        P("summary (cold, median): tqmetal int4 vs best baseline")
        P(f"  {'shape':<22} {'tq_int4':>10} {'eff GB/s':>8} {'%BW':>5} "
          f"{'best baseline':>24} {'speedup':>8}")
        for s in self.speedup_list:
            if s["method"] != "tq_int4" or s["mode"] != "cold":
                continue
            r = next(r for r in self.records if (r["phase"], r["L"], r["N"], r["method"],
                                                 r["mode"]) == (s["phase"], s["L"], s["N"],
                                                                "tq_int4", "cold"))
            bb = next((x for x in self.records if (x["phase"], x["L"], x["N"], x["method"],
                                                   x["mode"]) == (s["phase"], s["L"], s["N"],
                                                                  s["best_baseline"], "cold")),
                      None)
            bbs = f"{s['best_baseline']} {fmt_t(bb['median_s'])}" if bb else "-"
            sp = f"{s['vs_best']:.1f}x" if s["vs_best"] else "-"
            pct = f"{100 * r['frac_of_measured_bw']:.0f}%" if "frac_of_measured_bw" in r else "-"
            P(f"  {s['phase'] + ' L=' + str(s['L']) + ' N=' + str(s['N']):<22} "
              f"{fmt_t(r['median_s']):>10} {r['eff_gbps']:>8.2f} {pct:>5} {bbs:>24} {sp:>8}")
        if self.tq is None:
            P(f"  (tqmetal unavailable: {self.tq_error})")
        bad = [c for c in self.checks if not c["ok"]]
        if bad:
            P(f"WARNING: {len(bad)} correctness check(s) failed, see 'checks' in the JSON")
        return lines

    def finish(self):
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.speedup_list = self.speedups()
        lines = self.report_lines()
        text = "\n".join(lines) + "\n"
        sys.stdout.write(text)
        sys.stdout.flush()
        if self.args.txt:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.txt)), exist_ok=True)
            with open(self.args.txt, "w") as f:
                f.write(text)
        if self.args.json:
            mach = dict(self.machine)
            mach["measured_read_bandwidth_gbps"] = self.bw["gbps"]
            doc = {
                "benchmark": "tqmetal.sdpa_int4 vs MLX baselines (CPU)",
                "date": self.date,
                "argv": sys.argv[1:],
                "quick": self.quick,
                "elapsed_s": self.elapsed,
                "machine": mach,
                "load_avg_start": self.load_start,
                "load_avg_end": self.load_end,
                "versions": self.versions,
                "openblas": self.openblas,
                "bandwidth": self.bw,
                "config": {
                    "B": B, "H_q": H_Q, "H_kv": H_KV, "D": D, "group_size": GROUP,
                    "decode_N": self.decode_ns, "prefill_LxN": self.prefills,
                    "methods": self.methods, "cold_bytes_target": self.cold_bytes,
                    "max_call_s": self.max_call_s, "single_shot_s": self.single_shot_s,
                    "warm_single_s": self.warm_single_s,
                    "budget_cold_s": self.budget_cold, "budget_warm_s": self.budget_warm,
                    "max_reps": self.max_reps,
                },
                "method_labels": {k: v["label"] for k, v in self.method_info().items()},
                "results": self.records,
                "speedups": self.speedup_list,
                "checks": self.checks,
                "report_text": lines,
            }
            os.makedirs(os.path.dirname(os.path.abspath(self.args.json)), exist_ok=True)
            with open(self.args.json, "w") as f:
                json.dump(doc, f, indent=1, default=str)
            log(f"wrote {self.args.json}")


def main(argv=None):
    args = parse_args(argv)
    maybe_reexec_with_openblas(args)
    bench = Bench(args)
    bench.run()
    bench.finish()


if __name__ == "__main__":
    main()
