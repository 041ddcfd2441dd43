"""Independent float64 NumPy reference for ``tqmetal.sdpa_int4`` plus case builders.

Nothing here calls ``mx.dequantize`` or ``mx.fast``: the packed words are unpacked
with NumPy bit operations (4-bit element j of a row lives in word j // 8 at bit
4 * (j % 8), low nibble first; 8-bit element j is byte j % 4 of word j // 4) and the
attention is computed in float64.

Fully masked rows follow what ``mx.fast.scaled_dot_product_attention`` does (checked
in ``tests/test_sdpa_int4.py::TestReference``):

* boolean / "causal" mask, every key masked, no sinks -> uniform average of V over all
  N_total keys (MLX fills masked logits with finfo.min, not -inf, so the row is
  flat);
* the same with sinks -> 0 (the sink logit dominates finfo.min);
* additive mask, the whole row -inf, no sinks -> NaN;
* the same with sinks -> 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# NMSE thresholds from the spec.
TOL_F32 = 1e-6
TOL_HALF = 5e-4


def tolerance(q_dtype, scale_dtype) -> float:
    """NMSE bound: 1e-6 for float32 q with float32 scales, otherwise 5e-4."""
    if q_dtype == mx.float32 and scale_dtype == mx.float32:
        return TOL_F32
    return TOL_HALF


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
    """uint32 [..., W] -> integer codes [..., W * 32 // bits] (int64)."""
    if bits <= 0 or 32 % bits:
        raise ValueError(f"reference unpacker supports bits dividing 32, got {bits}")
    p = to_numpy(packed)
    if p.dtype != np.uint32:
        raise TypeError(f"packed must be uint32, got {p.dtype}")
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint64) * bits).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    codes = (p.astype(np.uint64)[..., None] >> shifts) & mask
    return codes.reshape(*p.shape[:-1], p.shape[-1] * per_word).astype(np.int64)


def pack_codes(codes, bits: int) -> np.ndarray:
    """integer codes [..., D] (0 <= c < 2**bits) -> uint32 [..., D * bits // 32]."""
    c = np.asarray(codes).astype(np.uint64)
    per_word = 32 // bits
    D = c.shape[-1]
    if D % per_word:
        raise ValueError(f"D={D} not a multiple of {per_word}")
    if c.size and (c.max() >= (1 << bits)):
        raise ValueError("code out of range")
    c = c.reshape(*c.shape[:-1], D // per_word, per_word)
    shifts = (np.arange(per_word, dtype=np.uint64) * bits).astype(np.uint64)
    words = np.bitwise_or.reduce(c << shifts, axis=-1) if per_word > 1 else c[..., 0]
    return words.astype(np.uint32)


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
    out = g * s[..., None] + b[..., None]
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


def _masked_logits(q, k, scale: float, mask):
    """scale * q k^T with the mask applied (-inf where a boolean/causal mask hides a key),
    and the boolean view of the mask (None for no mask or an additive one)."""
    L, N = q.shape[2], k.shape[2]
    logits = float(scale) * np.einsum("bhld,bhnd->bhln", q, k)
    allowed = None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask string {mask!r}")
        allowed = np.broadcast_to(causal_mask(L, N), logits.shape)
    elif mask is not None:
        m = to_numpy(mask)
        if m.dtype == np.bool_:
            allowed = np.broadcast_to(m, logits.shape)
        else:
            logits = logits + np.broadcast_to(m.astype(np.float64), logits.shape)
    if allowed is not None:
        logits = np.where(allowed, logits, -np.inf)
    return logits, allowed


def attention_ref(q, k, v, *, scale: float, mask=None, sinks=None) -> np.ndarray:
    """float64 softmax(scale * q k^T + mask) v with GQA, sinks and MLX's masked-row rules.

    q: [B, Hq, L, D]; k, v: [B, Hkv, N, D]; mask: None | "causal" | bool array |
    additive float array broadcastable to [B, Hq, L, N]; sinks: [Hq] or None.
    """
    q = to_f64(q)
    k = to_f64(k)
    v = to_f64(v)
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    N = k.shape[2]
    assert Hq % Hkv == 0, (Hq, Hkv)
    rep = Hq // Hkv
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    logits, allowed = _masked_logits(q, k, scale, mask)

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if sinks is not None:
            s = to_f64(sinks).reshape(1, Hq, 1, 1)
            s = np.broadcast_to(s, (B, Hq, L, 1))
            full = np.concatenate([s, logits], axis=-1)
        else:
            full = logits
        mx_ = full.max(axis=-1, keepdims=True)
        e = np.exp(full - mx_)
        p = e / e.sum(axis=-1, keepdims=True)
        if sinks is not None:
            p = p[..., 1:]
        out = np.einsum("bhln,bhnd->bhld", p, v)

    if allowed is not None:
        dead = ~allowed.any(axis=-1)  # [B, Hq, L]
        if dead.any():
            if sinks is None:
                uniform = v.mean(axis=2, keepdims=True)  # [B, Hq, 1, D]
                out = np.where(dead[..., None], uniform, out)
            else:
                out = np.where(dead[..., None], 0.0, out)
    return out


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


def check_close(out, ref, tol: float, *, context: str = "") -> float:
    """Assert out ~= ref: same NaN pattern, NMSE over the finite part <= tol.

    Returns the NMSE.  The assertion message says where the worst error is.
    """
    o = to_f64(out)
    r = to_f64(ref)
    assert o.shape == r.shape, f"{context}: shape {o.shape} != reference {r.shape}"
    r_nan = np.isnan(r)
    o_nan = np.isnan(o)
    if (r_nan != o_nan).any():
        bad = np.argwhere(r_nan != o_nan)
        first = tuple(int(i) for i in bad[0])
        raise AssertionError(
            f"{context}: NaN pattern differs at {len(bad)} elements, first {first}: "
            f"out={o[first]!r} ref={r[first]!r}"
        )
    fin = ~r_nan
    assert np.isfinite(o[fin]).all(), f"{context}: non-finite output where reference is finite"
    err = nmse(o[fin], r[fin])
    if not err <= tol:
        diff = np.abs(np.where(fin, o - r, 0.0))
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape))
        # rows (b, h, l) whose own NMSE exceeds tol: shows whether errors are localized
        d2 = (np.where(fin, o - r, 0.0) ** 2).sum(-1)
        r2 = (np.where(fin, r, 0.0) ** 2).sum(-1)
        bad_rows = np.argwhere(d2 > tol * np.maximum(r2, 1e-30))
        raise AssertionError(
            f"{context}: NMSE {err:.3e} > {tol:.1e}; worst |err| {diff[worst]:.4e} at "
            f"[b,h,l,d]={worst} (out={o[worst]:.6g}, ref={r[worst]:.6g}); "
            f"{len(bad_rows)} bad (b,h,l) rows, first few {bad_rows[:5].tolist()}"
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
        flat = m.reshape(-1, N)
        n_dead = max(1, flat.shape[0] // 4)
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
        flat = m.reshape(-1, N)
        for r in range(flat.shape[0]):
            flat[r, rng.integers(0, N, size=3)] = True
        return mx.array(m)
    if kind == "bool_L1":
        m = rng.random((L, 1)) < 0.7
        if L > 1:
            m[0, 0] = False  # one dead row (uniform average / 0 with sinks)
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
        n_dead = max(1, flat.shape[0] // 4)
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
            if p.shape[2] == 0:
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
) -> Case:
    """Random, realistic-ish case.

    K has a few outlier channels, V has per-channel offsets (so outputs are not ~0),
    `sharpness` multiplies K to make the softmax peakier.  `strided` hands K/V (and the
    tails) over as slices of larger buffers whose unused rows are NaN/garbage.
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
        vd = rng.standard_normal((B, Hkv, n, D)) + rng.normal(0, 1.0, size=(1, Hkv, 1, D))
        return kd.astype(np.float32), vd.astype(np.float32)

    kd, vd = kv_data(N)
    if N > 0:
        k = quantize(mx.array(kd).astype(scale_dtype), group_size, k_bits, quantizer, rng)
        v = quantize(mx.array(vd).astype(scale_dtype), group_size, v_bits, quantizer, rng)
    else:
        def empty(bits):
            return (
                mx.zeros((B, Hkv, 0, D * bits // 32), dtype=mx.uint32),
                mx.zeros((B, Hkv, 0, D // group_size), dtype=scale_dtype),
                mx.zeros((B, Hkv, 0, D // group_size), dtype=scale_dtype),
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

    q = mx.array(rng.standard_normal((B, Hq, L, D)).astype(np.float32)).astype(dtype)
    if transposed_q:
        q = as_transposed_view(q)

    m = make_mask(mask, B, Hq, L, N + T, dtype, rng)
    s = None
    if sinks:
        s = mx.array(rng.normal(0.5, 1.5, size=(Hq,)).astype(np.float32)).astype(dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    mx.eval(q)
    return Case(
        q=q, k=k, v=v, scale=float(scale), mask=m, group_size=group_size,
        k_bits=k_bits, v_bits=v_bits, sinks=s, k_tail=k_tail, v_tail=v_tail,
        desc=f"quantizer={quantizer} strided={strided} seed={seed}",
    )
