"""MLX's unmodified steel attention (tiled prefill, simdgroup_matrix 8x8 MMA) from the installed mlx package."""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)

MLX_INC = T.mlx_include()
pytestmark = pytest.mark.skipif(not MLX_INC, reason="mlx Metal kernel headers not found (pip install mlx / MLX_INCLUDE)")

ATTN_PARAMS = np.dtype([(n, np.int32) for n in ["B", "H", "D", "qL", "kL", "gqa_factor"]] + [("scale", np.float32)] +
                       [(n, np.int32) for n in ["NQ", "NK", "NQ_aligned", "NK_aligned", "qL_rem", "kL_rem", "qL_off"]] +
                       [(n, np.int64, (3,)) for n in ["Q_strides", "K_strides", "V_strides", "O_strides"]])


@pytest.fixture(scope="module")
def lib():
    return T.compile_kernel("mlx_steel_attn.metal", include_dirs=[MLX_INC])


@pytest.mark.parametrize("order", T.orders())
@pytest.mark.parametrize("name,dtype,BQ,BK,D,tol", [
    ("steel_attention_float32_bq32_bk32_bd64_wm4_wn1_maskbool", np.float32, 32, 32, 64, 2e-5),
    ("steel_attention_float16_bq32_bk16_bd128_wm4_wn1_maskbool", np.float16, 32, 16, 128, 3e-3)])
@pytest.mark.parametrize("causal", [False, True])
def test_steel_attention(lib, name, dtype, BQ, BK, D, tol, causal, order):
    rng = np.random.default_rng(20)
    B, H, Hkv, qL, kL = 1, 4, 2, 45, 70          # ragged: exercises align_Q = align_K = False
    q = rng.standard_normal((B, H, qL, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, kL, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, kL, D)).astype(dtype)
    o = np.zeros_like(q)
    p = np.zeros((), ATTN_PARAMS)
    p["B"], p["H"], p["D"], p["qL"], p["kL"], p["gqa_factor"], p["scale"] = B, H, D, qL, kL, H // Hkv, D ** -0.5
    p["NQ"], p["NK"] = -(-qL // BQ), -(-kL // BK)
    p["NQ_aligned"], p["NK_aligned"], p["qL_rem"], p["kL_rem"] = qL // BQ, kL // BK, qL % BQ, kL % BK
    p["qL_off"] = kL - qL
    p["Q_strides"] = p["O_strides"] = (H * qL * D, qL * D, D)
    p["K_strides"] = p["V_strides"] = (Hkv * kL * D, kL * D, D)
    fc = {200: qL % BQ == 0, 201: kL % BK == 0, 300: False, 301: causal, 302: False, 303: False}
    st = lib.dispatch(name, buffers={0: q, 1: k, 2: v, 3: o, 4: p}, function_constants=fc,
                      threadgroups=(int(p["NQ"]), H, B), threads_per_threadgroup=(32, 4, 1), order=order)
    ref = T.sdpa_ref(q[0], k[0], v[0], D ** -0.5, H // Hkv, causal)
    np.testing.assert_allclose(o[0].astype(np.float32), ref, rtol=tol, atol=tol)
    assert st.partial_collectives == 0 and st.races == 0
