"""Tests for `tqmetal plan` (python/tqmetal/plan.py): pure Python, no MLX, fast."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

try:
    from tqmetal import plan
except ImportError:
    # An installed (non-editable) tqmetal may predate plan.py, and plan.py needs
    # neither the extension nor MLX: load the source file directly.
    _path = Path(__file__).resolve().parents[1] / "python" / "tqmetal" / "plan.py"
    _spec = importlib.util.spec_from_file_location("tqmetal_plan", _path)
    plan = importlib.util.module_from_spec(_spec)
    sys.modules["tqmetal_plan"] = plan  # dataclasses look their module up
    _spec.loader.exec_module(plan)

GiB = 2**30
K = 1024
L70 = plan.PRESETS["Llama-3.1-70B"]


def run(capsys, *argv):
    rc = plan.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_error(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        plan.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


# --- the published Llama-3.1-70B / 64 GB Mac figures -------------------------


def test_published_kv_at_128k():
    # 40 GB fp16 and 12.5 GB int4 (group 32) at 128K: binary GB, 128K = 131072.
    assert plan.kv_cache_bytes(L70, 128 * K, "fp16") == 40 * GiB
    assert plan.kv_bytes_per_token(L70, "int4", 32) * 128 * K == 12.5 * GiB
    # With the fp16 window (128) and sinks (4) included it is still 12.5 GB.
    int4 = plan.kv_cache_bytes(L70, 128 * K, "int4", group_size=32, window=128, sinks=4)
    assert int4 == pytest.approx(12.5 * GiB, rel=0.005)
    assert int4 > 12.5 * GiB


def test_published_largest_int4_context():
    # ~236K tokens with int4 KV and 4-bit weights on a 64 GB Mac, default conventions.
    p = plan.plan(L70, plan.parse_memory("64GB"), system="Linux")
    assert p["budget"] == 60 * GiB
    assert p["max_context"]["int4"] == pytest.approx(236 * K, rel=0.02)
    assert p["max_context"]["fp16"] < 128 * K  # fp16 KV does not reach 128K


def test_published_figures_in_cli_output(capsys):
    rc, out, _ = run(capsys, "--model", "Llama-3.1-70B", "--memory", "64GB",
                     "--weight-bits", "4", "--group-size", "32", "--contexts", "128K")
    assert rc == 0
    row = next(line for line in out.splitlines() if line.strip().startswith("128K"))
    assert "40.0 GB" in row and "12.5 GB" in row
    assert row.rstrip().endswith("int4")  # only int4 fits at 128K
    assert "~236K" in out
    assert "int4 group 32" in out or "group 32" in out


def test_default_budget_needs_raised_wired_limit():
    # The default budget (60 GB) exceeds macOS's default 3/4 limit (48 GB);
    # --reserve 25% plans within that default instead.
    p = plan.plan(L70, 64 * GiB, system="Linux")
    w = p["gpu_wired_limit"]
    assert w["default_bytes"] == 48 * GiB and w["needs_raise"]
    assert w["raise_command"] == "sudo sysctl iogpu.wired_limit_mb=61440"
    p25 = plan.plan(L70, 64 * GiB, reserve=plan.parse_reserve("25%", 64 * GiB), system="Linux")
    assert p25["budget"] == 48 * GiB and not p25["gpu_wired_limit"]["needs_raise"]
    assert p25["max_context"]["int4"] < p["max_context"]["int4"]


# --- presets -----------------------------------------------------------------

# Hand-computed: 2 (K, V) * layers * kv_heads * head_dim * 2 bytes (fp16).
FP16_PER_TOKEN = {
    "Llama-3.1-8B": 2 * 32 * 8 * 128 * 2,  # 131072
    "Llama-3.1-70B": 2 * 80 * 8 * 128 * 2,  # 327680
    "Qwen2.5-7B": 2 * 28 * 4 * 128 * 2,  # 57344
    "Qwen2.5-32B": 2 * 64 * 8 * 128 * 2,  # 262144
    "Gemma-2-9B": 2 * 42 * 8 * 256 * 2,  # 344064 (every layer, before the window)
    "SmolLM2-135M": 2 * 30 * 3 * 64 * 2,  # 23040
}
# Published parameter counts.
PARAMS = {
    "Llama-3.1-8B": 8.03e9,
    "Llama-3.1-70B": 70.55e9,
    "Qwen2.5-7B": 7.62e9,
    "Qwen2.5-32B": 32.76e9,
    "Gemma-2-9B": 9.24e9,
    "SmolLM2-135M": 134.5e6,
}


def test_presets_covered():
    assert set(plan.PRESETS) == set(FP16_PER_TOKEN) == set(PARAMS)


@pytest.mark.parametrize("name", sorted(FP16_PER_TOKEN))
def test_preset_kv_bytes_per_token(name):
    shape = plan.PRESETS[name]
    fp16 = FP16_PER_TOKEN[name]
    assert plan.kv_bytes_per_token(shape, "fp16") == fp16
    # bytes/element: int4 g32 0.625, int8 g32 1.125, k8v4 (1.125 + 0.625) / 2.
    assert plan.kv_bytes_per_token(shape, "int4", 32) == fp16 * 0.625 / 2
    assert plan.kv_bytes_per_token(shape, "int8", 32) == fp16 * 1.125 / 2
    assert plan.kv_bytes_per_token(shape, "k8v4", 32) == fp16 * (1.125 + 0.625) / 4
    assert plan.kv_bytes_per_token(shape, "int4", 64) == fp16 * 0.5625 / 2
    # 5-bit keys and 3-bit values hold int4's bytes
    assert plan.kv_bytes_per_token(shape, "k5v3", 64) == plan.kv_bytes_per_token(shape, "int4", 64)
    # A context that no window caps: fp16 KV is linear in it.
    assert plan.kv_cache_bytes(shape, 2048, "fp16") == 2048 * fp16


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_preset_params(name):
    assert plan.num_params(plan.PRESETS[name]) == pytest.approx(PARAMS[name], rel=0.003)


def test_llama_70b_exact_params_and_weights():
    assert plan.num_params(L70) == 70_553_706_496
    linear, small = plan.param_counts(L70)
    # 4 bits + a float16 scale and bias per 64 weights = 0.5625 B/param; norms float16.
    assert plan.weight_bytes(L70, 4, 64) == linear * 9 // 16 + 2 * small
    assert plan.weight_bytes(L70, 16) == 2 * 70_553_706_496
    assert plan.weight_bytes(L70, 8, 64) == linear * 17 // 16 + 2 * small


def test_gemma2_sliding_window_layers():
    g = plan.PRESETS["Gemma-2-9B"]
    assert g.sliding_window == 4096 and sum(g.sliding_layers) == 21
    per_layer = 2 * 8 * 256 * 2
    # Up to 4096 tokens every layer grows; past it only the 21 global layers.
    assert plan.kv_cache_bytes(g, 4096, "fp16") == 42 * 4096 * per_layer
    assert plan.kv_cache_bytes(g, 8192, "fp16") == (21 * 8192 + 21 * 4096) * per_layer
    assert plan.kv_cache_bytes(g, 8192, "fp16", sliding=False) == 42 * 8192 * per_layer
    # int4: windowed layers hold 4096 tokens, 132 of them fp16.
    q = 8 * 256 * 2 * 0.625
    fp = 132 * per_layer
    assert plan.kv_cache_bytes(g, 8192, "int4") == 21 * (fp + (8192 - 132) * q) + 21 * (
        fp + (4096 - 132) * q)


def test_small_sliding_windows_stay_fp16():
    # Gemma 3's 512-token sliding layers keep float16 caches (make_prompt_cache's
    # fp_windows): the planner counts them so, and the constant matches the cache's.
    import dataclasses

    from tqmetal import cache as tqcache

    assert plan.FP_WINDOWS == tqcache.FP_WINDOWS
    g = dataclasses.replace(plan.PRESETS["Gemma-2-9B"], sliding_window=512)
    per_layer = 2 * 8 * 256 * 2
    q = 8 * 256 * 2 * 0.625
    assert plan.kv_cache_bytes(g, 8192, "int4") == 21 * (132 * per_layer + (8192 - 132) * q) + (
        21 * 512 * per_layer)


def test_window_and_sinks():
    s = plan.PRESETS["SmolLM2-135M"]
    fp = plan.kv_bytes_per_token(s, "fp16")
    q = plan.kv_bytes_per_token(s, "int4", 32)
    # Short contexts stay entirely fp16; past sinks + window the rest is int4.
    assert plan.kv_cache_bytes(s, 100, "int4") == 100 * fp
    assert plan.kv_cache_bytes(s, 1000, "int4") == 132 * fp + 868 * q
    assert plan.kv_cache_bytes(s, 1000, "int4", window=0, sinks=0) == 1000 * q


def test_max_context_is_tight():
    w = plan.weight_bytes(L70)
    budget = 60 * GiB
    n = plan.max_context(L70, budget, w, "int4")
    assert w + plan.kv_cache_bytes(L70, n, "int4") <= budget
    assert w + plan.kv_cache_bytes(L70, n + 1, "int4") > budget
    assert plan.max_context(L70, 30 * GiB, w, "int4") == 0  # weights alone too big


# --- parsing -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["64GB", "64GiB", "64G", "64 gb", "65536MB", "64.0GB"])
def test_parse_memory_binary(text):
    assert plan.parse_memory(text) == 64 * GiB


def test_parse_memory_other():
    assert plan.parse_memory("48G") == 48 * GiB
    assert plan.parse_memory("1.5T") == int(1.5 * 2**40)
    assert plan.parse_memory("512MiB") == 512 * 2**20
    assert plan.parse_reserve("25%", 64 * GiB) == 16 * GiB
    assert plan.parse_reserve("0", 64 * GiB) == 0


@pytest.mark.parametrize("text", ["64", "64XB", "lots", "", "GB", "-4GB", "0GB", "64iB"])
def test_parse_memory_malformed(text):
    with pytest.raises(ValueError, match="memory size"):
        plan.parse_memory(text)


def test_parse_contexts():
    assert plan.parse_contexts("8K,32K,128K") == [8192, 32768, 131072]
    assert plan.parse_contexts("1M, 4000, 0.5K") == [2**20, 4000, 512]
    for bad in ("8Q", "", "0", "1.5", "8KB"):
        with pytest.raises(ValueError):
            plan.parse_contexts(bad)


def test_parse_kv_formats():
    assert plan.parse_kv_formats("fp16,int8,int4,k8v4") == ["fp16", "int8", "int4", "k8v4"]
    assert plan.parse_kv_formats("k5v3,int4") == ["k5v3", "int4"]
    with pytest.raises(ValueError, match="fp16, int8, int4, k5v3, k8v4"):
        plan.parse_kv_formats("fp8")


# --- config.json -------------------------------------------------------------

LLAMA_70B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
    "quantization": {"group_size": 64, "bits": 4},
}


def write_config(tmp_path, cfg, name="model"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_config_json_matches_preset(tmp_path):
    d = write_config(tmp_path, LLAMA_70B_CONFIG, "Llama-3.1-70B-4bit")
    for where in (d / "config.json", d):  # the file or its directory
        shape = plan.load_shape(str(where))
        assert shape.name == "Llama-3.1-70B-4bit"
        assert shape.head_dim == 128  # hidden / heads when head_dim is absent
        assert (shape.weight_bits, shape.weight_group_size) == (4, 64)
        assert plan.num_params(shape) == plan.num_params(L70)
        assert plan.kv_bytes_per_token(shape) == plan.kv_bytes_per_token(L70)
        assert plan.weight_bytes(shape) == plan.weight_bytes(L70)


def test_config_json_fields(tmp_path):
    cfg = {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "tie_word_embeddings": False,
        "sliding_window": 131072, "use_sliding_window": False,  # not applied
        "quantization": {"group_size": 32, "bits": 8},
    }
    shape = plan.load_shape(str(write_config(tmp_path, cfg) / "config.json"))
    assert shape.sliding_window is None and shape.qkv_bias
    assert plan.num_params(shape) == plan.num_params(plan.PRESETS["Qwen2.5-7B"])
    p = plan.plan(shape, 16 * GiB, system="Linux")
    assert (p["weight_bits"], p["weight_group_size"]) == (8, 32)
    # --weight-bits overrides the config's quantization (and its group size).
    p16 = plan.plan(shape, 32 * GiB, weight_bits=16, system="Linux")
    assert p16["weights"] == 2 * plan.num_params(shape)


def test_config_json_explicit_head_dim_and_gemma2(tmp_path):
    cfg = {
        "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
        "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8,
        "head_dim": 256, "vocab_size": 256000, "sliding_window": 4096,
        "tie_word_embeddings": True, "max_position_embeddings": 8192,
    }
    shape = plan.load_shape(str(write_config(tmp_path, cfg) / "config.json"))
    g = plan.PRESETS["Gemma-2-9B"]
    assert shape.head_dim == 256  # not hidden / heads = 224
    assert shape.sliding_layers == g.sliding_layers
    assert plan.num_params(shape) == plan.num_params(g)
    assert plan.kv_cache_bytes(shape, 32 * K, "int4") == plan.kv_cache_bytes(g, 32 * K, "int4")


def test_config_json_bad(tmp_path):
    with pytest.raises(ValueError, match="num_hidden_layers"):
        plan.load_shape(str(write_config(tmp_path, {"hidden_size": 64}, "a") / "config.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        plan.load_shape(str(bad))


# --- CLI -----------------------------------------------------------------------


def test_cli_table(capsys, monkeypatch):
    monkeypatch.setattr(plan.platform, "system", lambda: "Linux")
    rc, out, _ = run(capsys, "--model", "Qwen2.5-7B", "--memory", "16GB",
                     "--kv", "fp16,int8,int4,k8v4", "--contexts", "8K,32K,128K")
    assert rc == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("context"))
    for col in ("weights", "fp16 KV", "int8 KV", "int4 KV", "k8v4 KV", "int4 total", "fits"):
        assert col in header
    assert [line.split()[0] for line in lines if line.strip()[:1].isdigit()][:3] == [
        "8K", "32K", "128K"]
    assert "largest context that fits" in out
    assert "applies to Macs" in out
    assert "sudo sysctl iogpu.wired_limit_mb=" in out


def test_cli_weight_bits_16(capsys):
    rc, out, _ = run(capsys, "--model", "SmolLM2-135M", "--memory", "8GB",
                     "--weight-bits", "16", "--contexts", "8K")
    assert rc == 0 and "16-bit (float16)" in out


def test_cli_json(capsys):
    rc, out, _ = run(capsys, "--model", "Llama-3.1-70B", "--memory", "64GiB",
                     "--contexts", "8K,128K", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["memory"] == 64 * GiB and data["budget"] == 60 * GiB
    assert [r["context"] for r in data["rows"]] == [8192, 131072]
    row = data["rows"][1]
    assert row["kv"]["fp16"] == 40 * GiB
    assert row["fits"] == {"fp16": False, "int4": True}
    assert row["total"]["int4"] == row["weights"] + row["kv"]["int4"]
    assert data["max_context"]["int4"] == pytest.approx(236 * K, rel=0.02)
    assert data["model"]["params"] == 70_553_706_496
    assert data["gpu_wired_limit"]["default_bytes"] == 48 * GiB


def test_cli_mac_wired_limit(capsys, monkeypatch):
    monkeypatch.setattr(plan.platform, "system", lambda: "Darwin")
    fake = {"hw.memsize": 64 * GiB, "iogpu.wired_limit_mb": 0}
    monkeypatch.setattr(plan, "_sysctl", lambda name: fake[name])
    rc, out, _ = run(capsys, "--model", "Llama-3.1-8B", "--memory", "64GB", "--contexts", "8K")
    assert rc == 0
    assert "this Mac: 64.0 GB RAM; the GPU may wire 48.0 GB" in out
    assert "iogpu.wired_limit_mb=0: default, 3/4 of RAM" in out
    assert "sudo sysctl iogpu.wired_limit_mb=61440" in out
    assert "applies to Macs" not in out
    fake["iogpu.wired_limit_mb"] = 57344
    rc, out, _ = run(capsys, "--model", "Llama-3.1-8B", "--memory", "64GB", "--contexts", "8K")
    assert "the GPU may wire 56.0 GB (iogpu.wired_limit_mb=57344)" in out


def test_default_wired_limit():
    assert plan.default_wired_limit(16 * GiB) == 16 * GiB * 2 // 3
    assert plan.default_wired_limit(36 * GiB) == 24 * GiB
    assert plan.default_wired_limit(64 * GiB) == 48 * GiB
    assert plan.default_wired_limit(128 * GiB) == 96 * GiB


# --- bad input -------------------------------------------------------------------


def test_unknown_preset_lists_presets(capsys):
    err = run_error(capsys, "--model", "Llama-9-1T", "--memory", "64GB")
    assert "unknown model 'Llama-9-1T'" in err
    for name in plan.PRESETS:
        assert name in err


@pytest.mark.parametrize("argv, message", [
    (["--memory", "64XB"], "malformed memory size '64XB'"),
    (["--memory", "64"], "malformed memory size '64'"),
    (["--memory", "64GB", "--contexts", "8Q"], "malformed context length '8Q'"),
    (["--memory", "64GB", "--kv", "fp8"], "unknown KV format 'fp8'"),
    (["--memory", "64GB", "--group-size", "48"], "KV group size 48 not supported"),
    (["--memory", "64GB", "--weight-bits", "7"], "invalid choice"),
    (["--memory", "64GB", "--reserve", "64GB"], "reserve must be smaller than memory"),
    (["--memory", "64GB", "--reserve", "lots%"], "malformed reserve"),
    (["--memory", "64GB", "--window", "-1"], "window and sinks must be >= 0"),
])
def test_bad_cli_input(capsys, argv, message):
    err = run_error(capsys, "--model", "Llama-3.1-8B", *argv)
    assert message in err


def test_group_size_must_divide_head_dim(capsys):
    err = run_error(capsys, "--model", "SmolLM2-135M", "--memory", "8GB", "--group-size", "128")
    assert "does not divide SmolLM2-135M's head_dim 64" in err


def test_missing_arguments(capsys):
    err = run_error(capsys, "--model", "Llama-3.1-8B")
    assert "--memory" in err
