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

The op attends ``[quantized..., fp buffer...]``, not in sequence order;
:mod:`tqmetal.cache_order` translates mlx-lm's masks (made in sequence order
by :meth:`Int4KVCache.make_mask`, as ``KVCache`` makes them) into the op's key
order. The buffers themselves (growth, views, bytes) are in
:mod:`tqmetal.cache_storage`, the key transforms below in
:mod:`tqmetal.key_transforms`; this module holds the policy: what arrives
where, and when it is quantized.

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
the size of the update, not of the cache. The sliding-window cache does the same
with the tokens some query of the update can still see.

Storage is float16 whatever the model's dtype: the full-precision sinks and
window, the quantization scales and biases, the key mean and channel scales.
Queries, outputs and the fetched K/V keep the model's dtype.

``update_and_fetch`` returns, lazily, the dequantized K and V in sequence
order (:meth:`Int4KVCache.keys_and_values`): an attention function that does
not know this cache (mlx-lm without :func:`tqmetal.patch.patch_mlx_lm`) is
still correct, just not economical. The patched one never evaluates them: it
runs the fused op on the packed data when handed exactly what the last
``update_and_fetch`` returned. Once it has done so for a cache, that cache's
``update_and_fetch`` returns placeholders while the patch is active (arrays
of the real shape and dtype, a broadcast of one NaN; :mod:`tqmetal.fetched`):
building the real graph was most of a decode step's host time. When the fused
op does not serve a call, the patched attention swaps the placeholders for the
real K/V (:meth:`Int4KVCache.materialize_fetched`) before it falls back to
mlx-lm's; a model that edits K/V before attention never gets the fused op, so
it keeps getting the real K/V. Code that reads the K/V itself under the patch
should call :meth:`~Int4KVCache.keys_and_values` (or ``materialize_fetched``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as _mlc
from mlx_lm.models.base import create_causal_mask

from . import patch
from .batch_cache import merge_caches
from .cache_order import KeyOrder, translate_mask_memo
from .cache_storage import (STORAGE_DTYPE, FullPrecisionPart, QuantizedPart, check_bits,
                            dequantize, empty_triple)
from .calibrate import calibrate_channel_scales
from .fetched import hand_out, real_for
from .key_transforms import (channel_scales, resolve_rotation, scale_queries, to_model_space,
                             unrotate)
from .ops import fused_op_available, quantize, sdpa_int4

__all__ = ["Int4KVCache", "RotatingInt4KVCache", "make_prompt_cache", "fused_op_available",
           "channel_scales", "calibrate_channel_scales"]

_KV_BITS = {"int4": (4, 4), "int8": (8, 8), "k8v4": (8, 4), "k4v8": (4, 8), "k5v3": (5, 3)}

def _round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


_FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def _check_update(cache, keys, values) -> None:
    """ValueError (naming the argument and what was expected) for an update_and_fetch the
    cache cannot take; called before anything is stored, so a refused call changes nothing."""
    where = f"{type(cache).__name__}.update_and_fetch"
    for name, x in (("keys", keys), ("values", values)):
        if not isinstance(x, mx.array):
            raise ValueError(f"{where}: {name}: expected an mx.array [B, H, S, D], got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{where}: {name}: expected [B, H, S, D], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: {name}: expected float16, bfloat16 or float32, got {x.dtype}")
    if tuple(keys.shape[:3]) != tuple(values.shape[:3]):
        raise ValueError(f"{where}: values: expected the keys' [B, H, S] = {tuple(keys.shape[:3])}, "
                         f"got shape {tuple(values.shape)}")
    if keys.dtype != values.dtype:
        raise ValueError(f"{where}: values: expected the keys' dtype {keys.dtype}, got {values.dtype}")
    if keys.shape[2] < 1:
        raise ValueError(f"{where}: keys: expected at least one token (S >= 1), got shape {tuple(keys.shape)}")
    if cache.fp.keys is not None:  # set up by an earlier update: the same heads, dims, dtype
        B, H, _, D = cache.fp.keys.shape
        Dv = cache.fp.values.shape[-1]
        for name, x, d in (("keys", keys, D), ("values", values, Dv)):
            if (x.shape[0], x.shape[1], x.shape[3]) != (B, H, d):
                raise ValueError(f"{where}: {name}: expected [B={B}, H={H}, S, D={d}] as in the cache's "
                                 f"earlier updates, got shape {tuple(x.shape)}")
        if cache.model_dtype is not None and _dtype_name(keys.dtype) != cache.model_dtype:
            raise ValueError(f"{where}: keys: expected dtype {cache.model_dtype} as in the cache's earlier "
                             f"updates, got {keys.dtype}")


def _check_state(cls, v) -> None:
    """ValueError for a ``state`` that is not one :attr:`Int4KVCache.state` returned (a truncated
    file, another cache class's state)."""
    what = (f"{cls.__name__}.state: expected (fp keys, fp values, quantized keys, quantized values, "
            f"key mean, key scales, meta dict) as {cls.__name__}.state returns")
    if not isinstance(v, (tuple, list)) or len(v) not in (6, 7):
        n = len(v) if isinstance(v, (tuple, list)) else type(v).__name__
        raise ValueError(f"{what}, got {n} items")
    meta = v[-1]
    if not isinstance(meta, dict):
        raise ValueError(f"{what}; its last item is {type(meta).__name__}, not the meta dict")
    missing = [k for k in ("offset", "group_size", "k_bits", "v_bits", "window", "num_sinks") if k not in meta]
    if missing:
        raise ValueError(f"{what}; the meta dict lacks {missing}")
    fk, fv = v[0], v[1]
    for name, x in (("fp keys", fk), ("fp values", fv)):
        if x is not None and (not isinstance(x, mx.array) or x.ndim != 4):
            raise ValueError(f"{what}; {name}: expected None or a [B, H, n, D] array, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    for name, t in (("quantized keys", v[2]), ("quantized values", v[3])):
        if t is not None and (not isinstance(t, (tuple, list)) or len(t) != 3
                              or not all(isinstance(a, mx.array) and a.ndim == 4 for a in t)):
            raise ValueError(f"{what}; {name}: expected None or a (packed, scales, biases) triple of "
                             f"[B, H, n, ...] arrays")
    if (fk is None) != (fv is None):
        raise ValueError(f"{what}; fp keys and fp values: expected both or neither")

    def count(name):
        x = meta.get(name)
        try:
            return int(x or 0)
        except (TypeError, ValueError):
            raise ValueError(f"{what}; meta {name}: expected an integer, got {x!r}") from None

    held = count("_ns") + count("_nw")
    if held and (fk is None or fk.shape[2] < held):
        raise ValueError(f"{what}; fp keys hold {0 if fk is None else fk.shape[2]} tokens, the meta "
                         f"dict says {held}")
    nq = count("_qlo") + count("_nq")
    if count("_nq") and (v[2] is None or v[2][0].shape[2] < nq):
        raise ValueError(f"{what}; quantized keys hold {0 if v[2] is None else v[2][0].shape[2]} "
                         f"tokens, the meta dict says {nq}")


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


class Int4KVCache(_mlc._BaseCache):
    """mlx-lm KV cache keeping old tokens int4/int8-quantized for ``tqmetal.sdpa_int4``.

    Args:
        group_size: quantization group along the head dim (16, 32, 64, 128).
        bits: 2, 3, 4, 5, 6 or 8 (mx.quantize's widths), for K and V unless
            ``k_bits`` / ``v_bits`` say otherwise (``k_bits=8, v_bits=4`` is
            "K8V4"; ``k_bits=5, v_bits=3`` "K5V3", 4 bits per element on
            average); widths other than 4 and 8 need groups of 32 or more.
        window: most recent tokens kept in full precision.
        sinks: first tokens kept in full precision for good.
        rotate_keys: Hadamard-rotate keys (and queries). None = for keys below
            8 bits, when the head dim has a Hadamard transform.
        rotate_values: Hadamard-rotate values (the output is rotated back).
            None = for values below 4 bits, when the head dim has one.
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

    The tokens live in ``self.fp`` (sinks and window, float16) and
    ``self.quantized`` (:mod:`tqmetal.cache_storage`); this class decides what
    arrives where and when it is quantized. ``nbytes`` counts the tokens held
    (what ``state`` returns: summing ``state`` and ``nbytes`` agree);
    ``nbytes_allocated`` counts every buffer as allocated: the quantized
    capacity grows in steps of 256 tokens; the fp buffer holds ``sinks +
    window`` tokens and grows once by ``chunk_size`` when single tokens
    (decode) fill the window past ``window``.

    ``update_and_fetch`` returns the dequantized K/V (lazy, in sequence order)
    until the patched attention has served this cache through the fused op with
    exactly what it returned; from then on, while :func:`tqmetal.patch.is_patched`,
    it returns NaN placeholders of the same shape and dtype (see the module
    docstring), and :meth:`materialize_fetched` turns them into the real K/V.
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
        rotate_values: Optional[bool] = None,
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
        if group_size not in (16, 32, 64, 128):
            raise ValueError(f"group_size must be 16, 32, 64 or 128, got {group_size}")
        check_bits(self.k_bits, self.v_bits, group_size)
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
        self.fp = FullPrecisionPart(self.num_sinks)
        self.quantized = QuantizedPart()
        self._rot_k = self._rot_v = None  # resolved on the first update
        self._kmean = None  # [B, H, 1, D] subtracted from stored keys (center_keys)
        self._kscale = None  # [B, H, 1, D] stored keys are k / s before rotation (channel_scale)
        self.model_dtype = None  # name of the dtype K/V arrive in, e.g. "float32"
        self._fetched = None  # weak refs to what the last update_and_fetch returned
        self._fetched_placeholders = False  # ... and whether those were placeholders
        # The patched attention served this cache through the fused op with exactly what
        # update_and_fetch returned: from then on it returns placeholders (see _fetch).
        self._fused_served = False
        self._fresh = 0  # tokens this update quantized that its attention reads in fp
        self._fresh_kv = None  # those tokens and the window after them, fp (K, V)

    # ---- what the current call's attention reads -------------------------
    # With attend_before_quantizing, the last _fresh quantized tokens are read
    # from _fresh_kv instead (full precision, transient).

    @property
    def _attended_quantized(self) -> int:
        return self.quantized.n - self._fresh

    @property
    def _attended_window(self) -> int:
        return self.fp.nw + self._fresh

    def _window(self):
        """The fp window (K, V) the current call attends: the buffer's, or the fresh tail."""
        return self._fresh_kv if self._fresh else self.fp.window_views()

    def key_order(self) -> KeyOrder:
        """Which positions the op's keys hold, in its order (:mod:`tqmetal.cache_order`)."""
        return KeyOrder(self.offset, self.num_sinks, self.fp.ns, self.quantized.start,
                        self._attended_quantized, self._attended_window, self._span)

    # ---- sliding-window hooks (RotatingInt4KVCache overrides) -------------

    @property
    def _span(self):
        """How many non-sink positions back a query sees (None: all)."""
        return None

    def _needed_from(self, first_query: int) -> int:
        """Oldest non-sink position any query from ``first_query`` on sees."""
        return 0

    def _target_cap(self, need: int) -> Optional[int]:
        """Quantized capacity to allocate for ``need`` tokens; None keeps the buffer."""
        if self.quantized.lo + need <= self.quantized.capacity:
            return None
        return _round_up(need, self.step)

    # ---- arrival: transforms, then sinks / window / quantized ------------

    def _setup(self, keys, values):
        B, H, _, D = keys.shape
        Dv = values.shape[-1]
        for name, d in (("keys", D), ("values", Dv)):
            if d % self.group_size:
                raise ValueError(
                    f"Int4KVCache: {name} head dim {d} is not a multiple of "
                    f"group_size={self.group_size} (try group_size=16 or 32)"
                )
        self._rot_k = resolve_rotation(self.rotate_keys, D, self.k_bits, "keys")
        self._rot_v = resolve_rotation(self.rotate_values, Dv, self.v_bits, "values")
        self.model_dtype = _dtype_name(keys.dtype)
        # The chunk's slots are added when decode first needs them (see the class docstring).
        self.fp.allocate(B, H, D, Dv, self.num_sinks + self.window)

    def _transform(self, keys, values):
        """Keys and values as stored: scaled, rotated, centred, float16."""
        S = keys.shape[2]
        if self.channel_scale:
            if self._kscale is None and getattr(self, "_kscale_given", None) is not None:
                given = self._kscale_given
                if given.shape[1] != keys.shape[1] or given.shape[3] != keys.shape[3]:
                    raise ValueError(f"Int4KVCache: key_scales {given.shape} do not fit keys "
                                     f"{keys.shape}")
                self._kscale = given
            elif self._kscale is None:
                lo = min(max(self.num_sinks - self.fp.ns, 0), S - 1)
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
                lo = min(max(self.num_sinks - self.fp.ns, 0), S - 1)
                self._kmean = mx.mean(keys[..., lo:, :].astype(mx.float32), axis=2,
                                      keepdims=True).astype(STORAGE_DTYPE)
            keys = keys - self._kmean
        return keys.astype(STORAGE_DTYPE), values.astype(STORAGE_DTYPE)

    def _quantize_into_store(self, k, v, first_query: int):
        """Quantize k, v (the oldest tokens leaving the window) into the quantized part."""
        q = self.quantized
        n = k.shape[2]
        skip = min(n, max(0, self._needed_from(first_query) - (q.start + q.n)))
        if skip:  # too old for every query from now on (only with a sliding window)
            k, v, n = k[..., skip:, :], v[..., skip:, :], n - skip
            q.start += skip
        if n == 0:
            return
        q.append(quantize(k, self.group_size, self.k_bits),
                 quantize(v, self.group_size, self.v_bits), self._target_cap)

    def update_and_fetch(self, keys, values):
        _check_update(self, keys, values)
        if self.fp.keys is None:
            self._setup(keys, values)
        S = keys.shape[2]
        first = self.offset
        self._fresh, self._fresh_kv = 0, None
        keys, values = self._transform(keys, values)
        fp, q = self.fp, self.quantized
        # Tokens no query from `first` on sees leave the quantized part (sliding window).
        q.drop_front(min(q.n, max(0, self._needed_from(first) - q.start)))
        i = 0
        if fp.ns < self.num_sinks:  # the first tokens: sinks, for good
            i = min(self.num_sinks - fp.ns, S)
            fp.write(fp.ns, keys[..., :i, :], values[..., :i, :])
            fp.ns += i
            q.start = fp.ns
        if i < S:  # the rest: into the window, whose overflow is quantized
            k, v = (keys[..., i:, :], values[..., i:, :]) if i else (keys, values)
            n, nw, W, s0 = S - i, fp.nw, self.window, self.num_sinks
            if nw + n < W + self.chunk_size:
                if s0 + nw + n > fp.capacity:
                    fp.grow(s0 + W + self.chunk_size)
                fp.write(s0 + nw, k, v)
                fp.nw += n
            else:
                if nw:
                    wk, wv = fp.window_views()
                    k = mx.concatenate([wk, k], axis=2)
                    v = mx.concatenate([wv, v], axis=2)
                out = nw + n - W  # tokens leaving the window, oldest first
                nq = q.n
                self._quantize_into_store(k[..., :out, :], v[..., :out, :], first)
                if self.attend_before_quantizing and n > 1:
                    # Read this update's quantized tokens (those still visible: a sliding
                    # window skips the rest) and the window after them from k, v.
                    fresh = q.n - nq
                    self._fresh = fresh
                    self._fresh_kv = (k, v) if fresh == out else (
                        k[..., out - fresh:, :], v[..., out - fresh:, :])
                if W:
                    fp.write(s0, k[..., out:, :], v[..., out:, :])
                fp.nw = W
        self.offset += S
        return self._fetch()

    # ---- fetch and attention ---------------------------------------------

    def _quantized_views(self):
        return self.quantized.views(self._attended_quantized)

    def keys_and_values(self):
        """K and V as the current call attends them: dequantized, un-rotated, in
        sequence order (lazy)."""
        qk, qv = self._quantized_views()
        sinks, window = self.fp.sink_views(), self._window()
        out = []
        for j, (q, bits, rot) in enumerate(((qk, self.k_bits, self._rot_k),
                                            (qv, self.v_bits, self._rot_v))):
            parts = []
            if self.fp.ns:
                parts.append(sinks[j])
            if self._attended_quantized:
                # in float32, as the fused op computes (float16 products round)
                pk, sc, bi = q
                parts.append(dequantize(pk, sc.astype(mx.float32), bi.astype(mx.float32),
                                        self.group_size, bits))
            if self._attended_window:
                parts.append(window[j])
            parts = [x.astype(mx.float32) for x in parts]
            x = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
            out.append(to_model_space(x, getattr(mx, self.model_dtype), rot,
                                      *((self._kmean, self._kscale) if j == 0 else ())))
        return tuple(out)

    def _fetched_shapes(self):
        """Shapes of K and V as :meth:`keys_and_values` returns them."""
        fp = self.fp
        B, H, _, D = fp.keys.shape
        n = fp.ns + self._attended_quantized + self._attended_window
        return (B, H, n, D), (B, H, n, fp.values.shape[-1])

    def _fetch(self):
        # Placeholders once the patched attention has served this cache through the
        # fused op (it never reads K/V then), else the real K/V (tqmetal.fetched).
        return hand_out(self, self._fused_served and patch.is_patched(), self._fetched_shapes(),
                        getattr(mx, self.model_dtype))

    def materialize_fetched(self, keys, values):
        """``keys``, ``values`` with the placeholders the last ``update_and_fetch``
        returned replaced by the real :meth:`keys_and_values`; anything else comes back
        unchanged. For attention that reads K/V when the fused op does not serve the call
        (the patched attention calls it, through :func:`tqmetal.fetched.materialize`,
        before it falls back to mlx-lm's)."""
        return real_for(self, keys, values)

    def fused_attention(self, queries, keys, values, *, scale, mask=None, sinks=None):
        """``tqmetal.sdpa_int4`` over this cache, or None if it cannot serve this call.

        ``keys``/``values`` must be what the last ``update_and_fetch`` returned;
        ``mask`` is in sequence order as mlx-lm makes it. Once this has served a
        call, ``update_and_fetch`` returns placeholders while the patch is active
        (an override that reads ``keys``/``values`` should read
        :meth:`materialize_fetched` of them).
        """
        f = self._fetched
        if f is None or f[0]() is not keys or f[1]() is not values:
            return None
        D = queries.shape[-1]
        fp = self.fp
        if fp.keys.shape[-1] != D or fp.values.shape[-1] != D or not fused_op_available():
            return None
        if sinks is not None and self._kmean is not None:
            return None  # centering shifts every logit, not the sinks' fixed one

        L = queries.shape[2]
        q = queries if self._kscale is None else scale_queries(queries, self._kscale)
        q = mx.hadamard_transform(q) if self._rot_k else q
        qk, qv = self._quantized_views()
        if qk is None:
            B, H = fp.keys.shape[:2]
            qk = empty_triple(B, H, D, self.group_size, self.k_bits)
            qv = empty_triple(B, H, D, self.group_size, self.v_bits)
        if self._fresh:
            kt, vt = (w if not fp.ns else mx.concatenate([s, w], axis=2)
                      for s, w in zip(fp.sink_views(), self._window()))
        else:
            t = fp.ns + fp.nw
            kt, vt = (fp.keys[..., :t, :], fp.values[..., :t, :]) if t else (None, None)
        out = sdpa_int4(
            q, qk, qv, scale=scale, mask=translate_mask_memo(self.key_order(), mask, L),
            group_size=self.group_size, k_bits=self.k_bits, v_bits=self.v_bits,
            sinks=sinks, k_tail=kt, v_tail=vt,
        )
        self._fused_served = True
        return unrotate(out) if self._rot_v else out

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        return _mlc.create_attention_mask(
            N, offset=self.offset, return_array=return_array, window_size=window_size
        )

    # ---- state, trim, sizes ---------------------------------------------

    # The scalars of ``state``, under the names saved files use: the first
    # five are the parts' counters (see _COUNTERS), the rest attributes.
    _META = (
        "offset", "_ns", "_nw", "_nq", "_qlo", "_qstart", "_rot_k", "_rot_v",
        "group_size", "k_bits", "v_bits", "window", "num_sinks", "chunk_size",
        "rotate_keys", "rotate_values", "max_size", "keep", "center_keys", "model_dtype",
        "attend_before_quantizing", "channel_scale", "channel_scale_alpha",
        "channel_scale_fixed",
    )
    _COUNTERS = {"_ns": ("fp", "ns"), "_nw": ("fp", "nw"), "_nq": ("quantized", "n"),
                 "_qlo": ("quantized", "lo"), "_qstart": ("quantized", "start")}
    _FLOAT_META = ("channel_scale_alpha",)

    def _get_meta(self, name):
        if name in self._COUNTERS:
            part, attr = self._COUNTERS[name]
            return getattr(getattr(self, part), attr)
        return getattr(self, name, None)

    def _set_meta(self, name, value):
        if name in self._COUNTERS:
            part, attr = self._COUNTERS[name]
            setattr(getattr(self, part), attr, value)
        else:
            setattr(self, name, value)

    @property
    def state(self):
        # The tokens held, as views of the buffers (slices, no copies: mlx-lm
        # evaluates state every prefill chunk), plus every scalar, so that
        # from_state alone rebuilds the cache. Spare capacity is left out, as
        # mlx-lm's caches leave it out of theirs: the bytes of state are nbytes.
        meta = {k: self._get_meta(k) for k in self._META}
        fp, q = self.fp, self.quantized
        fk, fv = fp.keys, fp.values
        if fk is not None:
            end = fp.sinks + fp.nw if fp.nw else fp.ns
            if end < fp.capacity:
                fk, fv = fk[..., :end, :], fv[..., :end, :]
        qk, qv = q.keys, q.values
        if qk is not None and (q.lo or q.n < q.capacity):
            lo, hi = q.lo, q.lo + q.n
            qk, qv = ([x[..., lo:hi, :] for x in qk], [x[..., lo:hi, :] for x in qv])
            meta["_qlo"] = 0
        return (fk, fv, qk, qv, self._kmean, self._kscale, meta)

    @state.setter
    def state(self, v):
        _check_state(type(self), v)
        if len(v) == 6:  # saved before channel_scale existed
            fk, fv, qk, qv, kmean, meta = v
            kscale = None
        else:
            fk, fv, qk, qv, kmean, kscale, meta = v
        self.num_sinks = meta.get("num_sinks")
        self._reset()
        for k in self._META:
            self._set_meta(k, meta.get(k))
        if self.channel_scale is None:
            self.channel_scale, self.channel_scale_alpha = False, 0.5
        self.channel_scale_fixed = bool(self.channel_scale_fixed)
        if fk is not None and fk.shape[2] < self.num_sinks + self.window:
            # state holds no spare slots; writes into the sinks and the window
            # expect theirs (a copy at load time only)
            pad = self.num_sinks + self.window - fk.shape[2]
            fk, fv = (mx.concatenate([b, mx.zeros((*b.shape[:2], pad, b.shape[3]), b.dtype)], axis=2)
                      for b in (fk, fv))
        self.fp.keys, self.fp.values, self._kmean, self._kscale = fk, fv, kmean, kscale
        self.quantized.keys = None if qk is None else list(qk)
        self.quantized.values = None if qv is None else list(qv)

    @property
    def meta_state(self):
        """The scalars of ``state`` as strings (mlx-lm's older convention)."""
        return tuple(str(self._get_meta(k)) for k in self._META)

    @meta_state.setter
    def meta_state(self, v):
        if (not isinstance(v, (tuple, list)) or len(v) != len(self._META)
                or not all(isinstance(s, str) for s in v)):
            n = len(v) if isinstance(v, (tuple, list)) else type(v).__name__
            raise ValueError(f"{type(self).__name__}.meta_state: expected {len(self._META)} strings "
                             f"as {type(self).__name__}.meta_state returns, got {n}")
        special = {"None": None, "True": True, "False": False}
        for k, s in zip(self._META, v):
            if s in special:
                value = special[s]
            elif k in self._FLOAT_META:
                value = float(s)
            else:
                value = int(s) if s.lstrip("-").isdigit() else s
            self._set_meta(k, value)
        self.fp.sinks = self.num_sinks

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
        return merge_caches(caches)

    def is_trimmable(self):
        return True

    def trim(self, n):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{type(self).__name__}.trim: n: expected a number of tokens >= 0, got {n!r}")
        n = int(n)
        self._fresh, self._fresh_kv = 0, None
        fp, q = self.fp, self.quantized
        n = min(self.offset, n)
        k = min(n, fp.nw)
        fp.nw -= k
        r = n - k
        k = min(r, q.n)
        q.n -= k
        fp.ns -= r - k
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
        return self.fp.keys is None

    @property
    def nbytes(self):
        """Bytes of the tokens held: quantized triples plus sinks and window."""
        if self.fp.keys is None:
            return 0
        extra = sum(a.nbytes for a in (self._kmean, self._kscale) if a is not None)
        return self.fp.nbytes + self.quantized.nbytes + extra

    @property
    def nbytes_allocated(self):
        """Bytes of all buffers as allocated, spare capacity included."""
        extra = sum(a.nbytes for a in (self._kmean, self._kscale) if a is not None)
        return self.fp.nbytes_allocated + self.quantized.nbytes_allocated + extra


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
        q = self.quantized
        if q.lo + need <= q.capacity and not (q.capacity > steady and need <= held):
            return None
        return max(steady, need if need <= steady else _round_up(need, self.step))

    def update_and_fetch(self, keys, values):
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


def has_key_norm(model) -> bool:
    """Whether the model's attention normalizes keys per head with a learned gain
    (mlx-lm's ``self_attn.k_norm``: Gemma 3, Qwen 3, OLMo 2, ...)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None) or []
    return any(hasattr(getattr(layer, "self_attn", None), "k_norm") for layer in layers)


# make_prompt_cache keeps a model's sliding-window layers of at most this many tokens in
# full precision (see fp_windows there).
FP_WINDOWS = 1024


def resolve_kv(model, kv: str, group_size: int = 64) -> str:
    """The format ``kv="auto"`` means for this model, the one measured best at
    4 bits per element on its family (docs/fidelity.md): "int4" (with per-channel
    key scaling, :func:`make_prompt_cache`) for models whose attention has a
    ``k_norm`` (Gemma 3: KL 0.0018-0.0025 at 32K on four kinds of text), else
    "k5v3", 5-bit keys and 3-bit values with both rotated (the same bytes as
    int4; SmolLM2 at 8K: KL 0.0027 on code against int4's 0.0057), which needs
    groups of 32 or more (int4 for group 16). Other names are returned as they
    are."""
    if kv != "auto":
        return kv
    return "int4" if has_key_norm(model) or group_size < 32 else "k5v3"


def make_prompt_cache(
    model,
    kv: str = "auto",
    group_size: int = 64,
    window: int = 128,
    sinks: int = 4,
    rotate_keys: Optional[bool] = None,
    full_precision_layers: Sequence[int] = (),
    max_kv_size: Optional[int] = None,
    rotate_values: Optional[bool] = None,
    center_keys: bool = True,
    k8_layers: Sequence[int] = (),
    attend_before_quantizing: bool = True,
    channel_scale: Optional[bool] = None,
    channel_scale_alpha: float = 0.5,
    key_scales: Optional[Sequence] = None,
    fp_windows: int = FP_WINDOWS,
):
    """mlx-lm's ``make_prompt_cache`` with quantized caches.

    ``kv``: "auto" (the default: :func:`resolve_kv` picks "k5v3" or "int4" by
    the model's family), "int4", "k5v3" (5-bit keys, 3-bit values: 4 bits per
    element, as int4), "int8", "k8v4" (8-bit keys, 4-bit values), "k4v8" or
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

    ``channel_scale``: per-channel key scaling (see :class:`Int4KVCache`); None
    (the default) turns it on for 4-bit keys of models whose attention normalizes
    the keys with a learned per-channel gain (a ``k_norm`` module: Gemma 3, Qwen 3,
    OLMo 2), whose key channels then have fixed, unequal scales that a factor
    fixed from the first update fits (:func:`has_key_norm`; docs/fidelity.md: on
    Gemma 3 270M it cut the int4 cache's KL several-fold), and off for the others
    (on SmolLM2-135M it raised KL from 0.0026 to 0.0043).

    ``fp_windows``: the model's own sliding-window layers whose window is at most
    this many tokens keep mlx-lm's full-precision ``RotatingKVCache`` (0: quantize
    them too, as :class:`RotatingInt4KVCache`). Such a layer holds at most its
    window whatever the context, so quantizing it saves a fixed number of bytes
    that long contexts make small (Gemma 3 270M at 32K, computed: 0.334x fp16 with
    its 15 sliding layers of 512 tokens in float16, 0.297x with them int4), while on
    Gemma 3 their int4 keys were most of the int4 cache's error (docs/fidelity.md).
    Layers that ``max_kv_size`` bounds are not concerned: they are quantized.
    """
    kv = resolve_kv(model, kv, group_size)
    base = _mlc.make_prompt_cache(model)
    own_windows = {i for i, c in enumerate(base)
                   if type(c) is _mlc.RotatingKVCache and c.max_size <= fp_windows}
    if max_kv_size is not None:
        base = [
            _mlc.RotatingKVCache(max_kv_size, keep=sinks) if type(c) is _mlc.KVCache else c
            for c in base
        ]
    if kv == "fp16":
        return base
    if kv not in _KV_BITS:
        raise ValueError(f"kv must be one of auto, {', '.join(_KV_BITS)}, fp16, got {kv!r}")
    k_bits, v_bits = _KV_BITS[kv]
    if channel_scale is None:
        channel_scale = k_bits == 4 and key_scales is None and has_key_norm(model)
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
        if i in keep_fp or i in own_windows:
            out.append(c)
        elif type(c) is _mlc.KVCache:
            out.append(Int4KVCache(sinks=sinks, **opts))
        elif type(c) is _mlc.RotatingKVCache:
            out.append(RotatingInt4KVCache(c.max_size, c.keep, **opts))
        else:
            out.append(c)
    return out
