"""Every misuse of tqmetal.sdpa_int4 raises ValueError naming the offending argument."""

import mlx.core as mx
import numpy as np
import pytest

import reference as R
import tqmetal
from tqmetal import _ext

B, HQ, HKV, L, N, D, GS = 2, 4, 2, 3, 20, 64, 32


def _base():
    c = R.make_case(B=B, Hq=HQ, Hkv=HKV, L=L, N=N, D=D, dtype="float16", group_size=GS, seed=0)
    return dict(q=c.q, k=c.k, v=c.v, scale=c.scale, group_size=GS)


def call(**over):
    kw = _base()
    kw.update(over)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    out = tqmetal.sdpa_int4(q, k, v, **kw)
    mx.eval(out)
    return out


def replace(t, i, new):
    t = list(t)
    t[i] = new
    return tuple(t)


def test_base_is_valid():
    out = call()
    assert out.shape == (B, HQ, L, D)
    out = call(mask="causal", sinks=mx.zeros((HQ,), mx.float16),
               k_tail=mx.zeros((B, HKV, 2, D), mx.float16), v_tail=mx.zeros((B, HKV, 2, D), mx.float16))
    assert out.shape == (B, HQ, L, D)


# --- q -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [mx.int32, mx.int8, mx.uint32, mx.bool_])
def test_q_dtype(dtype):
    with pytest.raises(ValueError, match=r"\bq\b"):
        call(q=mx.zeros((B, HQ, L, D), dtype=dtype))


@pytest.mark.parametrize("shape", [(HQ, L, D), (1, B, HQ, L, D), (D,)])
def test_q_rank(shape):
    with pytest.raises(ValueError, match=r"\bq\b"):
        call(q=mx.zeros(shape, dtype=mx.float16))


# --- k / v triples -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.float32, mx.uint16])
def test_packed_dtype(name, dtype):
    t = _base()[name]
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call(**{name: replace(t, 0, t[0].astype(dtype))})


@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_triple_rank(name, which):
    t = _base()[name]
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call(**{name: replace(t, which, t[which][0])})


@pytest.mark.parametrize("name", ["k", "v"])
def test_not_a_triple(name):
    t = _base()[name]
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        call(**{name: t[:2]})


@pytest.mark.parametrize("name", ["k", "v"])
def test_packed_width(name):
    # 4-bit D=64 needs 8 words per row; give 16 (that is D*8/32: bits mismatch) and 7
    t = _base()[name]
    p = t[0]
    wide = mx.concatenate([p, p], axis=-1)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call(**{name: replace(t, 0, wide)})
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call(**{name: replace(t, 0, p[..., :7])})


def test_bits_mismatch_with_width():
    # data is 4-bit; claiming 8-bit K makes the packed width wrong for k
    with pytest.raises(ValueError, match=r"\bk\b|k_bits"):
        call(k_bits=8)
    with pytest.raises(ValueError, match=r"\bv\b|v_bits"):
        call(v_bits=8)


def test_head_dim_not_divisible_by_group_size():
    # D=80 with group 32: packed width is right (80*4/32=10) but 80 % 32 != 0
    rng = np.random.default_rng(0)
    q = mx.zeros((1, 2, 1, 80), mx.float16)
    p = mx.array(rng.integers(0, 2**32, size=(1, 2, 5, 10), dtype=np.uint64).astype(np.uint32))
    s = mx.ones((1, 2, 5, 3), mx.float16)  # ceil(80/32)
    with pytest.raises(ValueError, match=r"group_size"):
        tqmetal.sdpa_int4(q, (p, s, s), (p, s, s), scale=0.1, group_size=32)
    s = mx.ones((1, 2, 5, 2), mx.float16)  # floor(80/32)
    with pytest.raises(ValueError, match=r"group_size"):
        tqmetal.sdpa_int4(q, (p, s, s), (p, s, s), scale=0.1, group_size=32)


@pytest.mark.parametrize("gs", [48, 8, 256, 0, -64])
def test_unsupported_group_size(gs):
    with pytest.raises(ValueError, match=r"group_size"):
        call(group_size=gs)


@pytest.mark.parametrize("arg,val", [("bits", 7), ("bits", 1), ("bits", 16),
                                     ("k_bits", 7), ("v_bits", 9), ("bits", 0)])
def test_unsupported_bits(arg, val):
    # the message must name the argument the caller passed: "bits" itself, not "k_bits"
    with pytest.raises(ValueError, match=rf"(?<![A-Za-z_]){arg}\b"):
        call(**{arg: val})


@pytest.mark.parametrize("arg,val", [("k_bits", 3), ("v_bits", 5), ("bits", 6)])
def test_bit_stream_widths_name_the_packed_shape(arg, val):
    # mx.quantize's 2/3/5/6-bit widths are accepted; 4-bit packed rows then have the
    # wrong word count, and the message names the tensor and the shape it expects
    with pytest.raises(ValueError, match=r"packed must have shape"):
        call(**{arg: val})


@pytest.mark.parametrize("bits", [2, 3, 5, 6])
def test_bit_stream_widths_need_groups_of_32(bits):
    x = mx.zeros((1, 1, 4, 64))
    with pytest.raises(ValueError, match=r"group_size=16 supports 4 and 8 bits only"):
        tqmetal.quantize(x, 16, bits)
    p = mx.zeros((1, 1, 4, 64 * bits // 32), mx.uint32)
    s = mx.ones((1, 1, 4, 4), mx.float16)
    q = mx.zeros((1, 1, 1, 64), mx.float16)
    with pytest.raises(ValueError, match=r"group_size.*k_bits=%d" % bits):
        tqmetal.sdpa_int4(q, (p, s, s), (p, s, s), scale=0.1, group_size=16, k_bits=bits, v_bits=4)


@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("which", [1, 2])
@pytest.mark.parametrize("how", ["groups", "rows", "heads"])
def test_scales_biases_shape(name, which, how):
    t = _base()[name]
    a = t[which]
    if how == "groups":
        bad = mx.concatenate([a, a], axis=-1)  # D/gs*2 groups
    elif how == "rows":
        bad = a[:, :, :-1]
    else:
        bad = a[:, :1]
    with pytest.raises(ValueError, match=rf"\b{name}\b|scales|biases"):
        call(**{name: replace(t, which, bad)})


@pytest.mark.parametrize("name", ["k", "v"])
def test_scales_integer_dtype(name):
    t = _base()[name]
    with pytest.raises(ValueError, match=rf"\b{name}\b|scales|biases"):
        call(**{name: replace(t, 1, t[1].astype(mx.int32))})


def test_heads_not_multiple():
    q = mx.zeros((B, 3, L, D), mx.float16)
    with pytest.raises(ValueError, match=r"\bq\b|\bk\b|head"):
        call(q=q)
    q = mx.zeros((B, 1, L, D), mx.float16)  # H_q < H_kv
    with pytest.raises(ValueError, match=r"\bq\b|\bk\b|head"):
        call(q=q)


def test_kv_heads_mismatch():
    base = _base()
    v = tuple(a[:, :1] for a in base["v"])
    with pytest.raises(ValueError, match=r"\bv\b|\bk\b"):
        call(v=v)


def test_batch_mismatch():
    q = mx.zeros((1, HQ, L, D), mx.float16)
    with pytest.raises(ValueError, match=r"\bq\b|\bk\b|batch"):
        call(q=q)
    base = _base()
    v = tuple(a[:1] for a in base["v"])
    with pytest.raises(ValueError, match=r"\bv\b|\bk\b|batch"):
        call(v=v)


def test_head_dim_mismatch_q_vs_k():
    q = mx.zeros((B, HQ, L, 2 * D), mx.float16)
    with pytest.raises(ValueError, match=r"\bq\b|\bk\b"):
        call(q=q)


def test_kv_length_mismatch():
    base = _base()
    v = tuple(a[:, :, :-3] for a in base["v"])
    with pytest.raises(ValueError, match=r"\bv\b|\bk\b"):
        call(v=v)


def test_empty_context():
    """No keys at all (N + T = 0): zeros, as mx.fast.scaled_dot_product_attention gives."""
    z = (
        mx.zeros((B, HKV, 0, D * 4 // 32), mx.uint32),
        mx.zeros((B, HKV, 0, D // GS), mx.float16),
        mx.zeros((B, HKV, 0, D // GS), mx.float16),
    )
    for extra in ({}, dict(k_tail=mx.zeros((B, HKV, 0, D), mx.float16), v_tail=mx.zeros((B, HKV, 0, D), mx.float16))):
        out = call(k=z, v=z, **extra)
        assert out.shape == (B, HQ, L, D) and not mx.any(out != 0).item()


# --- mask -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape",
    [(L, N + 1), (L + 1, N), (HQ + 1, L, N), (B + 1, 1, L, N), (B, HQ, L, N, 1), (N - 1,), (3 * B, 1, L, N)],
)
@pytest.mark.parametrize("dtype", [mx.bool_, mx.float16])
def test_mask_not_broadcastable(shape, dtype):
    with pytest.raises(ValueError, match=r"mask"):
        call(mask=mx.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.int8, mx.uint32])
def test_mask_dtype(dtype):
    with pytest.raises(ValueError, match=r"mask"):
        call(mask=mx.ones((L, N), dtype=dtype))


@pytest.mark.parametrize("mask", ["causal_lower", "full", ""])
def test_mask_bad_string(mask):
    with pytest.raises(ValueError, match=r"mask"):
        call(mask=mask)


def test_mask_not_broadcastable_with_tail():
    # [L, N] is fine without a tail but not once the tail adds keys
    kt = mx.zeros((B, HKV, 4, D), mx.float16)
    with pytest.raises(ValueError, match=r"mask"):
        call(mask=mx.ones((L, N), mx.bool_), k_tail=kt, v_tail=kt)


# --- tails -------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["k_tail", "v_tail"])
def test_only_one_tail(which):
    with pytest.raises(ValueError, match=r"k_tail|v_tail"):
        call(**{which: mx.zeros((B, HKV, 4, D), mx.float16)})


@pytest.mark.parametrize("which", ["k_tail", "v_tail"])
@pytest.mark.parametrize(
    "shape",
    [(B, HKV, 4, D + 1), (B, HKV + 1, 4, D), (B + 1, HKV, 4, D), (HKV, 4, D), (B, HQ * 2, 4, D)],
)
def test_tail_shape(which, shape):
    good = mx.zeros((B, HKV, 4, D), mx.float16)
    bad = mx.zeros(shape, mx.float16)
    kw = {"k_tail": good, "v_tail": good}
    kw[which] = bad
    with pytest.raises(ValueError, match=which):
        call(**kw)


def test_tail_lengths_differ():
    with pytest.raises(ValueError, match=r"k_tail|v_tail"):
        call(k_tail=mx.zeros((B, HKV, 4, D), mx.float16), v_tail=mx.zeros((B, HKV, 5, D), mx.float16))


@pytest.mark.parametrize("which", ["k_tail", "v_tail"])
def test_tail_dtype(which):
    good = mx.zeros((B, HKV, 4, D), mx.float16)
    kw = {"k_tail": good, "v_tail": good}
    kw[which] = mx.zeros((B, HKV, 4, D), mx.int32)
    with pytest.raises(ValueError, match=which):
        call(**kw)


# --- sinks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(HQ + 1,), (HKV,), (2, HQ), ()])
def test_sinks_shape(shape):
    with pytest.raises(ValueError, match=r"sinks"):
        call(sinks=mx.zeros(shape, mx.float16))


def test_sinks_dtype():
    with pytest.raises(ValueError, match=r"sinks"):
        call(sinks=mx.zeros((HQ,), mx.int32))


@pytest.mark.skipif(_ext.has_metal_kernels(), reason="this build has the Metal kernels (tests/test_metal_gpu.py)")
def test_gpu_stream_is_refused_with_its_name():
    """A build without the Metal kernels (Linux): an explicit GPU stream is a ValueError naming `stream`."""
    k = mx.quantize(mx.random.normal((1, 1, 8, 64)), group_size=64, bits=4)
    q = mx.random.normal((1, 1, 1, 64))
    with pytest.raises(ValueError, match="stream"):
        tqmetal.sdpa_int4(q, k, k, scale=0.1, stream=mx.gpu)
    # The default stream works wherever the op runs (the CPU here).
    assert tqmetal.sdpa_int4(q, k, k, scale=0.1).shape == (1, 1, 1, 64)
