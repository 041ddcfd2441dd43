"""Gemma 3's sliding-window layers on the int4 cache, end to end, on a tiny random
gemma3_text model: make_prompt_cache, prefill longer than the window, decode,
trim, save/load, against mlx-lm's own (unquantized) caches."""

import mlx.core as mx
import pytest
from mlx_lm.models import cache as mlc

from lm_testing import rel_err, run, tiny_gemma3, tqcache, tqpatch

Int4KVCache, RotatingInt4KVCache = tqcache.Int4KVCache, tqcache.RotatingInt4KVCache

WINDOW = 16  # the model's sliding window


@pytest.fixture(scope="module")
def model():
    # layers 0 and 2 slide (window 16), 1 and 3 attend everything
    return tiny_gemma3(layers=4, sliding_window=WINDOW, pattern=2)


@pytest.fixture(scope="module")
def tokens():
    mx.random.seed(1)
    return mx.random.randint(0, 256, (1, 80))


@pytest.fixture(autouse=True, scope="module")
def _patched():
    with tqpatch.patched():
        yield


def test_make_prompt_cache_follows_the_layers(model):
    cache = tqcache.make_prompt_cache(model)
    assert [type(c) for c in cache] == [RotatingInt4KVCache, Int4KVCache] * 2
    assert (cache[0].max_size, cache[0].keep, cache[0].num_sinks) == (WINDOW, 0, 0)
    assert cache[1].num_sinks == 4
    # What mlx-lm itself cannot do: its RotatingKVCache has no quantized form.
    with pytest.raises(NotImplementedError):
        mlc.RotatingKVCache(WINDOW).to_quantized()


@pytest.mark.parametrize("kv,tol", [("int8", 0.02), ("int4", 0.15)])
def test_prefill_longer_than_the_window_then_decode(model, tokens, kv, tol):
    # 70 prompt tokens in chunks longer and shorter than the sliding window
    # (and than the cache's full-precision window of 4), then 10 decode steps.
    chunks = [23, 17, 1, 29] + [1] * 10
    ref = run(model, model.make_cache(), tokens, chunks)
    cache = tqcache.make_prompt_cache(model, kv=kv, window=4, sinks=2)
    cache_chunk = [c for c in cache]
    for c in cache_chunk:
        c.chunk_size = 4
    out = run(model, cache, tokens, chunks)
    err = rel_err(out, ref)
    assert err < tol, err
    # Every cache quantized something; the sliding layers hold no more than
    # their window and dropped what no query can see.
    for i, c in enumerate(cache):
        assert c.quantized.n > 0
        if i % 2 == 0:
            assert c.fp.ns + c.quantized.n + c.fp.nw <= WINDOW and c.size() == WINDOW
        else:
            assert c.quantized.n + c.fp.ns + c.fp.nw == c.offset == sum(chunks)
    # The int4 cache's predictions follow the reference's
    agree = (out.argmax(-1) == ref.argmax(-1)).mean().item()
    assert agree > (0.95 if kv == "int8" else 0.8), agree


def test_trim_while_the_window_is_not_full(model, tokens):
    cache = tqcache.make_prompt_cache(model, window=4, sinks=2)
    for c in cache:
        c.chunk_size = 2
    run(model, cache, tokens, [12])
    assert all(c.is_trimmable() for c in cache)
    assert mlc.can_trim_prompt_cache(cache)
    assert mlc.trim_prompt_cache(cache, 5) == 5
    out = run(model, cache, tokens[:, 7:], [5, 1, 1])
    fresh = tqcache.make_prompt_cache(model, window=4, sinks=2)
    for c in fresh:
        c.chunk_size = 2
    ref = run(model, fresh, tokens, [7, 5, 1, 1])[:, 7:]
    assert rel_err(out, ref) < 1e-3
    run(model, cache, tokens[:, 14:], [WINDOW])
    assert not mlc.can_trim_prompt_cache(cache)  # as mlx-lm's RotatingKVCache once full


def test_save_load_after_the_window_slid(model, tokens, tmp_path):
    cache = tqcache.make_prompt_cache(model, window=4, sinks=2)
    run(model, cache, tokens, [40, 1, 1])
    path = str(tmp_path / "gemma3_cache.safetensors")
    mlc.save_prompt_cache(path, cache, {"note": "tiny gemma3"})
    back, meta = mlc.load_prompt_cache(path, return_metadata=True)
    assert meta == {"note": "tiny gemma3"}
    assert [type(c) for c in back] == [type(c) for c in cache]
    assert [(c.offset, c.size()) for c in back] == [(c.offset, c.size()) for c in cache]
    a = run(model, cache, tokens[:, 42:], [20, 1, 1])
    b = run(model, back, tokens[:, 42:], [20, 1, 1])
    assert mx.array_equal(a, b)
