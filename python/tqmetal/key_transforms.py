"""Exact transforms of keys (and values) before they are quantized.

Each keeps q.k (or the attention output) unchanged while making the stored
vectors easier to quantize; :class:`tqmetal.cache.Int4KVCache` applies them in
the order channel scaling, rotation, centering (see :mod:`tqmetal.cache`):

* Hadamard rotation (``mx.hadamard_transform``, orthonormal): (Hq).(Hk) = q.k;
  spreads outlier channels over the group.
* Channel scaling: keys divided by per-channel factors ``s``, queries multiplied
  by them: (q * s).(k / s) = q.k.
* Centering (in :mod:`tqmetal.cache`): a fixed per-channel mean subtracted.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .cache_storage import STORAGE_DTYPE


def hadamard_kind(d: int) -> Optional[str]:
    """How mx.hadamard_transform handles size d: "symmetric" (its own inverse),
    "orthogonal" (20 or 28 times a power of two: the inverse is the transpose)
    or None (unsupported; MLX 0.32.4's CPU backend corrupts memory on those)."""
    m = d
    while m > 1 and m % 2 == 0:
        m //= 2
    if m == 1 or (m == 3 and d % 12 == 0):
        return "symmetric"
    if (m == 5 and d % 20 == 0) or (m == 7 and d % 28 == 0):
        return "orthogonal"
    return None


def default_rotation(bits: int, what: str) -> bool:
    """Whether keys / values of this width are Hadamard-rotated when the caller
    does not say: keys below 8 bits (docs/fidelity.md: 2.7x less KL at 4 bits),
    values below 4 bits (3-bit values: KL 0.0038 -> 0.0027 on SmolLM2's code; at
    4 bits the default never measured a need)."""
    return bits < 8 if what == "keys" else bits < 4


def resolve_rotation(want: Optional[bool], d: int, bits: int, what: str) -> bool:
    """Whether a cache rotates its keys or values ("keys" / "values") of head dim
    d: as asked (True needs a Hadamard transform of size d), else
    :func:`default_rotation` where the transform exists."""
    ok = hadamard_kind(d) is not None
    if want and not ok:
        raise ValueError(f"Int4KVCache: no Hadamard transform of size {d} ({what})")
    return bool(default_rotation(bits, what) and ok) if want is None else bool(want)


_INVERSE = {}


def unrotate(x):
    """The inverse of ``mx.hadamard_transform`` along the last axis."""
    d = x.shape[-1]
    if hadamard_kind(d) == "symmetric":
        return mx.hadamard_transform(x)
    key = (d, x.dtype)
    if key not in _INVERSE:  # hadamard_transform(x) = x @ A with A = hadamard(I)
        _INVERSE[key] = mx.hadamard_transform(mx.eye(d)).T.astype(x.dtype)
    return x @ _INVERSE[key]


def to_model_space(x, dtype, rotated: bool, mean=None, scale=None):
    """K or V (float32, as stored: centred, rotated, divided by channel scales)
    back to what the model computed: the mean added back, cast to ``dtype``,
    un-rotated, times the channel scales (the inverse of the store's order)."""
    if mean is not None:
        x = x + mean
    x = x.astype(dtype)
    x = unrotate(x) if rotated else x
    if scale is not None:
        x = x * scale.astype(x.dtype)
    return x


def normalized_scales(r, alpha: float):
    """``r ** alpha`` (r clamped away from zero), divided by its geometric mean
    over the last axis, in float16."""
    r = mx.maximum(r, 1e-3 * mx.max(r, axis=-1, keepdims=True) + 1e-12)
    logs = alpha * mx.log(r)
    logs = logs - mx.mean(logs, axis=-1, keepdims=True)
    return mx.exp(logs).astype(STORAGE_DTYPE)


def channel_scales(keys, alpha: float = 0.5, center: bool = True):
    """Per-head, per-channel key scales ``s`` [B, H, 1, D] (float16) from ``keys``.

    ``s_c = r_c ** alpha`` with ``r_c`` the largest magnitude of channel c over
    the tokens (after subtracting the channel mean when ``center``), divided by
    the geometric mean over the channels (so a head's key norms stay the same
    on average). Keys are stored as ``k / s`` and queries multiplied by ``s``:
    (q * s).(k / s) = q.k exactly, whatever ``s`` is (it is rounded to float16
    once and both sides use the rounded value). alpha 1 gives every channel the
    same range; alpha 0.5 balances the key's quantization error against the
    query channel it is multiplied by, if queries are spread evenly.
    """
    k = keys.astype(mx.float32)
    if center:
        k = k - mx.mean(k, axis=2, keepdims=True)
    return normalized_scales(mx.max(mx.abs(k), axis=2, keepdims=True), alpha)


def scale_queries(queries, scales):
    """Queries times the key channel scales of their KV head (GQA: Hq = r * Hk)."""
    s = scales.astype(queries.dtype)
    B, Hq, L, D = queries.shape
    Hk = s.shape[1]
    if Hq == Hk:
        return queries * s
    q = queries.reshape(B, Hk, Hq // Hk, L, D) * mx.expand_dims(s, 2)
    return q.reshape(B, Hq, L, D)
