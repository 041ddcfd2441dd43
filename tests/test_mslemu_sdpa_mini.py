"""Miniature sdpa_vector (float/half) and an int4-KV decode kernel (tests/emu_kernels/sdpa_mini.metal)."""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mslemu  # noqa: E402
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)


@pytest.fixture(scope="module")
def lib():
    return T.compile_kernel("sdpa_mini.metal")


@pytest.mark.parametrize("order", T.orders())
@pytest.mark.parametrize("causal,Lq", [(False, 1), (True, 3)])
def test_sdpa_vector_mini_float(lib, causal, Lq, order):
    rng = np.random.default_rng(1)
    Hq, Hkv, N, D = 4, 2, 77, 64
    q = rng.standard_normal((Hq, Lq, D)).astype(np.float32)
    k = rng.standard_normal((Hkv, N, D)).astype(np.float32)
    v = rng.standard_normal((Hkv, N, D)).astype(np.float32)
    out = np.zeros((Hq, Lq, D), np.float32)
    scale = 1 / np.sqrt(D)
    lib.dispatch("sdpa_vector_mini_float_64",
                 buffers={0: q, 1: k, 2: v, 3: out, 4: np.int32(Hq // Hkv), 5: np.int32(N),
                          6: np.uint64(N * D), 7: np.uint64(D), 10: np.float32(scale)},
                 function_constants={22: causal, 30: False},
                 threadgroups=(Hq, Lq, 1), threads_per_threadgroup=(1024, 1, 1), order=order)
    np.testing.assert_allclose(out, T.sdpa_ref(q, k, v, scale, Hq // Hkv, causal), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("order", T.orders())
def test_sdpa_vector_mini_half(lib, order):
    rng = np.random.default_rng(2)
    Hq, Hkv, N, D = 2, 1, 200, 128
    q = rng.standard_normal((Hq, 1, D)).astype(np.float16)
    k = rng.standard_normal((Hkv, N, D)).astype(np.float16)
    v = rng.standard_normal((Hkv, N, D)).astype(np.float16)
    out = np.zeros((Hq, 1, D), np.float16)
    scale = 1 / np.sqrt(D)
    lib.dispatch("sdpa_vector_mini_half_128",
                 buffers={0: q, 1: k, 2: v, 3: out, 4: np.int32(2), 5: np.int32(N),
                          6: np.uint64(N * D), 7: np.uint64(D), 10: np.float32(scale)},
                 function_constants={22: False, 30: False}, threadgroups=(Hq, 1, 1),
                 threads_per_threadgroup=(1024, 1, 1), order=order)
    np.testing.assert_allclose(out.astype(np.float32), T.sdpa_ref(q, k, v, scale, 2), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("order", T.orders())
def test_sdpa_int4_kv(lib, order):
    bufs, ref = T.int4_case()
    lib.dispatch("sdpa_int4_half_128_g32", buffers=bufs, threadgroups=(8, 1, 1), threads_per_threadgroup=(1024, 1, 1),
                 order=order, seed=7)
    np.testing.assert_allclose(bufs[7].astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def _war_case():
    rng = np.random.default_rng(5)
    Hq, N, D = 1, 64, 128
    q, k, v = (rng.standard_normal(s).astype(np.float16) for s in [(Hq, 1, D), (1, N, D), (1, N, D)])
    bufs = lambda out: {0: q, 1: k, 2: v, 3: out, 4: np.int32(1), 5: np.int32(N), 6: np.uint64(N * D),
                        7: np.uint64(D), 10: np.float32(D ** -0.5)}
    return bufs, T.sdpa_ref(q, k, v, D ** -0.5, 1)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_missing_war_barrier_breaks_results(lib, order):
    """Drop the 2nd barrier of the output-transpose loop: simdgroups that run ahead overwrite `outputs`
    (race detector off: the schedule alone exposes it)."""
    bufs, ref = _war_case()
    ok, bad = np.zeros((1, 1, 128), np.float16), np.zeros((1, 1, 128), np.float16)
    kw = dict(threadgroups=(1, 1, 1), threads_per_threadgroup=(1024, 1, 1), order=order, racecheck=False)
    lib.dispatch("sdpa_vector_mini_half_128", buffers=bufs(ok), function_constants={22: False, 30: False}, **kw)
    lib.dispatch("sdpa_vector_mini_half_128", buffers=bufs(bad), function_constants={22: False, 30: True}, **kw)
    np.testing.assert_allclose(ok.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    assert not np.allclose(bad.astype(np.float32), ref, rtol=2e-3, atol=2e-3)


@T.needs_instrumentation
@pytest.mark.parametrize("order", T.orders())
def test_missing_war_barrier_is_reported(lib, order):
    bufs, _ = _war_case()
    with pytest.raises(mslemu.RaceError, match=r"race on threadgroup `outputs` \(U\[BN \* BD\], 4096 B\)"):
        lib.dispatch("sdpa_vector_mini_half_128", buffers=bufs(np.zeros((1, 1, 128), np.float16)),
                     function_constants={22: False, 30: True}, threadgroups=(1, 1, 1),
                     threads_per_threadgroup=(1024, 1, 1), order=order)
