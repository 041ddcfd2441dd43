"""`tqmetal serve`: mlx-lm's OpenAI-compatible server on tqmetal's int4 caches.

    tqmetal serve                                  # SmolLM2-135M (GGUF), int4, 127.0.0.1:8080
    tqmetal serve --port 8081 --kv k8v4 --kv-window 256
    tqmetal serve --model mlx-community/Llama-3.2-1B-Instruct-4bit --max-kv-size 4096

This is ``mlx_lm.server`` itself (same flags, same HTTP API, same errors,
continuous batching through ``BatchGenerator``, the LRU prompt cache with trie
prefix reuse) with three things swapped in before it starts:

* the caches: ``mlx_lm.server.make_prompt_cache`` and the one
  ``BatchGenerator`` calls become :func:`tqmetal.cache.make_prompt_cache` with
  the ``--kv*`` options; tqmetal's caches have ``merge``, so the server batches
  (mlx-lm's own ``--kv-bits`` turns batching off);
* attention: :func:`tqmetal.patch.patch_mlx_lm` (the fused int4 op, B >= 1);
* loading: a ``.gguf`` model path (the default, the bundled SmolLM2) loads
  with :mod:`tqmetal.gguf`, anything else with ``mlx_lm.load``.

Flags of its own: ``--kv auto|int4|k5v3|int8|k8v4|k4v8|fp16`` and the cache options of
``tqmetal generate`` (``--kv-window``, ``--kv-sinks``, ``--rotate-keys``,
``--center-keys``, ``--kv-channel-scale``, ``--kv-k8-layers``,
``--max-kv-size``), plus ``--max-prompt-tokens`` (longer prompts get
mlx-lm's error response). ``--kv-group-size`` is mlx_lm.server's own flag and
sets the int4 group size too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import logging
import sys
from typing import List, Optional, Sequence

from .generate import KV_FORMATS

__all__ = ["CacheConfig", "build_parser", "install", "main"]


@dataclasses.dataclass
class CacheConfig:
    """What ``tqmetal serve`` (and :func:`install`) give make_prompt_cache."""

    kv: str = "auto"
    group_size: int = 64
    window: int = 128
    sinks: int = 4
    rotate_keys: Optional[bool] = None
    center_keys: Optional[bool] = None
    channel_scale: Optional[bool] = None
    k8_layers: tuple = ()
    max_kv_size: Optional[int] = None

    def make_prompt_cache(self, model, max_kv_size: Optional[int] = None):
        from .cache import make_prompt_cache, resolve_kv

        extra = {}
        if self.center_keys is not None:
            extra["center_keys"] = self.center_keys
        if self.channel_scale is not None:
            extra["channel_scale"] = self.channel_scale
        caches = make_prompt_cache(
            model, kv=self.kv, group_size=self.group_size, window=self.window,
            sinks=self.sinks, rotate_keys=self.rotate_keys, k8_layers=self.k8_layers,
            max_kv_size=max_kv_size if max_kv_size is not None else self.max_kv_size, **extra,
        )
        if not getattr(self, "_announced", False):
            self._announced = True
            kinds = sorted({type(c).__name__ for c in caches})
            logging.info("tqmetal serve: --kv %s (%s): %s per layer (batching: %s)", self.kv,
                         resolve_kv(model, self.kv, self.group_size), ", ".join(kinds),
                         all(hasattr(c, "merge") for c in caches))
        return caches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tqmetal serve", add_help=False,
        description="mlx_lm.server with tqmetal's int4 KV caches and fused attention "
                    "(continuous batching on). Every mlx_lm.server flag works; these are added:",
    )
    p.add_argument("--kv", choices=KV_FORMATS, default="auto",
                   help="KV cache format (default auto: k5v3, or int4 for models with k_norm; "
                        "fp16 = mlx-lm's own caches)")
    p.add_argument("--kv-window", type=int, default=128,
                   help="most recent tokens kept in full precision (default 128)")
    p.add_argument("--kv-sinks", type=int, default=4,
                   help="first tokens kept in full precision (default 4)")
    p.add_argument("--rotate-keys", action=argparse.BooleanOptionalAction, default=None,
                   help="Hadamard-rotate keys (default: on for 4-bit keys when the head dim allows)")
    p.add_argument("--center-keys", action=argparse.BooleanOptionalAction, default=None,
                   help="subtract a per-channel key mean before quantizing (default on)")
    p.add_argument("--kv-channel-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel key scaling before rotation (default: on for 4-bit "
                        "keys of models with k_norm, such as Gemma 3, else off)")
    p.add_argument("--kv-k8-layers", default="",
                   help="comma-separated layer indices that store 8-bit keys")
    p.add_argument("--max-kv-size", type=int, default=None,
                   help="sliding window: keep at most this many tokens per request")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="reject prompts longer than this (mlx-lm's error response)")
    p.add_argument("--numpy-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="matrix products of many rows (prompt chunks, large batches) through "
                        "numpy's BLAS (default: on for the bundled model on the CPU, where "
                        "MLX's own are slow; as tqmetal generate)")
    return p


def _cache_config(ns, group_size: int) -> CacheConfig:
    for name in ("kv_window", "kv_sinks"):
        if getattr(ns, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if ns.max_kv_size is not None and ns.max_kv_size <= ns.kv_sinks:
        raise ValueError("--max-kv-size must be larger than --kv-sinks")
    if ns.kv != "fp16" and group_size not in (16, 32, 64, 128):
        raise ValueError(f"--kv-group-size must be 16, 32, 64 or 128 for --kv {ns.kv}, "
                         f"got {group_size}")
    try:
        k8 = tuple(int(i) for i in ns.kv_k8_layers.split(",") if i.strip())
    except ValueError:
        raise ValueError(f"--kv-k8-layers: expected comma-separated integers, got "
                         f"{ns.kv_k8_layers!r}") from None
    return CacheConfig(
        kv=ns.kv, group_size=group_size, window=ns.kv_window, sinks=ns.kv_sinks,
        rotate_keys=ns.rotate_keys, center_keys=ns.center_keys,
        channel_scale=ns.kv_channel_scale, k8_layers=k8, max_kv_size=ns.max_kv_size,
    )


def _load(model_path, adapter_path=None, tokenizer_config=None, return_config=False,
          numpy_prefill=False, **kwargs):
    """``mlx_lm.load`` that also takes a .gguf file (tqmetal.gguf); with
    ``numpy_prefill`` the model's matrix products of many rows go through numpy's
    BLAS (:func:`tqmetal.blas.numpy_matmuls`, as ``tqmetal generate`` does on the CPU)."""
    out = _load_model(model_path, adapter_path, tokenizer_config, return_config, **kwargs)
    if numpy_prefill:
        from .blas import numpy_matmuls

        numpy_matmuls(out[0], embedding_as_linear=False)
    return out


def _is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def _numpy_prefill_off(why: str):
    print(f"tqmetal serve: --numpy-prefill is off: {why}", file=sys.stderr)


def _load_model(model_path, adapter_path, tokenizer_config, return_config, **kwargs):
    if _is_gguf(model_path):
        if adapter_path is not None:
            raise ValueError("adapters are not supported for .gguf models")
        from .gguf import load_gguf

        model, tokenizer = load_gguf(model_path)
        chat_template = (tokenizer_config or {}).get("chat_template")
        if chat_template:
            tokenizer._tokenizer.chat_template = chat_template
        return (model, tokenizer, {}) if return_config else (model, tokenizer)
    from mlx_lm import load

    return load(model_path, adapter_path=adapter_path, tokenizer_config=tokenizer_config,
                return_config=return_config, **kwargs)


def _sharded_load(repo, pipeline_group=None, tensor_group=None, return_config=False, *,
                  original=None, numpy_prefill=False, **kwargs):
    """``mlx_lm.utils.sharded_load`` (mlx_lm.server under ``mlx.launch``) that also takes
    a .gguf file: each rank loads it whole and keeps its part (tqmetal.distributed:
    mlx-lm's tensor-parallel ``shard`` where the KV heads divide, else a pipeline)."""
    if not _is_gguf(repo):
        if numpy_prefill:
            _numpy_prefill_off("mlx-lm's sharded loader serves this model as it is")
        return original(repo, pipeline_group, tensor_group, return_config, **kwargs)
    import mlx.core as mx

    from .distributed import shard_model

    model, tokenizer = _load_model(repo, None, kwargs.get("tokenizer_config"), False)
    group = pipeline_group or tensor_group
    pipelined = False
    if group is not None:
        shard_model(model, group, "pipeline" if pipeline_group is not None else "auto")
        mx.eval(model.parameters())
        pipelined = getattr(getattr(model, "model", None), "pipeline_group", None) is not None
    if numpy_prefill and (group is None or pipelined):
        # a tensor-parallel layer's all_sum lives in its linear layers: only a whole or
        # pipelined model's products may go to numpy
        from .blas import numpy_matmuls

        numpy_matmuls(model, embedding_as_linear=False)
    elif numpy_prefill:
        _numpy_prefill_off("a tensor-parallel layer's all_sum lives in its linear layers")
    return (model, tokenizer, {}) if return_config else (model, tokenizer)


def install(config: CacheConfig, max_prompt_tokens: Optional[int] = None,
            numpy_prefill: bool = False):
    """Swap tqmetal's caches, attention and GGUF loading into mlx_lm.server / generate.

    For servers started in-process (e.g. ``mlx_lm.server.run``); ``tqmetal serve``
    calls it before handing over to ``mlx_lm.server.main``.
    """
    mlg = importlib.import_module("mlx_lm.generate")  # mlx_lm.generate is also a function
    mls = importlib.import_module("mlx_lm.server")

    from .patch import patch_mlx_lm

    if config.kv != "fp16":  # fp16: mlx-lm's caches and attention, untouched
        patch_mlx_lm()
    mls.make_prompt_cache = config.make_prompt_cache
    mlg.make_prompt_cache = config.make_prompt_cache
    mls.load = functools.partial(_load, numpy_prefill=numpy_prefill)
    sharded = getattr(mls.sharded_load, "keywords", {}).get("original", mls.sharded_load)
    mls.sharded_load = functools.partial(_sharded_load, original=sharded,
                                         numpy_prefill=numpy_prefill)
    if max_prompt_tokens is not None:
        tokenize = mls.ResponseGenerator._tokenize
        if getattr(tokenize, "__wrapped_by_tqmetal__", False):
            tokenize = tokenize.__wrapped__

        def _tokenize(self, tokenizer, request, args):
            out = tokenize(self, tokenizer, request, args)
            if len(out[0]) > max_prompt_tokens:
                raise ValueError(f"the prompt has {len(out[0])} tokens, more than "
                                 f"--max-prompt-tokens={max_prompt_tokens}")
            return out

        _tokenize.__wrapped__ = tokenize
        _tokenize.__wrapped_by_tqmetal__ = True
        mls.ResponseGenerator._tokenize = _tokenize


def start_server(flags: Sequence[str] = (), log=None, launcher: Sequence[str] = (),
                 timeout: float = 300.0):
    """Start ``tqmetal serve`` with ``flags`` in a subprocess (own process group; under
    ``launcher``, e.g. ``["mlx.launch", ..., "--"]``, if given) on a free loopback port
    and wait until it answers ``/health``. Returns ``(process, port)``; output goes to
    the file object ``log``. For tests and benchmarks; :func:`stop_server` ends it."""
    import http.client
    import os
    import socket
    import subprocess
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [*launcher, sys.executable, "-m", "tqmetal.serve", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "INFO", *flags]
    proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tqmetal serve exited with {proc.returncode}")
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"tqmetal serve did not answer /health in {timeout:.0f} s")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.5)


def sse_payloads(response):
    """The JSON payloads of a streamed (server-sent events) HTTP response, up to
    ``data: [DONE]``. For tests and benchmarks that stream completions."""
    import json

    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def stop_server(proc, timeout: float = 60.0) -> None:
    """SIGTERM the server's process group (a launcher's ranks too), SIGKILL after ``timeout``."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue


def _has_flag(argv: List[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours = build_parser()
    import mlx_lm.server as mls

    if "-h" in argv or "--help" in argv:
        ours.print_help()
        print("\nmlx_lm.server's flags:\n")
        sys.argv = ["tqmetal serve", "--help"]
        try:
            mls.main()
        except SystemExit:
            pass
        return 0
    ns, rest = ours.parse_known_args(argv)
    numpy_prefill = ns.numpy_prefill
    if numpy_prefill is None:
        import mlx.core as mx

        numpy_prefill = not _has_flag(rest, "--model") and mx.default_device() == mx.cpu
    if not _has_flag(rest, "--model"):
        from .gguf import default_model_path

        try:
            rest = ["--model", str(default_model_path())] + rest
        except (FileNotFoundError, ImportError) as e:
            print(f"tqmetal serve: no --model and no default model: {e}", file=sys.stderr)
            return 2
    original_run = mls.run

    def run(host, port, model_provider, *a, **kw):
        args = model_provider.cli_args
        if args.kv_bits is not None and ns.kv != "fp16":
            raise SystemExit("tqmetal serve: --kv-bits is mlx-lm's own (unbatched) cache "
                             "quantization; use --kv int4|int8|k8v4 (or --kv fp16 with it)")
        try:
            config = _cache_config(ns, args.kv_group_size)
        except ValueError as e:
            raise SystemExit(f"tqmetal serve: {e}") from None
        install(config, ns.max_prompt_tokens, numpy_prefill)
        return original_run(host, port, model_provider, *a, **kw)

    mls.run = run
    sys.argv = ["tqmetal serve"] + rest
    try:
        mls.main()
    finally:
        mls.run = original_run
    return 0


if __name__ == "__main__":
    sys.exit(main())
