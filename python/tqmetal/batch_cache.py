"""Batched int4/int8 KV caches for mlx-lm's continuous batching (``BatchGenerator``).

``Int4KVCache.merge(caches)`` returns a :class:`BatchInt4KVCache` and
``RotatingInt4KVCache.merge`` a :class:`BatchRotatingInt4KVCache`; they follow
the protocol of mlx-lm 0.32's ``BatchKVCache`` / ``BatchRotatingKVCache``:
left padding, ``offset`` (an array, one RoPE offset per sequence),
``make_mask``, ``prepare``/``finalize`` (right-padded prompt chunks become left
padding), ``filter``, ``extend``, ``extract`` (back to a per-request cache),
``trim``, ``state``/``meta_state``, ``size``, ``empty``, ``nbytes``.

Layout. The B sequences share one timeline of *slots*, right-aligned as in
``BatchKVCache``: all sequences end at slot ``_idx``; sequence b's token at
position p sits in slot ``p + lp[b]`` (``lp``: its left padding). Three stores:

* quantized ``[B, H, qcap, D*bits/32]`` triples for slots ``[qbase, qbase + qcap)``:
  every token is quantized when it arrives (so any row can move its
  full-precision boundary at any time without re-quantizing anything);
* full precision ``[B, H, sinks + fcap, D]`` (float16): the first ``sinks``
  columns are each sequence's attention-sink tokens (by position), then slots
  ``[fbase, fbase + fcap)`` hold the recent tokens of every row;
* per row, as Python ints: sinks held, window length ``nw`` and real end.

Each row keeps exactly the layout the single-sequence cache would have
(the same sinks, the same ``window``/``chunk_size`` flush schedule, the same
key mean and channel scales from its own first update, the same
``attend_before_quantizing``): row b reads its tokens before slot
``end[b] - nw[b]`` from the quantized store and the later ones from the
full-precision store. Which copy a row reads, its padding, causality and the
sliding window are all one boolean mask ``[B, 1, L, N + T]`` handed to the
fused op; nothing is dequantized and no score matrix is built. A batch answer
therefore equals the same request run alone, up to the order of float sums
inside the op.

``update_and_fetch`` returns what the single cache's returns: the dequantized K/V
(:meth:`BatchInt4KVCache.keys_and_values`, lazy, for attention that does not know the
cache) until the patched attention has served the batch through the fused op, NaN
placeholders from then on while the patch is active (:mod:`tqmetal.fetched`).

Costs against the single cache: every token is quantized once on arrival
(instead of in chunks), the full-precision store keeps up to ``chunk_size``
more tokens when rows are at different phases of their flush schedule, and
the op reads at most that many masked tokens more.
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx
from mlx_lm.models import cache as _mlc
from mlx_lm.models.base import create_causal_mask

from . import patch
from .cache_storage import STORAGE_DTYPE, dequantize
from .fetched import hand_out, real_for
from .key_transforms import channel_scales, resolve_rotation, to_model_space, unrotate
from .ops import fused_op_available, quantize, sdpa_int4

__all__ = ["BatchInt4KVCache", "BatchRotatingInt4KVCache", "cache_options", "merge_caches"]

# The constructor options of the single-sequence caches that a batch carries
# (names as in their ``state`` meta).
_OPTION_NAMES = (
    "group_size", "k_bits", "v_bits", "window", "num_sinks", "chunk_size", "rotate_keys",
    "rotate_values", "center_keys", "attend_before_quantizing", "channel_scale",
    "channel_scale_alpha", "channel_scale_fixed",
)


def cache_options(c) -> dict:
    """The options of a single-sequence int4 cache (and max_size/keep if it slides)."""
    opts = {k: getattr(c, k) for k in _OPTION_NAMES}
    if getattr(c, "max_size", None) is not None:
        opts["max_size"], opts["keep"] = c.max_size, c.keep
    return opts


def _make_single(cls, opts: dict, key_scales=None):
    """A fresh single-sequence cache of class ``cls`` with these options."""
    kw = dict(
        k_bits=opts["k_bits"], v_bits=opts["v_bits"], window=opts["window"],
        rotate_keys=opts["rotate_keys"], rotate_values=opts["rotate_values"],
        center_keys=opts["center_keys"], attend_before_quantizing=opts["attend_before_quantizing"],
        chunk_size=opts["chunk_size"], channel_scale=opts["channel_scale"],
        channel_scale_alpha=opts["channel_scale_alpha"],
    )
    if key_scales is not None:
        kw["key_scales"] = key_scales
    if "max_size" in opts:
        return cls(opts["max_size"], opts["keep"], opts["group_size"], **kw)
    return cls(opts["group_size"], sinks=opts["num_sinks"], **kw)


def _round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


def _empty_triple(B, H, n, D, bits, group_size, dtype=STORAGE_DTYPE):
    return [mx.zeros((B, H, n, D * bits // 32), mx.uint32),
            mx.zeros((B, H, n, D // group_size), dtype),
            mx.zeros((B, H, n, D // group_size), dtype)]


def _roll_rows(x, shifts: List[int]):
    """Roll each row b of x [B, H, n, ...] right by shifts[b] along axis 2."""
    if not any(shifts):
        return x
    n = x.shape[2]
    idx = (mx.arange(n)[None, :] - mx.array(shifts)[:, None]) % n  # [B, n]
    idx = idx.reshape(idx.shape[0], 1, n, *([1] * (x.ndim - 3)))
    return mx.take_along_axis(x, mx.broadcast_to(idx, x.shape), axis=2)


# One memo shared by all layers (same layout in every layer of a step).
_MASK_MEMO = [None, None]


class BatchInt4KVCache(_mlc._BaseCache):
    """B sequences of :class:`tqmetal.cache.Int4KVCache`, left-padded (see the module docstring).

    Made by ``Int4KVCache.merge(caches)`` (mlx-lm's ``BatchGenerator`` calls it),
    or as ``BatchInt4KVCache(left_padding, like=Int4KVCache(...))``: an empty batch
    whose rows take the options of ``like`` (and ``extract`` gives caches of its class).
    """

    step = 256  # quantized capacity grows in these steps
    f_slack = 64  # spare full-precision slots between compactions

    def __init__(self, left_padding: List[int], like):
        self._init(cache_options(like), list(left_padding), getattr(like, "_kscale_given", None),
                   type(like))

    def _init(self, opts: dict, left_padding: List[int], key_scales_given=None,
              single_cls=None):
        self._single_cls = single_cls
        for k, v in opts.items():
            if k not in ("max_size", "keep"):
                setattr(self, k, v)
        self._opts = dict(opts)
        self._kscale_given = key_scales_given
        B = len(left_padding)
        self._idx = 0
        self._lp = [int(p) for p in left_padding]
        self._end = list(self._lp)  # slot after each row's last real token
        self._ns = [0] * B  # sink tokens held per row
        self._nw = [0] * B  # window (full-precision, non-sink) tokens per row
        self._e_att = None  # per row: first slot read in full precision by this call
        self._real = [0] * B  # real tokens per row in the last update
        self._pending = None  # real tokens still to come per row (right padding)
        self._has_stats = [False] * B  # key mean / channel scales fixed for the row
        self._rot_k = self._rot_v = None
        self.model_dtype = None
        self._q = None  # (k triple, v triple)
        self._qbase = 0
        self._f = None  # (fk, fv)
        self._fbase = 0
        self._kmean = None
        self._kscale = None
        self._fetched = None  # weak refs to what the last update_and_fetch returned
        self._fetched_placeholders = False  # ... and whether those were placeholders
        self._fused_served = False  # as Int4KVCache's (see _fetch)
        self._offset_arr = None

    # ---- per-row bookkeeping -----------------------------------------------

    @property
    def batch_size(self):
        return len(self._lp)

    @property
    def _span(self):
        return None

    @property
    def offset(self):
        """Per-row RoPE offsets (an array), as ``BatchKVCache.offset``."""
        if self._offset_arr is None:
            self._offset_arr = mx.array([self._idx - p for p in self._lp], dtype=mx.int32)
        return self._offset_arr

    @property
    def left_padding(self):
        return mx.array(self._lp, dtype=mx.int32)

    def _changed(self):
        self._offset_arr = None

    def _off(self, b):
        """Real tokens of row b."""
        return self._end[b] - self._lp[b]

    # ---- stores -------------------------------------------------------------

    def _setup(self, keys, values):
        B, H, _, D = keys.shape
        Dv = values.shape[-1]
        # Check head dims and resolve rotation as the single cache does.
        for name, d in (("keys", D), ("values", Dv)):
            if d % self.group_size:
                raise ValueError(
                    f"Int4KVCache: {name} head dim {d} is not a multiple of "
                    f"group_size={self.group_size} (try group_size=16 or 32)")
        self._rot_k = resolve_rotation(self.rotate_keys, D, self.k_bits, "keys")
        self._rot_v = resolve_rotation(self.rotate_values, Dv, self.v_bits, "values")
        self.model_dtype = str(keys.dtype).rsplit(".", 1)[-1]
        self._allocate_stores(B, H, D, Dv)

    @property
    def _qcap(self):
        return self._q[0][0].shape[2]

    @property
    def _fcap(self):
        return self._f[0].shape[2] - self.num_sinks

    def _q_needed_from(self, b):
        """Oldest slot row b reads from the quantized store from now on."""
        return self._lp[b] + self.num_sinks

    def _q_steady(self):
        return None

    def _ensure_q(self, S):
        live = [self._q_needed_from(b) for b in range(self.batch_size)]
        # Nothing below qbase is held; rows never need slots below it again.
        new_base = max(min(live + [self._idx]), self._qbase)
        need = self._idx + S - self._qbase
        steady = self._q_steady()
        if need <= self._qcap and (steady is None or self._qcap <= 2 * steady):
            return
        cap = _round_up(self._idx + S - new_base + (self.step if steady else 0), self.step)
        if steady is not None:
            cap = max(cap, steady)
        lo, hi = new_base - self._qbase, self._idx - self._qbase

        def realloc(x):
            keep = x[..., lo:hi, :]
            fresh = mx.zeros((*x.shape[:2], cap - keep.shape[2], x.shape[3]), x.dtype)
            return mx.concatenate([keep, fresh], axis=2)

        self._q = tuple([realloc(x) for x in t] for t in self._q)
        self._qbase = new_base

    def _f_steady(self):
        return self.window + self.chunk_size + self.f_slack

    def _ensure_f(self, S):
        starts = [self._end[b] - self._nw[b] for b in range(self.batch_size) if self._off(b) > 0]
        new_base = min(starts + [self._idx])
        steady = self._f_steady()
        if self._idx + S - self._fbase <= self._fcap and self._fcap <= steady:
            return
        cap = max(steady, self._idx + S - new_base)
        s = self.num_sinks
        lo, hi = new_base - self._fbase, self._idx - self._fbase

        def realloc(x):
            parts = [x[..., :s, :], x[..., s + lo : s + hi, :]]
            parts.append(mx.zeros((*x.shape[:2], cap - (hi - lo), x.shape[3]), x.dtype))
            return mx.concatenate(parts, axis=2)

        self._f = tuple(realloc(x) for x in self._f)
        self._fbase = new_base

    # ---- the cache protocol ----------------------------------------------------

    def update_and_fetch(self, keys, values):
        if self._f is None:
            self._setup(keys, values)
        B, _, S, _ = keys.shape
        if B != self.batch_size:
            raise ValueError(f"BatchInt4KVCache: keys have batch {B}, the cache {self.batch_size}")
        if self._pending is not None:
            S_b = [min(max(r, 0), S) for r in self._pending]
            self._pending = [r - s for r, s in zip(self._pending, S_b)]
        else:
            S_b = [S] * B
        idx0 = self._idx
        self._ensure_q(S)
        self._ensure_f(S)

        first = [b for b in range(B) if not self._has_stats[b] and S_b[b] > 0]
        if self.channel_scale:
            for b in first:
                if self._kscale_given is not None:
                    g = self._kscale_given
                    if g.shape[1] != keys.shape[1] or g.shape[3] != keys.shape[3]:
                        raise ValueError(f"Int4KVCache: key_scales {g.shape} do not fit keys "
                                         f"{keys.shape}")
                    self._kscale[b : b + 1] = g
                else:
                    lo = min(max(self.num_sinks - self._ns[b], 0), S_b[b] - 1)
                    self._kscale[b : b + 1] = channel_scales(
                        keys[b : b + 1, :, lo : S_b[b]], self.channel_scale_alpha,
                        self.center_keys)
            keys = keys / self._kscale
        if self._rot_k:
            keys = mx.hadamard_transform(keys)
        if self._rot_v:
            values = mx.hadamard_transform(values)
        if self.center_keys:
            for b in first:
                lo = min(max(self.num_sinks - self._ns[b], 0), S_b[b] - 1)
                self._kmean[b : b + 1] = mx.mean(
                    keys[b : b + 1, :, lo : S_b[b]].astype(mx.float32), axis=2, keepdims=True
                ).astype(STORAGE_DTYPE)
            keys = keys - self._kmean
        for b in first:
            self._has_stats[b] = True
        keys, values = keys.astype(STORAGE_DTYPE), values.astype(STORAGE_DTYPE)

        # Sinks (by position), for rows still short of them.
        s0 = self.num_sinks
        fk, fv = self._f
        i_b = [0] * B
        for b in range(B):
            if self._ns[b] < s0 and S_b[b] > 0:
                i = min(s0 - self._ns[b], S_b[b])
                fk[b : b + 1, :, self._ns[b] : self._ns[b] + i] = keys[b : b + 1, :, :i]
                fv[b : b + 1, :, self._ns[b] : self._ns[b] + i] = values[b : b + 1, :, :i]
                self._ns[b] += i
                i_b[b] = i
        # Every token, every row: full precision and quantized, at slots [idx0, idx0 + S).
        a = s0 + idx0 - self._fbase
        fk[..., a : a + S, :] = keys
        fv[..., a : a + S, :] = values
        q = self._idx - self._qbase
        for buf, new in zip(self._q[0] + self._q[1],
                            quantize(keys, self.group_size, self.k_bits)
                            + quantize(values, self.group_size, self.v_bits)):
            buf[..., q : q + S, :] = new

        # Each row's window, on the single cache's schedule.
        W, C = self.window, self.chunk_size
        e_att = []
        for b in range(B):
            n = S_b[b] - i_b[b]
            end0, nw0 = self._end[b], self._nw[b]
            att = None
            if n > 0:
                if nw0 + n < W + C:
                    self._nw[b] = nw0 + n
                else:
                    self._nw[b] = W
                    if self.attend_before_quantizing and n > 1:
                        att = end0 - nw0  # this call reads the flushed tokens in fp
            self._end[b] = end0 + S_b[b]
            e_att.append(self._end[b] - self._nw[b] if att is None else att)
        self._e_att = e_att
        self._real = S_b
        self._idx += S
        self._changed()
        return self._fetch()

    # ---- reading ------------------------------------------------------------------

    def keys_and_values(self):
        """K and V over slots [0, _idx) as this call attends them: dequantized,
        un-rotated, with each row's copy chosen (lazy; for attention that does not
        know this cache, with mlx-lm's mask from :meth:`make_mask`)."""
        B, idx = self.batch_size, self._idx
        slots = mx.arange(idx)[None, None, :, None]
        lp = mx.array(self._lp)[:, None, None, None]
        e = mx.array(self._e_att)[:, None, None, None]
        ns = mx.array(self._ns)[:, None, None, None]
        out = []
        for which, bits, rot in ((0, self.k_bits, self._rot_k), (1, self.v_bits, self._rot_v)):
            pk, sc, bi = self._q[which]
            n = idx - self._qbase
            deq = dequantize(pk[..., :n, :], sc[..., :n, :].astype(mx.float32),
                                     bi[..., :n, :].astype(mx.float32), self.group_size, bits)
            if self._qbase > 0:
                pad = mx.zeros((*deq.shape[:2], self._qbase, deq.shape[3]), deq.dtype)
                deq = mx.concatenate([pad, deq], axis=2)
            elif self._qbase < 0:
                deq = deq[..., -self._qbase :, :]
            fp = self._f[which]
            s0 = self.num_sinks
            fpart = fp[..., s0 + max(0, -self._fbase) : s0 + idx - self._fbase, :].astype(mx.float32)
            fstart = max(self._fbase, 0)
            if fstart:
                fpart = mx.concatenate(
                    [mx.zeros((*fpart.shape[:2], fstart, fpart.shape[3]), mx.float32), fpart], axis=2)
            x = mx.where(slots >= e, fpart, deq)
            if s0:
                # sink k of row b sits at slot lp[b] + k
                pos = slots - lp
                sink_idx = mx.clip(pos, 0, s0 - 1)
                sk = mx.take_along_axis(
                    fp[..., :s0, :].astype(mx.float32),
                    mx.broadcast_to(sink_idx, (B, 1, idx, 1)).astype(mx.int32), axis=2)
                x = mx.where((pos >= 0) & (pos < ns), sk, x)
            out.append(to_model_space(x, getattr(mx, self.model_dtype), rot,
                                      *((self._kmean, self._kscale) if which == 0 else ())))
        return tuple(out)

    def _fetch(self):
        # As Int4KVCache._fetch: placeholders once the patched attention has served this
        # cache through the fused op, else the real K/V.
        B, H, n = self.batch_size, self._H, self._idx
        return hand_out(self, self._fused_served and patch.is_patched(),
                        ((B, H, n, self._D), (B, H, n, self._Dv)), getattr(mx, self.model_dtype))

    def materialize_fetched(self, keys, values):
        """As :meth:`tqmetal.cache.Int4KVCache.materialize_fetched`: the real
        :meth:`keys_and_values` for the placeholders the last ``update_and_fetch``
        returned, anything else unchanged."""
        return real_for(self, keys, values)

    def _visible(self, cols, t, lp):
        """Sliding-window visibility of key slots ``cols`` from query slots ``t``."""
        return None

    def _layout_key(self, L):
        return (type(self), self.num_sinks, self._span, self._idx, L, self._qbase, self._fbase, tuple(self._lp), tuple(self._e_att),
                tuple(self._ns), tuple(self._real), self._qcap, self._fcap)

    def _attend_ranges(self, L):
        B = self.batch_size
        qlo = max(self._qbase, min([self._q_read_from(b, L) for b in range(B)] + [self._idx]))
        qhi = max(qlo, min(self._idx, max(self._e_att)))
        return qlo, qhi

    def _q_read_from(self, b, L):
        return self._lp[b] + self.num_sinks

    def _op_mask(self, L, qlo, qhi):
        key = self._layout_key(L) + (qlo, qhi)
        if _MASK_MEMO[0] == key:
            return _MASK_MEMO[1]
        s0 = self.num_sinks
        lp = mx.array(self._lp)[:, None, None, None]
        e = mx.array(self._e_att)[:, None, None, None]
        ns = mx.array(self._ns)[:, None, None, None]
        real = mx.array(self._real)[:, None, None, None]
        i = mx.arange(L)[None, None, :, None]
        t = self._idx - L + i  # query slots
        nonsink = lp + s0
        qs = mx.arange(qlo, qhi)[None, None, None, :]
        fs = mx.arange(self._fbase, self._idx)[None, None, None, :]
        parts = []
        if qhi > qlo:
            m = (qs >= nonsink) & (qs < e) & (qs <= t)
            vis = self._visible(qs, t, lp)
            parts.append(m if vis is None else m & vis)
        if s0:
            k = mx.arange(s0)[None, None, None, :]
            parts.append((k < ns) & (k <= t - lp))
        m = (fs >= nonsink) & (fs >= e) & (fs <= t)
        vis = self._visible(fs, t, lp)
        m = m if vis is None else m & vis
        # Right-padding queries (past a row's real tokens) read their own slot,
        # so that no row of the op is empty; their outputs are never used.
        m = m | ((i >= real) & (fs == t))
        parts.append(m)
        mask = mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        _MASK_MEMO[0], _MASK_MEMO[1] = key, mask
        return mask

    def fused_attention(self, queries, keys, values, *, scale, mask=None, sinks=None):
        """``tqmetal.sdpa_int4`` over the batch, or None if it cannot serve this call.
        ``mask`` is ignored: the cache knows each row's padding and layout."""
        f = self._fetched
        if f is None or f[0]() is not keys or f[1]() is not values:
            return None
        D = queries.shape[-1]
        if self._D != D or self._Dv != D or not fused_op_available():
            return None
        if sinks is not None and self._kmean is not None:
            return None
        L = queries.shape[2]
        q = queries
        if self._kscale is not None:
            B, Hq, _, _ = q.shape
            Hk = self._kscale.shape[1]
            s = self._kscale.astype(q.dtype)
            q = (q.reshape(B, Hk, Hq // Hk, L, D) * mx.expand_dims(s, 2)).reshape(B, Hq, L, D)
        q = mx.hadamard_transform(q) if self._rot_k else q
        qlo, qhi = self._attend_ranges(L)
        a, b = qlo - self._qbase, qhi - self._qbase
        qk = [x[..., a:b, :] for x in self._q[0]]
        qv = [x[..., a:b, :] for x in self._q[1]]
        t = self.num_sinks + self._idx - self._fbase
        kt, vt = self._f[0][..., :t, :], self._f[1][..., :t, :]
        out = sdpa_int4(
            q, qk, qv, scale=scale, mask=self._op_mask(L, qlo, qhi),
            group_size=self.group_size, k_bits=self.k_bits, v_bits=self.v_bits,
            sinks=sinks, k_tail=kt, v_tail=vt,
        )
        self._fused_served = True
        return unrotate(out) if self._rot_v else out

    # ---- batch protocol ---------------------------------------------------------

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        # As BatchKVCache: for layers of other cache types that share the mask.
        # This cache's attention builds its own (see fused_attention).
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self._f is not None and self._idx > 0:
                raise ValueError("Left padding can only be added to an empty BatchInt4KVCache")
            left_padding = [int(x) for x in (left_padding.tolist() if isinstance(
                left_padding, mx.array) else left_padding)]
            self._lp = [a + p for a, p in zip(self._lp, left_padding)]
            self._end = [a + p for a, p in zip(self._end, left_padding)]
            self._changed()
        if right_padding is not None and max(right_padding) > 0:
            lengths = lengths.tolist() if isinstance(lengths, mx.array) else lengths
            self._pending = [int(x) for x in lengths]

    def finalize(self):
        if self._pending is None:
            return
        self._pending = None
        shifts = [self._idx - e for e in self._end]
        if not any(shifts) or self._f is None:
            self._lp = [p + s for p, s in zip(self._lp, shifts)]
            self._end = [self._idx] * self.batch_size
            self._changed()
            return
        self._q = tuple([_roll_rows(x, shifts) for x in t] for t in self._q)
        s0 = self.num_sinks
        self._f = tuple(
            mx.concatenate([x[..., :s0, :], _roll_rows(x[..., s0:, :], shifts)], axis=2)
            for x in self._f)
        self._lp = [p + s for p, s in zip(self._lp, shifts)]
        self._end = [self._idx] * self.batch_size
        self._changed()

    def filter(self, batch_indices):
        keep = batch_indices.tolist() if isinstance(batch_indices, mx.array) else list(batch_indices)
        for name in ("_lp", "_end", "_ns", "_nw", "_real", "_has_stats"):
            v = getattr(self, name)
            setattr(self, name, [v[i] for i in keep])
        if self._e_att is not None:
            self._e_att = [self._e_att[i] for i in keep]
        if self._pending is not None:
            self._pending = [self._pending[i] for i in keep]
        if self._f is not None:
            ix = mx.array(keep, dtype=mx.int32)
            self._q = tuple([x[ix] for x in t] for t in self._q)
            self._f = tuple(x[ix] for x in self._f)
            if self._kmean is not None:
                self._kmean = self._kmean[ix]
            if self._kscale is not None:
                self._kscale = self._kscale[ix]
        # Shift left to drop common padding (as BatchKVCache); the stores' dead
        # front is reclaimed at their next reallocation.
        if keep:
            m = min(self._lp)
            if m > 0:
                self._shift(-m)
        self._fetched = None
        self._changed()

    def _shift(self, d):
        """Move every coordinate by d slots (no data moves)."""
        self._idx += d
        self._lp = [p + d for p in self._lp]
        self._end = [p + d for p in self._end]
        if self._e_att is not None:
            self._e_att = [p + d for p in self._e_att]
        self._qbase += d
        self._fbase += d

    def _check_compatible(self, other):
        if type(other) is not type(self) or other._opts != self._opts:
            raise ValueError(f"cannot combine {type(self).__name__} caches with different options")
        if self._f is not None and other._f is not None:
            if (self._rot_k, self._rot_v, self.model_dtype, self._H, self._D, self._Dv) != (
                    other._rot_k, other._rot_v, other.model_dtype, other._H, other._D, other._Dv):
                raise ValueError("cannot combine caches of different models")

    def extend(self, other):
        """In-place extend this batch with the rows of ``other`` (right-aligned)."""
        self._check_compatible(other)
        idx = max(self._idx, other._idx)
        for c in (self, other):
            if c._idx != idx:
                c._shift(idx - c._idx)
        if self._f is None and other._f is None:
            self._concat_rows(other)
            return
        proto = self if self._f is not None else other
        for c in (self, other):
            if c._f is None:
                c._materialize_like(proto)
        qbase = min(self._qbase, other._qbase)
        fbase = min(self._fbase, other._fbase)
        qcap = _round_up(max(self._qbase + self._qcap, other._qbase + other._qcap) - qbase,
                         self.step)
        fcap = max(self._fbase + self._fcap, other._fbase + other._fcap) - fbase
        for c in (self, other):
            c._rebase(qbase, qcap, fbase, fcap)
        self._q = tuple([mx.concatenate([a, b], axis=0) for a, b in zip(ta, tb)]
                        for ta, tb in zip(self._q, other._q))
        self._f = tuple(mx.concatenate([a, b], axis=0) for a, b in zip(self._f, other._f))
        if self._kmean is not None:
            self._kmean = mx.concatenate([self._kmean, other._kmean], axis=0)
        if self._kscale is not None:
            self._kscale = mx.concatenate([self._kscale, other._kscale], axis=0)
        self._concat_rows(other)

    def _concat_rows(self, other):
        for name in ("_lp", "_end", "_ns", "_nw", "_real", "_has_stats"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if self._pending is not None or other._pending is not None:
            raise ValueError("extend: finalize() both caches first")
        self._e_att = None
        self._fetched = None
        self._changed()

    def _allocate_stores(self, B, H, D, Dv):
        """Empty quantized and full-precision stores (sinks' slots only) at the current slot."""
        self._H, self._D, self._Dv = H, D, Dv
        self._q = (_empty_triple(B, H, 0, D, self.k_bits, self.group_size),
                   _empty_triple(B, H, 0, Dv, self.v_bits, self.group_size))
        self._qbase = self._idx
        s = self.num_sinks
        self._f = (mx.zeros((B, H, s, D), STORAGE_DTYPE), mx.zeros((B, H, s, Dv), STORAGE_DTYPE))
        self._fbase = self._idx
        if self.center_keys:
            self._kmean = mx.zeros((B, H, 1, D), STORAGE_DTYPE)
        if self.channel_scale:
            self._kscale = mx.ones((B, H, 1, D), STORAGE_DTYPE)

    def _materialize_like(self, proto):
        """Give an empty batch stores shaped like proto's (its rows hold nothing)."""
        B, H, D, Dv = self.batch_size, proto._H, proto._D, proto._Dv
        self._rot_k, self._rot_v, self.model_dtype = proto._rot_k, proto._rot_v, proto.model_dtype
        self._allocate_stores(B, H, D, Dv)

    def _rebase(self, qbase, qcap, fbase, fcap):
        """Re-lay the stores over slots [qbase, qbase + qcap) and [fbase, fbase + fcap)."""

        def relay(x, old_base, base, cap, lead=0):
            front = old_base - base
            body = x[..., lead:, :]
            parts = [x[..., :lead, :]] if lead else []
            if front:
                parts.append(mx.zeros((*x.shape[:2], front, x.shape[3]), x.dtype))
            parts.append(body)
            back = cap - front - body.shape[2]
            if back > 0:
                parts.append(mx.zeros((*x.shape[:2], back, x.shape[3]), x.dtype))
            y = mx.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]
            return y[..., : lead + cap, :]

        self._q = tuple([relay(x, self._qbase, qbase, qcap) for x in t] for t in self._q)
        self._f = tuple(relay(x, self._fbase, fbase, fcap, self.num_sinks) for x in self._f)
        self._qbase, self._fbase = qbase, fbase

    # ---- to and from single-sequence caches --------------------------------------------

    def extract(self, idx):
        """Row ``idx`` as a single-sequence cache, in the layout that cache would have."""
        c = _make_single(self._single_cls, self._opts, self._kscale_given)
        off = self._off(idx)
        if self._f is None or off <= 0:
            return c
        s0, lp, end, nw, ns = self.num_sinks, self._lp[idx], self._end[idx], self._nw[idx], self._ns[idx]
        H = self._H
        n_fp = s0 + self.window + self.chunk_size
        fk = mx.zeros((1, H, n_fp, self._D), STORAGE_DTYPE)
        fv = mx.zeros((1, H, n_fp, self._Dv), STORAGE_DTYPE)
        if ns:
            fk[..., :ns, :] = self._f[0][idx : idx + 1, :, :ns]
            fv[..., :ns, :] = self._f[1][idx : idx + 1, :, :ns]
        if nw:
            a = s0 + end - nw - self._fbase
            fk[..., s0 : s0 + nw, :] = self._f[0][idx : idx + 1, :, a : a + nw]
            fv[..., s0 : s0 + nw, :] = self._f[1][idx : idx + 1, :, a : a + nw]
        q_end = end - nw  # slot after the last quantized token
        q_start = max(lp + ns, self._qbase, lp + self._first_live_pos(idx))
        q_start = min(q_start, q_end)
        nq = q_end - q_start
        a = q_start - self._qbase
        qk = [mx.contiguous(x[idx : idx + 1, :, a : a + nq]) for x in self._q[0]]
        qv = [mx.contiguous(x[idx : idx + 1, :, a : a + nq]) for x in self._q[1]]
        meta = dict(c.state[-1])
        meta.update(offset=off, _ns=ns, _nw=nw, _nq=nq, _qlo=0, _qstart=q_start - lp,
                    _rot_k=self._rot_k, _rot_v=self._rot_v, model_dtype=self.model_dtype)
        kmean = None if self._kmean is None else mx.contiguous(self._kmean[idx : idx + 1])
        kscale = None if self._kscale is None else mx.contiguous(self._kscale[idx : idx + 1])
        given = getattr(c, "_kscale_given", None)
        if not nq:
            qk = qv = None
        c.state = (fk, fv, qk, qv, kmean, kscale, meta)
        c._kscale_given = given
        return c

    def _first_live_pos(self, b):
        return 0

    @classmethod
    def merge(cls, caches):
        """One batch cache from single-sequence int4 caches (left-padded to the longest)."""
        if not caches:
            raise ValueError("merge: expected at least one cache")
        opts = cache_options(caches[0])
        for c in caches:
            if type(c) is not type(caches[0]) or cache_options(c) != opts:
                raise ValueError(f"{cls.__name__}.merge: all caches must be "
                                 f"{type(caches[0]).__name__} with the same options")
        offsets = [c.offset for c in caches]
        idx = max(offsets)
        batch = cls.__new__(cls)
        batch._init(opts, [idx - o for o in offsets], getattr(caches[0], "_kscale_given", None),
                    type(caches[0]))
        batch._idx = idx
        batch._end = [idx] * len(caches)
        # Each single cache through its state: (fk, fv, qk, qv, kmean, kscale, meta).
        states = [None if c.empty() or c.offset == 0 else c.state for c in caches]
        full = [st for st in states if st is not None]
        if not full:
            batch._changed()
            return batch
        fk0, fv0, meta0 = full[0][0], full[0][1], full[0][-1]
        B, H = len(caches), fk0.shape[1]
        D, Dv = fk0.shape[-1], fv0.shape[-1]
        model = ("_rot_k", "_rot_v", "model_dtype")
        for st in full:
            if [st[-1][k] for k in model] + [st[0].shape[1], st[0].shape[-1]] != [
                    meta0[k] for k in model] + [H, D]:
                raise ValueError(f"{cls.__name__}.merge: caches of different models")
        batch._rot_k, batch._rot_v, batch.model_dtype = (meta0[k] for k in model)
        batch._H, batch._D, batch._Dv = H, D, Dv
        s0 = batch.num_sinks
        # Per row: sinks, quantized tokens at slots [qs, qe), window [qe, idx).
        rows = []
        for b, st in enumerate(states):
            if st is None:
                rows.append(None)
                continue
            m = st[-1]
            qe = idx - m["_nw"]
            qs = batch._lp[b] + m["_qstart"] if m["_nq"] else qe
            rows.append((st, qs, qe))
        qbase = min([r[1] for r in rows if r is not None] + [idx])
        qbase = min(qbase, min(batch._lp[b] + s0 for b in range(B)))
        qcap = _round_up(idx - qbase, batch.step) or batch.step
        fbase = min([r[2] for r in rows if r is not None] + [idx])
        fcap = max(batch._f_steady(), idx - fbase)
        qk = _empty_triple(B, H, qcap, D, batch.k_bits, batch.group_size)
        qv = _empty_triple(B, H, qcap, Dv, batch.v_bits, batch.group_size)
        fk = mx.zeros((B, H, s0 + fcap, D), STORAGE_DTYPE)
        fv = mx.zeros((B, H, s0 + fcap, Dv), STORAGE_DTYPE)
        kmean = mx.zeros((B, H, 1, D), STORAGE_DTYPE) if batch.center_keys else None
        kscale = mx.ones((B, H, 1, D), STORAGE_DTYPE) if batch.channel_scale else None
        for b, r in enumerate(rows):
            if r is None:
                continue  # an empty row: its stats come with its first update
            (cfk, cfv, cqk, cqv, ckmean, ckscale, m), qs, qe = r
            ns, nw, nq, qlo = m["_ns"], m["_nw"], m["_nq"], m["_qlo"]
            if ns:
                fk[b : b + 1, :, :ns] = cfk[..., :ns, :]
                fv[b : b + 1, :, :ns] = cfv[..., :ns, :]
            if nq:
                a = qs - qbase
                for buf, src in zip(qk + qv, list(cqk) + list(cqv)):
                    buf[b : b + 1, :, a : a + nq] = src[..., qlo : qlo + nq, :]
            if nw:
                wk, wv = cfk[..., s0 : s0 + nw, :], cfv[..., s0 : s0 + nw, :]
                a = s0 + qe - fbase
                fk[b : b + 1, :, a : a + nw] = wk
                fv[b : b + 1, :, a : a + nw] = wv
                # The window is quantized too (as it would be when it leaves the window).
                a = qe - qbase
                for buf, src in zip(qk + qv, quantize(wk, batch.group_size, batch.k_bits)
                                    + quantize(wv, batch.group_size, batch.v_bits)):
                    buf[b : b + 1, :, a : a + nw] = src
            if kmean is not None and ckmean is not None:
                kmean[b : b + 1] = ckmean
            if kscale is not None and ckscale is not None:
                kscale[b : b + 1] = ckscale
            batch._ns[b], batch._nw[b] = ns, nw
            batch._has_stats[b] = True
        batch._q, batch._qbase = (qk, qv), qbase
        batch._f, batch._fbase = (fk, fv), fbase
        batch._kmean, batch._kscale = kmean, kscale
        batch._changed()
        return batch

    # ---- state, trim, sizes ---------------------------------------------------------

    _META = ("_idx", "_qbase", "_fbase", "_rot_k", "_rot_v", "model_dtype", "_H", "_D", "_Dv")
    _ROWS = ("_lp", "_end", "_ns", "_nw", "_has_stats")

    @property
    def state(self):
        # the slots in use, as mlx-lm's BatchKVCache.state gives them (rows' left padding
        # included, spare capacity not); the stores grow back as updates need
        arrays = ()
        if self._f is not None:
            nq = max(0, self._idx - self._qbase)
            nf = self.num_sinks + max(0, self._idx - self._fbase)
            arrays = (*(x[..., :nq, :] for t in self._q for x in t),
                      *(x[..., :nf, :] for x in self._f))
        meta = {k: getattr(self, k, None) for k in self._META}
        meta.update({k: list(getattr(self, k)) for k in self._ROWS})
        meta["options"] = dict(self._opts)
        meta["single_class"] = None if self._single_cls is None else self._single_cls.__name__
        return arrays, self._kmean, self._kscale, meta

    @state.setter
    def state(self, v):
        arrays, kmean, kscale, meta = v
        # the single cache class is registered in mlx-lm's cache module (load_prompt_cache)
        single = meta.get("single_class")
        self._init(meta["options"], meta["_lp"], None,
                   None if single is None else getattr(_mlc, single))
        for k in self._META:
            setattr(self, k, meta.get(k))
        for k in self._ROWS:
            setattr(self, k, [type(x)(x) for x in meta[k]])
        if arrays:
            self._q = (list(arrays[0:3]), list(arrays[3:6]))
            self._f = (arrays[6], arrays[7])
        self._kmean, self._kscale = kmean, kscale
        self._changed()

    @property
    def meta_state(self):
        return ()

    @meta_state.setter
    def meta_state(self, v):
        pass

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self._idx, n)
        for b in range(self.batch_size):
            off = self._off(b)
            k = max(0, min(off, self._end[b] - (self._idx - n)))
            w = min(k, self._nw[b])
            nq = max(0, off - self._ns[b] - self._nw[b])
            self._nw[b] -= w
            r = k - w
            self._ns[b] -= r - min(r, nq)
            self._end[b] -= k
            if self._off(b) <= 0:
                self._has_stats[b] = False
        self._idx -= n
        self._e_att = None
        self._fetched = None
        self._changed()
        return n

    def size(self):
        return self._idx

    def empty(self):
        return self._f is None

    @property
    def nbytes_allocated(self):
        """Bytes of every buffer as allocated (padding and spare capacity included)."""
        if self._f is None:
            return 0
        arrays = [*self._q[0], *self._q[1], *self._f, self._kmean, self._kscale]
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def nbytes(self):
        """Bytes of the tokens the rows hold, each in the form it is read in."""
        if self._f is None:
            return 0
        per_fp = (self._D + self._Dv) * self._H * 2
        per_q = sum(x.nbytes // max(x.shape[0] * x.shape[2], 1) for t in self._q for x in t)
        total = 0
        for b in range(self.batch_size):
            held = self._held(b)
            nfp = self._ns[b] + min(self._nw[b], held)
            total += per_fp * nfp + per_q * max(0, held - nfp)
        extra = sum(a.nbytes for a in (self._kmean, self._kscale) if a is not None)
        return total + extra

    def _held(self, b):
        return self._off(b)


class BatchRotatingInt4KVCache(BatchInt4KVCache):
    """B sequences of :class:`tqmetal.cache.RotatingInt4KVCache` (sliding window
    of ``max_size`` tokens, the first ``keep`` kept)."""

    def _init(self, opts, left_padding, key_scales_given=None, single_cls=None):
        if "max_size" not in opts:
            raise ValueError("BatchRotatingInt4KVCache: expected RotatingInt4KVCache caches")
        super()._init(opts, left_padding, key_scales_given, single_cls)
        self.max_size, self.keep = opts["max_size"], opts["keep"]

    @property
    def _span(self):
        return self.max_size - self.keep

    def _first_live_pos(self, b):
        return max(self.keep, self._off(b) - self._span + 1)

    def _q_needed_from(self, b):
        return self._lp[b] + self._first_live_pos(b)

    def _q_read_from(self, b, L):
        first_query = self._off(b) - self._real[b] if self._real else self._off(b)
        return self._lp[b] + max(self.keep, first_query - self._span + 1)

    def _q_steady(self):
        return _round_up(self._span + self.step, self.step)

    def _visible(self, cols, t, lp):
        return cols > t - self._span

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None,
                  **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding,
                                  window_size=window_size or self.max_size)

    def is_trimmable(self):
        return all(self._off(b) < self.max_size for b in range(self.batch_size))

    def size(self):
        return min(self._idx, self.max_size)

    def _held(self, b):
        off = self._off(b)
        return min(off, self.max_size)



def merge_caches(caches):
    """``Int4KVCache.merge``: a batch cache of the caches' kind (sliding window or not)."""
    if caches and getattr(caches[0], "max_size", None) is not None:
        return BatchRotatingInt4KVCache.merge(caches)
    return BatchInt4KVCache.merge(caches)


for _cls in (BatchInt4KVCache, BatchRotatingInt4KVCache):
    # load_prompt_cache resolves class names in mlx_lm.models.cache's globals.
    setattr(_mlc, _cls.__name__, _cls)
