"""From mlx-lm's full-precision caches to tqmetal's int4 caches.

    from mlx_lm.models.cache import load_prompt_cache
    from tqmetal.convert import to_int4

    cache = to_int4(load_prompt_cache("prompt.safetensors"))   # a saved fp16 prompt cache
    # or, inside mlx-lm's generate_step / server (kv_bits, quantized_kv_start):
    with quantize_kv_to_int4():
        mlx_lm.generate(model, tok, prompt, kv_bits=4, quantized_kv_start=1000)

A ``KVCache`` becomes an :class:`~tqmetal.cache.Int4KVCache` and a
``RotatingKVCache`` a :class:`~tqmetal.cache.RotatingInt4KVCache` (same
``max_size`` and ``keep``) holding exactly what a tqmetal cache would hold had
it seen the same tokens in one update: the sinks and the last ``window``
tokens in full precision, the rest quantized. The full-precision copy is not
kept: the conversion quantizes from the mlx-lm cache's buffers and returns a
cache that references none of them (evaluated, no transient tail), so once the
caller drops the mlx-lm cache (``to_int4`` on a list replaces its entries) its
memory is free. Other caches (already quantized, SSM states, ...) are returned
unchanged.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Optional

import mlx.core as mx
from mlx_lm.models import cache as _mlc

from . import patch
from .cache import _KV_BITS, Int4KVCache, RotatingInt4KVCache

__all__ = ["from_kv_cache", "from_rotating_kv_cache", "to_int4", "maybe_quantize_kv_cache",
           "quantize_kv_to_int4"]


def _bits(kv: str, k_bits: Optional[int], v_bits: Optional[int]):
    if kv not in _KV_BITS:
        raise ValueError(f"kv must be one of {sorted(_KV_BITS)}, got {kv!r}")
    kb, vb = _KV_BITS[kv]
    return (kb if k_bits is None else k_bits), (vb if v_bits is None else v_bits)


def _settle(c):
    # Drop the transient full-precision tail of the update (attend_before_quantizing)
    # and evaluate, so the new cache holds no reference to the mlx-lm buffers.
    c.trim(0)
    c._fetched = None
    mx.eval([a for a in c.state[:-1] if a is not None])
    return c


def from_kv_cache(c, kv: str = "int4", *, k_bits=None, v_bits=None, **options) -> Int4KVCache:
    """An :class:`Int4KVCache` holding the tokens of mlx-lm's ``KVCache`` ``c``.

    ``options``: those of :class:`Int4KVCache` (``group_size``, ``window``, ``sinks``, ...).
    """
    if not isinstance(c, _mlc.KVCache):
        raise ValueError(f"from_kv_cache: expected an mlx-lm KVCache, got {type(c).__name__}")
    kb, vb = _bits(kv, k_bits, v_bits)
    out = Int4KVCache(k_bits=kb, v_bits=vb, **options)
    if c.keys is None or c.offset == 0:
        return out
    out.update_and_fetch(c.keys[..., : c.offset, :], c.values[..., : c.offset, :])
    return _settle(out)


def from_rotating_kv_cache(c, kv: str = "int4", *, k_bits=None, v_bits=None,
                           **options) -> RotatingInt4KVCache:
    """A :class:`RotatingInt4KVCache` (same ``max_size``, ``keep``) holding the tokens of
    mlx-lm's ``RotatingKVCache`` ``c``, at their positions."""
    if not isinstance(c, _mlc.RotatingKVCache):
        raise ValueError(f"from_rotating_kv_cache: expected an mlx-lm RotatingKVCache, got "
                         f"{type(c).__name__}")
    if options.pop("sinks", c.keep) != c.keep:
        raise ValueError("from_rotating_kv_cache: the sinks are the cache's keep tokens")
    kb, vb = _bits(kv, k_bits, v_bits)
    out = RotatingInt4KVCache(c.max_size, c.keep, k_bits=kb, v_bits=vb, **options)
    if c.keys is None or c.offset == 0:
        return out
    keys, values = c._temporal_order(c.keys), c._temporal_order(c.values)
    held = min(keys.shape[2], c.offset)
    keys, values = keys[..., :held, :], values[..., :held, :]
    with patch.patched():  # the rotating cache insists on the fused attention
        if held == c.offset:  # nothing dropped yet: positions 0..offset-1
            out.update_and_fetch(keys, values)
        else:
            keep = min(c.keep, held)
            if keep:
                out.update_and_fetch(keys[..., :keep, :], values[..., :keep, :])
            # The rest sit at positions [offset - (held - keep), offset): jump there.
            first = c.offset - (held - keep)
            out.offset = first
            out.quantized.start = first
            out.update_and_fetch(keys[..., keep:, :], values[..., keep:, :])
    return _settle(out)


def to_int4(caches, kv: str = "int4", **options):
    """Convert one cache or a list (in place: its entries are replaced) to tqmetal's.

    ``KVCache`` -> :class:`Int4KVCache`, ``RotatingKVCache`` ->
    :class:`RotatingInt4KVCache`; anything else is left as it is. Returns the
    converted cache or the (same) list.
    """
    if isinstance(caches, list):
        for i, c in enumerate(caches):
            caches[i] = to_int4(c, kv, **options)
        return caches
    c = caches
    if type(c) is _mlc.KVCache:
        return from_kv_cache(c, kv, **options)
    if type(c) is _mlc.RotatingKVCache:
        return from_rotating_kv_cache(c, kv, **options)
    return c


def maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits, **options):
    """mlx-lm's ``maybe_quantize_kv_cache`` ending on tqmetal caches (int4 for
    ``kv_bits=4``, int8 for 8): what :func:`quantize_kv_to_int4` installs."""
    if kv_bits is None:
        return
    if kv_bits not in (4, 8):
        raise ValueError(f"kv_bits: tqmetal's caches store 4 or 8 bits, got {kv_bits}")
    kv = "int4" if kv_bits == 4 else "int8"
    for i, c in enumerate(prompt_cache):
        if type(c) in (_mlc.KVCache, _mlc.RotatingKVCache) and c.offset >= quantized_kv_start:
            prompt_cache[i] = to_int4(c, kv, group_size=kv_group_size, **options)


@contextmanager
def quantize_kv_to_int4(**options):
    """Within the block, mlx-lm's ``kv_bits``/``quantized_kv_start`` (generate_step,
    stream_generate, the server's unbatched path) convert to tqmetal's caches instead
    of ``QuantizedKVCache``, and attention is patched to the fused op."""
    import functools

    mlg = importlib.import_module("mlx_lm.generate")  # mlx_lm.generate is also a function

    old = mlg.maybe_quantize_kv_cache
    mlg.maybe_quantize_kv_cache = functools.partial(maybe_quantize_kv_cache, **options)
    try:
        with patch.patched():
            yield
    finally:
        mlg.maybe_quantize_kv_cache = old
