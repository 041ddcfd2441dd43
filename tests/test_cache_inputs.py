"""Bad inputs to the caches (python/tqmetal/cache.py) are ValueErrors naming the argument and what
was expected, and a refused call stores nothing: the cache still gives the answer of a cache
that never saw the bad call."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlc

from tqmetal import patch as tqpatch
from tqmetal.cache import Int4KVCache, RotatingInt4KVCache

B, H, D = 1, 2, 64


def kv(S, seed=0, H=H, D=D, dtype=mx.float16, Dv=None):
    rng = np.random.default_rng(seed)
    k = mx.array(rng.normal(size=(B, H, S, D)).astype(np.float32)).astype(dtype)
    v = mx.array(rng.normal(size=(B, H, S, Dv or D)).astype(np.float32)).astype(dtype)
    return k, v


def make(cls=Int4KVCache):
    if cls is RotatingInt4KVCache:
        return RotatingInt4KVCache(64, keep=2, window=8, sinks=2, chunk_size=4)
    return Int4KVCache(window=8, sinks=2, chunk_size=4)


def feed(c, chunks, seed=0):
    out = None
    for i, S in enumerate(chunks):
        out = c.update_and_fetch(*kv(S, seed=seed + i))
    return out


def snapshot(c):
    mx.eval(c.state[:2])
    return c.offset, c.meta_state


def same_as_fresh(c, chunks_before, seed=0):
    """c (which saw chunks_before, then refused calls) answers the next update like a fresh cache."""
    ref = make(type(c))
    with tqpatch.patched():
        feed(ref, chunks_before, seed)
        a = feed(c, [3, 1], seed=100)
        b = feed(ref, [3, 1], seed=100)
    assert c.offset == ref.offset
    assert c.meta_state == ref.meta_state
    for x, y in zip(a, b):
        assert mx.array_equal(x, y, equal_nan=True).item()


@pytest.mark.parametrize("cls", [Int4KVCache, RotatingInt4KVCache])
@pytest.mark.parametrize("before", [[], [20]], ids=["empty", "held20"])
def test_trim_negative(cls, before):
    c = make(cls)
    with tqpatch.patched():
        feed(c, before)
    snap = snapshot(c)
    for n in (-5, -1, 2.5, "3", None, True):
        with pytest.raises(ValueError, match=r"trim: n: expected a number of tokens >= 0"):
            c.trim(n)
    assert snapshot(c) == snap
    same_as_fresh(c, before)


BAD_UPDATES = [
    # (description, keys, values, words of the message)
    ("head count", lambda: kv(1, H=4), r"keys: expected \[B=1, H=2, S, D=64\]"),
    ("head dim", lambda: kv(1, D=128), r"keys: expected \[B=1, H=2, S, D=64\]"),
    ("value head dim", lambda: kv(1, Dv=128), r"values: expected \[B=1, H=2, S, D=64\]"),
    ("dtype", lambda: kv(1, dtype=mx.float32), r"keys: expected dtype float16"),
    ("integer keys", lambda: tuple(a.astype(mx.int32) for a in kv(1)), r"keys: expected float16, bfloat16 or float32"),
    ("integer values", lambda: (kv(1)[0], kv(1)[1].astype(mx.uint8)), r"values: expected float16, bfloat16 or float32"),
    ("K/V token counts", lambda: (kv(2)[0], kv(3)[1]), r"values: expected the keys' \[B, H, S\]"),
    ("K/V heads", lambda: (kv(2)[0], kv(2, H=1)[1]), r"values: expected the keys' \[B, H, S\]"),
    ("K/V dtypes", lambda: (kv(2)[0], kv(2)[1].astype(mx.float32)), r"values: expected the keys' dtype"),
    ("3-D keys", lambda: (kv(2)[0][0], kv(2)[1][0]), r"keys: expected \[B, H, S, D\]"),
    ("no tokens", lambda: kv(0), r"keys: expected at least one token"),
    ("not arrays", lambda: (np.zeros((1, 2, 1, 64), np.float16), kv(1)[1]), r"keys: expected an mx.array"),
]


@pytest.mark.parametrize("cls", [Int4KVCache, RotatingInt4KVCache])
@pytest.mark.parametrize("desc,make_kv,message", BAD_UPDATES, ids=[b[0] for b in BAD_UPDATES])
def test_bad_update(cls, desc, make_kv, message):
    c = make(cls)
    with tqpatch.patched():
        feed(c, [20, 1])
        snap = snapshot(c)
        with pytest.raises(ValueError, match=message):
            c.update_and_fetch(*make_kv())
    assert snapshot(c) == snap
    same_as_fresh(c, [20, 1])


@pytest.mark.parametrize("desc,make_kv,message", [b for b in BAD_UPDATES if b[0] in (
    "integer keys", "integer values", "K/V token counts", "K/V dtypes", "3-D keys", "no tokens", "not arrays")],
    ids=lambda x: x if isinstance(x, str) and " " in x or x in ("dtype",) else None)
def test_bad_first_update_leaves_cache_empty(desc, make_kv, message):
    c = make()
    with pytest.raises(ValueError, match=message):
        c.update_and_fetch(*make_kv())
    assert c.offset == 0 and c.empty()
    same_as_fresh(c, [])


def _saved(tmp_path, caches):
    path = str(tmp_path / "cache.safetensors")
    mlc.save_prompt_cache(path, caches)
    return path


def test_truncated_saved_cache(tmp_path):
    """A prompt-cache file missing arrays (truncated) or meta entries: ValueError naming the state."""
    c = make()
    with tqpatch.patched():
        feed(c, [30, 1])
    path = _saved(tmp_path, [c])
    arrays, meta = mx.load(path, return_metadata=True)
    fp_keys = [k for k in arrays if k.startswith("0.0")]
    assert fp_keys, sorted(arrays)
    for drop in (fp_keys, [k for k in arrays if k.startswith("0.2")]):
        bad = str(tmp_path / "truncated.safetensors")
        mx.save_safetensors(bad, {k: a for k, a in arrays.items() if k not in drop}, meta)
        with pytest.raises(ValueError, match=r"Int4KVCache.state: expected"):
            mlc.load_prompt_cache(bad)
    # fewer meta entries than the class writes
    bad_meta = {k: m for k, m in meta.items() if not k.endswith(".num_sinks")}
    if bad_meta != meta:
        bad = str(tmp_path / "meta.safetensors")
        mx.save_safetensors(bad, arrays, bad_meta)
        with pytest.raises(ValueError, match=r"Int4KVCache\.(meta_)?state: expected"):
            mlc.load_prompt_cache(bad)


def test_foreign_state():
    """Another cache class's state (mlx-lm's KVCache: (keys, values)) is refused by name."""
    k, v = kv(5)
    other = mlc.KVCache()
    other.update_and_fetch(k, v)
    with pytest.raises(ValueError, match=r"Int4KVCache.state: expected .* got \d+ items"):
        Int4KVCache.from_state(other.state, None)
    with pytest.raises(ValueError, match=r"Int4KVCache.state: expected"):
        Int4KVCache.from_state((k, v, None, None, None, None, {"offset": "5"}), None)
    good = make()
    with tqpatch.patched():
        feed(good, [20])
    with pytest.raises(ValueError, match=r"meta_state: expected \d+ strings"):
        Int4KVCache.from_state(good.state, ("5", "1"))
    # what the class itself wrote round-trips
    back = Int4KVCache.from_state(good.state, good.meta_state)
    assert back.offset == 20 and back.meta_state == good.meta_state


def test_foreign_class_in_saved_file(tmp_path):
    """A file whose class name says Int4KVCache but whose state is a KVCache's."""
    k, v = kv(5)
    other = mlc.KVCache()
    other.update_and_fetch(k, v)
    path = _saved(tmp_path, [other])
    arrays, meta = mx.load(path, return_metadata=True)
    meta = {key: ("Int4KVCache" if m == "KVCache" else m) for key, m in meta.items()}
    bad = str(tmp_path / "foreign.safetensors")
    mx.save_safetensors(bad, arrays, meta)
    from tqmetal import cache as _register  # noqa: F401  (registers the classes with mlx-lm)

    with pytest.raises(ValueError, match=r"Int4KVCache\.(meta_)?state: expected"):
        mlc.load_prompt_cache(bad)
