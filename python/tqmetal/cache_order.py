"""Key order and masks of :class:`tqmetal.cache.Int4KVCache`.

The fused op attends a cache's keys as ``[quantized..., sinks..., window...]``:
positions ``[qstart, qstart + nq)``, then ``[0, ns)``, then ``[offset - nw,
offset)``. mlx-lm makes masks in sequence order (``[0, offset)``). Attention
does not depend on the key order except through the mask, so this module
translates one into the other:

* ``None`` stays ``None``;
* ``"causal"`` stays ``"causal"`` (bottom-right aligned) while the newest L keys
  of the op's order are the L new tokens, that is while the window holds all of
  them, or while nothing is reordered (no sinks, or nothing quantized); else it
  becomes a boolean mask built from the key positions;
* an array has its last axis permuted;
* with a sliding window (``span``), the mask follows from the positions held.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import mlx.core as mx


class KeyOrder(NamedTuple):
    """Which positions the op's keys hold, in the op's order (see the module docstring)."""

    offset: int  # tokens seen so far; the L queries are positions [offset - L, offset)
    num_sinks: int  # sinks configured (a mask array's first num_sinks columns)
    ns: int  # sinks held, positions [0, ns)
    qstart: int  # position of the first quantized key attended
    nq: int  # quantized keys attended, positions [qstart, qstart + nq)
    nw: int  # window keys attended, positions [offset - nw, offset)
    span: Optional[int] = None  # sliding window: non-sink positions a query sees (None: all)


def key_positions(order: KeyOrder):
    """Sequence position of every key in the op's order."""
    parts = []
    if order.nq:
        parts.append(mx.arange(order.qstart, order.qstart + order.nq))
    if order.ns:
        parts.append(mx.arange(order.ns))
    if order.nw:
        parts.append(mx.arange(order.offset - order.nw, order.offset))
    return mx.concatenate(parts) if len(parts) > 1 else parts[0]


def positional_mask(order: KeyOrder, L: int):
    """Boolean [L, keys] mask: causal (and within the sliding window, sinks exempt)."""
    pos = key_positions(order)[None]
    t = mx.arange(order.offset - L, order.offset)[:, None]
    m = pos <= t
    if order.span is not None:
        m = m & ((pos > t - order.span) | (pos < order.num_sinks))
    return m


def translate_mask(order: KeyOrder, mask, L: int):
    """mlx-lm's ``mask`` (sequence order) for L queries, in the op's key order."""
    s0, nq, nw = order.num_sinks, order.nq, order.nw
    reordered = order.ns > 0 and nq > 0
    if order.span is not None:
        oldest = order.qstart if nq else order.offset - nw
        if (nq or nw) and oldest <= order.offset - 1 - order.span:
            return positional_mask(order, L)
        mask = None if L == 1 else "causal"
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported mask {mask!r}")
        return mask if not reordered or nw >= L else positional_mask(order, L)
    if not reordered or mask.shape[-1] == 1:
        return mask
    if mask.shape[-1] != order.offset:
        raise ValueError(
            f"Int4KVCache: mask covers {mask.shape[-1]} keys, the cache holds {order.offset}"
        )
    return mx.concatenate(
        [mask[..., s0 : s0 + nq], mask[..., :s0], mask[..., s0 + nq :]], axis=-1
    )


# One memo entry shared by all layers: every layer of a model has the same
# layout, so the mask translated for layer 0 serves the others in the step.
_MEMO = [None, None]


def translate_mask_memo(order: KeyOrder, mask, L: int):
    """:func:`translate_mask`, reusing the last result for the same order and mask."""
    key = (order, L, id(mask))
    if _MEMO[0] is not None and _MEMO[0][0] == key and _MEMO[0][1] is mask:
        return _MEMO[1]
    out = translate_mask(order, mask, L)
    _MEMO[0], _MEMO[1] = (key, mask), out
    return out
