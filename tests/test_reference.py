"""The float64 reference (tests/reference.py) reproduces mx.fast.scaled_dot_product_attention
on non-finite and degenerate inputs element for element: the same NaN pattern, the same
infinities, finite values within mx.fast's own rounding (it computes in the input dtype).

mx.fast runs on the dequantized cache (mx.dequantize) + tails, in float32, so what is
compared is the semantics, not float16 rounding.  No tqmetal needed.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

import fuzz_cases as F
import reference as R


def mx_fast(c: R.Case):
    K, V = c.dequantized_mx()
    return mx.fast.scaled_dot_product_attention(c.q, K, V, scale=c.scale, mask=c.mask, sinks=c.sinks)


BASE = dict(B=2, Hq=4, Hkv=2, L=3, N=40, T=3, D=64, group_size=32, dtype="float32", seed=7)

# (mask kind, sinks, poison list) -- every target, every non-finite value
POISONS = []
for where, value in itertools.product(
    ["q", "k_scales", "k_biases", "k_tail", "mask", "sinks", "v_scales", "v_biases", "v_tail"],
    ["nan", "inf", "-inf"],
):
    masks = ["none", "causal", "bool_dead", "add_inf", "add_LN"]
    if where.startswith("v_"):
        masks = ["none", "add_LN"]  # values at zero-weight keys: MLX's paths disagree (see reference.py)
    if where == "mask":
        masks = ["add_LN", "add_inf", "add_dead"]
    for mask in masks:
        for sinks in (False, True):
            POISONS.append((mask, sinks, [[where, value, 1, 3, 2, 5]]))


@pytest.mark.parametrize("mask,sinks,poison", POISONS,
                         ids=[f"{p[0][0]}={p[0][1]}-{m}-{'sinks' if s else 'nosinks'}" for m, s, p in POISONS])
def test_nonfinite_matches_mx_fast(mask, sinks, poison):
    c = F.build({**BASE, "mask": mask, "sinks": sinks, "poison": poison})
    ref = c.reference()
    R.check_close(mx_fast(c), ref, R.tolerance_mx_fast(mx.float32), context=repr(c))
    if poison[0][1] == "nan" and poison[0][0] not in ("mask", "sinks") and mask != "bool_dead":
        assert not np.isfinite(ref).all(), "the poison should reach the output"


SINK_EDGES = [
    # (mask kind, sink value for head 0) on rows whose every key is hidden
    ("bool_dead", "-inf"), ("bool_dead", "inf"), ("bool_dead", "nan"), ("bool_dead", 0.25),
    ("add_dead", "-inf"), ("add_dead", "inf"), ("add_dead", "nan"), ("add_dead", 0.25),
]


@pytest.mark.parametrize("mask,sink", SINK_EDGES)
def test_dead_rows_with_extreme_sinks(mask, sink):
    """Hidden rows with sinks of -inf (uniform average for boolean masks, NaN for additive),
    +inf / NaN (NaN) and finite (0)."""
    c = F.build({**BASE, "mask": mask, "sinks": True, "poison": [["sinks", sink, 0]]})
    R.check_close(mx_fast(c), c.reference(), R.tolerance_mx_fast(mx.float32), context=repr(c))


@pytest.mark.parametrize("extreme", ["scales0", "equal_keys", "scale0"])
@pytest.mark.parametrize("mask", ["none", "causal", "bool_dead", "add_dead"])
def test_extremes_match_mx_fast(extreme, mask):
    c = F.build({**BASE, "mask": mask, "sinks": True, "extreme": extreme})
    R.check_close(mx_fast(c), c.reference(), R.tolerance_mx_fast(mx.float32), context=repr(c))


@pytest.mark.parametrize("B,Hq,Hkv,L,N,T", [(0, 4, 2, 3, 40, 0), (1, 4, 2, 0, 40, 2), (1, 4, 2, 3, 0, 0),
                                            (2, 4, 2, 5, 0, 0)])
@pytest.mark.parametrize("sinks", [False, True])
def test_empty_shapes_match_mx_fast(B, Hq, Hkv, L, N, T, sinks):
    """Empty batch or rows -> empty result; no key at all (N + T = 0) -> zeros, as mx.fast."""
    c = R.make_case(B=B, Hq=Hq, Hkv=Hkv, L=L, N=N, T=T, D=64, group_size=32, dtype="float32",
                    sinks=sinks, seed=3)
    fast = mx_fast(c)
    ref = c.reference()
    assert tuple(fast.shape) == ref.shape == (B, Hq, L, 64)
    R.check_close(fast, ref, R.tolerance_mx_fast(mx.float32), context=repr(c))
    if ref.size and N + T == 0:
        assert (ref == 0).all()


def test_check_close_is_element_exact_on_nonfinite():
    ref = np.array([[1.0, np.nan, np.inf, -np.inf]])
    R.check_close(ref.copy(), ref, 1e-12)
    for bad in ([1.0, 0.0, np.inf, -np.inf], [1.0, np.nan, 1e300, -np.inf], [1.0, np.nan, -np.inf, -np.inf],
                [np.nan, np.nan, np.inf, -np.inf], [1.0 + 1e-3, np.nan, np.inf, -np.inf]):
        with pytest.raises(AssertionError):
            R.check_close(np.array([bad]), ref, 1e-9)


def test_check_close_is_per_row():
    """One wrong row among many right ones fails, however small its share of the output."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1, 64, 100, 128))
    out = ref.copy()
    out[0, 5, 7] *= 1.01  # one row 1% off: whole-output NMSE ~1.6e-8, its own 1e-4
    assert R.nmse(out, ref) < 1e-7
    with pytest.raises(AssertionError, match="row"):
        R.check_close(out, ref, 1e-6)
