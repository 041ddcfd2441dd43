"""tqmetal.convert: mlx-lm's KVCache / RotatingKVCache -> tqmetal's int4 caches."""

import gc

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlc

from lm_testing import rel_err, tiny_llama, tqcache, tqpatch
from tqmetal import convert

OPTS = dict(group_size=32, window=8, sinks=2, chunk_size=4)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


@pytest.fixture(scope="module")
def tokens():
    mx.random.seed(2)
    return mx.random.randint(0, 256, (1, 70))


@pytest.fixture(autouse=True, scope="module")
def _patched():
    with tqpatch.patched():
        yield


def _decode(model, cache, first, steps):
    """Logits of `steps` one-token steps fed fixed tokens (so that two caches
    are compared on the same sequence even where their argmax differs)."""
    out = []
    for i in range(steps):
        y = (first + 17 * i) % 256
        out.append(model(y, cache=cache)[:, -1])
    mx.eval(out)
    return out


def test_kv_cache_to_int4_equals_int4_from_the_start(model, tokens):
    fp = [mlc.KVCache() for _ in range(2)]
    model(tokens, cache=fp)
    ours = [tqcache.Int4KVCache(**OPTS) for _ in range(2)]
    model(tokens, cache=ours)  # one update, as the conversion does
    conv = convert.to_int4(fp, **OPTS)
    assert conv is fp and all(type(c) is tqcache.Int4KVCache for c in conv)
    for a, b in zip(conv, ours):
        keys = ("offset", "_ns", "_nw", "_nq", "_qstart")
        assert [a.state[-1][k] for k in keys] == [b.state[-1][k] for k in keys]
    y = mx.array([[5]])
    for x, r in zip(_decode(model, conv, y, 6), _decode(model, ours, y, 6)):
        assert rel_err(x, r) < 5e-3  # layer 1 keys differ by float rounding of layer 0


def test_conversion_keeps_no_fp16_copy(model):
    mx.random.seed(4)
    toks = mx.random.randint(0, 256, (1, 600))
    fp = [mlc.KVCache() for _ in range(2)]
    model(toks, cache=fp)
    mx.eval([c.state for c in fp])
    fp_bytes = sum(c.nbytes for c in fp)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    convert.to_int4(fp, **OPTS)  # replaces the entries: the fp16 caches are dropped
    gc.collect()
    mx.clear_cache()
    after = mx.get_active_memory()
    held = sum(c.nbytes for c in fp)
    assert held < fp_bytes / 2
    assert after - before < -(fp_bytes - held) * 0.8, (before, after, fp_bytes, held)


def test_rotating_kv_cache_to_int4(model):
    mx.random.seed(6)
    toks = mx.random.randint(0, 256, (1, 40))
    fp = [mlc.RotatingKVCache(24, keep=2) for _ in range(2)]
    model(toks[:, :30], cache=fp)
    for t in range(30, 40):  # one-token steps: the mlx-lm cache rotates
        model(toks[:, t : t + 1], cache=fp)
    ref = [mlc.RotatingKVCache(24, keep=2) for _ in range(2)]
    model(toks[:, :30], cache=ref)
    for t in range(30, 40):
        model(toks[:, t : t + 1], cache=ref)
    # A window as long as the cache: every token kept in full precision, so the
    # converted cache must give mlx-lm's logits (positions, keep tokens, window).
    conv = convert.to_int4(fp, group_size=32, bits=8, window=32, chunk_size=4)
    assert all(type(c) is tqcache.RotatingInt4KVCache for c in conv)
    assert conv[0].offset == 40 and conv[0].max_size == 24 and conv[0].keep == 2
    y = mx.array([[9]])
    for x, r in zip(_decode(model, conv, y, 8), _decode(model, ref, y, 8)):
        assert rel_err(x, r) < 1e-3


def test_rotating_conversion_quantizes_all_but_the_window(model):
    mx.random.seed(6)
    toks = mx.random.randint(0, 256, (1, 40))
    fp = [mlc.RotatingKVCache(24, keep=2) for _ in range(2)]
    model(toks[:, :30], cache=fp)
    for t in range(30, 40):
        model(toks[:, t : t + 1], cache=fp)
    conv = convert.to_int4(fp, group_size=32, window=4, chunk_size=4)
    meta = conv[0].state[-1]
    assert (meta["_ns"], meta["_nw"], meta["_nq"], meta["_qstart"]) == (2, 4, 18, 18)


def test_quantized_kv_start_ends_on_int4(model, tokens):
    caches = [mlc.KVCache() for _ in range(2)]
    with convert.quantize_kv_to_int4(window=8, sinks=2, chunk_size=4):
        steps = generate_step(tokens[0], model, prompt_cache=caches, max_tokens=8,
                              kv_bits=4, kv_group_size=32, quantized_kv_start=20)
        toks = [int(t) for t, _ in steps]
    assert len(toks) == 8
    assert all(type(c) is tqcache.Int4KVCache for c in caches)
    assert caches[0].offset >= 70 + 7  # generate_step runs one step ahead


def test_bad_input():
    with pytest.raises(ValueError, match="KVCache"):
        convert.from_kv_cache(tqcache.Int4KVCache())
    with pytest.raises(ValueError, match="kv must be"):
        convert.from_kv_cache(mlc.KVCache(), kv="int3")
    assert convert.to_int4(mlc.ArraysCache(2)).__class__ is mlc.ArraysCache
