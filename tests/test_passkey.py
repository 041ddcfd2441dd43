"""tqmetal passkey on a tiny random model: the grid's rows, and the key score
taken from a copy of the cache equals scoring the key on a fresh prefill."""

import mlx.core as mx
import numpy as np
import pytest

from lm_testing import tiny_gemma3, tiny_llama
from tqmetal import passkey
from tqmetal.fidelity import parse_configs
from tqmetal.patch import patched


class CharTokenizer:
    """Bytes as ids (vocab 256), enough for the prompt builder."""

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


def test_prompt_places_needle():
    tok = CharTokenizer()
    ids, at = passkey.passkey_prompt(tok, 2000, 0.5, 12345)
    assert abs(len(ids) - 2000) < 200
    assert tok.decode(ids[at:at + 40]).lstrip().startswith("The pass key is 12345.")
    with pytest.raises(ValueError, match="depth"):
        passkey.passkey_prompt(tok, 2000, 1.5, 12345)


@pytest.mark.parametrize("config", ["fp16", "int4-g64-rot-center-abq", "k8v4-vrot-center-abq"])
def test_grid_scores_key_from_a_copy(model, config):
    tok = CharTokenizer()
    (cfg,) = parse_configs(config)
    with patched():
        rows = passkey.run_grid(model, tok, [600], [0.5], [cfg], answer_tokens=4, chunk=128)
        (row,) = rows
        # the same score from a fresh cache, prefilled and scored without a copy
        ids, _ = passkey.passkey_prompt(tok, 600, 0.5, row["key"])
        key_ids = tok.encode(f" {row['key']}", add_special_tokens=False)
        fresh = cfg.make_cache(model)
        passkey.prefill(model, ids, fresh, 128)
        logp, rank = passkey.key_score(model, ids[-1], fresh, key_ids)
        # and the answer from a fresh cache: the copy did not disturb the original
        again = cfg.make_cache(model)
        passkey.prefill(model, ids, again, 128)
        answer = passkey.greedy_answer(model, ids[-1], again, 4)
    assert row["key_logprob"] == pytest.approx(logp, abs=1e-3)
    assert row["key_rank"] == rank
    assert row["answer"] == tok.decode(answer)
    assert logp < 0 and 0 <= rank < 256
    assert row["retrieved"] == (str(row["key"]) in row["answer"].replace(" ", ""))
    assert "log P(key)" in passkey.format_grid(rows)


@pytest.mark.parametrize("config", ["fp16", "int4-g64-rot-center-abq-chs-fpw", "int4-g64-rot-center-abq"])
def test_copy_cache_gemma3(config):
    """Sliding-window layers (float16 reference caches hold an MLX dtype) copy too,
    and the copy answers as a fresh prefill does."""
    model = tiny_gemma3(sliding_window=64)
    (cfg,) = parse_configs(config)
    tok = CharTokenizer()
    ids, _ = passkey.passkey_prompt(tok, 400, 0.3, 54321)
    key_ids = tok.encode(" 54321", add_special_tokens=False)
    with patched():
        cache = cfg.make_cache(model)
        passkey.prefill(model, ids, cache, 128)
        copied = passkey.copy_cache(cache)
        before = [[np.array(a) for a in _arrays(c.state)] for c in copied]
        passkey.greedy_answer(model, ids[-1], cache, 3)
        after = [[np.array(a) for a in _arrays(c.state)] for c in copied]
        got = passkey.key_score(model, ids[-1], copied, key_ids)
        fresh = cfg.make_cache(model)
        passkey.prefill(model, ids, fresh, 128)
        want = passkey.key_score(model, ids[-1], fresh, key_ids)
    assert got[0] == pytest.approx(want[0], abs=1e-3) and got[1] == want[1]
    # the original's answer wrote into its buffers (a full sliding window overwrites
    # held slots); the copy's held tokens did not change
    for b, a in zip(before, after):
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _arrays(state):
    out = []
    for x in state if isinstance(state, (list, tuple)) else [state]:
        if isinstance(x, mx.array):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out += _arrays(x)
    return out
