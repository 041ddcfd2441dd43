"""The Metal path on a real GPU (Apple Silicon): tqmetal.sdpa_int4 with stream=mx.gpu against the float64
reference. Skipped where the build has no Metal kernels (Linux) or MLX sees no Metal device; the same plans
run under the MSL emulator in test_metal_decode.py / test_metal_prefill.py. CI: .github/workflows/macos.yml.
"""
import mlx.core as mx
import pytest

import reference as R
import tqmetal
from tqmetal import _ext

pytestmark = pytest.mark.skipif(
    not (_ext.has_metal_kernels() and mx.metal.is_available()),
    reason="needs a macOS build with the Metal kernels and a Metal device")

CASES = [
    # decode, 1 pass and split-K (N long enough for the automatic split)
    dict(Hq=8, Hkv=2, L=1, N=300, D=128, dtype="float16", mask="causal"),
    dict(Hq=32, Hkv=8, L=1, N=4096, T=17, D=128, dtype="bfloat16", sinks=True),
    dict(Hq=4, Hkv=1, L=2, N=1000, D=64, dtype="float32", k_bits=8, v_bits=4, mask="bool_B1LN"),
    # prefill (more than 32 rows per KV head, head dims 80/96, group 16)
    dict(Hq=8, Hkv=2, L=40, N=300, T=9, D=128, dtype="float16", mask="causal"),
    dict(Hq=2, Hkv=1, L=33, N=200, D=80, dtype="float16", group_size=16, mask="add_LN"),
    dict(Hq=3, Hkv=1, L=20, N=90, D=96, dtype="bfloat16", group_size=32, mask="bool_dead", sinks=True),
    dict(Hq=2, Hkv=1, L=70, N=64, D=256, dtype="float32", v_bits=8, mask="causal", strided=True),
    # fully masked causal rows (L > N + T)
    dict(Hq=1, Hkv=1, L=50, N=20, T=4, D=64, dtype="float16", mask="causal"),
]


@pytest.mark.parametrize("kw", CASES, ids=[str(i) for i in range(len(CASES))])
def test_gpu_matches_reference(kw):
    c = R.make_case(seed=7, **kw)
    out = tqmetal.sdpa_int4(c.q, c.k, c.v, **c.kwargs(), stream=mx.gpu)
    mx.eval(out)
    assert out.dtype == c.q.dtype and tuple(out.shape) == tuple(c.q.shape)
    R.check_close(out, c.reference(), c.tol(), context=repr(c))


def test_unsupported_head_dim_falls_back_to_cpu():
    """D = 48 (group 16): no Metal instance; the op runs on the CPU instead (documented fallback)."""
    assert "head dim" in _ext.metal_unsupported_reason(dict(Hq=2, Hkv=1, L=1, D=48, N=10, group_size=16))
    c = R.make_case(Hq=2, Hkv=1, L=3, N=40, D=48, dtype="float16", group_size=16, seed=1)
    out = tqmetal.sdpa_int4(c.q, c.k, c.v, **c.kwargs(), stream=mx.gpu)
    R.check_close(out, c.reference(), c.tol(), context=repr(c))


def test_default_stream_is_the_gpu():
    c = R.make_case(Hq=4, Hkv=2, L=1, N=100, D=64, dtype="float16", seed=2)
    out = tqmetal.sdpa_int4(c.q, c.k, c.v, **c.kwargs())
    R.check_close(out, c.reference(), c.tol(), context=repr(c))
