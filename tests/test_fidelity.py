"""Tests of `tqmetal eval` (python/tqmetal/fidelity.py): the metric functions on
synthetic logits, the config-name parser, and a tiny end-to-end run."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from tqmetal import fidelity as fid
from tqmetal import generate as tqgen
from tqmetal import patch as tqpatch

from test_generate_cli import byte_tokenizer, tiny_model


# ---- metrics ---------------------------------------------------------------


def test_kl_of_identical_is_zero():
    x = mx.random.normal((7, 50)) * 4
    lp = fid.log_softmax(x)
    assert np.allclose(np.array(fid.kl_divergence(lp, lp)), 0.0, atol=1e-6)
    # shifting logits changes nothing
    assert np.allclose(np.array(fid.kl_divergence(lp, fid.log_softmax(x + 3.0))), 0, atol=1e-5)


def test_kl_known_values():
    p = mx.log(mx.array([[0.5, 0.5], [0.25, 0.75]]))
    q = mx.log(mx.array([[0.9, 0.1], [0.25, 0.75]]))
    kl = np.array(fid.kl_divergence(p, q))
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl[0] == pytest.approx(want, rel=1e-5)
    assert kl[1] == pytest.approx(0.0, abs=1e-6)
    # KL(p||q) != KL(q||p): the reference goes first
    rev = float(fid.kl_divergence(q, p)[0])
    assert rev == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), rel=1e-5)


def test_kl_against_numpy_on_random_logits():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 300)) * 3, rng.normal(size=(5, 300)) * 3
    la = a - np.log(np.exp(a).sum(-1, keepdims=True))
    lb = b - np.log(np.exp(b).sum(-1, keepdims=True))
    want = (np.exp(la) * (la - lb)).sum(-1)
    got = np.array(fid.kl_divergence(fid.log_softmax(mx.array(a)), fid.log_softmax(mx.array(b))))
    assert np.allclose(got, want, rtol=1e-4)


def test_top2_margin_and_nll():
    logits = mx.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    lp = fid.log_softmax(logits)
    assert np.allclose(np.array(fid.top2_margin(lp)), [1.0, 5.0], atol=1e-5)
    nll = np.array(fid.target_nll(lp, mx.array([0, 1])))
    z = math.log(math.e ** 2 + math.e + 1)
    assert nll[0] == pytest.approx(z - 2.0, rel=1e-5)
    assert nll[1] == pytest.approx(math.log(2 + math.e ** 5), rel=1e-5)


def test_summarize_known_values():
    kl = np.zeros(1000)
    kl[-1] = 1.0
    ref_top1 = np.arange(1000) % 7
    top1 = ref_top1.copy()
    top1[:10] = -1  # 10 disagreements, at positions with margin 0.01
    margin = np.full(1000, 1.0)
    margin[:20] = 0.01
    s = fid.summarize(kl, ref_top1, top1, margin, np.full(999, 2.0), np.full(999, 3.0), 0.05)
    assert s["kl_mean"] == pytest.approx(1e-3)
    assert s["kl_max"] == 1.0
    assert 0 < s["kl_p999"] <= 1.0
    assert s["top1"] == pytest.approx(0.99)
    assert s["top1_confident"] == 1.0 and s["confident_positions"] == 980
    assert s["ppl_ref"] == pytest.approx(math.e ** 2)
    assert s["ppl"] == pytest.approx(math.e ** 3)


def test_first_divergence():
    assert fid.first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert fid.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert fid.first_divergence([4], [5]) == 0
    assert fid.first_divergence([1, 2, 3], [1, 2]) == 2


def test_moving_average():
    assert np.allclose(fid.moving_average([1, 2, 3, 4], 2), [1.5, 2.5, 3.5])
    assert np.allclose(fid.moving_average([1, 2], 5), [1, 2])


# ---- config names ----------------------------------------------------------


@pytest.mark.parametrize("name, want", [
    ("int4-g64", dict(kind="tq", k_bits=4, v_bits=4, group_size=64, window=128, sinks=4,
                      rotate_keys=False)),
    ("int4-g64-rot", dict(kind="tq", group_size=64, rotate_keys=True)),
    ("int4-g32-w128", dict(group_size=32, window=128, rotate_keys=False)),
    ("int4-g128-w0-s0-norot", dict(group_size=128, window=0, sinks=0, rotate_keys=False)),
    ("INT4-W32", dict(window=32, group_size=64)),
    ("k8v4", dict(kind="tq", k_bits=8, v_bits=4)),
    ("k4v8-g32", dict(k_bits=4, v_bits=8, group_size=32)),
    ("int8", dict(kind="tq", k_bits=8, v_bits=8)),
    ("mlx4", dict(kind="mlx", k_bits=4, group_size=64)),
    ("mlx8-g32", dict(kind="mlx", k_bits=8, group_size=32)),
    ("fp16", dict(kind="fp", window=0, sinks=0)),
    ("int4-rot-center-vrot", dict(rotate_keys=True, center_keys=True, rotate_values=True)),
    ("int4-fp0.3-k8l2", dict(fp_layers=(0, 3), k8_layers=(2,), center_keys=False)),
    ("int4-k8l5.1.1", dict(k8_layers=(1, 5), fp_layers=())),
    ("int4-abq", dict(attend_before_quantizing=True, center_keys=False)),
    ("int4-rot-center-chs", dict(channel_scale=0.5, rotate_keys=True, center_keys=True)),
    ("int4-chs100", dict(channel_scale=1.0)),
    ("int4-chs25", dict(channel_scale=0.25)),
    ("int4-g64", dict(channel_scale=0.0, calibrated_scale=False)),
    ("int4-rot-chsq", dict(channel_scale=0.5, calibrated_scale=True)),
    ("int4-rot-chsq100", dict(channel_scale=1.0, calibrated_scale=True)),
])
def test_parse_config(name, want):
    c = fid.parse_config(name)
    assert c.name == name.lower()
    for k, v in want.items():
        assert getattr(c, k) == v, k


@pytest.mark.parametrize("bad", [
    "int5", "int4-g48", "int4-x", "int4-g64-g32", "int4-rot-norot", "mlx4-w0", "mlx4-rot",
    "fp16-g32", "", "int4-w", "int4-wabc", "int4-fp", "int4-k8l1.x", "int4-fp1..2",
    "mlx4-center", "int4-chs0", "int4-chs101", "int4-chsx", "int4-chs-chs50", "mlx4-chs",
    "int4-chsqx", "int4-chsq-chs",
])
def test_parse_config_rejects(bad):
    with pytest.raises(ValueError):
        fid.parse_configs(bad)


def test_parse_configs_list():
    cs = fid.parse_configs("int4-g64, int4-g64-rot,k8v4,int8,mlx4")
    assert [c.name for c in cs] == ["int4-g64", "int4-g64-rot", "k8v4", "int8", "mlx4"]
    with pytest.raises(ValueError):
        fid.parse_configs("int8,int8")


def test_make_cache_kinds():
    from mlx_lm.models import cache as mlc

    from tqmetal.cache import Int4KVCache

    model = tiny_model(layers=2)
    assert all(isinstance(c, mlc.KVCache) and c.store_dtype is None
               for c in fid.parse_config("fp16").make_cache(model))
    q = fid.parse_config("mlx4-g32").make_cache(model)
    assert all(isinstance(c, mlc.QuantizedKVCache) and c.bits == 4 and c.group_size == 32
               for c in q)
    c = fid.parse_config("k8v4-g32-w32-s2-rot").make_cache(model)[0]
    assert isinstance(c, Int4KVCache)
    assert (c.k_bits, c.v_bits, c.group_size, c.window, c.num_sinks, c.rotate_keys) == \
        (8, 4, 32, 32, 2, True)
    layers = fid.parse_config("int4-center-fp0-k8l1").make_cache(tiny_model(layers=3))
    assert isinstance(layers[0], mlc.KVCache) and layers[0].store_dtype == mx.float16
    assert [(c.k_bits, c.v_bits, c.center_keys) for c in layers[1:]] == [(8, 4, True),
                                                                        (4, 4, True)]
    with pytest.raises(ValueError, match="out of range"):
        fid.parse_config("int4-fp3").make_cache(tiny_model(layers=3))
    c = fid.parse_config("int4-chs").make_cache(model)[0]
    assert c.channel_scale and c.channel_scale_alpha == 0.5
    c = fid.parse_config("int4-chs100").make_cache(model)[0]
    assert c.channel_scale and c.channel_scale_alpha == 1.0
    assert not fid.parse_config("int4").make_cache(model)[0].channel_scale
    fid.set_calibration_tokens(None)
    with pytest.raises(ValueError, match="calibration"):
        fid.parse_config("int4-chsq").make_cache(model)
    fid.set_calibration_tokens([5, 6, 7, 8] * 20)
    try:
        a, b = (fid.parse_config("int4-rot-chsq").make_cache(model) for _ in range(2))
        assert a[0].channel_scale_fixed and mx.array_equal(a[0]._kscale_given, b[0]._kscale_given)
        assert len(fid._CALIBRATION["scales"]) == 1  # calibrated once per model and alpha
    finally:
        fid.set_calibration_tokens(None)


@pytest.mark.parametrize("L, N, causal", [(1, 50, False), (7, 7, True), (16, 300, True),
                                          (16, 300, False)])
def test_numpy_attention_matches_mlx(L, N, causal):
    mx.random.seed(L + N)
    q = mx.random.normal((1, 6, L, 64))
    k = mx.random.normal((1, 2, N, 64))
    v = mx.random.normal((1, 2, N, 64))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125,
                                                mask="causal" if causal else None)
    got = fid.numpy_attention(q, k, v, 0.125, causal)
    assert got.dtype == q.dtype and got.shape == want.shape
    assert np.allclose(np.array(got), np.array(want), atol=2e-5)


# ---- model-level pieces -----------------------------------------------------


def test_numpy_matmuls_keep_the_function():
    model = tiny_model(layers=2, seed=3)
    x = mx.array([list(range(1, 40, 2))])  # 20 rows: the numpy path
    want = np.array(model(x))
    fid.numpy_matmuls(model)
    got = np.array(model(x))
    assert np.allclose(got, want, atol=2e-4, rtol=1e-4)


def test_teacher_forced_reference_row_is_exact():
    model = tiny_model(layers=2)
    mx.random.seed(5)
    toks = np.array(mx.random.randint(0, 256, (200,))).tolist()
    cfgs = fid.parse_configs("fp16,int4-g64-w0-s0,int8-w32")
    with tqpatch.patched():
        r = fid.teacher_forced(model, toks, cfgs, chunk=64)
    assert r["ref"]["top1"].shape == (200,) and r["ref"]["nll"].shape == (199,)
    assert np.all(r["fp16"]["kl"] == 0)
    # the reference's attention went through numpy: the same logits as mlx-lm's own cache
    from mlx_lm.models import cache as mlc
    with tqpatch.patched():
        plain = [mlc.KVCache() for _ in model.layers]
        lp = [fid.log_softmax(model(mx.array([toks[i:i + 64]]), cache=plain)[0])
              for i in range(0, 200, 64)]
    want_top1 = np.concatenate([np.array(mx.argmax(x, -1)) for x in lp])
    assert np.array_equal(r["ref"]["top1"], want_top1)
    assert np.all(r["int4-g64-w0-s0"]["kl"] >= 0)
    assert r["int4-g64-w0-s0"]["kl"].mean() > r["int8-w32"]["kl"].mean()
    # int8 with a 32-token window: the reference's logits, to float16 storage, while
    # everything fits the window
    assert np.allclose(r["int8-w32"]["kl"][:36], 0, atol=1e-5)


def test_teacher_forced_stride_samples_the_same_positions():
    # stride 4 measures positions 3, 7, 11, ... with the same values as stride 1
    # (the output layer runs on those rows only; the caches still see every token)
    model = tiny_model(layers=2)
    mx.random.seed(6)
    toks = np.array(mx.random.randint(0, 256, (150,))).tolist()
    cfgs = fid.parse_configs("int4-g64-w0-s0-rot")
    with tqpatch.patched():
        full = fid.teacher_forced(model, toks, cfgs, chunk=64)
        part = fid.teacher_forced(model, toks, cfgs, chunk=64, stride=4)
    sel = np.arange(3, 150, 4)
    assert part["ref"]["top1"].shape == (len(sel),) and part["ref"]["nll"].shape == (len(sel),)
    for name in ("ref", "int4-g64-w0-s0-rot"):
        assert np.array_equal(part[name]["top1"], full[name]["top1"][sel])
        assert np.allclose(part[name]["nll"], full[name]["nll"][sel], atol=1e-4)
    assert np.allclose(part["int4-g64-w0-s0-rot"]["kl"], full["int4-g64-w0-s0-rot"]["kl"][sel],
                       atol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        fid.teacher_forced(model, toks, cfgs, stride=0)


# ---- end to end ---------------------------------------------------------------


def test_shipped_text_is_long_enough():
    text = fid.load_text()
    assert len(text.split()) >= 4000  # ~5K+ tokens of prose for the default tokenizer


def test_eval_end_to_end_tiny(monkeypatch, tmp_path, capsys):
    model, tok = tiny_model(layers=2), byte_tokenizer()
    monkeypatch.setattr(tqgen, "load_model", lambda spec=None: (model, tok))
    out_json, out_png = tmp_path / "r.json", tmp_path / "kl.png"
    rc = fid.main([
        "--tokens", "256", "--configs", "fp16,int4-g64,int4-g32-rot-w32,k8v4,mlx4",
        "--gen-prompts", "2", "--gen-tokens", "8", "--gen-prompt-tokens", "64",
        "--json", str(out_json), "--plot", str(out_png), "--quiet",
    ])
    out = capsys.readouterr().out
    assert rc == 0
    assert not tqpatch.is_patched()
    for name in ("fp16", "int4-g64", "int4-g32-rot-w32", "k8v4", "mlx4"):
        assert name in out
    data = json.loads(out_json.read_text())
    assert data["tokens"] == 256
    rows = {r["config"]: r for r in data["configs"]}
    assert rows["fp16"]["kl_mean"] == 0 and rows["fp16"]["top1"] == 1.0
    assert rows["fp16"]["first_divergence"] == [8, 8]
    assert rows["fp16"]["first_divergence_ref_margin"] == [None, None]
    assert "(m): the reference's top-2" in out
    assert data["versions"]["mlx"] == mx.__version__ and data["machine"]["logical_cpus"] >= 1
    assert rows["fp16"]["ppl"] == pytest.approx(rows["fp16"]["ppl_ref"])
    assert rows["int4-g64"]["kl_mean"] >= 0 and rows["int4-g64"]["rotate_keys"] is False
    assert rows["int4-g32-rot-w32"]["window"] == 32
    assert len(data["per_position"]["kl"]["k8v4"]) == 256
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_greedy_divergence_reports_the_reference_margin():
    model = tiny_model(layers=2)
    prompts = [[3, 7, 11, 200, 5] * 8, [9, 1, 40] * 10]
    cfgs = fid.parse_configs("fp16,mlx4-g32")
    margins = {}
    with tqpatch.patched():
        div = fid.greedy_divergence(model, prompts, cfgs, 12, prefill_step=16, margins=margins)
        ref_m = []
        fid.greedy_tokens(model, prompts[1], fid.parse_config("fp16").make_cache(model), 12, 16,
                          margins=ref_m)
    assert div["fp16"] == [12, 12] and margins["fp16"] == [None, None]
    assert len(ref_m) == 12 and min(ref_m) >= 0
    for d, m in zip(div["mlx4-g32"], margins["mlx4-g32"]):
        assert (m is None) == (d == 12)
    d, m = div["mlx4-g32"][1], margins["mlx4-g32"][1]
    if d < 12:  # (it diverges at token 3 here, a margin of 0.018)
        assert m == pytest.approx(ref_m[d], abs=1e-4)
    row = {"config": "x", "kl_mean": 0, "kl_p999": 0, "top1": 1, "top1_confident": 1, "ppl": 1,
           "ppl_ref": 1, "first_divergence": [6, 256],
           "first_divergence_ref_margin": [0.0123, None], "kv_vs_fp16": 0.3}
    assert "6(0.012),256" in fid.format_table([row], 0.05)


def test_eval_bad_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        fid.main(["--configs", "int4-g99"])
    assert "group size" in capsys.readouterr().err


def test_key_sensitivity_finds_the_layer_with_offset_keys():
    """A layer whose keys carry a large common offset plus outliers is the most
    sensitive to int4 keys: the probe must rank it first."""
    model = tiny_model(layers=3)
    attn = model.model.layers[1].self_attn
    w = np.array(attn.k_proj.weight)
    w[:5] *= 25.0  # a few huge key channels in layer 1 only
    attn.k_proj.weight = mx.array(w)
    mx.random.seed(2)
    toks = np.array(mx.random.randint(0, 256, (192,))).tolist()
    with tqpatch.patched():
        sens = fid.key_sensitivity(model, toks, chunk=64)
    assert sens.shape == (3,) and np.all(sens > 0)
    assert int(np.argmax(sens)) == 1, sens
    # int4 error, far above float16 rounding (~1e-7: what the probe measured while
    # the quantizing cache handed its update's keys back unquantized)
    assert sens.min() > 5e-6, sens
