"""Runs MLX's *unmodified* sdpa_vector.h (+ utils.h, bf16*.h, complex.h, ...) from the installed mlx package."""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)

MLX_INC = T.mlx_include()
pytestmark = pytest.mark.skipif(not MLX_INC, reason="mlx Metal kernel headers not found (pip install mlx / MLX_INCLUDE)")


@pytest.fixture(scope="module")
def lib():
    return T.compile_kernel("mlx_sdpa.metal", include_dirs=[MLX_INC])


def fcs(**kw):
    base = dict(has_mask=False, query_transposed=False, do_causal=False, bool_mask=False, float_mask=False, has_sinks=False)
    base.update(kw)
    idx = dict(has_mask=20, query_transposed=21, do_causal=22, bool_mask=23, float_mask=24, has_sinks=25, blocks=26)
    return {idx[k]: v for k, v in base.items()}


def run_1pass(lib, name, q, k, v, scale, causal=False, bmask=None, store=np.float32, order="forward"):
    Hq, Lq, D = q.shape
    Hkv, N, _ = k.shape
    out = np.zeros((Hq, Lq, v.shape[2]), store)
    bufs = {0: q, 1: k, 2: v, 3: out, 4: np.int32(Hq // Hkv), 5: np.int32(N),
            6: np.uint64(N * D), 7: np.uint64(D), 8: np.uint64(N * D), 9: np.uint64(D), 10: np.float32(scale)}
    kw = {}
    if bmask is not None:  # bmask: [Hq, Lq, N] bool
        bufs.update({11: bmask, 13: np.int32(1), 14: np.int32(N), 15: np.int32(Lq * N)})
        kw = dict(has_mask=True, bool_mask=True)
    st = lib.dispatch(name, buffers=bufs, function_constants=fcs(do_causal=causal, **kw),
                      threadgroups=(Hq, Lq, 1), threads_per_threadgroup=(1024, 1, 1), order=order)
    return out, st


@pytest.mark.parametrize("order", T.orders())
@pytest.mark.parametrize("causal,Lq", [(False, 1), (True, 4)])
def test_mlx_sdpa_vector_float(lib, causal, Lq, order):
    rng = np.random.default_rng(10)
    Hq, Hkv, N, D = 4, 2, 100, 64
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(Hq, Lq, D), (Hkv, N, D), (Hkv, N, D)])
    out, st = run_1pass(lib, "sdpa_vector_float_64_64", q, k, v, D ** -0.5, causal, order=order)
    np.testing.assert_allclose(out, T.sdpa_ref(q, k, v, D ** -0.5, 2, causal), rtol=1e-5, atol=1e-5)
    assert st.partial_collectives == 0 and st.races == 0


@pytest.mark.parametrize("order", T.orders())
def test_mlx_sdpa_vector_bool_mask(lib, order):
    rng = np.random.default_rng(11)
    Hq, Hkv, N, D, Lq = 2, 1, 70, 64, 2
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(Hq, Lq, D), (Hkv, N, D), (Hkv, N, D)])
    m = rng.random((Hq, Lq, N)) < 0.7
    m[..., 0] = True
    out, _ = run_1pass(lib, "sdpa_vector_float_64_64", q, k, v, 0.125, bmask=m, order=order)
    ref = np.zeros_like(out, dtype=np.float64)
    for h in range(Hq):
        s = 0.125 * q[h].astype(np.float64) @ k[0].T.astype(np.float64)
        s = np.where(m[h], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref[h] = p @ v[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", T.orders())
def test_mlx_sdpa_vector_half(lib, order):
    rng = np.random.default_rng(12)
    Hq, Hkv, N, D = 2, 2, 129, 128
    q, k, v = (rng.standard_normal(s).astype(np.float16) for s in [(Hq, 1, D), (Hkv, N, D), (Hkv, N, D)])
    out, _ = run_1pass(lib, "sdpa_vector_float16_t_128_128", q, k, v, D ** -0.5, store=np.float16, order=order)
    np.testing.assert_allclose(out.astype(np.float32), T.sdpa_ref(q, k, v, D ** -0.5, 1), rtol=3e-3, atol=3e-3)


@pytest.mark.parametrize("order", T.orders())
def test_mlx_sdpa_vector_bfloat16(lib, order):
    rng = np.random.default_rng(13)
    Hq, Hkv, N, D = 2, 1, 64, 128
    qf, kf, vf = (rng.standard_normal(s).astype(np.float32) for s in [(Hq, 1, D), (Hkv, N, D), (Hkv, N, D)])
    q, k, v = T.to_bf16(qf), T.to_bf16(kf), T.to_bf16(vf)
    out, _ = run_1pass(lib, "sdpa_vector_bfloat16_t_128_128", q, k, v, D ** -0.5, store=np.uint16, order=order)
    ref = T.sdpa_ref(T.from_bf16(q), T.from_bf16(k), T.from_bf16(v), D ** -0.5, 2)
    np.testing.assert_allclose(T.from_bf16(out), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("order", T.orders())
def test_mlx_sdpa_vector_2pass_float(lib, order):
    rng = np.random.default_rng(14)
    Hq, Hkv, N, D, blocks = 4, 2, 300, 64, 64
    gqa = Hq // Hkv
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(Hq, 1, D), (Hkv, N, D), (Hkv, N, D)])
    partials = np.zeros((Hq, 1, blocks, D), np.float32)
    sums = np.zeros((Hq, 1, blocks), np.float32)
    maxs = np.zeros((Hq, 1, blocks), np.float32)
    fc = fcs()
    fc[26] = blocks
    lib.dispatch("sdpa_vector_2pass_1_float_64_64",
                 buffers={0: q, 1: k, 2: v, 3: partials, 4: sums, 5: maxs, 7: np.int32(N),
                          8: np.uint64(N * D), 9: np.uint64(D), 10: np.uint64(N * D), 11: np.uint64(D),
                          12: np.float32(D ** -0.5)},
                 function_constants=fc, threadgroups=(Hkv, 1, blocks), threads_per_threadgroup=(32, gqa, 1), order=order)
    out = np.zeros((Hq, 1, D), np.float32)
    lib.dispatch("sdpa_vector_2pass_2_float_64",
                 buffers={0: partials, 1: sums, 2: maxs, 3: out, 4: np.int32(blocks)},
                 function_constants=fc, threadgroups=(Hq, 1, 1), threads_per_threadgroup=(1024, 1, 1), order=order)
    np.testing.assert_allclose(out, T.sdpa_ref(q, k, v, D ** -0.5, gqa), rtol=1e-5, atol=1e-5)
