"""Route mlx-lm's attention over quantized caches to ``tqmetal.sdpa_int4``.

    from tqmetal.patch import patch_mlx_lm, patched
    patch_mlx_lm()            # or: with patched(): ...

mlx-lm's models import ``scaled_dot_product_attention`` by name from
``mlx_lm.models.base``. Patching rebinds it in ``base`` (so modules imported
later pick up the patched function when they import it) and in every loaded
module that holds base's function under that name. The patched function sends

* :class:`tqmetal.cache.Int4KVCache` and :class:`~tqmetal.cache.RotatingInt4KVCache`
  to their ``fused_attention`` (quantized part + full-precision tail, key
  rotation, masks translated to the op's key order);
* mlx-lm's ``QuantizedKVCache`` (2, 3, 4, 5, 6 or 8 bits; its K/V are already
  ``(packed, scales, biases)`` views) to ``tqmetal.sdpa_int4``, where mlx-lm
  would call ``quantized_scaled_dot_product_attention``; attention sinks work;

and every other call, unchanged, to the function it replaced. This module
does not know the cache classes (they know it): it calls any cache's
``fused_attention`` method.

While patched, a tqmetal cache that the fused op has served once returns NaN
placeholders from ``update_and_fetch`` instead of its dequantized K/V (the fused
op reads the packed data; see :mod:`tqmetal.fetched`). Before a call goes to
the replaced function, :func:`tqmetal.fetched.materialize` swaps any
placeholders among its K/V for the real ones, whichever cache handed them out.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import mlx_lm.models.base as _base

from .cache_storage import readable_width
from .fetched import materialize
from .ops import fused_op_available, sdpa_int4

__all__ = [
    "patch_mlx_lm", "unpatch_mlx_lm", "patched", "is_patched", "scaled_dot_product_attention",
]

_NAME = "scaled_dot_product_attention"
_UNPATCHED = _base.scaled_dot_product_attention  # mlx-lm's, when this module was imported
_original = None  # what base held when patch_mlx_lm() ran


def _fused(queries, keys, values, cache, scale, mask, sinks):
    attend = getattr(cache, "fused_attention", None)
    if attend is not None:
        return attend(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
    if (
        hasattr(cache, "bits")
        and readable_width(cache.bits, getattr(cache, "group_size", 0))
        and getattr(cache, "mode", "affine") == "affine"
        and isinstance(keys, (tuple, list))
        and len(keys) == 3
        and fused_op_available()
    ):
        return sdpa_int4(
            queries, keys, values, scale=scale, mask=mask,
            group_size=cache.group_size, bits=cache.bits, sinks=sinks,
        )
    return None


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """Drop-in for ``mlx_lm.models.base.scaled_dot_product_attention``."""
    out = _fused(queries, keys, values, cache, scale, mask, sinks)
    if out is not None:
        return out
    # The fallback reads K/V: placeholders a cache handed out become its real K/V.
    keys, values = materialize(keys, values)
    fallback = _original or _UNPATCHED
    return fallback(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def _rebind(old, new):
    for name, mod in list(sys.modules.items()):
        d = getattr(mod, "__dict__", None)
        if name != __name__ and d is not None and d.get(_NAME) is old:
            d[_NAME] = new


def is_patched() -> bool:
    return _base.scaled_dot_product_attention is scaled_dot_product_attention


def patch_mlx_lm():
    """Rebind mlx-lm's ``scaled_dot_product_attention`` everywhere (idempotent)."""
    global _original
    if is_patched():
        return
    _original = _base.scaled_dot_product_attention
    _rebind(_original, scaled_dot_product_attention)


def unpatch_mlx_lm():
    """Undo :func:`patch_mlx_lm` in every module that holds the patched function."""
    global _original
    if _original is None:
        return
    _rebind(scaled_dot_product_attention, _original)
    _original = None


@contextmanager
def patched():
    """``with patched(): ...`` patches for the block (nests; restores what was there)."""
    was = is_patched()
    patch_mlx_lm()
    try:
        yield
    finally:
        if not was:
            unpatch_mlx_lm()
