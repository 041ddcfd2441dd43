"""Helpers shared by tests/test_mslemu_*.py (paths, orders, modes, NumPy references)."""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

mslemu = sys.modules[__package__]  # this package, however it was imported

TESTS = Path(__file__).resolve().parent.parent
KERNELS = TESTS / "emu_kernels"
PROJECT_METAL = TESTS.parent / "metal"

# ---------------------------------------------------------------------------------------------- modes
FULL = os.environ.get("MSLEMU_FULL", "") not in ("", "0")
SANITIZE = os.environ.get("MSLEMU_SANITIZE", "")
ASAN = "address" in SANITIZE.split(",")
INSTRUMENTED = not ASAN and os.environ.get("MSLEMU_INSTRUMENT", "1") not in ("0", "off", "false")

# Default run: every kernel test runs under two complementary orders (simdgroups run ahead in reverse
# order / lockstep-like interleaving).  MSLEMU_FULL=1: all orders and several shuffle seeds.
# MSLEMU_ORDERS=forward,shuffle:3 overrides both.
DEFAULT_ORDERS = ["reverse", "interleave"]
ALL_ORDERS = ["forward", "reverse", "shuffle:1", "shuffle:2", "runahead:3", "runahead:4", "interleave"]


def orders():
    env = os.environ.get("MSLEMU_ORDERS")
    if env:
        return [o.strip() for o in env.split(",") if o.strip()]
    return ALL_ORDERS if FULL else DEFAULT_ORDERS


needs_instrumentation = pytest.mark.skipif(
    not INSTRUMENTED, reason="needs the instrumented build (not available with MSLEMU_SANITIZE=address / MSLEMU_INSTRUMENT=0)")
deliberate_ub = pytest.mark.skipif(
    bool(SANITIZE), reason="runs a deliberately out-of-bounds kernel (C++ UB): the sanitizer pass would abort on it")
full_only = pytest.mark.skipif(not FULL, reason="heavy variant: set MSLEMU_FULL=1 (tests/mslemu/run_full.sh)")


def compile_kernel(name, **kw):
    """Compile tests/emu_kernels/<name> with the race detector on (when the build can be instrumented)."""
    kw.setdefault("racecheck", INSTRUMENTED)
    return mslemu.compile(KERNELS / name, **kw)


# ---------------------------------------------------------------------------------------------- parallel builds
def _module_builds():
    """test module -> [(kernel file, compile kwargs)] it compiles (racecheck is not part of the key); the most
    expensive builds first."""
    mlx = mlx_include()
    return {
        "test_mslemu_mlx_steel_attention": [("mlx_steel_attn.metal", {"include_dirs": [mlx]})] if mlx else [],
        "test_mslemu_mlx_sdpa_vector": [("mlx_sdpa.metal", {"include_dirs": [mlx]})] if mlx else [],
        "test_mslemu_sdpa_mini": [("sdpa_mini.metal", {})],
        "test_mslemu_sgmm": [("sgmm.metal", {})],
        "test_mslemu_counters": [("counters.metal", {}), ("reduce.metal", {}), ("sdpa_mini.metal", {})],
        "test_mslemu_reduce": [("reduce.metal", {})],
        "test_mslemu_racecheck": [("races.metal", {})],
        "test_mslemu_guards": [("guards.metal", {})] + ([] if SANITIZE else [("guards.metal", {"instrument": False})]),
        "test_mslemu_orders": [("orders.metal", {})],
        "test_mslemu_build": [("reduce.metal", {})],
        # the project's own kernels, as embedded (tests/metal_sources.py; absolute paths: KERNELS / path is the path)
        "test_metal_decode": _project("sdpa_int4", mlx),
        "test_metal_prefill": _project("sdpa_int4_prefill", mlx),
        "test_metal_runtime": _project("sdpa_int4", mlx) + _project("sdpa_int4_prefill", mlx)
                              + _project("sdpa_int4_copy", mlx),
    }


def _project(stem, mlx):
    """A build of the project's metal/<stem>.metal exactly as metal_plan_testing compiles it."""
    if not mlx:
        return []
    from metal_sources import expanded
    return [(str(expanded(stem)), {"include_dirs": [mlx]})]


_prebuild_started = False


def start_prebuild(modules):
    """Compile the libraries the given test modules need on background threads (2 at a time), most
    expensive first.  Tests calling compile_kernel() for a library that is being built wait for it."""
    global _prebuild_started
    if _prebuild_started or os.environ.get("MSLEMU_PREBUILD", "1") in ("0", "off"):
        return
    _prebuild_started = True
    specs, seen = [], set()
    for mod, builds in _module_builds().items():
        if mod not in modules:
            continue
        for name, kw in builds:
            key = (name, repr(sorted(kw.items())))
            if key not in seen:
                seen.add(key)
                specs.append((name, kw))
    try:
        todo = [(n, kw) for n, kw in specs if not mslemu.plan(KERNELS / n, **kw).cached]
    except Exception:  # noqa: BLE001 -- a broken source: let the test report it
        return
    if len(todo) < 2:
        return
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)), thread_name_prefix="mslemu-build")
    for n, kw in todo:
        pool.submit(_quiet_compile, n, kw)
    pool.shutdown(wait=False)


def _quiet_compile(name, kw):
    try:
        mslemu.compile(KERNELS / name, **kw)
    except Exception:  # noqa: BLE001 -- the test that needs it compiles again and reports the error
        pass


@pytest.fixture(scope="session", autouse=True)
def mslemu_prebuild(request):
    """Session fixture (import it into test modules): parallel background builds for the collected modules."""
    mods = {getattr(getattr(item, "module", None), "__name__", "").rsplit(".", 1)[-1] for item in request.session.items}
    start_prebuild(mods)
    yield


def find_clang():
    for c in ("clang++-19", "clang++-18", "clang++-17", "clang++-16", "clang++-15", "clang++"):
        path = shutil.which(c)
        if path and _clang_works(c):
            return c
    return None


def _clang_works(c):
    """clang++ >= 15 is needed (std::source_location with libstdc++)."""
    try:
        return "clang" in mslemu.compiler_id(c).lower() and _major(c) >= 15
    except mslemu.KernelError:
        return False


def _major(c):
    m = re.search(r"version (\d+)", mslemu.compiler_id(c))
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------------------------------- MLX
def mlx_include():
    """Directory holding mlx/backend/metal/kernels/*.h of the installed mlx (mlx is a namespace package)."""
    env = os.environ.get("MLX_INCLUDE")
    if env:
        return env
    try:
        import mlx
    except ImportError:
        return ""
    for p in getattr(mlx, "__path__", []):
        inc = Path(p) / "include"
        if (inc / "mlx" / "backend" / "metal" / "kernels" / "sdpa_vector.h").is_file():
            return str(inc)
    return ""


# ---------------------------------------------------------------------------------------------- references
def sdpa_ref(q, k, v, scale, gqa, causal=False):
    """q: [Hq, Lq, D], k/v: [Hkv, N, D] -> [Hq, Lq, D] in float64."""
    Hq, Lq, D = q.shape
    N = k.shape[1]
    out = np.zeros((Hq, Lq, v.shape[2]))
    for h in range(Hq):
        kk, vv = k[h // gqa].astype(np.float64), v[h // gqa].astype(np.float64)
        s = scale * q[h].astype(np.float64) @ kk.T
        if causal:
            s = np.where(np.arange(N)[None, :] <= (N - Lq + np.arange(Lq))[:, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[h] = (p / p.sum(-1, keepdims=True)) @ vv
    return out


def quant_int4(x, group):
    """x: [..., D] -> packed uint8 [..., D/2] (low nibble = even element), scales, biases (fp16) [..., D/group]."""
    *lead, D = x.shape
    xg = x.reshape(*lead, D // group, group).astype(np.float32)
    lo, hi = xg.min(-1, keepdims=True), xg.max(-1, keepdims=True)
    scale = np.maximum((hi - lo) / 15, 1e-8).astype(np.float16)
    bias = lo.astype(np.float16)
    qv = np.clip(np.round((xg - bias.astype(np.float32)) / scale.astype(np.float32)), 0, 15).astype(np.uint8)
    qv = qv.reshape(*lead, D)
    packed = (qv[..., 0::2] | (qv[..., 1::2] << 4)).astype(np.uint8)
    deq = (qv.reshape(*lead, D // group, group) * scale.astype(np.float32) + bias.astype(np.float32)).reshape(*lead, D)
    return packed, scale[..., 0], bias[..., 0], deq


def to_bf16(x):
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def int4_case(seed=3, Hq=8, Hkv=2, N=300, D=128, G=32):
    """Buffers for sdpa_int4_half_128_g32 (tests/emu_kernels/sdpa_mini.metal) and the float64 reference."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((Hq, 1, D)).astype(np.float16)
    kf = rng.standard_normal((Hkv, N, D)).astype(np.float32)
    vf = rng.standard_normal((Hkv, N, D)).astype(np.float32)
    kp, ks, kb, kdq = quant_int4(kf, G)
    vp, vs, vb, vdq = quant_int4(vf, G)
    out = np.zeros((Hq, 1, D), np.float16)
    scale = 1 / np.sqrt(D)
    bufs = {0: q, 1: kp, 2: ks, 3: kb, 4: vp, 5: vs, 6: vb, 7: out,
            8: np.int32(Hq // Hkv), 9: np.int32(N), 10: np.float32(scale)}
    return bufs, sdpa_ref(q, kdq, vdq, scale, Hq // Hkv)
