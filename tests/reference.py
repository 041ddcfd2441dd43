"""Independent float64 NumPy reference for ``tqmetal.sdpa_int4`` plus case builders.

Nothing here calls ``mx.dequantize`` or ``mx.fast``: the packed words are unpacked
with NumPy bit operations (4-bit element j of a row lives in word j // 8 at bit
4 * (j % 8), low nibble first; 8-bit element j is byte j % 4 of word j // 4) and the
attention is computed in float64.

The semantics are those of ``mx.fast.scaled_dot_product_attention`` (its CPU
decomposition, checked element for element in ``tests/test_reference.py``), computed
exactly instead of in the input dtype:

* logits = scale * q k^T; a key hidden by a boolean or "causal" mask gets the lowest
  finite logit (MLX fills with ``finfo.min``; here float64's), not -inf; an additive
  mask is added (so -inf weighs 0, +inf or NaN make the row NaN);
* sinks join the softmax as one more logit with no value; softmax subtracts the row
  max (NaN anywhere in the visible row -> NaN row);
* out = p @ V in IEEE arithmetic.

What follows from that, all matching MLX:

* every key hidden by a boolean/causal mask, no sinks -> uniform average of V over all
  N_total keys (a NaN query in such a row does not matter: its logits are replaced);
* the same with a finite sink -> 0 (the sink dominates the lowest finite logit); with
  a -inf sink -> the uniform average again; a +inf or NaN sink -> NaN;
* additive mask, the whole row -inf, no sinks (or a -inf sink) -> NaN;
* a NaN/inf in q, or a dequantized key that is NaN (``mx.quantize`` of a group with
  inf gives a NaN scale), makes every row that sees that key NaN; a hidden key's
  logits do not matter;
* no key at all (N + T = 0) -> 0; empty batch / heads / rows -> an empty result.

One thing MLX's own paths do not agree on, so tests avoid it: a non-finite *value*
(V) at a key whose weight is exactly 0 (hidden, or exp underflow): MLX's CPU
decomposition computes 0 * inf = NaN, its Metal kernels skip hidden keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Per-row NMSE bounds for tqmetal's result against the float64 reference, by the
# dtype of q (= the output's dtype). The op's error is the rounding of its output to
# that dtype plus float32 accumulation; measured largest row NMSE over the test grid
# (tests/test_sdpa_int4.py, all CPU variants, emulated Metal): see TOL_MEASURED.
# Bounds are ~3-10x the measured worst row and far below what a planted bug gives
# (tests/test_planted_bugs.py).
TOL_OP = {"float16": 1e-6, "bfloat16": 2e-5, "float32": 1e-9}
# The integer decode paths (avx512vnni, avx512amx) round each query row to int16 and the
# softmax weights of a block to int16 (README, "Decode on AVX512-VNNI CPUs"): about 1e-5
# relative on the logits, so the error grows with the logits' size: float32 outputs show
# it (measured worst row 1.5e-7 at sharpness 8, 2.5e-7 with scale 1, 3e-9 on ordinary
# data; 1.95e-6 for one row of the fuzz suite's "scales0" extreme, where some groups'
# scales are 0 and a block's int16 weights are scaled to the few rows left);
# float16/bfloat16 rounding hides it.
TOL_OP_INT16_QUERY = {**TOL_OP, "float32": 5e-6}
_INT16_QUERY = None


def op_rounds_query_to_int16() -> bool:
    """Whether this process's tqmetal runs an integer decode path (cpu_isa avx512vnni/amx)."""
    global _INT16_QUERY
    if _INT16_QUERY is None:
        try:
            import tqmetal  # lazily: the reference itself does not need it

            _INT16_QUERY = tqmetal.cpu_isa() in ("avx512vnni", "avx512amx")
        except ImportError:
            _INT16_QUERY = False
    return _INT16_QUERY
# mx.fast itself computes in the input dtype (scores rounded to float16/bfloat16):
# comparisons of mx.fast against the reference need this looser per-row bound.
TOL_MX_FAST = {"float16": 5e-5, "bfloat16": 2e-3, "float32": 1e-7}
# Old whole-output NMSE bounds (kept for callers outside the kernel grid).
TOL_F32 = 1e-6
TOL_HALF = 5e-4


def tolerance(q_dtype, scale_dtype=None, *, int16_query: Optional[bool] = None) -> float:
    """Per-row NMSE bound for the op's output in q's dtype (scale dtype: inputs are exact);
    int16_query (default: what this process's tqmetal runs) selects the integer paths' bound."""
    del scale_dtype
    if int16_query is None:
        int16_query = op_rounds_query_to_int16()
    return (TOL_OP_INT16_QUERY if int16_query else TOL_OP)[DTYPE_NAMES[q_dtype]]


def tolerance_mx_fast(q_dtype) -> float:
    return TOL_MX_FAST[DTYPE_NAMES[q_dtype]]


# ----------------------------------------------------------------------------------
# conversions
# ----------------------------------------------------------------------------------


def to_numpy(x) -> np.ndarray:
    """mx.array (any layout, any dtype incl. bfloat16) -> NumPy array, values exact."""
    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)  # exact
        return np.array(x)
    return np.asarray(x)


def to_f64(x) -> np.ndarray:
    return to_numpy(x).astype(np.float64)


# ----------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------


def unpack_codes(packed, bits: int) -> np.ndarray:
    """uint32 [..., W] -> integer codes [..., W * 32 // bits] (int64).

    The words are one little-endian bit stream (mx.quantize's layout for every
    width): code j sits at bits [j * bits, (j + 1) * bits) of the stream, so a
    3-, 5- or 6-bit code may straddle two words."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"reference unpacker supports bits 2, 3, 4, 5, 6 or 8, got {bits}")
    p = to_numpy(packed)
    if p.dtype != np.uint32:
        raise TypeError(f"packed must be uint32, got {p.dtype}")
    stream = np.unpackbits(np.ascontiguousarray(p).view(np.uint8), axis=-1, bitorder="little")
    D = p.shape[-1] * 32 // bits
    fields = stream[..., : D * bits].reshape(*p.shape[:-1], D, bits).astype(np.int64)
    return (fields << np.arange(bits, dtype=np.int64)).sum(-1)


def pack_codes(codes, bits: int) -> np.ndarray:
    """integer codes [..., D] (0 <= c < 2**bits) -> uint32 [..., D * bits // 32]."""
    c = np.asarray(codes).astype(np.int64)
    D = c.shape[-1]
    if (D * bits) % 32:
        raise ValueError(f"D={D} codes of {bits} bits do not fill whole 32-bit words")
    if c.size and (c.max() >= (1 << bits) or c.min() < 0):
        raise ValueError(f"codes out of range for {bits} bits")
    fields = ((c[..., None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    stream = fields.reshape(*c.shape[:-1], D * bits)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32).reshape(
        *c.shape[:-1], D * bits // 32)


def dequantize_ref(packed, scales, biases, group_size: int, bits: int) -> np.ndarray:
    """float64 scale * code + bias, group-wise along the last axis."""
    codes = unpack_codes(packed, bits).astype(np.float64)
    s = to_f64(scales)
    b = to_f64(biases)
    D = codes.shape[-1]
    if D % group_size or s.shape[-1] != D // group_size or b.shape != s.shape:
        raise ValueError(
            f"inconsistent quantized triple: D={D}, group_size={group_size}, "
            f"scales {s.shape}, biases {b.shape}"
        )
    g = codes.reshape(*codes.shape[:-1], D // group_size, group_size)
    with np.errstate(invalid="ignore", over="ignore"):
        out = g * s[..., None] + b[..., None]  # 0 * inf = NaN, as mx.dequantize
    return out.reshape(codes.shape)


def quantize_ref(x, group_size: int, bits: int):
    """Plain affine min/max quantizer in NumPy (float64 math, float32 scales).

    Returns NumPy (packed uint32, scales float32, biases float32).  Used for
    format round trips; not bit-identical to mx.quantize.
    """
    a = to_f64(x)
    D = a.shape[-1]
    g = a.reshape(*a.shape[:-1], D // group_size, group_size)
    lo = g.min(-1)
    hi = g.max(-1)
    n = (1 << bits) - 1
    scale = (hi - lo) / n
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    bias = lo.astype(np.float32)
    codes = np.clip(
        np.rint((g - bias[..., None].astype(np.float64)) / scale[..., None].astype(np.float64)),
        0,
        n,
    ).astype(np.int64)
    return pack_codes(codes.reshape(a.shape), bits), scale, bias


# ----------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------


def causal_mask(L: int, N: int) -> np.ndarray:
    """Bottom-right aligned causal mask: row i sees key j iff j <= i + N - L."""
    i = np.arange(L)[:, None]
    j = np.arange(N)[None, :]
    return j <= i + (N - L)


# The logit MLX gives a key hidden by a boolean/causal mask: the lowest finite value
# (mx.fast uses finfo(dtype).min, the Metal kernels -FLT_MAX; in float64 any finite
# logit is above this one and -inf below it, which is all that matters).
MASKED_LOGIT = -np.finfo(np.float64).max


def _masked_logits(q, k, scale: float, mask, *, causal_shift: int = 0):
    """scale * q k^T with the mask applied (MASKED_LOGIT where a boolean/causal mask
    hides a key, additive masks added), and the boolean view of the mask (None for no
    mask or an additive one).  `causal_shift` moves the causal diagonal (for planted
    off-by-one bugs)."""
    L, N = q.shape[2], k.shape[2]
    with np.errstate(invalid="ignore", over="ignore"):
        logits = float(scale) * np.einsum("bhld,bhnd->bhln", q, k)
    allowed = None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask string {mask!r}")
        i = np.arange(L)[:, None]
        j = np.arange(N)[None, :]
        allowed = np.broadcast_to(j <= i + (N - L) + causal_shift, logits.shape)
    elif mask is not None:
        m = to_numpy(mask)
        if m.dtype == np.bool_:
            allowed = np.broadcast_to(m, logits.shape)
        else:
            with np.errstate(invalid="ignore"):
                logits = logits + np.broadcast_to(m.astype(np.float64), logits.shape)
    if allowed is not None:
        logits = np.where(allowed, logits, MASKED_LOGIT)
    return logits, allowed


def softmax_weights(logits, sinks, Hq: int):
    """Softmax over the keys with the optional per-head sink logit joining it.
    Returns (p over the keys, the row's log-sum-exp including the sink)."""
    B, _, L, N = logits.shape
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if sinks is not None:
            s = np.broadcast_to(to_f64(sinks).reshape(1, Hq, 1, 1), (B, Hq, L, 1))
            full = np.concatenate([s, logits], axis=-1)
        else:
            full = logits
        if full.shape[-1] == 0:
            return np.zeros(logits.shape), np.full((B, Hq, L), -np.inf)
        # NaN anywhere -> NaN max (np.max propagates NaN, like MLX's softmax)
        mx_ = full.max(axis=-1, keepdims=True)
        e = np.exp(full - mx_)
        tot = e.sum(axis=-1, keepdims=True)
        p = e / tot
        lse = (np.log(tot) + mx_)[..., 0]
        if sinks is not None:
            p = p[..., 1:]
    return p, lse


def attention_ref(q, k, v, *, scale: float, mask=None, sinks=None, mutation: Optional[str] = None) -> np.ndarray:
    """float64 softmax(scale * q k^T + mask) v with GQA, sinks and MLX's masked-row rules.

    q: [B, Hq, L, D]; k, v: [B, Hkv, N, D]; mask: None | "causal" | bool array |
    additive float array broadcastable to [B, Hq, L, N]; sinks: [Hq] or None.

    `mutation` computes a deliberately wrong answer, the one a planted kernel bug would
    give (see PLANTED_BUGS): the tests use it to show their comparisons catch such bugs.
    """
    q = to_f64(q)
    k = to_f64(k)
    v = to_f64(v)
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    assert Hkv == 0 or Hq % Hkv == 0, (Hq, Hkv)
    rep = Hq // Hkv if Hkv else 1
    if mutation is not None and mutation not in PLANTED_BUGS:
        raise ValueError(f"unknown mutation {mutation!r}")
    if mutation == "sinks_by_kv_head" and sinks is not None:
        s = to_f64(sinks)
        sinks = s[np.arange(Hq) // rep]  # query head h reads sink[h // G]: the KV head's index
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    shift = -1 if mutation == "causal_off_by_one" else 0
    logits, _ = _masked_logits(q, k, scale, mask, causal_shift=shift)
    if mutation == "drop_last_key" and logits.shape[-1] > 0:
        logits[..., -1] = -np.inf  # the last key never enters the softmax
    if mutation == "average_split_merge" and logits.shape[-1] >= 2:
        # split the keys in two halves, normalize each (the first carries the sink) and
        # average them instead of weighting by their log-sum-exp
        h = logits.shape[-1] // 2
        p1, _ = softmax_weights(logits[..., :h], sinks, Hq)
        p2, _ = softmax_weights(logits[..., h:], None, Hq)
        with np.errstate(invalid="ignore", over="ignore"):
            return 0.5 * (np.einsum("bhln,bhnd->bhld", p1, v[:, :, :h])
                          + np.einsum("bhln,bhnd->bhld", p2, v[:, :, h:]))
    p, _ = softmax_weights(logits, sinks, Hq)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.einsum("bhln,bhnd->bhld", p, v)


# Bugs the test grids must catch (tests/test_planted_bugs.py shows they do, on every
# backend's grid; tests/mutants/ has the same bugs as real edits of the Metal kernels).
PLANTED_BUGS = ("drop_last_key", "sinks_by_kv_head", "causal_off_by_one", "average_split_merge")


def row_lse_ref(q, k, *, scale: float, mask=None) -> np.ndarray:
    """Each row's log-sum-exp of its visible logits, [B, Hq, L] (for sinks near it)."""
    q = to_f64(q)
    k = to_f64(k)
    rep = q.shape[1] // k.shape[1]
    logits, _ = _masked_logits(q, np.repeat(k, rep, axis=1), scale, mask)
    _, lse = softmax_weights(logits, None, q.shape[1])
    return lse


def sdpa_int4_ref(
    q,
    k,
    v,
    *,
    scale: float,
    mask=None,
    group_size: int = 64,
    bits: int = 4,
    k_bits: Optional[int] = None,
    v_bits: Optional[int] = None,
    sinks=None,
    k_tail=None,
    v_tail=None,
    stream=None,
) -> np.ndarray:
    """float64 reference with the same signature as tqmetal.sdpa_int4."""
    del stream
    k_bits = bits if k_bits is None else k_bits
    v_bits = bits if v_bits is None else v_bits
    K = dequantize_ref(*k, group_size=group_size, bits=k_bits)
    V = dequantize_ref(*v, group_size=group_size, bits=v_bits)
    if (k_tail is None) != (v_tail is None):
        raise ValueError("k_tail and v_tail must be given together")
    if k_tail is not None:
        K = np.concatenate([K, to_f64(k_tail)], axis=2)
        V = np.concatenate([V, to_f64(v_tail)], axis=2)
    return attention_ref(q, K, V, scale=scale, mask=mask, sinks=sinks)


def attention_grad_q_ref(q, k, v, cotangent, *, scale: float, mask=None, sinks=None) -> np.ndarray:
    """float64 d(sum(out * cotangent))/dq for attention_ref (analytic softmax backward).

    Rows with no visible key get zero gradient (their output does not depend on q).
    Additive masks must not contain fully -inf rows here.
    """
    q = to_f64(q)
    k = to_f64(k)
    v = to_f64(v)
    g = to_f64(cotangent)
    B, Hq, L, D = q.shape
    rep = Hq // k.shape[1]
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    logits, allowed = _masked_logits(q, k, scale, mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        if sinks is not None:
            s = np.broadcast_to(to_f64(sinks).reshape(1, Hq, 1, 1), (B, Hq, L, 1))
            full = np.concatenate([s, logits], axis=-1)
        else:
            full = logits
        e = np.exp(full - full.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        if sinks is not None:
            p = p[..., 1:]
    p = np.nan_to_num(p, nan=0.0)
    if allowed is not None:
        p = np.where(allowed.any(-1, keepdims=True), p, 0.0)  # dead rows: constant output
    dp = np.einsum("bhld,bhnd->bhln", g, v)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    return float(scale) * np.einsum("bhln,bhnd->bhld", ds, k)


# ----------------------------------------------------------------------------------
# error metric
# ----------------------------------------------------------------------------------


def nmse(out, ref) -> float:
    """sum((out - ref)^2) / sum(ref^2) in float64 (absolute SSE if ref is all zero)."""
    o = to_f64(out)
    r = to_f64(ref)
    num = float(np.sum((o - r) ** 2))
    den = float(np.sum(r**2))
    if den == 0.0:
        return num
    return num / den


def row_nmse(out, ref) -> np.ndarray:
    """Per-row NMSE over the last axis, [*batch]: sum((o - r)^2) / sum(r^2) of each row.

    A row whose reference is (near) zero is measured against a millionth of the mean
    row energy instead of its own, so an exact-0 row must come out (nearly) 0."""
    o = to_f64(out)
    r = to_f64(ref)
    num = ((o - r) ** 2).sum(-1)
    den = (r**2).sum(-1)
    floor = 1e-6 * float(den.mean()) if den.size else 0.0
    floor = floor if floor > 0 else 1e-30
    return num / np.maximum(den, floor)


def check_close(out, ref, tol: float, *, context: str = "") -> float:
    """Assert out ~= ref element for element where non-finite, row by row where finite:

    * the same NaN pattern, the same +-inf where the reference is infinite;
    * finite wherever the reference is finite (rows with a NaN element are compared on
      their finite elements);
    * every row's NMSE (row_nmse) <= tol: one wrong row, one dropped key or a wrong
      sink cannot hide in the average of many right ones.

    Returns the largest row NMSE.  The assertion message says where the worst error is.
    """
    o = to_f64(out)
    r = to_f64(ref)
    assert o.shape == r.shape, f"{context}: shape {o.shape} != reference {r.shape}"
    if r.size == 0:
        return 0.0
    r_nan = np.isnan(r)
    o_nan = np.isnan(o)
    if (r_nan != o_nan).any():
        bad = np.argwhere(r_nan != o_nan)
        first = tuple(int(i) for i in bad[0])
        raise AssertionError(
            f"{context}: NaN pattern differs at {len(bad)} elements "
            f"({int((r_nan & ~o_nan).sum())} NaN only in the reference), first {first}: "
            f"out={o[first]!r} ref={r[first]!r}"
        )
    r_inf = np.isinf(r)
    if (o[r_inf] != r[r_inf]).any():
        first = tuple(int(i) for i in np.argwhere(r_inf & (o != r))[0])
        raise AssertionError(f"{context}: infinity differs at {first}: out={o[first]!r} ref={r[first]!r}")
    fin = np.isfinite(r)
    if not np.isfinite(o[fin]).all():
        first = tuple(int(i) for i in np.argwhere(fin & ~np.isfinite(o))[0])
        raise AssertionError(f"{context}: non-finite output where the reference is finite, first {first}: "
                             f"out={o[first]!r} ref={r[first]!r}")
    rows = row_nmse(np.where(fin, o, 0.0), np.where(fin, r, 0.0))
    err = float(rows.max())
    if not err <= tol:
        with np.errstate(invalid="ignore"):
            diff = np.abs(np.where(fin, o - r, 0.0))
        worst_row = tuple(int(i) for i in np.unravel_index(np.argmax(rows), rows.shape))
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape))
        bad_rows = np.argwhere(rows > tol)
        raise AssertionError(
            f"{context}: row NMSE {err:.3e} > {tol:.1e} at row {worst_row} (whole-output NMSE "
            f"{nmse(np.where(fin, o, 0), np.where(fin, r, 0)):.3e}); worst |err| {diff[worst]:.4e} at "
            f"{worst} (out={o[worst]:.6g}, ref={r[worst]:.6g}); {len(bad_rows)} of {rows.size} rows "
            f"over, first few {bad_rows[:5].tolist()}"
        )
    return err


# ----------------------------------------------------------------------------------
# random case builders
# ----------------------------------------------------------------------------------


def valid_group_sizes(D: int, include16: bool = True) -> list:
    gs = [g for g in (16, 32, 64, 128) if D % g == 0]
    if not include16:
        gs = [g for g in gs if g != 16]
    return gs


def default_quantizer(group_size: int) -> str:
    """mx.quantize wherever it works (proves the mlx-lm format), tqmetal.quantize for 16."""
    return "tqmetal" if group_size == 16 else "mx"


def quantize(x: mx.array, group_size: int, bits: int, how: str, rng=None):
    """Quantize [..., D] with the chosen quantizer; returns an mx (packed, scales, biases)."""
    if how == "mx":
        return tuple(mx.quantize(x, group_size=group_size, bits=bits))
    if how == "tqmetal":
        import tqmetal  # imported lazily: the reference itself does not need it

        return tuple(tqmetal.quantize(x, group_size, bits))
    if how == "numpy":
        p, s, b = quantize_ref(x, group_size, bits)
        return (mx.array(p), mx.array(s).astype(x.dtype), mx.array(b).astype(x.dtype))
    if how == "codes":
        # random integer codes + random scales/biases, packed in NumPy.
        rng = rng if rng is not None else np.random.default_rng(0)
        codes = rng.integers(0, 1 << bits, size=x.shape)
        G = x.shape[-1] // group_size
        s = rng.uniform(0.02, 0.3, size=(*x.shape[:-1], G)) * (16 / (1 << bits))
        b = rng.normal(0, 1.0, size=(*x.shape[:-1], G))
        return (
            mx.array(pack_codes(codes, bits)),
            mx.array(s.astype(np.float32)).astype(x.dtype),
            mx.array(b.astype(np.float32)).astype(x.dtype),
        )
    raise ValueError(how)


def poison_rows(a: mx.array, rows: int, rng) -> mx.array:
    """`rows` extra rows along axis 2 that would wreck the result if read."""
    shape = (*a.shape[:2], rows, *a.shape[3:])
    if a.dtype == mx.uint32:
        return mx.array(rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32))
    return mx.full(shape, float("nan"), dtype=a.dtype)


def as_prefix_view(a: mx.array, rng, *, capacity_step: int = 256, offset: int = 0) -> mx.array:
    """Return a[..., :, :] as a strided view a_buf[..., offset:offset+N, :] of a larger
    buffer whose other rows are garbage/NaN (like mlx-lm's preallocated KV cache)."""
    N = a.shape[2]
    cap = max(capacity_step, int(math.ceil((N + offset) / capacity_step)) * capacity_step)
    if cap == N + offset:
        cap += capacity_step
    parts = []
    if offset:
        parts.append(poison_rows(a, offset, rng))
    parts.append(a)
    parts.append(poison_rows(a, cap - N - offset, rng))
    buf = mx.concatenate(parts, axis=2)
    mx.eval(buf)
    view = buf[:, :, offset : offset + N, :]
    return view


def as_transposed_view(a: mx.array) -> mx.array:
    """Same values as `a` [B,H,N,D] but stored as [B,N,H,D] and transposed (mlx-lm's q)."""
    t = mx.array(np.ascontiguousarray(np.swapaxes(to_numpy(a), 1, 2))).astype(a.dtype)
    mx.eval(t)
    return t.transpose(0, 2, 1, 3)


MASK_KINDS = (
    "none",
    "causal",
    "bool_LN",  # [L, N]
    "bool_11LN",  # [1, 1, L, N]
    "bool_B1LN",  # [B, 1, L, N]
    "bool_BHLN",  # [B, Hq, L, N]
    "bool_B11N",  # [B, 1, 1, N]  (padding mask)
    "bool_dead",  # [B, Hq, L, N] with some fully masked rows
    "bool_broadcast",  # mx.broadcast_to of an [L, N] mask (stride-0 view)
    "bool_slice",  # [L, N] slice of a wider mask buffer (strided view)
    "bool_window",  # [L, N] sliding window: each row sees at most its last 48 keys
    "bool_few",  # [B, 1, L, N] each row sees only ~3 random keys (long runs fully masked)
    "bool_L1",  # [L, 1]: whole rows on or off (broadcast along the keys)
    "bool_stride2",  # [1, L, N] view with stride 2 along the keys
    "bool_N",  # [N]: 1-D key padding mask
    "add_scalar",  # 0-d additive mask (a constant shift, no effect)
    "add_LN",  # additive float [L, N]
    "add_B1LN",  # additive float [B, 1, L, N]
    "add_inf",  # additive with some -inf entries (no fully masked rows)
    "add_dead",  # additive with some rows entirely -inf
    "add_broadcast",  # additive, broadcast_to view
)


def make_mask(kind: str, B: int, Hq: int, L: int, N: int, dtype, rng):
    """Build a mask of the given kind for N total keys (dtype used for additive masks)."""
    if kind == "none":
        return None
    if kind == "causal":
        return "causal"

    def rand_bool(shape, p_keep=0.7):
        m = rng.random(shape) < p_keep
        if m.size == 0:
            return m
        # keep every row alive by letting each row see at least one key
        flat = m.reshape(-1, shape[-1])
        idx = rng.integers(0, shape[-1], size=flat.shape[0])
        flat[np.arange(flat.shape[0]), idx] = True
        return flat.reshape(shape)

    def rand_add(shape):
        return rng.uniform(-4.0, 1.0, size=shape).astype(np.float32)

    if kind == "bool_LN":
        return mx.array(rand_bool((L, N)))
    if kind == "bool_11LN":
        return mx.array(rand_bool((1, 1, L, N)))
    if kind == "bool_B1LN":
        return mx.array(rand_bool((B, 1, L, N)))
    if kind == "bool_BHLN":
        return mx.array(rand_bool((B, Hq, L, N)))
    if kind == "bool_B11N":
        return mx.array(rand_bool((B, 1, 1, N)))
    if kind == "bool_dead":
        m = rand_bool((B, Hq, L, N))
        if not m.size:  # (reshape(-1, 0) of an empty array is ambiguous)
            return mx.array(m)
        flat = m.reshape(-1, N)
        n_dead = max(1, flat.shape[0] // 4) if flat.shape[0] else 0
        dead = rng.choice(flat.shape[0], size=n_dead, replace=False)
        flat[dead] = False
        return mx.array(flat.reshape(B, Hq, L, N))
    if kind == "bool_broadcast":
        return mx.broadcast_to(mx.array(rand_bool((L, N))), (B, Hq, L, N))
    if kind == "bool_slice":
        extra = int(rng.integers(1, 64))
        buf = rand_bool((L, N + extra))
        buf[:, N:] = False  # would only matter if read
        full = mx.array(buf)
        mx.eval(full)
        return full[:, :N]
    if kind == "bool_window":
        c = causal_mask(L, N)
        i = np.arange(L)[:, None]
        j = np.arange(N)[None, :]
        w = c & (j > i + (N - L) - 48)
        return mx.array(w)
    if kind == "bool_few":
        m = np.zeros((B, 1, L, N), dtype=bool)
        if m.size:  # (reshape(-1, 0) of an empty array is ambiguous)
            flat = m.reshape(-1, N)
            for r in range(flat.shape[0]):
                flat[r, rng.integers(0, N, size=3)] = True
        return mx.array(m)
    if kind == "bool_L1":
        m = rng.random((L, 1)) < 0.7
        if L > 1:
            m[0, 0] = False  # one dead row (uniform average / 0 with sinks)
        if L > 0:
            m[-1, 0] = True
        return mx.array(m)
    if kind == "bool_stride2":
        buf = mx.array(rand_bool((1, L, 2 * N)))
        mx.eval(buf)
        return buf[:, :, ::2]
    if kind == "bool_N":
        return mx.array(rand_bool((1, N))[0])
    if kind == "add_scalar":
        return mx.array(np.float32(-0.75)).astype(dtype)
    if kind == "add_LN":
        return mx.array(rand_add((L, N))).astype(dtype)
    if kind == "add_B1LN":
        return mx.array(rand_add((B, 1, L, N))).astype(dtype)
    if kind == "add_inf":
        a = rand_add((B, Hq, L, N))
        keep = rand_bool((B, Hq, L, N), p_keep=0.6)
        a = np.where(keep, a, -np.inf).astype(np.float32)
        return mx.array(a).astype(dtype)
    if kind == "add_dead":
        a = rand_add((B, Hq, L, N))
        flat = a.reshape(-1, N)
        n_dead = max(1, flat.shape[0] // 4) if flat.shape[0] else 0
        dead = rng.choice(flat.shape[0], size=n_dead, replace=False)
        flat[dead] = -np.inf
        return mx.array(flat.reshape(B, Hq, L, N)).astype(dtype)
    if kind == "add_broadcast":
        return mx.broadcast_to(mx.array(rand_add((1, 1, L, N))).astype(dtype), (B, Hq, L, N))
    raise ValueError(f"unknown mask kind {kind!r}")


@dataclasses.dataclass
class Case:
    q: mx.array
    k: tuple
    v: tuple
    scale: float
    mask: Any = None
    group_size: int = 64
    k_bits: int = 4
    v_bits: int = 4
    sinks: Optional[mx.array] = None
    k_tail: Optional[mx.array] = None
    v_tail: Optional[mx.array] = None
    desc: str = ""

    @property
    def scale_dtype(self):
        return self.k[1].dtype

    def kwargs(self) -> dict:
        kw = dict(scale=self.scale, mask=self.mask, group_size=self.group_size)
        # exercise both ways of giving the widths
        if self.k_bits == self.v_bits:
            kw["bits"] = self.k_bits
        else:
            kw["k_bits"] = self.k_bits
            kw["v_bits"] = self.v_bits
        if self.sinks is not None:
            kw["sinks"] = self.sinks
        if self.k_tail is not None:
            kw["k_tail"] = self.k_tail
            kw["v_tail"] = self.v_tail
        return kw

    def reference(self) -> np.ndarray:
        return sdpa_int4_ref(self.q, self.k, self.v, **self.kwargs())

    def kv_ref(self):
        """float64 (K, V): NumPy-dequantized cache followed by the tails."""
        K = dequantize_ref(*self.k, group_size=self.group_size, bits=self.k_bits)
        V = dequantize_ref(*self.v, group_size=self.group_size, bits=self.v_bits)
        if self.k_tail is not None:
            K = np.concatenate([K, to_f64(self.k_tail)], axis=2)
            V = np.concatenate([V, to_f64(self.v_tail)], axis=2)
        return K, V

    def tol(self) -> float:
        return tolerance(self.q.dtype, self.scale_dtype)

    def dequantized_mx(self):
        """(K, V) as mx arrays in q's dtype, made with mx.dequantize (+ tails)."""
        def deq(t, bits):
            p, s, b = t
            if p.size == 0:
                D = p.shape[-1] * 32 // bits
                return mx.zeros((*p.shape[:3], D), dtype=mx.float32)
            return mx.dequantize(
                p, s.astype(mx.float32), b.astype(mx.float32),
                group_size=self.group_size, bits=bits,
            )

        K = deq(self.k, self.k_bits)
        V = deq(self.v, self.v_bits)
        if self.k_tail is not None:
            K = mx.concatenate([K, self.k_tail.astype(mx.float32)], axis=2)
            V = mx.concatenate([V, self.v_tail.astype(mx.float32)], axis=2)
        return K.astype(self.q.dtype), V.astype(self.q.dtype)

    def __repr__(self) -> str:  # short, for pytest/hypothesis output
        m = self.mask
        if isinstance(m, mx.array):
            m = f"{DTYPE_NAMES.get(m.dtype, m.dtype)}{tuple(m.shape)}"
        return (
            f"Case(q={DTYPE_NAMES[self.q.dtype]}{tuple(self.q.shape)}, "
            f"k_packed={tuple(self.k[0].shape)}, scales={DTYPE_NAMES[self.scale_dtype]}, "
            f"gs={self.group_size}, k_bits={self.k_bits}, v_bits={self.v_bits}, "
            f"tail={None if self.k_tail is None else tuple(self.k_tail.shape)}, "
            f"mask={m}, sinks={self.sinks is not None}, scale={self.scale:.4g}, {self.desc})"
        )


def make_case(
    *,
    B: int = 1,
    Hq: int = 4,
    Hkv: int = 2,
    L: int = 1,
    N: int = 64,
    D: int = 128,
    T: int = 0,
    dtype=mx.float16,
    scale_dtype=None,
    group_size: int = 64,
    k_bits: int = 4,
    v_bits: int = 4,
    mask: str = "none",
    sinks: bool = False,
    strided: bool = False,
    view_offset: int = 0,
    transposed_q: bool = False,
    transposed_tail: bool = False,
    quantizer: Optional[str] = None,
    sharpness: float = 1.0,
    scale: Optional[float] = None,
    seed: int = 0,
    match: float = 0.5,
    v_offset: float = 0.3,
) -> Case:
    """Random, realistic-ish case in which the attention weights matter.

    K has a few outlier channels, `sharpness` multiplies K to make the softmax peakier.
    A `match` fraction of the query rows points at one key it can see (q gets a
    multiple of that key added: a logit a few units above the rest), often one of the
    last keys, so dropping, misplacing or mis-masking a key moves those rows a lot.
    V has a per-channel offset of standard deviation `v_offset` (small: a large common
    offset would dominate every output row and hide errors in the weights).  Sinks sit
    near each head's typical row log-sum-exp, a different distance for every head, so
    they take a real share of the weight and a sink read for the wrong head shows.
    `strided` hands K/V (and the tails) over as slices of larger buffers whose unused
    rows are NaN/garbage.
    """
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if isinstance(scale_dtype, str):
        scale_dtype = DTYPES[scale_dtype]
    scale_dtype = dtype if scale_dtype is None else scale_dtype
    quantizer = quantizer or default_quantizer(group_size)
    rng = np.random.default_rng(seed)
    assert Hq % Hkv == 0

    def kv_data(n):
        kd = rng.standard_normal((B, Hkv, n, D))
        outl = rng.random(D) < 0.05
        kd[..., outl] *= 4.0
        kd *= sharpness
        vd = rng.standard_normal((B, Hkv, n, D)) + rng.normal(0, v_offset, size=(1, Hkv, 1, D))
        return kd.astype(np.float32), vd.astype(np.float32)

    kd, vd = kv_data(N)
    if N > 0 and B > 0:  # (mx.quantize refuses empty arrays)
        k = quantize(mx.array(kd).astype(scale_dtype), group_size, k_bits, quantizer, rng)
        v = quantize(mx.array(vd).astype(scale_dtype), group_size, v_bits, quantizer, rng)
    else:
        def empty(bits):
            return (
                mx.zeros((B, Hkv, N, D * bits // 32), dtype=mx.uint32),
                mx.zeros((B, Hkv, N, D // group_size), dtype=scale_dtype),
                mx.zeros((B, Hkv, N, D // group_size), dtype=scale_dtype),
            )
        k, v = empty(k_bits), empty(v_bits)
    mx.eval(*k, *v)

    k_tail = v_tail = None
    if T > 0:
        ktd, vtd = kv_data(T)
        k_tail = mx.array(ktd).astype(dtype)
        v_tail = mx.array(vtd).astype(dtype)

    if strided:
        k = tuple(as_prefix_view(a, rng, offset=view_offset) for a in k)
        v = tuple(as_prefix_view(a, rng, offset=view_offset) for a in v)
        if T > 0:
            k_tail = as_prefix_view(k_tail, rng, capacity_step=64)
            v_tail = as_prefix_view(v_tail, rng, capacity_step=64)
    if T > 0 and transposed_tail:
        k_tail = as_transposed_view(k_tail)
        v_tail = as_transposed_view(v_tail)

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    qd = rng.standard_normal((B, Hq, L, D))
    NT = N + T
    if match > 0 and NT > 0 and B * Hq * L > 0:
        # keys as the op sees them (quantized), unit direction; a row's key is one it
        # sees under a causal mask, the last one it sees in half the cases
        keys = dequantize_ref(*k, group_size=group_size, bits=k_bits) if N > 0 else np.zeros((B, Hkv, 0, D))
        if T > 0:
            keys = np.concatenate([keys, ktd.astype(np.float64)], axis=2)
        norms = np.linalg.norm(keys, axis=-1)
        unit = keys / np.maximum(norms[..., None], 1e-30)
        G = Hq // Hkv
        for b_, h_, l_ in np.argwhere(rng.random((B, Hq, L)) < match):
            last = min(NT - 1, l_ + NT - L)
            if last < 0:
                continue
            j = last if rng.random() < 0.5 else int(rng.integers(0, last + 1))
            # the logit of key j gains a = 3..6 (whatever scale and sharpness say), so the
            # row's weight sits on key j and a few others, not on one key alone
            kn = norms[b_, h_ // G, j]
            if kn > 0 and scale != 0:
                qd[b_, h_, l_] += rng.uniform(3.0, 6.0) * unit[b_, h_ // G, j] / (abs(float(scale)) * kn)
    q = mx.array(qd.astype(np.float32)).astype(dtype)
    if transposed_q:
        q = as_transposed_view(q)

    m = make_mask(mask, B, Hq, L, N + T, dtype, rng)
    s = None
    if sinks:
        # near the head's median row log-sum-exp, offsets -1.5..1.5 distinct per head
        base = np.full(Hq, 0.5)
        if NT > 0 and B * L > 0:
            K = dequantize_ref(*k, group_size=group_size, bits=k_bits) if N > 0 else np.zeros((B, Hkv, 0, D))
            if T > 0:
                K = np.concatenate([K, to_f64(k_tail)], axis=2)
            lse = row_lse_ref(q, K, scale=float(scale), mask=m)
            for h_ in range(Hq):
                row = lse[:, h_][np.isfinite(lse[:, h_]) & (np.abs(lse[:, h_]) < 1e6)]
                if row.size:
                    base[h_] = float(np.median(row))
        offs = rng.permutation(np.linspace(-1.5, 1.5, Hq)) if Hq > 1 else np.zeros(1)
        s = mx.array((base + offs).astype(np.float32)).astype(dtype)
    mx.eval(q)
    return Case(
        q=q, k=k, v=v, scale=float(scale), mask=m, group_size=group_size,
        k_bits=k_bits, v_bits=v_bits, sinks=s, k_tail=k_tail, v_tail=v_tail,
        desc=f"quantizer={quantizer} strided={strided} seed={seed}",
    )
