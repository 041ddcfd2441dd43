"""Tests for tqmetal.patch: mlx-lm's attention routed to tqmetal.sdpa_int4."""

import importlib
import sys

import mlx.core as mx
import mlx_lm.models
import mlx_lm.models.base as base
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlc
from mlx_lm.models import llama

import tqmetal

from lm_testing import rel_err, run, tiny_llama, tqcache, tqpatch

ORIGINAL = base.scaled_dot_product_attention
SDPA = tqmetal.sdpa_int4


@pytest.fixture(autouse=True)
def _clean():
    assert not tqpatch.is_patched()
    yield
    tqpatch.unpatch_mlx_lm()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=1)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the fused op from either module."""
    calls = []

    def wrap(*a, **k):
        calls.append(k)
        return SDPA(*a, **k)

    monkeypatch.setattr(tqpatch, "sdpa_int4", wrap)
    monkeypatch.setattr(tqcache, "sdpa_int4", wrap)
    return calls


# ---- rebinding ----------------------------------------------------------------


def test_patch_and_unpatch_rebind_loaded_modules():
    patched = tqpatch.scaled_dot_product_attention
    assert llama.scaled_dot_product_attention is ORIGINAL
    tqpatch.patch_mlx_lm()
    tqpatch.patch_mlx_lm()  # idempotent
    assert tqpatch.is_patched()
    assert base.scaled_dot_product_attention is patched
    assert llama.scaled_dot_product_attention is patched
    tqpatch.unpatch_mlx_lm()
    tqpatch.unpatch_mlx_lm()
    assert not tqpatch.is_patched()
    assert base.scaled_dot_product_attention is ORIGINAL
    assert llama.scaled_dot_product_attention is ORIGINAL
    assert tqpatch.scaled_dot_product_attention is patched  # its own name untouched


def test_module_imported_after_patching():
    name = "mlx_lm.models.qwen2"
    saved = sys.modules.pop(name, None)  # import it afresh, whoever loaded it before
    saved_attr = getattr(mlx_lm.models, "qwen2", None)
    try:
        with tqpatch.patched():
            mod = importlib.import_module(name)
            assert mod.scaled_dot_product_attention is tqpatch.scaled_dot_product_attention
        assert mod.scaled_dot_product_attention is ORIGINAL
    finally:
        sys.modules.pop(name, None)
        if saved is not None:
            sys.modules[name] = saved
        if saved_attr is not None:
            mlx_lm.models.qwen2 = saved_attr


def test_patched_context_nests_and_restores():
    with tqpatch.patched():
        with tqpatch.patched():
            assert tqpatch.is_patched()
        assert tqpatch.is_patched()  # the inner block did not undo the outer one
    assert not tqpatch.is_patched()
    tqpatch.patch_mlx_lm()
    with tqpatch.patched():
        pass
    assert tqpatch.is_patched()  # already patched before: left patched


# ---- dispatch ------------------------------------------------------------------


def test_int4_cache_goes_to_the_fused_op(model, spy):
    toks = mx.random.randint(0, 256, (1, 40))
    with tqpatch.patched():
        run(model, [tqcache.Int4KVCache(window=8, chunk_size=8)], toks, [30, 1, 1])
        assert len(spy) == 3
        rot = tqcache.RotatingInt4KVCache(16, keep=2, window=4, chunk_size=4)
        run(model, [rot], toks, [30, 1, 1])
        assert len(spy) == 6
        assert spy[-1]["k_tail"] is not None


@pytest.mark.parametrize("bits", [4, 8, 3, 5, 6, 2])  # mlx-lm's --kv-bits widths
def test_quantized_kv_cache_goes_to_the_fused_op(model, spy, bits):
    toks = mx.random.randint(0, 256, (1, 80))
    chunks = [60, 1, 1, 17, 1]
    ref = run(model, [mlc.QuantizedKVCache(group_size=64, bits=bits)], toks, chunks)
    assert not spy
    with tqpatch.patched():
        got = run(model, [mlc.QuantizedKVCache(group_size=64, bits=bits)], toks, chunks)
    assert len(spy) == len(chunks) and all(k["bits"] == bits for k in spy)
    assert spy[0]["mask"] == "causal" and spy[1]["mask"] is None
    assert rel_err(got, ref) < 1e-4


def test_quantized_kv_cache_masks_and_sinks(spy):
    mx.random.seed(5)
    c = mlc.QuantizedKVCache(group_size=32, bits=4)
    N, L = 50, 6
    k = mx.random.normal((2, 2, N, 64))
    v = mx.random.normal((2, 2, N, 64))
    c.update_and_fetch(k[..., : N - L, :], v[..., : N - L, :])
    kq, vq = c.update_and_fetch(k[..., N - L :, :], v[..., N - L :, :])  # sliced views
    K = mx.dequantize(*kq, group_size=32, bits=4)
    V = mx.dequantize(*vq, group_size=32, bits=4)
    q = mx.random.normal((2, 4, L, 64))
    sinks = mx.random.normal((4,))
    left_pad = mx.arange(N)[None, None, None] >= mx.array([0, 3])[:, None, None, None]
    causal = mx.arange(N)[None] <= mx.arange(N - L, N)[:, None]
    for mask in (None, "causal", causal & left_pad, mx.where(causal, 0.0, -1e9)):
        for s in (None, sinks):
            with tqpatch.patched():
                got = base.scaled_dot_product_attention(
                    q, kq, vq, cache=c, scale=0.125, mask=mask, sinks=s
                )
            want = mx.fast.scaled_dot_product_attention(q, K, V, scale=0.125, mask=mask, sinks=s)
            # 1e-4: the op's float32 accuracy (the VNNI decode path rounds the query
            # to int16); a wrong mask or permutation would be off by O(0.1).
            assert mx.allclose(got, want, atol=1e-4)
    assert len(spy) == 8


def test_other_caches_go_where_they_went(model, spy):
    toks = mx.random.randint(0, 256, (1, 30))
    # (every QuantizedKVCache width mx.quantize has now goes to the fused op: above)
    for make in (mlc.KVCache, lambda: mlc.RotatingKVCache(16)):
        ref = run(model, [make()], toks, [20, 1, 1])
        with tqpatch.patched():
            got = run(model, [make()], toks, [20, 1, 1])
        assert mx.array_equal(got, ref)
    assert not spy


def test_edited_keys_fall_back(spy):
    # A model that changes K/V after update_and_fetch gets the dequantized fallback.
    c = tqcache.Int4KVCache(window=4, chunk_size=4)
    k = mx.random.normal((1, 2, 20, 64))
    kk, vv = c.update_and_fetch(k, k)
    q = mx.random.normal((1, 2, 3, 64))
    with tqpatch.patched():
        got = base.scaled_dot_product_attention(q, kk * 2, vv, cache=c, scale=0.1, mask="causal")
    want = mx.fast.scaled_dot_product_attention(q, kk * 2, vv, scale=0.1, mask="causal")
    assert mx.array_equal(got, want) and not spy


def test_generate_step_kv_bits(model, spy):
    """generate_step(kv_bits=4) switches to QuantizedKVCache: fused once patched."""
    prompt = mx.array([5, 17, 33, 2, 9, 100, 42, 7])

    def tokens():
        steps = generate_step(prompt, model, max_tokens=10, kv_bits=4, quantized_kv_start=0)
        return [t for t, _ in steps]

    ref = tokens()
    assert not spy
    with tqpatch.patched():
        assert tokens() == ref
    assert len(spy) >= 9  # every step after the prefill (the cache is fp16 until then)
