"""Gemma 3's sliding-window layers on the int4 cache, end to end, on a tiny random
gemma3_text model: make_prompt_cache, prefill longer than the window, decode,
trim, save/load, against mlx-lm's own (unquantized) caches."""

import mlx.core as mx
import numpy as np
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
    # By default a sliding-window layer of the model (window 16 <= fp_windows)
    # keeps mlx-lm's full-precision cache; the full-attention layers are int4.
    cache = tqcache.make_prompt_cache(model)
    assert [type(c) for c in cache] == [mlc.RotatingKVCache, Int4KVCache] * 2
    assert cache[0].max_size == WINDOW
    for fp_windows in (0, WINDOW - 1):
        cache = tqcache.make_prompt_cache(model, fp_windows=fp_windows)
        assert [type(c) for c in cache] == [RotatingInt4KVCache, Int4KVCache] * 2
    # max_kv_size bounds the full-attention layers: those are quantized whatever
    # their window (fp_windows is about the model's own sliding layers).
    cache = tqcache.make_prompt_cache(model, max_kv_size=8)
    assert [type(c) for c in cache] == [mlc.RotatingKVCache, RotatingInt4KVCache] * 2
    cache = tqcache.make_prompt_cache(model, fp_windows=0)
    assert (cache[0].max_size, cache[0].keep, cache[0].num_sinks) == (WINDOW, 0, 0)
    assert cache[1].num_sinks == 4
    # What mlx-lm itself cannot do: its RotatingKVCache has no quantized form.
    with pytest.raises(NotImplementedError):
        mlc.RotatingKVCache(WINDOW).to_quantized()


def _float64_window_attention(q, k, v, scale, first, window):
    """Softmax attention in float64: query i (position first + i) attends the keys at
    positions (t - window, t]; k, v hold consecutive positions ending at the last query."""
    q, k, v = (np.asarray(x.astype(mx.float32), np.float64) for x in (q, k, v))
    B, Hq, L, D = q.shape
    N, rep = k.shape[2], Hq // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    pos = np.arange(first + L - N, first + L)[None, :]
    t = np.arange(first, first + L)[:, None]
    s = np.where((pos <= t) & (pos > t - window), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("bits", [4, 8])
def test_sliding_attention_matches_float64_reference(bits):
    # Gemma 3's shapes: head dim 256, 4 query heads on 1 KV head. The fused op
    # over the sliding-window cache (rotation and centering for 4-bit keys)
    # must equal float64 attention over the cache's K/V (keys_and_values:
    # dequantized, in sequence order) with the exact window, prefill longer than the
    # window included.
    mx.random.seed(3)
    D, Hq, T = 256, 4, 90
    q = mx.random.normal((1, Hq, T, D))
    k = mx.random.normal((1, 1, T, D)) + 2.0 * mx.random.normal((1, 1, 1, D))
    v = mx.random.normal((1, 1, T, D))
    cache = RotatingInt4KVCache(WINDOW, 0, bits=bits, window=4, chunk_size=4)
    i = 0
    for n in [23, 17, 1, 29, 1, 1, 1, 17]:
        mask = cache.make_mask(n, window_size=WINDOW)
        kk, vv = cache.update_and_fetch(k[:, :, i:i + n], v[:, :, i:i + n])
        # the K/V themselves: once the fused op has served the cache, update_and_fetch
        # hands out NaN placeholders (tqmetal.fetched)
        kr, vr = cache.keys_and_values()
        out = tqpatch.scaled_dot_product_attention(q[:, :, i:i + n], kk, vv, cache, 1 / 16, mask)
        want = _float64_window_attention(q[:, :, i:i + n], kr, vr, 1 / 16, i, WINDOW)
        err = np.abs(np.asarray(out, np.float64) - want).max() / np.abs(want).max()
        assert err < 2e-3, (i, n, err)
        assert kk.shape[2] <= WINDOW + n - 1  # only what some query can see
        i += n
    assert cache.quantized.n > 0


def test_sliding_attend_before_quantizing():
    # A prefill chunk reads the tokens it quantizes (those some query can still
    # see) in full precision, as Int4KVCache does; the next chunk reads them
    # quantized. Without the option the chunk reads them quantized at once.
    mx.random.seed(4)
    D, Hq = 256, 4
    q = mx.random.normal((1, Hq, 40, D))
    k = mx.random.normal((1, 1, 40, D)) + 2.0 * mx.random.normal((1, 1, 1, D))
    v = mx.random.normal((1, 1, 40, D))

    def fetched(abq):
        cache = RotatingInt4KVCache(WINDOW, 0, window=4, chunk_size=4,
                                    attend_before_quantizing=abq)
        out, i = [], 0
        for n in (10, 30):  # the second chunk is longer than the sliding window
            mask = cache.make_mask(n, window_size=WINDOW)
            kk, vv = cache.update_and_fetch(k[:, :, i:i + n], v[:, :, i:i + n])
            kr, vr = cache.keys_and_values()  # (kk, vv may be placeholders: see above)
            o = tqpatch.scaled_dot_product_attention(q[:, :, i:i + n], kk, vv, cache, 1 / 16,
                                                     mask)
            want = _float64_window_attention(q[:, :, i:i + n], kr, vr, 1 / 16, i, WINDOW)
            assert np.abs(np.asarray(o, np.float64) - want).max() < 2e-3 * np.abs(want).max()
            out.append((np.asarray(kr, np.float64), np.asarray(vr, np.float64)))
            i += n
        return out

    def err(a, lo, hi, end):  # largest error of the fetched tokens [lo, hi) vs the input
        x = np.asarray(k[:, :, lo:hi], np.float64)
        return np.abs(a[0][:, :, a[0].shape[2] - (end - lo):][:, :, :hi - lo] - x).max()

    on, off = fetched(True), fetched(False)
    # first chunk: tokens 0..5 quantized, 6..9 the window
    assert err(on[0], 0, 6, 10) < 1e-2 < err(off[0], 0, 6, 10)
    # second chunk (tokens 10..39; its first query still sees token 0): it quantizes
    # 6..35 and reads them in full precision; 0..5, quantized by the first chunk,
    # it reads quantized.
    assert on[1][0].shape == off[1][0].shape == (1, 1, 40, D)
    assert err(on[1], 6, 36, 40) < 1e-2 < err(off[1], 6, 36, 40)
    assert err(on[1], 0, 6, 40) > 1e-2


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_prefill_longer_than_the_window_then_decode(model, tokens, kv):
    # 70 prompt tokens in chunks longer and shorter than the sliding window
    # (and than the cache's full-precision window of 4), then 10 decode steps.
    chunks = [23, 17, 1, 29] + [1] * 10
    ref = run(model, model.make_cache(), tokens, chunks)
    # Nothing quantized (the window holds everything): mlx-lm's attention up to
    # K/V rounded to float16 (this random model amplifies that to ~1%).
    same = run(model, tqcache.make_prompt_cache(model, kv=kv, window=128, fp_windows=0),
               tokens, chunks)
    assert rel_err(same, ref) < 0.03
    cache = tqcache.make_prompt_cache(model, kv=kv, window=4, sinks=2, fp_windows=0)
    for c in cache:
        c.chunk_size = 4
    out = run(model, cache, tokens, chunks)
    # Every cache quantized something; the sliding layers hold no more than
    # their window and dropped what no query can see.
    for i, c in enumerate(cache):
        assert c.quantized.n > 0
        if i % 2 == 0:
            assert c.fp.ns + c.quantized.n + c.fp.nw <= WINDOW and c.size() == WINDOW
        else:
            assert c.quantized.n + c.fp.ns + c.fp.nw == c.offset == sum(chunks)
    assert mx.isfinite(out).all().item()
    if kv == "int8":  # int4 on random gaussian keys says little (the float64 test above checks it)
        agree = (out.argmax(-1) == ref.argmax(-1)).mean().item()
        assert agree > 0.9 and rel_err(out, ref) < 0.1, (agree, rel_err(out, ref))


def test_key_channel_scaling_follows_the_key_norm(model):
    # Gemma 3 normalizes keys with a learned per-channel gain (k_norm): 4-bit keys
    # get channel scaling by default; 8-bit keys, models without k_norm and an
    # explicit choice do not.
    from lm_testing import tiny_llama

    assert tqcache.has_key_norm(model) and not tqcache.has_key_norm(tiny_llama())
    quantized = lambda cache: [c for c in cache if isinstance(c, Int4KVCache)]  # noqa: E731
    for kv, want in (("int4", True), ("k4v8", True), ("k8v4", False), ("int8", False)):
        cache = quantized(tqcache.make_prompt_cache(model, kv=kv, fp_windows=0))
        assert cache and all(c.channel_scale is want for c in cache), kv
    assert not any(c.channel_scale for c in quantized(
        tqcache.make_prompt_cache(model, channel_scale=False)))
    assert not any(c.channel_scale for c in quantized(
        tqcache.make_prompt_cache(tiny_llama())))


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_default_keeps_the_sliding_layers_in_full_precision(model, tokens, kv, tmp_path):
    # The default cache of a sliding-window model: mlx-lm's RotatingKVCache in the
    # sliding layers, the int4 cache in the others; prefill longer than the window,
    # decode, trim, save/load.
    chunks = [23, 17, 1, 29] + [1] * 10
    ref = run(model, model.make_cache(), tokens, chunks)
    cache = tqcache.make_prompt_cache(model, kv=kv, window=4, sinks=2)
    for c in cache[1::2]:
        c.chunk_size = 4
    out = run(model, cache, tokens, chunks)
    assert all(c.quantized.n > 0 for c in cache[1::2])
    assert [c.offset for c in cache] == [sum(chunks)] * 4
    assert mx.isfinite(out).all().item()
    if kv == "int8":
        assert rel_err(out, ref) < 0.1
    # only the full-attention layers are quantized: closer to the reference than
    # the cache that quantizes every layer
    every = tqcache.make_prompt_cache(model, kv=kv, window=4, sinks=2, fp_windows=0)
    for c in every:
        c.chunk_size = 4
    assert rel_err(out, ref) < rel_err(run(model, every, tokens, chunks), ref)
    path = str(tmp_path / "mixed.safetensors")
    mlc.save_prompt_cache(path, cache)
    back = mlc.load_prompt_cache(path)
    assert [type(c) for c in back] == [type(c) for c in cache]
    more = tokens[:, :7]  # any continuation
    assert mx.array_equal(run(model, cache, more, [6, 1]), run(model, back, more, [6, 1]))


def test_trim_while_the_window_is_not_full(model, tokens):
    # Speculative decoding's pattern: feed, trim the rejected tail, feed again;
    # against mlx-lm's own caches doing the same.
    def feed(cache):
        a = run(model, cache, tokens, [12])
        assert mlc.can_trim_prompt_cache(cache)
        assert mlc.trim_prompt_cache(cache, 5) == 5
        assert all(c.offset == 7 for c in cache)
        return mx.concatenate([a[:, :7], run(model, cache, tokens[:, 7:], [5, 1, 1])], axis=1)

    ref = feed(model.make_cache())
    cache = tqcache.make_prompt_cache(model, kv="int8", window=4, sinks=2, fp_windows=0)
    for c in cache:
        c.chunk_size = 2
    out = feed(cache)
    assert sum(c.quantized.n for c in cache) > 0
    assert (out.argmax(-1) == ref.argmax(-1)).mean().item() > 0.9
    assert rel_err(out, ref) < 0.1
    run(model, cache, tokens[:, 14:], [WINDOW])
    assert not mlc.can_trim_prompt_cache(cache)  # as mlx-lm's RotatingKVCache once full


def test_save_load_after_the_window_slid(model, tokens, tmp_path):
    cache = tqcache.make_prompt_cache(model, window=4, sinks=2, fp_windows=0)
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


def test_eval_follows_the_sliding_layout(model, tokens):
    # tqmetal eval on a sliding-window model: the reference (numpy attention,
    # mlx-lm's window masks as arrays) gives mlx-lm's own logits; each config's
    # caches follow the model's layout; mlx-lm's 4-bit cache quantizes only the
    # full-attention layers (it cannot quantize the sliding ones).
    from tqmetal import fidelity as fid

    toks = np.array(tokens[0, :60]).tolist()
    cfgs = fid.parse_configs("fp16,int4-g64-rot-center-abq,mlx4-g64")
    caches = {c.name: c.make_cache(model) for c in cfgs}
    assert [type(c).__name__ for c in caches["int4-g64-rot-center-abq"]] == [
        "RotatingInt4KVCache", "Int4KVCache"] * 2
    assert [type(c).__name__ for c in caches["mlx4-g64"]] == [
        "ReferenceRotatingKVCache", "QuantizedKVCache"] * 2
    # -fpw: the sliding layers in float16, as make_prompt_cache's default; -fpw8:
    # windows of at most 8 tokens only (this model's are 16)
    for name, sliding in (("int4-fpw", "ReferenceRotatingKVCache"),
                          ("int4-fpw8", "RotatingInt4KVCache")):
        got = fid.parse_config(name).make_cache(model)
        assert [type(c).__name__ for c in got] == [sliding, "Int4KVCache"] * 2
    assert fid.parse_config("int4-fpw").fp_windows == tqcache.FP_WINDOWS
    r = fid.teacher_forced(model, toks, cfgs, chunk=24)
    assert np.all(r["fp16"]["kl"] == 0)
    plain = model.make_cache()  # mlx-lm's own caches and attention
    lp = [fid.log_softmax(model(mx.array([toks[i:i + 24]]), cache=plain)[0])
          for i in range(0, 60, 24)]
    want = np.concatenate([np.array(mx.argmax(x, -1)) for x in lp])
    assert np.array_equal(r["ref"]["top1"], want)
    for name in ("int4-g64-rot-center-abq", "mlx4-g64"):
        assert np.all(np.isfinite(r[name]["kl"])) and r[name]["kl"].mean() > 0
