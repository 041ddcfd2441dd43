"""Storage of :class:`tqmetal.cache.Int4KVCache`: where its tokens live.

Two parts per layer, K and V side by side (positions are token indices)::

    FullPrecisionPart  slots [0, ns) sinks | [sinks, sinks + nw) window    float16
    QuantizedPart      slots [lo, lo + n) = positions [start, start + n)   affine int4/int8

Both are preallocated buffers written in place (slice assignment); their
capacity changes only when a part is reallocated (``grow`` / ``resize``),
never as a side effect of a write. Which tokens go where, and when, is the
cache's business (:mod:`tqmetal.cache`); these classes only hold them.
"""

from __future__ import annotations

import mlx.core as mx

# The dtype of everything the cache stores in floating point: the full-precision
# sinks and window, scales and biases, the key mean and channel scales.
STORAGE_DTYPE = mx.float16

_SHIFTS = {}

# mx.quantize's widths; those other than 4 and 8 (codes straddling words) need
# groups of 32 or more.
BIT_WIDTHS = (2, 3, 4, 5, 6, 8)


def readable_width(bits: int, group_size: int) -> bool:
    """Whether the fused op reads codes of this width at this group size."""
    return bits in BIT_WIDTHS and (bits in (4, 8) or group_size >= 32)


def check_bits(k_bits: int, v_bits: int, group_size: int) -> None:
    """ValueError unless the fused op reads these widths at this group size."""
    for name, b in (("k_bits", k_bits), ("v_bits", v_bits)):
        if b not in BIT_WIDTHS:
            raise ValueError(f"{name} must be one of {BIT_WIDTHS} (mx.quantize's widths), got {b}")
        if not readable_width(b, group_size):
            raise ValueError(f"{name}={b} needs group_size 32, 64 or 128 (group_size={group_size} "
                             f"supports 4 and 8 bits only)")


def dequantize(packed, scales, biases, group_size: int, bits: int):
    """mx.dequantize for any group size, in cheap-to-build ops (mx.dequantize
    itself for the widths whose codes straddle words).

    Built on every fetch and usually never evaluated, so graph-building time
    is what counts: this takes a third of mx.dequantize's.
    """
    if 32 % bits:  # 3, 5, 6 bits: codes straddle words (groups of 32 or more)
        return mx.dequantize(packed, scales, biases, group_size, bits)
    if bits not in _SHIFTS:
        _SHIFTS[bits] = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = (mx.expand_dims(packed, -1) >> _SHIFTS[bits]) & ((1 << bits) - 1)
    q = q.reshape(*packed.shape[:-1], -1, group_size).astype(scales.dtype)
    x = q * mx.expand_dims(scales, -1) + mx.expand_dims(biases, -1)
    return x.reshape(*packed.shape[:-1], -1)


def empty_triple(B: int, H: int, D: int, group_size: int, bits: int):
    """A (packed, scales, biases) triple of zero tokens."""
    gs = mx.zeros((B, H, 0, D // group_size), STORAGE_DTYPE)
    return [mx.zeros((B, H, 0, D * bits // 32), mx.uint32), gs, gs]


class FullPrecisionPart:
    """The sinks and the recent-token window, float16, in one K and one V buffer.

    Slots ``[0, ns)`` hold the first ``ns`` tokens (sinks, kept for good);
    slots ``[sinks, sinks + nw)`` hold positions ``[offset - nw, offset)``.
    """

    def __init__(self, sinks: int):
        self.sinks = sinks  # slots reserved for sinks: the window starts here
        self.ns = 0  # sink tokens held
        self.nw = 0  # window tokens held
        self.keys = self.values = None  # [B, H, capacity, D]

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def allocate(self, B: int, H: int, D: int, Dv: int, capacity: int):
        self.keys = mx.zeros((B, H, capacity, D), STORAGE_DTYPE)
        self.values = mx.zeros((B, H, capacity, Dv), STORAGE_DTYPE)

    def grow(self, capacity: int):
        """Reallocate to ``capacity`` slots (no-op if it has them), keeping the contents."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.keys, self.values = (
            mx.concatenate([b, mx.zeros((*b.shape[:2], extra, b.shape[3]), b.dtype)], axis=2)
            for b in (self.keys, self.values)
        )

    def write(self, slot: int, k, v):
        n = k.shape[2]
        self.keys[..., slot : slot + n, :] = k
        self.values[..., slot : slot + n, :] = v

    def sink_views(self):
        return self.keys[..., : self.ns, :], self.values[..., : self.ns, :]

    def window_views(self):
        s0 = self.sinks
        return self.keys[..., s0 : s0 + self.nw, :], self.values[..., s0 : s0 + self.nw, :]

    @property
    def nbytes_allocated(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held (sinks and window)."""
        if not self.capacity:
            return 0
        return self.nbytes_allocated // self.capacity * (self.ns + self.nw)


class QuantizedPart:
    """Quantized K and V tokens: one ``[packed, scales, biases]`` list each.

    Live slots ``[lo, lo + n)`` hold positions ``[start, start + n)``: the front
    ``[0, lo)`` is dead space a sliding window leaves until the next ``resize``.
    ``keys`` / ``values`` are None until the first tokens arrive.
    """

    def __init__(self):
        self.keys = self.values = None
        self.lo = 0
        self.n = 0
        self.start = 0
        self._views = None  # ((lo, hi), k views, v views) of the attended slots

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def resize(self, capacity: int):
        """Reallocate to ``capacity`` slots with the live tokens moved to the front."""
        lo, hi = self.lo, self.lo + self.n

        def realloc(buf):
            shape = (*buf.shape[:2], capacity - self.n, buf.shape[3])
            fresh = mx.zeros(shape, buf.dtype)
            return mx.concatenate([buf[..., lo:hi, :], fresh], axis=2) if hi > lo else fresh

        self._views = None
        self.keys = [realloc(b) for b in self.keys]
        self.values = [realloc(b) for b in self.values]
        self.lo = 0

    def drop_front(self, count: int):
        """Forget the ``count`` oldest live tokens (their slots become dead space)."""
        self.lo += count
        self.n -= count
        self.start += count

    def append(self, kq, vq, reserve):
        """Store quantized triples after the live tokens; ``reserve(need)`` gives the
        capacity to reallocate to for ``need`` live tokens, or None if they fit."""
        n = kq[0].shape[2]
        if self.keys is None:
            B, H = kq[0].shape[:2]
            self.keys = [mx.zeros((B, H, 0, x.shape[-1]), x.dtype) for x in kq]
            self.values = [mx.zeros((B, H, 0, x.shape[-1]), x.dtype) for x in vq]
        cap = reserve(self.n + n)
        if cap is not None:
            self.resize(cap)
        self._views = None  # views would keep MLX from updating the buffers in place
        a = self.lo + self.n
        for buf, new in zip(self.keys + self.values, kq + vq):
            buf[..., a : a + n, :] = new
        self.n += n

    def views(self, n: int):
        """The first ``n`` live tokens' (K triple, V triple), or (None, None) if none stored."""
        if self.keys is None:
            return None, None
        lo, hi = self.lo, self.lo + n
        if self._views is None or self._views[0] != (lo, hi):
            if lo == 0 and hi == self.capacity:
                views = self.keys, self.values
            else:
                views = ([x[..., lo:hi, :] for x in self.keys],
                         [x[..., lo:hi, :] for x in self.values])
            self._views = ((lo, hi), *views)
        return self._views[1:]

    def forget_views(self):
        self._views = None

    @property
    def nbytes_allocated(self) -> int:
        return sum(a.nbytes for a in (self.keys or []) + (self.values or []))

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held."""
        return sum(a.nbytes // max(a.shape[2], 1) for a in (self.keys or []) + (self.values or [])) * self.n
