"""What the quantized caches' ``update_and_fetch`` hands out: real K/V, or placeholders.

An :class:`~tqmetal.cache.Int4KVCache` (and the batched
:class:`~tqmetal.batch_cache.BatchInt4KVCache`) returns K and V dequantized and in
sequence order, a lazy graph, so that any attention reading them is right. The patched
attention (:mod:`tqmetal.patch`) never evaluates them: it checks that it was handed
exactly those arrays and runs the fused op on the packed data. Building that graph was
most of the host time of a decode step (70% of ~70 us per layer and token,
bench/results/cuda/cache_update_profile.txt).

So once the patched attention has served a cache through the fused op with exactly the
arrays it returned (the cache's ``_fused_served``), the cache hands out
:func:`placeholders` while the patch is active: arrays of the real shape and dtype that
are a broadcast of one NaN (no memory, evaluated or not), so that a reader nobody
expected gets NaN, never plausible numbers. Whoever would read them when the fused op
does not serve the call (the patched attention's fallback to mlx-lm's own) first calls
:func:`materialize`, which swaps each placeholder for the real K/V of the cache that
handed it out, as long as that cache has not been updated since.

Only mlx is imported here: the cache modules and :mod:`tqmetal.patch` both use it.
"""

from __future__ import annotations

import weakref

import mlx.core as mx

__all__ = ["placeholders", "is_placeholder", "materialize", "hand_out", "real_for"]

_NAN = {}  # dtype -> one evaluated NaN scalar
# id(placeholder) -> (weak ref to it, weak ref to its cache); an entry goes when its
# placeholder does (the weak ref's callback runs before the id can be reused).
_LIVE = {}


def _nan(dtype):
    x = _NAN.get(dtype)
    if x is None:
        x = _NAN[dtype] = mx.array(float("nan"), dtype)
        mx.eval(x)
    return x


def _forget(key):
    return lambda _ref: _LIVE.pop(key, None)


def placeholders(cache, k_shape, v_shape, dtype):
    """Placeholder K and V (NaN, of these shapes and dtype) that ``cache`` hands out;
    :func:`materialize` asks ``cache.materialize_fetched`` for their real values."""
    nan = _nan(dtype)
    owner = weakref.ref(cache)
    out = []
    for shape in (k_shape, v_shape):
        x = mx.broadcast_to(nan, shape)
        key = id(x)
        _LIVE[key] = (weakref.ref(x, _forget(key)), owner)
        out.append(x)
    return tuple(out)


def _owner(x):
    entry = _LIVE.get(id(x))
    if entry is None or entry[0]() is not x:
        return None
    return entry[1]()


def is_placeholder(x) -> bool:
    """Whether ``x`` is a placeholder some live cache handed out."""
    return _owner(x) is not None


def materialize(keys, values):
    """``keys``, ``values`` with placeholders replaced by the real K/V of the cache that
    handed them out (``cache.materialize_fetched``); other arrays come back unchanged."""
    if not _LIVE:
        return keys, values
    for x in (keys, values):
        cache = _owner(x)
        if cache is not None:
            keys, values = cache.materialize_fetched(keys, values)
    return keys, values


def hand_out(cache, use_placeholders: bool, shapes, dtype):
    """What ``cache.update_and_fetch`` returns: placeholders of ``shapes`` (K's, V's) and
    ``dtype`` when ``use_placeholders``, else ``cache.keys_and_values()``. Records them in
    the cache as weak references (``cache._fetched``): the patched attention checks that
    it is handed exactly these (models that edit K/V after fetching get the fallback)
    without keeping buffers alive, which would block MLX from updating them in place."""
    k, v = placeholders(cache, *shapes, dtype) if use_placeholders else cache.keys_and_values()
    cache._fetched = (weakref.ref(k), weakref.ref(v))
    cache._fetched_placeholders = use_placeholders
    return k, v


def real_for(cache, keys, values):
    """``keys``, ``values`` with the placeholders ``cache`` handed out last replaced by
    its real ``keys_and_values()``; anything else comes back unchanged (the body of the
    caches' ``materialize_fetched``)."""
    f = cache._fetched
    if not cache._fetched_placeholders or f is None:
        return keys, values
    is_k, is_v = f[0]() is keys, f[1]() is values
    if not (is_k or is_v):
        return keys, values
    k, v = cache.keys_and_values()
    if (is_k and k.shape != keys.shape) or (is_v and v.shape != values.shape):
        raise RuntimeError(f"{type(cache).__name__}: the cache changed (trim?) since "
                           f"update_and_fetch returned these K/V; fetch them again")
    return (k if is_k else keys), (v if is_v else values)
