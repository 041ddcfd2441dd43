"""Batched int4 caches (tqmetal.batch_cache) against the single-sequence caches
and against mlx-lm's own BatchKVCache, protocol method by protocol method.

Every batched run is compared with each request run alone through the
single-sequence cache of the same kind (same layout, so the logits agree up to
float summation order), and the int8 batch with mlx-lm's fp16 BatchKVCache
driven through the same protocol calls (agree within int8 error).
"""

import copy

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import cache as mlc

from lm_testing import rel_err, tiny_llama, tqcache, tqpatch
from tqmetal import batch_cache as bc

# Small window and chunk so that quantization, flushes and sinks all happen
# within a few dozen tokens.
SMALL = dict(window=8, sinks=2, chunk_size=4)
CONFIGS = {
    "int4": dict(group_size=32, **SMALL),
    "k8v4": dict(group_size=32, k_bits=8, v_bits=4, **SMALL),
    "int8-nosinks": dict(group_size=64, bits=8, window=4, sinks=0, chunk_size=8),
    "int4-rotv-chs": dict(group_size=32, rotate_values=True, channel_scale=True, **SMALL),
    "int4-nocenter-noabq": dict(group_size=32, center_keys=False,
                                attend_before_quantizing=False, **SMALL),
}
TOL = 2e-3  # batch vs alone: same layout, float order differs


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


@pytest.fixture(autouse=True, scope="module")
def _patched():
    with tqpatch.patched():
        yield


def _prompts(lengths, seed=3):
    mx.random.seed(seed)
    return [mx.random.randint(0, 256, (n,)).tolist() for n in lengths]


def _single(opts, n_layers=2, max_size=None):
    if max_size is not None:
        o = dict(opts)
        keep = o.pop("sinks", 0)
        return [tqcache.RotatingInt4KVCache(max_size, keep, **o) for _ in range(n_layers)]
    return [tqcache.Int4KVCache(**opts) for _ in range(n_layers)]


def _alone(model, cache, prompt, steps, chunk=None):
    """Logits of the last prompt token and of `steps` greedy decode steps."""
    toks = mx.array(prompt)[None]
    chunk = chunk or len(prompt)
    out = []
    for i in range(0, len(prompt), chunk):
        logits = model(toks[:, i : i + chunk], cache=cache)
    out.append(logits[0, -1])
    y = mx.argmax(logits[0, -1])
    for _ in range(steps):
        logits = model(y.reshape(1, 1), cache=cache)
        out.append(logits[0, -1])
        y = mx.argmax(logits[0, -1])
    mx.eval(out)
    return out


def _batch_prefill(model, cache, prompts):
    """BatchGenerator's prompt(): right-padded chunk, prepare, forward, finalize."""
    lengths = [len(p) for p in prompts]
    L = max(lengths)
    pad = [L - n for n in lengths]
    toks = mx.array([p + [0] * (L - len(p)) for p in prompts])
    if max(pad):
        for c in cache:
            c.prepare(lengths=lengths, right_padding=pad)
    logits = model(toks, cache=cache)
    if max(pad):
        for c in cache:
            c.finalize()
    return [logits[b, n - 1] for b, n in enumerate(lengths)]


def _batch_decode(model, cache, last_logits, steps):
    outs = [[x] for x in last_logits]
    y = mx.stack([mx.argmax(x) for x in last_logits])
    for _ in range(steps):
        logits = model(y[:, None], cache=cache)[:, -1]
        for b in range(len(outs)):
            outs[b].append(logits[b])
        y = mx.argmax(logits, axis=-1)
    mx.eval(outs)
    return outs


def _close(a, b, tol=TOL):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        e = rel_err(x, y)
        assert e < tol, f"step {i}: rel err {e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_empty_prefill_decode_equals_alone(model, name):
    opts = CONFIGS[name]
    prompts = _prompts([21, 5, 13])
    steps = 14
    ref = [_alone(model, _single(opts), p, steps) for p in prompts]
    batch = [c.merge([_single(opts)[i] for _ in prompts]) for i, c in enumerate(_single(opts))]
    assert all(type(c) is bc.BatchInt4KVCache for c in batch)
    outs = _batch_decode(model, batch, _batch_prefill(model, batch, prompts), steps)
    for r, o in zip(ref, outs):
        _close(o, r)


def test_merge_filled_and_extract(model):
    opts = CONFIGS["int4"]
    prompts = _prompts([30, 9, 17], seed=5)
    steps = 10
    ref = [_alone(model, _single(opts), p, steps) for p in prompts]
    # Per-request prefill (as the server's prompt cache hands them over), then merge.
    singles, last = [], []
    for p in prompts:
        c = _single(opts)
        last.append(model(mx.array(p)[None], cache=c)[0, -1])
        singles.append(c)
    batch = [singles[0][i].merge([s[i] for s in singles]) for i in range(2)]
    outs = _batch_decode(model, batch, last, steps)
    for r, o in zip(ref, outs):
        _close(o, r)
    # extract -> a single cache in the layout the request alone would have
    for b, p in enumerate(prompts):
        alone = _single(opts)
        _alone(model, alone, p, steps)  # consumed the same tokens as the batch
        ex = [c.extract(b) for c in batch]
        for e, a in zip(ex, alone):
            assert type(e) is type(a)
            layout = ("offset", "_ns", "_nw", "_nq", "_qstart")
            assert [e.state[-1][k] for k in layout] == [a.state[-1][k] for k in layout]
        y = mx.array([[7]])
        _close([model(y, cache=ex)[0, -1]], [model(y, cache=alone)[0, -1]])


def test_filter_extend_join_leave(model):
    """Requests leave (filter) and join (extend) mid-batch: each keeps its tokens."""
    opts = CONFIGS["int4"]
    prompts = _prompts([12, 25, 7, 19], seed=9)
    total = 16
    ref = [_alone(model, _single(opts), p, total) for p in prompts]
    # Batch A: requests 0, 1, 2.
    A = [c.merge([_single(opts)[i] for _ in range(3)]) for i, c in enumerate(_single(opts))]
    last = _batch_prefill(model, A, prompts[:3])
    got = {b: [last[b]] for b in range(3)}
    y = mx.stack([mx.argmax(x) for x in last])
    rows = [0, 1, 2]
    for step in range(total):
        if step == 5:  # request 1 leaves
            keep = [0, 2]
            for c in A:
                c.filter(keep)
            rows = [rows[k] for k in keep]
            y = y[mx.array(keep)]
        if step == 8:  # request 3 joins: its own batch prefilled, then extend
            Bc = [c.merge([_single(opts)[i]]) for i, c in enumerate(_single(opts))]
            l3 = _batch_prefill(model, Bc, [prompts[3]])
            got[3] = [l3[0]]
            for a, b in zip(A, Bc):
                a.extend(b)
            rows.append(3)
            y = mx.concatenate([y, mx.argmax(l3[0])[None]])
        logits = model(y[:, None], cache=A)[:, -1]
        for k, r in enumerate(rows):
            got[r].append(logits[k])
        y = mx.argmax(logits, axis=-1)
    mx.eval([v for vs in got.values() for v in vs])
    _close(got[0], ref[0])
    _close(got[2], ref[2])
    _close(got[1], ref[1][: len(got[1])])
    _close(got[3], ref[3][: len(got[3])])


def test_trim(model):
    opts = CONFIGS["int4"]
    prompts = _prompts([26, 11], seed=11)
    batch = [c.merge([_single(opts)[i] for _ in prompts]) for i, c in enumerate(_single(opts))]
    _batch_prefill(model, batch, prompts)
    assert [c.trim(6) for c in batch] == [6, 6]
    # Equal to the requests prefilled without their last 6 tokens.
    y = mx.array([[3], [3]])
    out = model(y, cache=batch)[:, -1]
    for b, p in enumerate(prompts):
        alone = _single(opts)
        model(mx.array(p)[None], cache=alone)
        for c in alone:
            c.trim(6)
        _close([out[b]], [model(mx.array([[3]]), cache=alone)[0, -1]])


def test_rotating_batch_equals_alone(model):
    opts = CONFIGS["int4"]
    prompts = _prompts([20, 6, 33], seed=13)
    steps = 20
    ref = [_alone(model, _single(opts, max_size=24), p, steps) for p in prompts]
    singles = _single(opts, max_size=24)
    batch = [c.merge([_single(opts, max_size=24)[i] for _ in prompts])
             for i, c in enumerate(singles)]
    assert all(type(c) is bc.BatchRotatingInt4KVCache for c in batch)
    outs = _batch_decode(model, batch, _batch_prefill(model, batch, prompts), steps)
    for r, o in zip(ref, outs):
        _close(o, r)
    # memory stays bounded by the window, not the tokens seen
    assert batch[0]._qcap <= 24 + 2 * bc.BatchInt4KVCache.step
    ex = batch[0].extract(2)
    assert type(ex) is tqcache.RotatingInt4KVCache and ex.offset == 33 + steps


def test_int8_batch_close_to_mlx_lm_batch_kv_cache(model):
    """The same protocol calls on mlx-lm's BatchKVCache (fp16) and on the int8 batch."""
    opts = dict(group_size=64, bits=8, window=4, sinks=2, chunk_size=4)
    prompts = _prompts([18, 9, 27], seed=17)
    ours = [c.merge([_single(opts)[i] for _ in prompts]) for i, c in enumerate(_single(opts))]
    theirs = [mlc.KVCache.merge([mlc.KVCache() for _ in prompts]) for _ in range(2)]
    res = []
    for cache in (ours, theirs):
        last = _batch_prefill(model, cache, prompts)
        y = mx.stack([mx.argmax(x) for x in last])
        seq = [mx.stack(last)]
        for step in range(10):
            if step == 4:
                for c in cache:
                    c.filter([0, 2])
                y = y[mx.array([0, 2])]
            logits = model(y[:, None], cache=cache)[:, -1]
            seq.append(logits)
            y = mx.argmax(logits, axis=-1)
        mx.eval(seq)
        res.append(seq)
    for a, b in zip(*res):
        assert a.shape == b.shape
        assert rel_err(a, b) < 2e-2
    ex_ours, ex_theirs = ours[0].extract(1), theirs[0].extract(1)
    assert ex_ours.offset == ex_theirs.offset == 27 + 10
    assert ours[0].size() == theirs[0].size()
    mx.eval(ours[0].state)


def test_batch_generator_greedy_equals_alone(model):
    """mlx-lm's BatchGenerator (continuous batching) with tqmetal caches."""
    opts = CONFIGS["int4"]
    prompts = _prompts([15, 40, 8, 23], seed=19)
    max_tokens = 12

    def alone_tokens(p):
        out = _alone(model, _single(opts), p[:-1] + p[-1:], max_tokens - 1)
        return [int(mx.argmax(x)) for x in out]

    ref = [alone_tokens(p) for p in prompts]
    gen = BatchGenerator(model, max_tokens=max_tokens, prefill_batch_size=2,
                         completion_batch_size=3)
    uids = gen.insert(prompts, caches=[_single(opts) for _ in prompts])
    got = {u: [] for u in uids}
    for _ in range(200):
        responses = gen.next_generated()
        if not responses and not any(len(v) < max_tokens for v in got.values()):
            break
        for r in responses:
            got[r.uid].append(r.token)
            if r.finish_reason is not None:
                assert isinstance(r.prompt_cache[0], tqcache.Int4KVCache)
    gen.close()
    for u, r in zip(uids, ref):
        assert got[u] == r


def test_deepcopy_and_nbytes(model):
    opts = CONFIGS["int4"]
    prompts = _prompts([30, 10], seed=23)
    batch = [c.merge([_single(opts)[i] for _ in prompts]) for i, c in enumerate(_single(opts))]
    _batch_prefill(model, batch, prompts)
    mx.eval([c.state for c in batch])
    dup = copy.deepcopy(batch)
    assert dup[0].nbytes_allocated == batch[0].nbytes_allocated > batch[0].nbytes > 0
    singles = [[c.extract(b) for c in batch] for b in range(2)]
    used = sum(c.nbytes for s in singles for c in s)
    assert abs(used - sum(c.nbytes for c in batch)) <= 2 * 2 * 2 * 64 * 2 * 2


def test_state_round_trip(model):
    opts = CONFIGS["int4"]
    prompts = _prompts([30, 10], seed=29)
    batch = [c.merge([_single(opts)[i] for _ in prompts]) for i, c in enumerate(_single(opts))]
    _batch_prefill(model, batch, prompts)
    mx.eval([c.state for c in batch])
    again = [type(c).from_state(c.state) for c in batch]
    # state holds the slots in use, not the spare capacity (as mlx-lm's batch caches)
    for c in batch:
        arrays = c.state[0]
        assert sum(a.nbytes for a in arrays) < c.nbytes_allocated
        assert all(a.shape[2] <= c._idx + c.num_sinks for a in arrays)
    y = mx.array([[4], [4]])
    for _ in range(3):  # and the loaded cache grows again as it decodes
        _close(list(model(y, cache=again)[:, -1]), list(model(y, cache=batch)[:, -1]))
    assert type(again[0].extract(1)) is tqcache.Int4KVCache


def test_merge_rejects_mixed_options():
    a = tqcache.Int4KVCache(window=8)
    b = tqcache.Int4KVCache(window=16)
    with pytest.raises(ValueError, match="same options"):
        a.merge([a, b])
