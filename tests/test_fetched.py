"""What update_and_fetch hands out (tqmetal.fetched): the real dequantized K/V until the
patched attention has served the cache through the fused op, NaN placeholders from then
on (while patched), and the real K/V again wherever the fused op does not serve a call.

The reference is the same cache unpatched: mlx-lm's own attention over the real K/V.
One-layer models, as in test_cache.py: with two, float rounding differences in layer 1
can flip a 4-bit rounding of a layer-2 key between two equivalent attention paths.
"""

from contextlib import contextmanager

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.generate import generate_step
from mlx_lm.models import llama

from lm_testing import rel_err, run, tiny_llama, tqcache, tqpatch
from tqmetal import batch_cache as bc
from tqmetal import fetched

Int4KVCache = tqcache.Int4KVCache
RotatingInt4KVCache = tqcache.RotatingInt4KVCache

# prefill past the window, decode steps, chunks that flush the window
CHUNKS = [70, 1, 1, 1, 30, 1, 1, 1, 1, 20, 1, 1]
OPTS = dict(window=16, chunk_size=8)
TOL = 1e-5  # fused vs mlx-lm's attention on the same stored values (test_cache.py)


@pytest.fixture(scope="module")
def model1():
    return tiny_llama(layers=1)


@pytest.fixture(scope="module")
def tokens():
    mx.random.seed(11)
    return mx.random.randint(0, 256, (1, sum(CHUNKS)))


@pytest.fixture(autouse=True)
def _clean():
    assert not tqpatch.is_patched()
    yield
    tqpatch.unpatch_mlx_lm()


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused op's calls from the caches."""
    calls = []
    op = tqcache.sdpa_int4

    def spy(*a, **k):
        calls.append(1)
        return op(*a, **k)

    monkeypatch.setattr(tqcache, "sdpa_int4", spy)
    monkeypatch.setattr(bc, "sdpa_int4", spy)
    return calls


@contextmanager
def fetch_log(cache_cls, log):
    """Records, per update_and_fetch of ``cache_cls``, whether it returned placeholders."""
    orig = cache_cls.update_and_fetch

    def wrapped(self, keys, values):
        k, v = orig(self, keys, values)
        log.append((fetched.is_placeholder(k), fetched.is_placeholder(v)))
        return k, v

    cache_cls.update_and_fetch = wrapped
    try:
        yield
    finally:
        cache_cls.update_and_fetch = orig


def reference(model, tokens, chunks=CHUNKS, **opts):
    """Logits through an unpatched cache: mlx-lm's attention over the real K/V."""
    assert not tqpatch.is_patched()
    return run(model, [Int4KVCache(**opts) for _ in model.layers], tokens, chunks)


def is_nan(x):
    return bool(mx.all(mx.isnan(x)).item())


# ---- (a), (b): the patched model gets placeholders and the same logits ----------


@pytest.mark.parametrize("opts", [OPTS, dict(OPTS, k_bits=5, v_bits=3),
                                  dict(OPTS, bits=8, sinks=0, attend_before_quantizing=False)],
                         ids=["int4", "k5v3", "int8"])
def test_patched_decode_gets_placeholders_and_same_logits(model1, tokens, fused_calls, opts):
    ref = reference(model1, tokens, **opts)
    log = []
    with tqpatch.patched(), fetch_log(Int4KVCache, log):
        cache = [Int4KVCache(**opts)]
        got = run(model1, cache, tokens, CHUNKS)
    assert len(fused_calls) == len(CHUNKS)  # every call went to the fused op
    # the first call's K/V are real; every later one's are placeholders
    assert log == [(False, False)] + [(True, True)] * (len(CHUNKS) - 1)
    assert rel_err(got, ref) < TOL
    # the greedy tokens agree too
    assert mx.array_equal(mx.argmax(got, -1), mx.argmax(ref, -1))


def test_placeholders_are_nan_of_the_real_shape(model1, tokens):
    with tqpatch.patched():
        c = Int4KVCache(**OPTS)
        run(model1, [c], tokens, [40, 1])
        assert c._fused_served
        k = mx.random.normal((1, 2, 3, 64)).astype(mx.float32)
        kk, vv = c.update_and_fetch(k, k)
        assert fetched.is_placeholder(kk) and fetched.is_placeholder(vv) and kk is not vv
        kr, vr = c.keys_and_values()
        assert (kk.shape, vv.shape, kk.dtype, vv.dtype) == (kr.shape, vr.shape, kr.dtype, vr.dtype)
        assert is_nan(kk) and is_nan(vv)  # misuse is loud
        mk, mv = c.materialize_fetched(kk, vv)
        assert mx.array_equal(mk, kr) and mx.array_equal(mv, vr)
        # a stale placeholder (the cache was updated since) stays NaN: never old values
        c.update_and_fetch(k, k)
        sk, sv = fetched.materialize(kk, vv)
        assert sk is kk and sv is vv and is_nan(sk)
        del kk, vv, sk, sv
    # unpatched: the real K/V again
    kk, vv = c.update_and_fetch(k, k)
    assert not fetched.is_placeholder(kk) and not is_nan(kk)
    assert mx.array_equal(kk, c.keys_and_values()[0])


def test_generate_step_tokens_match_unpatched(model1):
    prompt = mx.array([5, 17, 33, 2, 9, 100, 42, 7] * 6)

    def tokens(**opts):
        cache = [Int4KVCache(**opts)]
        steps = generate_step(prompt, model1, max_tokens=24, prompt_cache=cache)
        return [t for t, _ in steps]

    ref = tokens(window=8, chunk_size=4)
    with tqpatch.patched():
        assert tokens(window=8, chunk_size=4) == ref


# ---- (c): a model that edits K/V after fetching keeps getting the real K/V ---------


def test_model_that_edits_kv_gets_real_kv(model1, tokens, fused_calls):
    ref = reference(model1, tokens, **OPTS)
    log = []

    def editing_attention(queries, keys, values, cache, scale, mask, sinks=None):
        return tqpatch.scaled_dot_product_attention(queries, keys * 1.0, values, cache=cache,
                                                    scale=scale, mask=mask, sinks=sinks)

    with tqpatch.patched(), fetch_log(Int4KVCache, log), pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama, "scaled_dot_product_attention", editing_attention)
        cache = [Int4KVCache(**OPTS)]
        got = run(model1, cache, tokens, CHUNKS)
    assert not fused_calls and not cache[0]._fused_served
    assert log == [(False, False)] * len(CHUNKS)
    assert rel_err(got, ref) < TOL
    assert not is_nan(got)


# ---- (d): the fused op declines a call after the cache was served -----------------


def test_fused_op_unavailable_after_served_materializes(model1, tokens, fused_calls,
                                                       monkeypatch):
    ref = reference(model1, tokens, **OPTS)
    log = []
    first, rest = CHUNKS[:4], CHUNKS[4:]
    with tqpatch.patched(), fetch_log(Int4KVCache, log):
        cache = [Int4KVCache(**OPTS)]
        a = run(model1, cache, tokens, first)
        assert cache[0]._fused_served and len(fused_calls) == len(first)
        monkeypatch.setattr(tqcache, "fused_op_available", lambda: False)
        b = run(model1, cache, tokens[:, sum(first):], rest)
    assert len(fused_calls) == len(first)  # the rest went to mlx-lm's attention
    assert all(p == (True, True) for p in log[1:])  # ... handed placeholders
    got = mx.concatenate([a, b], axis=1)
    assert not is_nan(got)
    assert rel_err(got, ref) < TOL


def test_sinks_with_centred_keys_materialize():
    # Attention sinks with key centring: fused_attention declines (the centring shifts
    # every logit but the sinks' fixed one); the fallback must get the real K/V.
    mx.random.seed(2)
    c = Int4KVCache(window=4, sinks=0, chunk_size=4, center_keys=True)
    k = mx.random.normal((1, 2, 40, 64)) + 3.0
    v = mx.random.normal((1, 2, 40, 64))
    q = mx.random.normal((1, 4, 1, 64))
    sinks = mx.random.normal((4,))
    with tqpatch.patched():
        kk, vv = c.update_and_fetch(k[..., :30, :], v[..., :30, :])
        assert tqpatch.scaled_dot_product_attention(q, kk, vv, c, 0.125, None) is not None
        assert c._fused_served
        for i in range(30, 40):
            kk, vv = c.update_and_fetch(k[..., i:i + 1, :], v[..., i:i + 1, :])
            assert fetched.is_placeholder(kk)
            kr, vr = c.keys_and_values()
            got = tqpatch.scaled_dot_product_attention(q, kk, vv, c, 0.125, None, sinks=sinks)
            want = mx.fast.scaled_dot_product_attention(q, kr, vr, scale=0.125, sinks=sinks)
            assert mx.array_equal(got, want)


def test_placeholders_passed_with_another_cache():
    # A model may hand one layer's K/V to attention with another layer's cache
    # (mlx-lm's iquestloopcoder does): the fallback asks the cache that made them.
    mx.random.seed(4)
    a, b = Int4KVCache(window=4, chunk_size=4), Int4KVCache(window=4, chunk_size=4)
    k = mx.random.normal((1, 2, 30, 64))
    q = mx.random.normal((1, 4, 1, 64))
    with tqpatch.patched():
        for c in (a, b):
            kk, vv = c.update_and_fetch(k[..., :20, :], k[..., :20, :])
            assert c.fused_attention(q, kk, vv, scale=0.125) is not None
        kk, vv = a.update_and_fetch(k[..., 20:21, :], k[..., 20:21, :])
        b.update_and_fetch(k[..., 20:21, :], k[..., 20:21, :])
        assert fetched.is_placeholder(kk)
        got = tqpatch.scaled_dot_product_attention(q, kk, vv, b, 0.125, None)
    kr, vr = a.keys_and_values()
    assert mx.array_equal(got, mx.fast.scaled_dot_product_attention(q, kr, vr, scale=0.125))


# ---- (e): unpatched, nothing changes ----------------------------------------------


def test_unpatched_always_real(model1, tokens):
    log = []
    with fetch_log(Int4KVCache, log):
        c = Int4KVCache(**OPTS)
        run(model1, [c], tokens, CHUNKS[:3])
        # even once the fused op has served it (called directly)
        kk, vv = c.update_and_fetch(mx.zeros((1, 2, 1, 64)), mx.zeros((1, 2, 1, 64)))
        assert c.fused_attention(mx.zeros((1, 4, 1, 64)), kk, vv, scale=0.125) is not None
        assert c._fused_served
        kk, vv = c.update_and_fetch(mx.zeros((1, 2, 1, 64)), mx.zeros((1, 2, 1, 64)))
        assert not is_nan(kk)
    assert not any(p for pair in log for p in pair)


# ---- the placeholders' shapes are keys_and_values' shapes ---------------------------


@settings(max_examples=30)
@given(window=st.sampled_from([0, 4, 16]), sinks=st.sampled_from([0, 4]),
       chunk=st.sampled_from([1, 4, 8]), abq=st.booleans(), rotating=st.booleans(),
       chunks=st.lists(st.integers(1, 24), min_size=2, max_size=8))
def test_placeholder_shapes(window, sinks, chunk, abq, rotating, chunks):
    opts = dict(window=window, chunk_size=chunk, attend_before_quantizing=abq, group_size=32)
    with tqpatch.patched():
        c = (RotatingInt4KVCache(24, keep=sinks, **opts) if rotating
             else Int4KVCache(sinks=sinks, **opts))
        x = mx.random.normal((1, 1, sum(chunks), 32)).astype(mx.float16)
        i = 0
        for n in chunks:
            kk, vv = c.update_and_fetch(x[..., i:i + n, :], x[..., i:i + n, :])
            i += n
            kr, vr = c.keys_and_values()
            assert (kk.shape, vv.shape, kk.dtype) == (kr.shape, vr.shape, kr.dtype)
            assert fetched.is_placeholder(kk) == (i > chunks[0])
            if not c._fused_served:
                q = mx.zeros((1, 2, n, 32), mx.float16)
                assert c.fused_attention(q, kk, vv, scale=0.2, mask="causal") is not None
            else:
                mk, mv = c.materialize_fetched(kk, vv)
                assert mx.array_equal(mk, kr) and mx.array_equal(mv, vr)


# ---- (f): the batched cache ------------------------------------------------------


def _batch(opts, lengths, layers=1):
    return [Int4KVCache.merge([Int4KVCache(**opts) for _ in lengths]) for _ in range(layers)]


def _batch_run(model, cache, prompts, steps):
    """Left-aligned equal-length prompts (no padding) then greedy decode: logits [B, steps+1, V]."""
    toks = mx.array(prompts)
    out = [model(toks, cache=cache)[:, -1]]
    for _ in range(steps):
        y = mx.argmax(out[-1], axis=-1)
        out.append(model(y[:, None], cache=cache)[:, -1])
        mx.eval(out[-1])
    return mx.stack(out, axis=1)


def test_batch_cache_placeholders(model1, fused_calls, monkeypatch):
    mx.random.seed(6)
    prompts = mx.random.randint(0, 256, (3, 37)).tolist()
    steps, served_steps = 12, 3
    opts = dict(window=8, sinks=2, chunk_size=4, group_size=32)
    ref = _batch_run(model1, _batch(opts, prompts), prompts, steps)  # unpatched
    log = []
    with tqpatch.patched(), fetch_log(bc.BatchInt4KVCache, log):
        got = _batch_run(model1, _batch(opts, prompts), prompts, steps)
        assert len(fused_calls) == steps + 1
        assert log == [(False, False)] + [(True, True)] * steps
        # the fused op declines once the batch was served: the fallback gets real K/V
        cache = _batch(opts, prompts)
        first = _batch_run(model1, cache, prompts, served_steps)
        assert cache[0]._fused_served
        monkeypatch.setattr(bc, "fused_op_available", lambda: False)
        y, later = mx.argmax(first[:, -1], axis=-1), []
        for _ in range(steps - served_steps):
            later.append(model1(y[:, None], cache=cache)[:, -1])
            y = mx.argmax(later[-1], axis=-1)
        mixed = mx.concatenate([first, mx.stack(later, axis=1)], axis=1)
        assert len(fused_calls) == steps + 1 + served_steps + 1
        assert log[-1] == (True, True)
    assert rel_err(got, ref) < TOL
    assert not is_nan(mixed) and rel_err(mixed, ref) < TOL
    # unpatched again: the batch hands out its real K/V
    kk, vv = cache[0].update_and_fetch(mx.zeros((3, 2, 1, 64)), mx.zeros((3, 2, 1, 64)))
    assert not fetched.is_placeholder(kk) and not is_nan(kk)
