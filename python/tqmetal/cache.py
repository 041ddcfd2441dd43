"""KV caches for mlx-lm that store old tokens int4/int8-quantized.

    from tqmetal.cache import make_prompt_cache
    from tqmetal.patch import patch_mlx_lm

    patch_mlx_lm()                       # models' attention -> tqmetal.sdpa_int4
    cache = make_prompt_cache(model, kv="int4")
    text = mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache)

Layout of one layer's cache (positions are token indices in the sequence)::

    quantized  [qstart, qstart + nq)   affine int4/int8, group_size, one triple each for K, V
    fp buffer  [0, ns) sinks | [offset - nw, offset) window     full precision, one buffer

Tokens arrive in the fp buffer: the first ``sinks`` tokens stay there for good
(attention sinks), the others join the recent-token window. When the window
reaches ``window + chunk_size`` tokens, its oldest tokens are quantized
(``tqmetal.quantize``) and appended to the quantized part, leaving ``window``
tokens. An update of S > window tokens (prefill) quantizes the tokens that
leave the window at once: no full-precision copy of the prompt is kept.

The op attends ``[quantized..., fp buffer...]``, so it sees the keys in the
order ``[qstart..), [0..ns), [offset - nw..)``, not in sequence order.
Attention is order-independent except for the mask, so :meth:`fused_attention`
translates mlx-lm's masks (made in sequence order by :meth:`make_mask`, as
``KVCache`` makes them) into the op's key order: ``None`` stays ``None``;
``"causal"`` stays ``"causal"`` (bottom-right) while the newest L keys of the
op order are the L new tokens, that is while the window holds all of them,
else it becomes a boolean mask built from the key positions; arrays have their
last axis permuted.

With ``rotate_keys`` the keys are multiplied by the orthonormal Hadamard matrix
H (``mx.hadamard_transform``) before they are stored, sinks and window
included, and the queries once per call: (Hq).(Hk) = q.k, while the rotated
keys spread outlier channels over the group so 4-bit keys lose far less.
``rotate_values`` does the same to V and un-rotates the output with H^T.

With ``center_keys`` a per-head, per-channel mean ``m`` (of the first update's
non-sink keys, fixed from then on) is subtracted from every stored key, sinks
and window included: q.(k - m) = q.k - q.m, the same shift for every key of a
query row, so the softmax is unchanged while the quantized keys lose their
common offset (keys often have a few channels far from zero, which set the
range of every group they are in). Not exact with attention sinks (a fixed
logit in the softmax): with sinks the fused path is not used.

With ``channel_scale`` (SmoothQuant-style) every key channel c of a head is
divided by a factor ``s_c`` before the rotation and centering, and the queries
are multiplied by it before they are rotated: (q * s).(k / s) = q.k, exact
for any s (sinks included). ``s`` is fixed from the first update's non-sink
keys (see :func:`channel_scales`: the channel's largest centred magnitude to
the power ``channel_scale_alpha``, normalised) unless ``key_scales`` gives it
(e.g. :func:`calibrate_channel_scales`, from queries and keys of a calibration
text), stored in float16 next to the key mean, and carried by ``state``,
save/load and ``trim`` like it (given factors survive a trim to zero). It shrinks
the channels whose outliers set the quantization ranges and moves their share
of the error to where the queries weigh it less; on SmolLM2-135M neither kind
of factor helped (README, Fidelity), so it is off by default.

With ``attend_before_quantizing`` (a multi-token update, i.e. prefill), the
tokens an update pushes out of the window are quantized and stored as usual,
but this update's own attention still reads them in full precision (a tail
of the old window plus the new tokens, built from the update's input, freed
after the call): every prompt token attends its own chunk and the ``window``
tokens before it unquantized, as it would in decode. Only the next update's
attention sees them quantized. Nothing more is stored; the transient tail is
the size of the update, not of the cache. Not used by the sliding-window cache.

Storage is float16 whatever the model's dtype: the full-precision sinks and
window, the quantization scales and biases, the key mean and channel scales.
Queries, outputs and the fetched K/V keep the model's dtype.

``update_and_fetch`` returns, lazily, the dequantized K and V in sequence
order: an attention function that does not know this cache (mlx-lm without
:func:`tqmetal.patch.patch_mlx_lm`) is still correct, just not economical;
the patched one never evaluates them, so they cost a few graph nodes only.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import mlx.core as mx
from mlx_lm.models import cache as _mlc
from mlx_lm.models.base import create_causal_mask

from .ops import quantize, sdpa_int4

__all__ = ["Int4KVCache", "RotatingInt4KVCache", "make_prompt_cache", "fused_op_available",
           "channel_scales", "calibrate_channel_scales"]

# The dtype of everything the cache stores in floating point (see the module docstring).
STORAGE_DTYPE = mx.float16

_KV_BITS = {"int4": (4, 4), "int8": (8, 8), "k8v4": (8, 4), "k4v8": (4, 8)}


def _round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


_SHIFTS = {}


def _dequantize(packed, scales, biases, group_size, bits):
    """mx.dequantize for any group size, in cheap-to-build ops.

    Built on every fetch and usually never evaluated, so graph-building time
    is what counts: this takes a third of mx.dequantize's.
    """
    if bits not in _SHIFTS:
        _SHIFTS[bits] = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = (mx.expand_dims(packed, -1) >> _SHIFTS[bits]) & ((1 << bits) - 1)
    q = q.reshape(*packed.shape[:-1], -1, group_size).astype(scales.dtype)
    x = q * mx.expand_dims(scales, -1) + mx.expand_dims(biases, -1)
    return x.reshape(*packed.shape[:-1], -1)


def _hadamard_kind(d: int) -> Optional[str]:
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


_INVERSE = {}


def _unrotate(x):
    d = x.shape[-1]
    if _hadamard_kind(d) == "symmetric":
        return mx.hadamard_transform(x)
    key = (d, x.dtype)
    if key not in _INVERSE:  # hadamard_transform(x) = x @ A with A = hadamard(I)
        _INVERSE[key] = mx.hadamard_transform(mx.eye(d)).T.astype(x.dtype)
    return x @ _INVERSE[key]


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
    r = mx.max(mx.abs(k), axis=2, keepdims=True)
    r = mx.maximum(r, 1e-3 * mx.max(r, axis=-1, keepdims=True) + 1e-12)
    logs = alpha * mx.log(r)
    logs = logs - mx.mean(logs, axis=-1, keepdims=True)
    return mx.exp(logs).astype(STORAGE_DTYPE)


def calibrate_channel_scales(model, tokens, alpha: float = 0.5, chunk: int = 128) -> list:
    """Per layer, key channel scales ``[1, H_kv, 1, D]`` (float16) from the
    queries and keys the model computes on ``tokens`` (a calibration text):
    ``s_c = (rms_k_c / rms_q_c) ** alpha`` with the keys centred and the queries
    of the KV head's group, normalised like :func:`channel_scales`. With
    rotation, the key's quantization error after the transform is spread evenly
    over the channels, so the logit error goes as |q * s| |k / s|, smallest for
    alpha 0.5; keys-only factors miss that queries are often large in the same
    channels. None for layers whose attention did not run.
    """
    from .patch import patched

    n = len(model.layers)
    stats = [None] * n

    class _Probe(_mlc.KVCache):
        def fused_attention(self, queries, keys, values, *, scale, mask=None, sinks=None):
            L = queries.shape[2]
            k = keys[..., -L:, :].astype(mx.float32)
            B, Hq, _, D = queries.shape
            Hk = k.shape[1]
            q = queries.astype(mx.float32).reshape(B, Hk, Hq // Hk, L, D)
            new = (B * L, mx.sum(k, axis=(0, 2)), mx.sum(k * k, axis=(0, 2)),
                   mx.sum(q * q, axis=(0, 2, 3)) / (Hq // Hk))
            old = stats[self.layer]
            stats[self.layer] = new if old is None else tuple(a + b for a, b in zip(old, new))
            mx.eval(stats[self.layer][1:])
            return None

    caches = []
    for i in range(n):
        caches.append(_Probe())
        caches[-1].layer = i
    toks = mx.array(list(tokens), dtype=mx.int32)[None]
    with patched():
        for start in range(0, toks.shape[1], chunk):
            mx.eval(model(toks[:, start:start + chunk], cache=caches))
    out = []
    for st in stats:
        if st is None:
            out.append(None)
            continue
        cnt, sk, sk2, sq2 = st
        var_k = mx.maximum(sk2 / cnt - (sk / cnt) ** 2, 0.0)
        r = mx.sqrt(var_k) / mx.maximum(mx.sqrt(sq2 / cnt), 1e-12)  # [Hk, D]
        r = mx.maximum(r, 1e-3 * mx.max(r, axis=-1, keepdims=True) + 1e-12)
        logs = alpha * mx.log(r)
        logs = logs - mx.mean(logs, axis=-1, keepdims=True)
        out.append(mx.exp(logs).astype(STORAGE_DTYPE)[None, :, None, :])
    return out


_GPU_OK = None


def fused_op_available() -> bool:
    """Whether tqmetal.sdpa_int4 runs on the default device (CPU always; GPU with a Metal build)."""
    global _GPU_OK
    if mx.default_device() == mx.cpu:
        return True
    if _GPU_OK is None:
        try:
            z = mx.zeros((1, 1, 1, 32))
            zq = quantize(z, 32, 4)
            sdpa_int4(z, zq, zq, scale=1.0, group_size=32, stream=mx.gpu)
            _GPU_OK = True
        except Exception:
            _GPU_OK = False
    return _GPU_OK


# One memo entry shared by all layers: every layer of a model has the same
# layout, so the mask translated for layer 0 serves the others in the step.
_MASK_MEMO = [None, None]


class Int4KVCache(_mlc._BaseCache):
    """mlx-lm KV cache keeping old tokens int4/int8-quantized for ``tqmetal.sdpa_int4``.

    Args:
        group_size: quantization group along the head dim (16, 32, 64, 128).
        bits: 4 or 8, for K and V unless ``k_bits`` / ``v_bits`` say otherwise
            (``k_bits=8, v_bits=4`` is "K8V4").
        window: most recent tokens kept in full precision.
        sinks: first tokens kept in full precision for good.
        rotate_keys: Hadamard-rotate keys (and queries). None = only for 4-bit
            keys, when the head dim has a Hadamard transform.
        rotate_values: Hadamard-rotate values (the output is rotated back).
        center_keys: subtract a per-channel key mean before storing keys
            (exact for attention without sinks; see the module docstring).
        channel_scale: divide every key channel by a per-head factor (and
            multiply the queries by it) before rotating, fixed from the first
            update (see the module docstring).
        channel_scale_alpha: the exponent of that factor (0: no scaling).
        key_scales: fixed factors [H, D] (or [1, H, 1, D]) to use instead, e.g.
            from :func:`calibrate_channel_scales` (queries and keys of a
            calibration text); implies ``channel_scale``.
        attend_before_quantizing: a multi-token update attends the tokens it
            quantizes in full precision (see the module docstring).
        chunk_size: tokens quantized at a time once the window overflows.

    ``nbytes`` counts every buffer as allocated (quantized capacity grows in
    steps of 256 tokens; the fp buffer holds ``sinks + window + chunk_size``
    tokens), like mlx-lm's caches; ``nbytes_used`` counts only held tokens.
    """

    step = 256
    max_size = None  # no sliding window: nothing is ever dropped

    def __init__(
        self,
        group_size: int = 64,
        bits: int = 4,
        *,
        k_bits: Optional[int] = None,
        v_bits: Optional[int] = None,
        window: int = 128,
        sinks: int = 4,
        rotate_keys: Optional[bool] = None,
        rotate_values: bool = False,
        center_keys: bool = True,
        attend_before_quantizing: bool = True,
        chunk_size: int = 64,
        channel_scale: bool = False,
        channel_scale_alpha: float = 0.5,
        key_scales=None,
    ):
        self.group_size = group_size
        self.k_bits = bits if k_bits is None else k_bits
        self.v_bits = bits if v_bits is None else v_bits
        for b in (self.k_bits, self.v_bits):
            if b not in (4, 8):
                raise ValueError(f"bits must be 4 or 8, got {b}")
        if group_size not in (16, 32, 64, 128):
            raise ValueError(f"group_size must be 16, 32, 64 or 128, got {group_size}")
        if window < 0 or sinks < 0 or chunk_size < 1:
            raise ValueError("window and sinks must be >= 0 and chunk_size >= 1")
        if not 0 <= channel_scale_alpha <= 1:
            raise ValueError(f"channel_scale_alpha must be in [0, 1], got {channel_scale_alpha}")
        self.window = window
        self.num_sinks = sinks
        self.chunk_size = chunk_size
        self.rotate_keys = rotate_keys
        self.rotate_values = rotate_values
        self.center_keys = bool(center_keys)
        self.attend_before_quantizing = bool(attend_before_quantizing)
        self.channel_scale = bool(channel_scale) or key_scales is not None
        self.channel_scale_alpha = float(channel_scale_alpha)
        self.channel_scale_fixed = key_scales is not None
        self._kscale_given = None
        if key_scales is not None:
            ks = mx.array(key_scales)
            if ks.ndim == 2:
                ks = ks[None, :, None, :]
            if ks.ndim != 4 or ks.shape[0] != 1 or ks.shape[2] != 1:
                raise ValueError(f"key_scales must be [H, D] or [1, H, 1, D], got {ks.shape}")
            self._kscale_given = ks.astype(STORAGE_DTYPE)
        self._reset()

    def _reset(self):
        self.offset = 0
        self._ns = 0  # sink tokens held
        self._nw = 0  # window tokens held
        self._nq = 0  # quantized tokens held, at slots [qlo, qlo + nq)
        self._qlo = 0
        self._qstart = 0  # position of the token in slot qlo
        self._rot_k = self._rot_v = None  # resolved on the first update
        self._kmean = None  # [B, H, 1, D] subtracted from stored keys (center_keys)
        self._kscale = None  # [B, H, 1, D] stored keys are k / s before rotation (channel_scale)
        self.model_dtype = None  # name of the dtype K/V arrive in, e.g. "float32"
        self._fk = self._fv = None  # fp buffers [B, H, sinks + window + chunk, D]
        self._qk = self._qv = None  # lists (packed, scales, biases)
        self._fetched = None
        self._qviews = None  # (key, k views, v views) of the held quantized slots
        self._fresh = 0  # tokens this update quantized that its attention reads in fp
        self._fresh_kv = None  # those tokens and the window after them, fp (K, V)

    # What the current call's attention reads: the last _fresh quantized tokens
    # are read from _fresh_kv instead (attend_before_quantizing).
    @property
    def _aq(self):
        return self._nq - self._fresh

    @property
    def _aw(self):
        return self._nw + self._fresh

    # ---- layout helpers -------------------------------------------------

    @property
    def _span(self):
        """How many non-sink positions back a query sees (None: all)."""
        return None

    def _needed_from(self, first_query: int) -> int:
        """Oldest non-sink position any query from ``first_query`` on sees."""
        return 0

    @property
    def _qcap(self) -> int:
        return 0 if self._qk is None else self._qk[0].shape[2]

    def _target_cap(self, need: int) -> Optional[int]:
        """Capacity to allocate for ``need`` tokens; None keeps the buffer."""
        if self._qlo + need <= self._qcap:
            return None
        return _round_up(need, self.step)

    def _setup(self, keys, values):
        B, H, _, D = keys.shape
        Dv = values.shape[-1]
        for name, d in (("keys", D), ("values", Dv)):
            if d % self.group_size:
                raise ValueError(
                    f"Int4KVCache: {name} head dim {d} is not a multiple of "
                    f"group_size={self.group_size} (try group_size=16 or 32)"
                )
        for attr, want, d, bits in (
            ("_rot_k", self.rotate_keys, D, self.k_bits),
            ("_rot_v", self.rotate_values, Dv, self.v_bits),
        ):
            ok = _hadamard_kind(d) is not None
            if want and not ok:
                raise ValueError(f"Int4KVCache: no Hadamard transform of size {d}")
            if want is None:
                want = bits == 4 and ok
            setattr(self, attr, bool(want))
        n = self.num_sinks + self.window + self.chunk_size
        self.model_dtype = _dtype_name(keys.dtype)
        self._fk = mx.zeros((B, H, n, D), STORAGE_DTYPE)
        self._fv = mx.zeros((B, H, n, Dv), STORAGE_DTYPE)

    def _reserve(self, n: int):
        """Make room for n more quantized tokens after slot qlo + nq."""
        need = self._nq + n
        cap = self._target_cap(need)
        if cap is None:
            return
        lo, hi = self._qlo, self._qlo + self._nq

        def realloc(buf):
            shape = (*buf.shape[:2], cap - self._nq, buf.shape[3])
            fresh = mx.zeros(shape, buf.dtype)
            return mx.concatenate([buf[..., lo:hi, :], fresh], axis=2) if hi > lo else fresh

        self._qviews = None
        self._qk = [realloc(b) for b in self._qk]
        self._qv = [realloc(b) for b in self._qv]
        self._qlo = 0

    def _drop_dead(self, first_query: int):
        dead = min(self._nq, max(0, self._needed_from(first_query) - self._qstart))
        self._qlo += dead
        self._nq -= dead
        self._qstart += dead

    def _push(self, k, v, first_query: int):
        """Quantize k, v (the oldest tokens leaving the window) into the quantized part."""
        n = k.shape[2]
        skip = min(n, max(0, self._needed_from(first_query) - (self._qstart + self._nq)))
        if skip:  # too old for every query from now on (only with a sliding window)
            k, v, n = k[..., skip:, :], v[..., skip:, :], n - skip
            self._qstart += skip
        if n == 0:
            return
        kq = quantize(k, self.group_size, self.k_bits)
        vq = quantize(v, self.group_size, self.v_bits)
        if self._qk is None:
            B, H = k.shape[:2]
            self._qk = [mx.zeros((B, H, 0, x.shape[-1]), x.dtype) for x in kq]
            self._qv = [mx.zeros((B, H, 0, x.shape[-1]), x.dtype) for x in vq]
        self._reserve(n)
        self._qviews = None  # views would keep MLX from updating the buffers in place
        a = self._qlo + self._nq
        for buf, new in zip(self._qk + self._qv, kq + vq):
            buf[..., a : a + n, :] = new
        self._nq += n

    # ---- the cache protocol ---------------------------------------------

    def update_and_fetch(self, keys, values):
        if self._fk is None:
            self._setup(keys, values)
        S = keys.shape[2]
        first = self.offset
        self._fresh, self._fresh_kv = 0, None
        if self.channel_scale:
            if self._kscale is None and getattr(self, "_kscale_given", None) is not None:
                given = self._kscale_given
                if given.shape[1] != keys.shape[1] or given.shape[3] != keys.shape[3]:
                    raise ValueError(f"Int4KVCache: key_scales {given.shape} do not fit keys "
                                     f"{keys.shape}")
                self._kscale = given
            elif self._kscale is None:
                lo = min(max(self.num_sinks - self._ns, 0), S - 1)
                self._kscale = channel_scales(keys[..., lo:, :], self.channel_scale_alpha,
                                              self.center_keys)
            keys = keys / self._kscale
        if self._rot_k:
            keys = mx.hadamard_transform(keys)
        if self._rot_v:
            values = mx.hadamard_transform(values)
        if self.center_keys:
            if self._kmean is None:
                # The first update's keys past the sinks (all of them if it has
                # only sinks); the mean is then fixed, which keeps it exact.
                lo = min(max(self.num_sinks - self._ns, 0), S - 1)
                self._kmean = mx.mean(keys[..., lo:, :].astype(mx.float32), axis=2,
                                      keepdims=True).astype(STORAGE_DTYPE)
            keys = keys - self._kmean
        keys, values = keys.astype(STORAGE_DTYPE), values.astype(STORAGE_DTYPE)
        self._drop_dead(first)
        i = 0
        if self._ns < self.num_sinks:
            i = min(self.num_sinks - self._ns, S)
            self._fk[..., self._ns : self._ns + i, :] = keys[..., :i, :]
            self._fv[..., self._ns : self._ns + i, :] = values[..., :i, :]
            self._ns += i
            self._qstart = self._ns
        if i < S:
            k, v = (keys[..., i:, :], values[..., i:, :]) if i else (keys, values)
            n, nw, W, s0 = S - i, self._nw, self.window, self.num_sinks
            if nw + n < W + self.chunk_size:
                self._fk[..., s0 + nw : s0 + nw + n, :] = k
                self._fv[..., s0 + nw : s0 + nw + n, :] = v
                self._nw += n
            else:
                if nw:
                    k = mx.concatenate([self._fk[..., s0 : s0 + nw, :], k], axis=2)
                    v = mx.concatenate([self._fv[..., s0 : s0 + nw, :], v], axis=2)
                out = nw + n - W  # tokens leaving the window, oldest first
                nq = self._nq
                self._push(k[..., :out, :], v[..., :out, :], first)
                if self.attend_before_quantizing and self._span is None and n > 1:
                    self._fresh, self._fresh_kv = self._nq - nq, (k, v)
                if W:
                    self._fk[..., s0 : s0 + W, :] = k[..., out:, :]
                    self._fv[..., s0 : s0 + W, :] = v[..., out:, :]
                self._nw = W
        self.offset += S
        return self._fetch()

    def _quantized_views(self):
        if self._qk is None:
            return None, None
        lo, hi = self._qlo, self._qlo + self._aq
        if self._qviews is None or self._qviews[0] != (lo, hi):
            if lo == 0 and hi == self._qcap:
                views = self._qk, self._qv
            else:
                views = [x[..., lo:hi, :] for x in self._qk], [x[..., lo:hi, :] for x in self._qv]
            self._qviews = ((lo, hi), *views)
        return self._qviews[1:]

    def _empty_quantized(self, bits):
        B, H, _, D = self._fk.shape
        gs = mx.zeros((B, H, 0, D // self.group_size), self._fk.dtype)
        return [mx.zeros((B, H, 0, D * bits // 32), mx.uint32), gs, gs]

    def _window(self, fp):
        """The fp window the current call attends: the buffer's, or the fresh tail."""
        if self._fresh:
            return self._fresh_kv[0 if fp is self._fk else 1]
        s0 = self.num_sinks
        return fp[..., s0 : s0 + self._nw, :]

    def keys_and_values(self):
        """K and V as the current call attends them: dequantized, un-rotated, in
        sequence order (lazy)."""
        ns, nw = self._ns, self._aw
        qk, qv = self._quantized_views()
        out = []
        for fp, q, bits, rot in (
            (self._fk, qk, self.k_bits, self._rot_k),
            (self._fv, qv, self.v_bits, self._rot_v),
        ):
            parts = []
            if ns:
                parts.append(fp[..., :ns, :])
            if self._aq:
                # in float32, as the fused op computes (float16 products round)
                pk, sc, bi = q
                parts.append(_dequantize(pk, sc.astype(mx.float32), bi.astype(mx.float32),
                                         self.group_size, bits))
            if nw:
                parts.append(self._window(fp))
            parts = [x.astype(mx.float32) for x in parts]
            x = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
            if fp is self._fk and self._kmean is not None:
                x = x + self._kmean
            x = x.astype(getattr(mx, self.model_dtype))
            x = _unrotate(x) if rot else x
            if fp is self._fk and self._kscale is not None:
                x = x * self._kscale.astype(x.dtype)
            out.append(x)
        return tuple(out)

    def _fetch(self):
        k, v = self.keys_and_values()
        # Weak references: the patched attention checks that it is handed what
        # this call returned (models that edit K/V after fetching get the
        # fallback) without keeping buffers alive, which would block MLX from
        # updating them in place.
        self._fetched = (weakref.ref(k), weakref.ref(v))
        return k, v

    def fused_attention(self, queries, keys, values, *, scale, mask=None, sinks=None):
        """``tqmetal.sdpa_int4`` over this cache, or None if it cannot serve this call.

        ``keys``/``values`` must be what the last ``update_and_fetch`` returned;
        ``mask`` is in sequence order as mlx-lm makes it.
        """
        f = self._fetched
        if f is None or f[0]() is not keys or f[1]() is not values:
            return None
        D = queries.shape[-1]
        if self._fk.shape[-1] != D or self._fv.shape[-1] != D or not fused_op_available():
            return None
        if sinks is not None and self._kmean is not None:
            return None  # centering shifts every logit, not the sinks' fixed one

        L = queries.shape[2]
        q = queries if self._kscale is None else self._scale_queries(queries)
        q = mx.hadamard_transform(q) if self._rot_k else q
        qk, qv = self._quantized_views()
        if qk is None:
            qk, qv = self._empty_quantized(self.k_bits), self._empty_quantized(self.v_bits)
        if self._fresh:
            kt, vt = (self._window(b) if not self._ns else
                      mx.concatenate([b[..., :self._ns, :], self._window(b)], axis=2)
                      for b in (self._fk, self._fv))
        else:
            t = self._ns + self._nw
            kt, vt = (self._fk[..., :t, :], self._fv[..., :t, :]) if t else (None, None)
        out = sdpa_int4(
            q, qk, qv, scale=scale, mask=self._op_mask(mask, L),
            group_size=self.group_size, k_bits=self.k_bits, v_bits=self.v_bits,
            sinks=sinks, k_tail=kt, v_tail=vt,
        )
        return _unrotate(out) if self._rot_v else out

    def _scale_queries(self, queries):
        """Queries times the key channel scales of their KV head (GQA: Hq = r * Hk)."""
        s = self._kscale.astype(queries.dtype)
        B, Hq, L, D = queries.shape
        Hk = s.shape[1]
        if Hq == Hk:
            return queries * s
        q = queries.reshape(B, Hk, Hq // Hk, L, D) * mx.expand_dims(s, 2)
        return q.reshape(B, Hq, L, D)

    # ---- masks ----------------------------------------------------------

    def _layout(self):
        return (self.offset, self.num_sinks, self._ns, self._qstart, self._aq, self._aw, self._span)

    def _positions(self):
        """Sequence position of every key in the op's order."""
        parts = []
        if self._aq:
            parts.append(mx.arange(self._qstart, self._qstart + self._aq))
        if self._ns:
            parts.append(mx.arange(self._ns))
        if self._aw:
            parts.append(mx.arange(self.offset - self._aw, self.offset))
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]

    def _positional_mask(self, L):
        pos = self._positions()[None]
        t = mx.arange(self.offset - L, self.offset)[:, None]
        m = pos <= t
        if self._span is not None:
            m = m & ((pos > t - self._span) | (pos < self.num_sinks))
        return m

    def _op_mask(self, mask, L):
        key = (self._layout(), L, id(mask))
        memo = _MASK_MEMO
        if memo[0] is not None and memo[0][0] == key and memo[0][1] is mask:
            return memo[1]
        out = self._translate_mask(mask, L)
        memo[0], memo[1] = (key, mask), out
        return out

    def _translate_mask(self, mask, L):
        s0, nq, nw = self.num_sinks, self._aq, self._aw
        reordered = self._ns > 0 and nq > 0
        if self._span is not None:
            # Sliding window: the mask follows from the positions held.
            oldest = self._qstart if nq else self.offset - nw
            if (nq or nw) and oldest <= self.offset - 1 - self._span:
                return self._positional_mask(L)
            mask = None if L == 1 else "causal"
        if mask is None:
            return None
        if isinstance(mask, str):
            if mask != "causal":
                raise ValueError(f"unsupported mask {mask!r}")
            return mask if not reordered or nw >= L else self._positional_mask(L)
        if not reordered or mask.shape[-1] == 1:
            return mask
        if mask.shape[-1] != self.offset:
            raise ValueError(
                f"Int4KVCache: mask covers {mask.shape[-1]} keys, the cache holds {self.offset}"
            )
        return mx.concatenate(
            [mask[..., s0 : s0 + nq], mask[..., :s0], mask[..., s0 + nq :]], axis=-1
        )

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        return _mlc.create_attention_mask(
            N, offset=self.offset, return_array=return_array, window_size=window_size
        )

    # ---- state, trim, sizes ---------------------------------------------

    _META = (
        "offset", "_ns", "_nw", "_nq", "_qlo", "_qstart", "_rot_k", "_rot_v",
        "group_size", "k_bits", "v_bits", "window", "num_sinks", "chunk_size",
        "rotate_keys", "rotate_values", "max_size", "keep", "center_keys", "model_dtype",
        "attend_before_quantizing", "channel_scale", "channel_scale_alpha",
        "channel_scale_fixed",
    )
    _FLOAT_META = ("channel_scale_alpha",)

    @property
    def state(self):
        # The buffers as held (no copies: mlx-lm evaluates state every prefill
        # chunk), plus every scalar, so that from_state alone rebuilds the cache.
        meta = {k: getattr(self, k, None) for k in self._META}
        return self._fk, self._fv, self._qk, self._qv, self._kmean, self._kscale, meta

    @state.setter
    def state(self, v):
        if len(v) == 6:  # saved before channel_scale existed
            fk, fv, qk, qv, kmean, meta = v
            kscale = None
        else:
            fk, fv, qk, qv, kmean, kscale, meta = v
        self._reset()
        for k in self._META:
            setattr(self, k, meta.get(k))
        if self.channel_scale is None:
            self.channel_scale, self.channel_scale_alpha = False, 0.5
        self.channel_scale_fixed = bool(self.channel_scale_fixed)
        self._fk, self._fv, self._kmean, self._kscale = fk, fv, kmean, kscale
        self._qk = None if qk is None else list(qk)
        self._qv = None if qv is None else list(qv)

    @property
    def meta_state(self):
        """The scalars of ``state`` as strings (mlx-lm's older convention)."""
        return tuple(str(getattr(self, k, None)) for k in self._META)

    @meta_state.setter
    def meta_state(self, v):
        special = {"None": None, "True": True, "False": False}
        for k, s in zip(self._META, v):
            if s in special:
                setattr(self, k, special[s])
            elif k in self._FLOAT_META:
                setattr(self, k, float(s))
            else:
                setattr(self, k, int(s) if s.lstrip("-").isdigit() else s)

    @classmethod
    def from_state(cls, state, meta_state=None):
        obj = cls.__new__(cls)
        obj.state = state
        if meta_state is not None:
            obj.meta_state = meta_state
        return obj

    @classmethod
    def merge(cls, caches):
        """One batch cache of these caches, for mlx-lm's ``BatchGenerator`` and server
        (:mod:`tqmetal.batch_cache`)."""
        from .batch_cache import merge_caches  # batch_cache builds on this module

        return merge_caches(caches)

    def is_trimmable(self):
        return True

    def trim(self, n):
        self._fresh, self._fresh_kv = 0, None
        n = min(self.offset, n)
        k = min(n, self._nw)
        self._nw -= k
        r = n - k
        k = min(r, self._nq)
        self._nq -= k
        self._ns -= r - k
        self.offset -= n
        if self.offset == 0:
            # nothing depends on them: the next update picks fresh ones (given
            # key scales stay: they do not come from the data)
            self._kmean = None
            if not self.channel_scale_fixed:
                self._kscale = None
        return n

    def size(self):
        return self.offset

    def empty(self):
        return self._fk is None

    @property
    def nbytes(self):
        """Bytes of all buffers as allocated (see the class docstring)."""
        arrays = [self._fk, self._fv, self._kmean, self._kscale] + (self._qk or []) + (
            self._qv or [])
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def nbytes_used(self):
        """Bytes of the tokens held: quantized triples plus sinks and window."""
        if self._fk is None:
            return 0
        per_fp = (self._fk.nbytes + self._fv.nbytes) // self._fk.shape[2]
        per_q = sum(a.nbytes // max(a.shape[2], 1) for a in (self._qk or []) + (self._qv or []))
        extra = sum(a.nbytes for a in (self._kmean, self._kscale) if a is not None)
        return per_fp * (self._ns + self._nw) + per_q * self._nq + extra


class RotatingInt4KVCache(Int4KVCache):
    """Sliding-window :class:`Int4KVCache`, for layers mlx-lm gives a ``RotatingKVCache``.

    Each query at position t attends the first ``keep`` tokens (held in full
    precision: they are this cache's sinks) and positions ``(t - (max_size -
    keep), t]``: what ``RotatingKVCache(max_size, keep)`` keeps for one-token
    steps. For multi-token updates this is the exact sliding window, where
    mlx-lm's own cache masks by slot index (identical when ``keep == 0``).
    Tokens that no query can see any more are dropped (by bookkeeping: the
    live quantized tokens are a slice of one buffer whose dead front is
    reclaimed when the buffer is full); the quantized buffer holds
    ``max_size - keep - window`` tokens plus up to as many (at most 256, at
    least ``chunk_size``) of slack, and more during a long prefill, given back
    at the next flush.

    The mask comes from the positions held, not from the ``mask`` argument:
    use it through the patched attention (:mod:`tqmetal.patch`).
    """

    def __init__(self, max_size: int, keep: int = 0, group_size: int = 64, bits: int = 4, **kwargs):
        if kwargs.pop("sinks", keep) != keep:
            raise ValueError("RotatingInt4KVCache: the sinks are the keep tokens")
        if max_size <= keep:
            raise ValueError("max_size must be larger than keep")
        self.max_size = max_size
        self.keep = keep
        super().__init__(group_size, bits, sinks=keep, **kwargs)

    @property
    def _span(self):
        return self.max_size - self.keep

    def _needed_from(self, first_query):
        return max(self.keep, first_query - self._span + 1)

    def _target_cap(self, need):
        # In steady state at most span - window tokens are held; the slack lets
        # dead tokens accumulate at the front before the live ones move down.
        held = max(self._span - self.window, 0)
        steady = held + max(self.chunk_size, min(self.step, held))
        if self._qlo + need <= self._qcap and not (self._qcap > steady and need <= held):
            return None
        return max(steady, need if need <= steady else _round_up(need, self.step))

    def update_and_fetch(self, keys, values):
        from . import patch

        if not patch.is_patched():
            raise RuntimeError(
                "RotatingInt4KVCache needs the patched attention: call "
                "tqmetal.patch.patch_mlx_lm() first"
            )
        return super().update_and_fetch(keys, values)

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        # What RotatingKVCache.make_mask returns, for layers of other cache types
        # that share this mask; this cache derives its own mask from positions.
        if N > 1:
            window_size = window_size or self.max_size
            offset = min(self.max_size - 1, self.offset)
            if offset + N > window_size or return_array:
                return create_causal_mask(N, offset, window_size=window_size)
            return "causal"
        return None

    def is_trimmable(self):
        return self.offset < self.max_size

    def size(self):
        return min(self.offset, self.max_size)


for _cls in (Int4KVCache, RotatingInt4KVCache):
    # load_prompt_cache resolves class names in mlx_lm.models.cache's globals.
    setattr(_mlc, _cls.__name__, _cls)


def make_prompt_cache(
    model,
    kv: str = "int4",
    group_size: int = 64,
    window: int = 128,
    sinks: int = 4,
    rotate_keys: Optional[bool] = None,
    full_precision_layers: Sequence[int] = (),
    max_kv_size: Optional[int] = None,
    rotate_values: bool = False,
    center_keys: bool = True,
    k8_layers: Sequence[int] = (),
    attend_before_quantizing: bool = True,
    channel_scale: bool = False,
    channel_scale_alpha: float = 0.5,
    key_scales: Optional[Sequence] = None,
):
    """mlx-lm's ``make_prompt_cache`` with quantized caches.

    ``kv``: "int4", "int8", "k8v4" (8-bit keys, 4-bit values), "k4v8" or
    "fp16" (mlx-lm's caches). The model's own ``make_cache()`` (else one
    ``KVCache`` per layer) says what each layer needs: a ``KVCache`` becomes an
    :class:`Int4KVCache`, a ``RotatingKVCache`` a :class:`RotatingInt4KVCache`
    with its max_size and keep; other caches (SSM states, ...) and the layers
    in ``full_precision_layers`` (indices; negative ones count from the end)
    keep mlx-lm's; the layers in ``k8_layers`` store 8-bit keys (their values
    keep ``kv``'s bits). ``max_kv_size`` bounds every full-attention layer to a
    sliding window of that many tokens keeping the first ``sinks`` (mlx-lm's
    ``RotatingKVCache(max_kv_size, keep=4)``), also for models with
    ``make_cache``, where mlx-lm 0.32 ignores it. ``key_scales``: per layer,
    fixed key channel scales (:func:`calibrate_channel_scales`) or None.
    """
    base = _mlc.make_prompt_cache(model)
    if max_kv_size is not None:
        base = [
            _mlc.RotatingKVCache(max_kv_size, keep=sinks) if type(c) is _mlc.KVCache else c
            for c in base
        ]
    if kv == "fp16":
        return base
    if kv not in _KV_BITS:
        raise ValueError(f"kv must be one of {sorted(_KV_BITS) + ['fp16']}, got {kv!r}")
    k_bits, v_bits = _KV_BITS[kv]
    n = len(base)
    layer_sets = {}
    for name, layers in (("full_precision_layers", full_precision_layers),
                         ("k8_layers", k8_layers)):
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(f"{name}: layer indices {bad} out of range for {n} layers")
        layer_sets[name] = {i % n for i in layers}
    keep_fp, keys8 = layer_sets["full_precision_layers"], layer_sets["k8_layers"]
    out = []
    for i, c in enumerate(base):
        opts = dict(group_size=group_size, k_bits=8 if i in keys8 else k_bits, v_bits=v_bits,
                    window=window, rotate_keys=rotate_keys, rotate_values=rotate_values,
                    center_keys=center_keys, attend_before_quantizing=attend_before_quantizing,
                    channel_scale=channel_scale, channel_scale_alpha=channel_scale_alpha)
        if key_scales is not None and key_scales[i] is not None:
            opts["key_scales"] = key_scales[i]
        if i in keep_fp:
            out.append(c)
        elif type(c) is _mlc.KVCache:
            out.append(Int4KVCache(sinks=sinks, **opts))
        elif type(c) is _mlc.RotatingKVCache:
            out.append(RotatingInt4KVCache(c.max_size, c.keep, **opts))
        else:
            out.append(c)
    return out
