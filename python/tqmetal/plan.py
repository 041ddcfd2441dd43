# Copyright © 2025 tqmetal contributors.
"""`tqmetal plan`: which context fits in how much memory, with fp16 or int4 KV.

    tqmetal plan --model Llama-3.1-70B --memory 64GB
    tqmetal plan --model path/to/config.json --memory 48G --kv fp16,int8,int4,k8v4 --json

For each context length it prints the weights, the KV cache in each format,
the totals and which formats fit; then the largest context that fits for each.

Conventions (the defaults reproduce the published Llama-3.1-70B figures on a
64 GB Mac: KV at 128K = 40 GB fp16 against 12.5 GB int4 group 32, and about
236K tokens the most that fits with int4 KV and 4-bit weights):

* Sizes are binary. "64GB", "64GiB" and "64G" all mean 64 * 2**30 bytes, and
  printed "GB" means 2**30 bytes too: Mac RAM is sold in binary sizes (a
  "64GB" Mac has 64 GiB), and the published KV figures are binary (fp16 KV of
  Llama-3.1-70B at 128K is 40 * 2**30 bytes; it would be 42.9 decimal GB).
* Context lengths are binary: 128K = 131072 tokens (the model's 128K window).
* Budget = memory - reserve, reserve 4 GB by default for macOS and the
  activations/compute buffers; `--reserve 25%` instead models the GPU wired
  limit macOS sets by default on larger Macs (3/4 of RAM). The default needs
  that limit raised (the Mac note printed with the plan says how).
  How the candidates fare on 70B at 64 GB (int4 group 32, 4-bit weights with
  their g64 overhead, 36.96 GB): 64 GiB - 4 GiB -> 235.6K (the published
  ~236K); 64e9 bytes, no reserve -> 231.6K; 3/4 wired limit (48 GiB) ->
  112.7K; 7/8 (56 GiB) -> 194.7K. So binary units with a fixed 4 GB reserve
  are the defaults. (56 GiB with weights at a bare 0.5 B/param would also
  give ~237K, but that drops the scales and biases MLX stores.)
* Weights: params * bits/8, plus one float16 scale and one float16 bias per
  group of 64 weights (MLX affine quantization, mlx-lm's default group), on
  every Linear and on the embedding (and the output head when untied);
  norms and Linear biases stay float16. `--weight-bits 16` is plain float16.
  A config.json with a `quantization` entry supplies bits and group size.
* KV cache: 2 (K and V) * layers * kv_heads * head_dim * bytes/element per
  token. Quantized formats store per group of `--group-size` elements along
  head_dim one float16 scale and one float16 bias (int4 g32: 0.625 B/elem),
  and keep the first `--sinks` tokens and the last `--window` tokens float16.
  k8v4 is int8 keys with int4 values; k5v3 (5-bit keys, 3-bit values, the
  default cache for models without k_norm) takes int4's bytes.
* Sliding-window layers hold at most their window: Gemma-2 alternates layers
  with a 4096-token window and global layers, so past 4096 tokens only half
  its layers grow. mlx-lm 0.32's gemma2 keeps full caches on every layer;
  `--no-sliding-window` plans for that.
* Total = weights + KV cache; a format fits when the total is within the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Optional

GB = 2**30  # binary, see the module docstring
MB = 2**20
TOKENS_K = 1024

DEFAULT_RESERVE = "4GB"
DEFAULT_CONTEXTS = "8K,16K,32K,64K,128K,256K"
DEFAULT_KV = "fp16,int4"
WEIGHT_GROUP_SIZE = 64
KV_GROUP_SIZES = (16, 32, 64, 128)
WEIGHT_BITS = (2, 3, 4, 5, 6, 8, 16)

# KV format -> (key bits, value bits); 16 is float16.
KV_FORMATS = {"fp16": (16, 16), "int8": (8, 8), "int4": (4, 4), "k5v3": (5, 3), "k8v4": (8, 4),
              "k4v8": (4, 8)}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only transformer."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q, k, v projections
    norms_per_layer: int = 2  # Gemma-2 has 4
    num_experts: int = 1  # MoE: experts per layer, each a full MLP
    sliding_window: Optional[int] = None
    sliding_layers: tuple = ()  # per layer: True where the cache is windowed
    max_context: Optional[int] = None  # max_position_embeddings
    weight_bits: Optional[int] = None  # from config.json `quantization`
    weight_group_size: Optional[int] = None
    weight_mode: str = "affine"


def _alternating(num_layers: int) -> tuple:
    # Gemma-2 (HF): even layers use the sliding window, odd layers are global.
    return tuple(i % 2 == 0 for i in range(num_layers))


# Published config.json values of the real models.
PRESETS = {
    "Llama-3.1-8B": ModelShape(
        "Llama-3.1-8B", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
        head_dim=128, vocab_size=128256, intermediate_size=14336, max_context=131072),
    "Llama-3.1-70B": ModelShape(
        "Llama-3.1-70B", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
        head_dim=128, vocab_size=128256, intermediate_size=28672, max_context=131072),
    "Qwen2.5-7B": ModelShape(
        "Qwen2.5-7B", num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4,
        head_dim=128, vocab_size=152064, intermediate_size=18944, qkv_bias=True,
        max_context=131072),
    "Qwen2.5-32B": ModelShape(
        "Qwen2.5-32B", num_layers=64, hidden_size=5120, num_heads=40, num_kv_heads=8,
        head_dim=128, vocab_size=152064, intermediate_size=27648, qkv_bias=True,
        max_context=131072),
    "Gemma-2-9B": ModelShape(
        "Gemma-2-9B", num_layers=42, hidden_size=3584, num_heads=16, num_kv_heads=8,
        head_dim=256, vocab_size=256000, intermediate_size=14336, tie_embeddings=True,
        norms_per_layer=4, sliding_window=4096, sliding_layers=_alternating(42),
        max_context=8192),
    "SmolLM2-135M": ModelShape(
        "SmolLM2-135M", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3,
        head_dim=64, vocab_size=49152, intermediate_size=1536, tie_embeddings=True,
        max_context=8192),
}


# ---------------------------------------------------------------------------
# Parsing


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str) -> int:
    """'64GB', '64GiB', '48G', '512MB', '1.5T' -> bytes; all units are binary."""
    m = _SIZE_RE.match(str(text))
    if not m or (not m.group(2) and not m.group(3)):
        raise ValueError(
            f"malformed memory size {text!r}: use a number and a unit, e.g. 64GB, 64GiB, 48G "
            "(units are binary: GB = GiB = 2**30 bytes)")
    if m.group(3) and m.group(3).lower() == "ib" and not m.group(2):
        raise ValueError(f"malformed memory size {text!r}: 'iB' needs a prefix, e.g. GiB")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value)


def parse_reserve(text: str, memory: int) -> int:
    """'4GB' -> bytes; '25%' -> that share of `memory`."""
    t = str(text).strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise ValueError(f"malformed reserve {text!r}: use a size (4GB) or a percentage (25%)")
        if not 0 <= pct < 100:
            raise ValueError(f"reserve {text!r} must be a percentage in [0, 100)")
        return int(memory * pct / 100)
    if re.fullmatch(r"0+(\.0*)?", t):
        return 0
    return parse_memory(t)


_CTX_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([km]?)\s*$", re.IGNORECASE)


def parse_context(text: str) -> int:
    """'8K' -> 8192, '128K' -> 131072, '1M' -> 1048576, '4000' -> 4000 tokens."""
    m = _CTX_RE.match(str(text))
    if not m:
        raise ValueError(f"malformed context length {text!r}: use e.g. 8K, 128K, 1M or 4000")
    n = float(m.group(1)) * {"": 1, "k": TOKENS_K, "m": TOKENS_K**2}[m.group(2).lower()]
    if n < 1 or n != int(n):
        raise ValueError(f"context length {text!r} must be a whole number of tokens >= 1")
    return int(n)


def parse_contexts(text: str) -> list:
    items = [s for s in str(text).split(",") if s.strip()]
    if not items:
        raise ValueError("no context lengths given: use e.g. 8K,32K,128K")
    return [parse_context(s) for s in items]


def parse_kv_formats(text: str) -> list:
    names = [s.strip().lower() for s in str(text).split(",") if s.strip()]
    if not names:
        raise ValueError(f"no KV format given: choose from {', '.join(KV_FORMATS)}")
    for n in names:
        if n not in KV_FORMATS:
            raise ValueError(f"unknown KV format {n!r}: choose from {', '.join(KV_FORMATS)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------
# Model shapes


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def shape_from_config(cfg: dict, name: str = "config.json") -> ModelShape:
    """A ModelShape from an mlx-lm / Hugging Face config.json dict."""
    quant = cfg.get("quantization") or cfg.get("quantization_config")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers
        cfg = {**cfg, **cfg["text_config"]}
    try:
        layers = int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers"))
        hidden = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
        heads = int(_get(cfg, "num_attention_heads", "n_head"))
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{name}: needs num_hidden_layers, hidden_size, num_attention_heads and "
            f"vocab_size ({e!r} missing or not a number)") from None
    kv_heads = int(_get(cfg, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_get(cfg, "head_dim", default=hidden // heads))
    inter = int(_get(cfg, "intermediate_size", "moe_intermediate_size", default=4 * hidden))
    model_type = str(cfg.get("model_type", ""))
    experts = int(_get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=1))

    window = cfg.get("sliding_window")
    sliding: tuple = ()
    if cfg.get("layer_types"):
        sliding = tuple(str(t) == "sliding_attention" for t in cfg["layer_types"][:layers])
    elif window and model_type == "gemma2":
        sliding = _alternating(layers)
    elif window and model_type.startswith("gemma3"):
        pattern = int(cfg.get("sliding_window_pattern", 6))
        sliding = tuple(i % pattern != pattern - 1 for i in range(layers))
    elif window and model_type == "mistral":
        sliding = (True,) * layers
    if not any(sliding):
        window, sliding = None, ()

    bits = group = None
    mode = "affine"
    if isinstance(quant, dict) and "bits" in quant:
        bits = int(quant["bits"])
        group = int(quant.get("group_size", WEIGHT_GROUP_SIZE))
        mode = str(quant.get("mode", "affine"))
    for field_name, v in (("num_hidden_layers", layers), ("hidden_size", hidden),
                          ("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                          ("head_dim", head_dim), ("vocab_size", vocab)):
        if v <= 0:
            raise ValueError(f"{name}: {field_name} must be positive, got {v}")
    return ModelShape(
        name=name, num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, intermediate_size=inter,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
        num_experts=max(1, experts), sliding_window=int(window) if window else None,
        sliding_layers=sliding, max_context=_get(cfg, "max_position_embeddings"),
        weight_bits=bits, weight_group_size=group, weight_mode=mode)


def load_shape(model: str) -> ModelShape:
    """A preset name (case-insensitive), a config.json path, or a directory holding one."""
    for key, shape in PRESETS.items():
        if key.lower() == str(model).lower():
            return shape
    path = model
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: expected a JSON object")
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        return shape_from_config(cfg, name)
    raise ValueError(
        f"unknown model {model!r}: give a config.json path or one of the presets: "
        + ", ".join(PRESETS))


# ---------------------------------------------------------------------------
# Sizes


def param_counts(shape: ModelShape) -> tuple:
    """(quantizable, float16) parameter counts: Linear and embedding weights, and
    the norms and Linear biases that stay float16."""
    h, hd = shape.hidden_size, shape.head_dim
    q_out, kv_out = shape.num_heads * hd, shape.num_kv_heads * hd
    attn = h * q_out + 2 * h * kv_out + q_out * h
    mlp = 3 * h * shape.intermediate_size * shape.num_experts
    router = h * shape.num_experts if shape.num_experts > 1 else 0
    embed = shape.vocab_size * h * (1 if shape.tie_embeddings else 2)
    linear = shape.num_layers * (attn + mlp + router) + embed
    bias = (q_out + 2 * kv_out) if shape.qkv_bias else 0
    small = shape.num_layers * (shape.norms_per_layer * h + bias) + h  # + final norm
    return linear, small


def num_params(shape: ModelShape) -> int:
    return sum(param_counts(shape))


def weight_bytes(shape: ModelShape, bits: int = 4, group_size: int = WEIGHT_GROUP_SIZE,
                 mode: str = "affine") -> int:
    """Bytes of the weights at `bits` (16 = float16): packed weights plus, per group
    of `group_size`, a float16 scale and bias (affine) or one 8-bit scale (mx/nv fp)."""
    linear, small = param_counts(shape)
    if bits >= 16:
        return 2 * (linear + small)
    per_group = 4 if mode == "affine" else 1
    return math.ceil(linear * bits / 8) + math.ceil(linear / group_size) * per_group + 2 * small


def _kv_layer_token_bytes(shape: ModelShape, bits: int, group_size: int) -> int:
    """Bytes of one token's K (or V) in one layer."""
    n = shape.num_kv_heads * shape.head_dim
    if bits >= 16:
        return 2 * n
    return n * bits // 8 + (n // group_size) * 4


def kv_bytes_per_token(shape: ModelShape, fmt: str = "fp16", group_size: int = 32) -> int:
    """2 * layers * kv_heads * head_dim * bytes/element: every layer, no window."""
    kb, vb = KV_FORMATS[fmt]
    return shape.num_layers * (_kv_layer_token_bytes(shape, kb, group_size)
                               + _kv_layer_token_bytes(shape, vb, group_size))


def check_kv_group_size(shape: ModelShape, group_size: int) -> None:
    if group_size not in KV_GROUP_SIZES:
        raise ValueError(f"KV group size {group_size} not supported: use one of "
                         + ", ".join(map(str, KV_GROUP_SIZES)))
    if shape.head_dim % group_size:
        raise ValueError(f"KV group size {group_size} does not divide {shape.name}'s "
                         f"head_dim {shape.head_dim} (groups run along head_dim)")


# tqmetal.cache.FP_WINDOWS (not imported: the planner runs without MLX)
FP_WINDOWS = 1024


def kv_cache_bytes(shape: ModelShape, context: int, fmt: str = "int4", group_size: int = 32,
                   window: int = 128, sinks: int = 4, sliding: bool = True) -> int:
    """KV cache bytes at `context` tokens. Quantized formats keep the first `sinks`
    and the last `window` tokens float16; sliding-window layers hold at most their
    window (unless `sliding` is False), all of it float16 when the window is at most
    `FP_WINDOWS` tokens (as tqmetal.cache.make_prompt_cache keeps them: Gemma 3)."""
    kb, vb = KV_FORMATS[fmt]
    fp = _kv_layer_token_bytes(shape, 16, group_size) * 2
    qt = _kv_layer_token_bytes(shape, kb, group_size) + _kv_layer_token_bytes(shape, vb, group_size)
    keep = 0 if fmt == "fp16" else sinks + window
    total = 0
    windowed = shape.sliding_layers if (sliding and shape.sliding_window) else ()
    for layer in range(shape.num_layers):
        n = context
        if layer < len(windowed) and windowed[layer]:
            n = min(context, shape.sliding_window)
            if shape.sliding_window <= FP_WINDOWS:
                total += n * fp
                continue
        f = min(n, keep)
        total += f * fp + (n - f) * qt
    return total


def max_context(shape: ModelShape, budget: int, weights: int, fmt: str, group_size: int = 32,
                window: int = 128, sinks: int = 4, sliding: bool = True,
                limit: int = 2**40) -> Optional[int]:
    """Largest context whose weights + KV fit in `budget`; 0 if the weights alone do
    not fit, None if the cache stops growing (every layer windowed) before `limit`."""
    def fits(n):
        return weights + kv_cache_bytes(shape, n, fmt, group_size, window, sinks, sliding) <= budget

    if not fits(1):
        return 0
    if fits(limit):
        return None
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------
# The macOS GPU wired-memory limit


def default_wired_limit(memory: int) -> int:
    """macOS's default GPU wired limit: about 2/3 of RAM up to 36 GB, 3/4 above."""
    return memory * 2 // 3 if memory <= 36 * GB else memory * 3 // 4


def _sysctl(name: str) -> Optional[int]:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def wired_limit_info(memory: int, needed: int, system: Optional[str] = None,
                     sysctl=None) -> dict:
    """The GPU wired limit for a Mac of `memory` bytes and the sysctl that lets the
    GPU wire `needed` bytes; on a Mac also this host's current setting."""
    system = platform.system() if system is None else system
    sysctl = sysctl or _sysctl
    default = default_wired_limit(memory)
    raise_mb = -(-needed // MB)
    info = {
        "default_bytes": default,
        "default_rule": "2/3 of RAM" if memory <= 36 * GB else "3/4 of RAM",
        "needed_bytes": needed,
        "needs_raise": needed > default,
        "raise_command": f"sudo sysctl iogpu.wired_limit_mb={raise_mb}",
        "on_mac": system == "Darwin",
    }
    if system == "Darwin":
        host_mem = sysctl("hw.memsize")
        limit_mb = sysctl("iogpu.wired_limit_mb")
        info["host_memory_bytes"] = host_mem
        info["host_wired_limit_mb"] = limit_mb  # 0: the default applies
        if host_mem:
            info["host_wired_limit_bytes"] = (limit_mb * MB if limit_mb
                                              else default_wired_limit(host_mem))
    return info


# ---------------------------------------------------------------------------
# The plan


def plan(shape: ModelShape, memory: int, *, weight_bits: Optional[int] = None,
         weight_group_size: Optional[int] = None, kv_formats=("fp16", "int4"),
         group_size: int = 32, window: int = 128, sinks: int = 4, contexts=None,
         reserve: int = 4 * GB, sliding: bool = True, system: Optional[str] = None,
         sysctl=None) -> dict:
    """Everything `tqmetal plan` prints, as a JSON-ready dict (sizes in bytes)."""
    contexts = list(contexts or parse_contexts(DEFAULT_CONTEXTS))
    check_kv_group_size(shape, group_size)
    if window < 0 or sinks < 0:
        raise ValueError("window and sinks must be >= 0")
    if reserve >= memory:
        raise ValueError("reserve must be smaller than memory")
    bits = weight_bits or shape.weight_bits or 4
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits {bits} not supported: use one of "
                         + ", ".join(map(str, WEIGHT_BITS)))
    wgroup = weight_group_size or (shape.weight_group_size if not weight_bits else None) \
        or WEIGHT_GROUP_SIZE
    mode = shape.weight_mode if not weight_bits else "affine"
    budget = memory - reserve
    weights = weight_bytes(shape, bits, wgroup, mode)
    kw = dict(group_size=group_size, window=window, sinks=sinks, sliding=sliding)

    rows = []
    for n in contexts:
        kv = {f: kv_cache_bytes(shape, n, f, **kw) for f in kv_formats}
        total = {f: weights + b for f, b in kv.items()}
        rows.append({"context": n, "weights": weights, "kv": kv, "total": total,
                     "fits": {f: t <= budget for f, t in total.items()}})
    largest = {f: max_context(shape, budget, weights, f, **kw) for f in kv_formats}
    return {
        "model": {**asdict(shape), "sliding_layers": sum(shape.sliding_layers),
                  "params": num_params(shape)},
        "memory": memory, "reserve": reserve, "budget": budget,
        "weight_bits": bits, "weight_group_size": None if bits >= 16 else wgroup,
        "weight_mode": None if bits >= 16 else mode, "weights": weights,
        "kv_formats": list(kv_formats), "kv_group_size": group_size,
        "window": window, "sinks": sinks, "sliding_window_applied": sliding,
        "kv_bytes_per_token": {f: kv_bytes_per_token(shape, f, group_size) for f in kv_formats},
        "rows": rows, "max_context": largest,
        "units": {"GB": GB, "K_tokens": TOKENS_K},
        "gpu_wired_limit": wired_limit_info(memory, budget, system, sysctl),
    }


def fmt_bytes(n: float) -> str:
    if n >= 10 * GB:
        return f"{n / GB:.1f} GB"
    if n >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / MB:.0f} MB"


def fmt_tokens(n: int) -> str:
    if n >= TOKENS_K and n % TOKENS_K == 0:
        return f"{n // TOKENS_K}K"
    return f"{n / TOKENS_K:.1f}K" if n >= TOKENS_K else str(n)


def format_plan(p: dict) -> str:
    m = p["model"]
    out = []
    windowed = ""
    if m["sliding_window"] and m["sliding_layers"]:
        state = "capped" if p["sliding_window_applied"] else "NOT capped (--no-sliding-window)"
        windowed = (f", {m['sliding_layers']} of them with a {m['sliding_window']}-token "
                    f"sliding window, {state}")
    out.append(f"{m['name']}: {m['params'] / 1e9:.2f}B params, {m['num_layers']} layers"
               f"{windowed}, {m['num_kv_heads']} KV heads x head_dim {m['head_dim']}")
    if p["weight_bits"] >= 16:
        wdesc = "16-bit (float16)"
    else:
        wdesc = (f"{p['weight_bits']}-bit + {p['weight_mode']} scales/biases per group of "
                 f"{p['weight_group_size']}")
    out.append(f"weights: {wdesc} = {fmt_bytes(p['weights'])}")
    out.append(f"memory {fmt_bytes(p['memory'])} - reserve {fmt_bytes(p['reserve'])} "
               f"= budget {fmt_bytes(p['budget'])}   (GB = 2^30 bytes, K = 1024 tokens)")
    quant = [f for f in p["kv_formats"] if f != "fp16"]
    if quant:
        out.append(f"quantized KV: group {p['kv_group_size']}, first {p['sinks']} + last "
                   f"{p['window']} tokens kept fp16")
    per_tok = ", ".join(f"{f} {b / TOKENS_K:.1f} KB" for f, b in p["kv_bytes_per_token"].items())
    out.append(f"KV per token (every layer, before windows): {per_tok}")
    out.append("")

    head = ["context", "weights"] + [f"{f} KV" for f in p["kv_formats"]] \
        + [f"{f} total" for f in p["kv_formats"]] + ["fits"]
    body = []
    for r in p["rows"]:
        fits = [f for f in p["kv_formats"] if r["fits"][f]]
        body.append([fmt_tokens(r["context"]), fmt_bytes(r["weights"])]
                    + [fmt_bytes(r["kv"][f]) for f in p["kv_formats"]]
                    + [fmt_bytes(r["total"][f]) for f in p["kv_formats"]]
                    + [", ".join(fits) if fits else "none"])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    for row in [head] + body:
        cells = [c.rjust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]
        out.append("  ".join(cells).rstrip())
    out.append("")

    out.append(f"largest context that fits in {fmt_bytes(p['budget'])}:")
    max_pos = m["max_context"]
    for f, n in p["max_context"].items():
        if n is None:
            text = "unbounded (every layer's cache is windowed)"
        elif n == 0:
            text = "none: the weights alone exceed the budget"
        else:
            text = f"~{round(n / TOKENS_K)}K ({n:,} tokens)"
            if max_pos and n > max_pos:
                text += f", beyond the model's {fmt_tokens(max_pos)} max_position_embeddings"
        out.append(f"  {f:>5} KV: {text}")
    out.append("")
    out.extend(_wired_lines(p))
    return "\n".join(out)


def _wired_lines(p: dict) -> list:
    w = p["gpu_wired_limit"]
    mem = fmt_bytes(p["memory"])
    lines = []
    if w["on_mac"]:
        host = w.get("host_memory_bytes")
        if host:
            mb = w.get("host_wired_limit_mb")
            how = (f"iogpu.wired_limit_mb={mb}" if mb else
                   f"iogpu.wired_limit_mb=0: default, {'2/3' if host <= 36 * GB else '3/4'} of RAM")
            lines.append(f"this Mac: {fmt_bytes(host)} RAM; the GPU may wire "
                         f"{fmt_bytes(w['host_wired_limit_bytes'])} ({how})")
    else:
        lines.append("note: the GPU wired-memory limit below applies to Macs (Apple silicon), "
                     "not to this machine")
    lines.append(f"macOS lets the GPU wire {fmt_bytes(w['default_bytes'])} of a {mem} Mac by "
                 f"default ({w['default_rule']}, `sysctl iogpu.wired_limit_mb`, 0 = default)")
    if w["needs_raise"]:
        lines.append(f"this plan's budget is {fmt_bytes(w['needed_bytes'])}: raise the limit with "
                     f"`{w['raise_command']}` (until reboot), or plan within the default "
                     f"with --reserve {'33' if p['memory'] <= 36 * GB else '25'}%")
    else:
        lines.append("this plan's budget fits within that default")
    return lines


# ---------------------------------------------------------------------------
# CLI


def _arg(fn):
    def parse(text):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))
    parse.__name__ = fn.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tqmetal plan",
        description="Memory planner: weights + fp16/int8/int4 KV cache per context length, "
                    "and the largest context that fits. Sizes are binary (GB = GiB = 2^30 "
                    "bytes), 1K tokens = 1024.",
    )
    p.add_argument("--model", required=True,
                   help="a preset (" + ", ".join(PRESETS) + ") or an mlx-lm/HF config.json "
                        "path (or its directory)")
    p.add_argument("--memory", required=True, type=_arg(parse_memory),
                   help="unified memory, e.g. 64GB, 64GiB, 48G (all binary)")
    p.add_argument("--reserve", default=DEFAULT_RESERVE,
                   help="memory kept for macOS and activations: a size or a percentage "
                        f"(default {DEFAULT_RESERVE}; 25%% = macOS's default GPU wired limit on "
                        "Macs over 36 GB)")
    p.add_argument("--weight-bits", type=int, choices=WEIGHT_BITS, default=None,
                   help="weight bits (default: the config's quantization, else 4; 16 = float16)")
    p.add_argument("--weight-group-size", type=int, choices=(32, 64, 128), default=None,
                   help="weight quantization group "
                        f"(default: the config's, else {WEIGHT_GROUP_SIZE})")
    p.add_argument("--kv", type=_arg(parse_kv_formats), default=parse_kv_formats(DEFAULT_KV),
                   help=f"KV formats, comma-separated from {','.join(KV_FORMATS)} "
                        f"(default {DEFAULT_KV})")
    p.add_argument("--group-size", type=int, default=32, help="KV quantization group (default 32)")
    p.add_argument("--window", type=int, default=128,
                   help="recent tokens kept fp16 in quantized caches (default 128)")
    p.add_argument("--sinks", type=int, default=4,
                   help="first tokens kept fp16 in quantized caches (default 4)")
    p.add_argument("--contexts", type=_arg(parse_contexts),
                   default=parse_contexts(DEFAULT_CONTEXTS),
                   help=f"context lengths, comma-separated (default {DEFAULT_CONTEXTS})")
    p.add_argument("--no-sliding-window", action="store_true",
                   help="count full-length caches on sliding-window layers too "
                        "(what mlx-lm 0.32's gemma2 allocates)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        shape = load_shape(args.model)
        reserve = parse_reserve(args.reserve, args.memory)
        result = plan(shape, args.memory, weight_bits=args.weight_bits,
                      weight_group_size=args.weight_group_size, kv_formats=args.kv,
                      group_size=args.group_size, window=args.window, sinks=args.sinks,
                      contexts=args.contexts, reserve=reserve,
                      sliding=not args.no_sliding_window)
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
