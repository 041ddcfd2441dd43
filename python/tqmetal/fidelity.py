"""`tqmetal eval`: how far a quantized KV cache moves a real model's predictions.

    tqmetal eval                                        # SmolLM2-135M, 2048 tokens
    tqmetal eval --configs int4-g64,int4-g64-rot,k8v4,int8,mlx4-g64 --tokens 8192 \\
                 --json fidelity.json --plot kl.png

Two measurements, each against the reference cache (mlx-lm's ``KVCache`` in
the model's dtype: float32 on the CPU, float16 on the GPU; on the CPU its
attention is computed in float32 through numpy's BLAS, see
:class:`ReferenceKVCache`, because MLX's CPU attention takes tens of seconds
per 128-token chunk at 8K context):

* **Teacher-forced**: the same text (``tqmetal/data/*.txt``, original prose
  written for this project; ``--text`` for another file) is fed through the
  model in chunks of ``--chunk`` (128) tokens, as a prefill would, once with
  each cache. At every position: KL(reference || quantized) of the next-token
  distributions (nats/token; mean and 99.9th percentile), top-1 agreement
  (overall, and where the reference's top-2 log-probability margin is at least
  ``--margin`` nats, that is where the reference has a clear favourite), and
  the perplexity of the text under both.
* **Greedy**: from ``--gen-prompts`` prompts (slices of the text of
  ``--gen-prompt-tokens`` tokens), ``--gen-tokens`` (256) greedy tokens with
  each cache; the position of the first token that differs from the
  reference's (``--gen-tokens`` when none does).

The issue's targets are stated at 8192 tokens of context; the default is 2048
to keep a run short on a CPU (``--tokens 8192`` for the real thing: on a shared
2-core machine, 10 to 20 minutes per configuration and as much for the reference).

Config names (``--configs``, comma-separated): a format, then options joined by
``-``:

    int4 | int8 | k8v4 | k4v8      tqmetal.cache.Int4KVCache (K bits, V bits)
    k<a>v<b>                       the same with a-bit keys and b-bit values, any of
                                   mx.quantize's widths 2, 3, 4, 5, 6, 8 (k5v3: the
                                   default for models without k_norm)
    mlx4 | mlx8                    mlx-lm's QuantizedKVCache (everything quantized,
                                   no window or sinks), attended by the fused op
    fp16                           the reference cache itself (a sanity row)
    options:  g32 | g64 | g128     group size (default 64)
              w<N>                 recent-token window kept full precision (default 128)
              s<N>                 sink tokens kept full precision (default 4)
              rot | norot          Hadamard key rotation
    (every option defaults to off, unlike Int4KVCache, so that a name says what it
    measures: make_prompt_cache's default is ``k5v3-g64-rot-vrot-center-abq``, and
    ``int4-g64-rot-center-abq-chs-fpw`` for models with k_norm)
              vrot                 Hadamard value rotation
              center               key centering (Int4KVCache's center_keys)
              abq                  attend_before_quantizing: a chunk attends the
                                   tokens it quantizes in full precision
              abqg                 the same in the full-attention layers only (the
                                   sliding-window layers' cache did not have it
                                   before 2026-12-06)
              chs | chs<N>         per-channel key scaling before rotation
                                   (channel_scale), exponent 0.5 or N/100,
                                   factors from the first update's keys
              chsq | chsq<N>       the same with factors calibrated on queries and
                                   keys (calibrate_channel_scales) of held-out text:
                                   the tokens after the evaluated ones (else the
                                   text's first 512 tokens)
              fp<i>.<j>...         these layers keep a full-precision (float16) cache
              fpw | fpw<N>         the model's sliding-window layers of at most N
                                   tokens (fpw: 1024, make_prompt_cache's default
                                   fp_windows) keep a float16 cache, as
                                   make_prompt_cache does by default
              k8l<i>.<j>...        these layers store 8-bit keys

e.g. ``int4-g64``, ``int4-g64-rot``, ``int4-g32-w128``, ``int4-w0-s0``, ``k8v4``,
``mlx4-g64``, ``int4-rot-center-k8l0.1``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .blas import numpy_matmuls  # noqa: F401 (used by main and the bench scripts)
from .corpus import TEXT_KINDS, load_text, load_text_kind, tokenize_text
from .provenance import package_versions

# The default cache (k5v3-g64-rot-vrot-center-abq), int4 with what each part buys, and
# the baselines.
DEFAULT_CONFIGS = ("k5v3-g64-rot-vrot-center-abq,int4-g64-rot-center-abq,int4-g64-rot-center,"
                   "int4-g64-rot,k8v4-vrot-center-abq,int8,mlx4-g64")
DEFAULT_TOKENS = 2048
DEFAULT_CHUNK = 128
DEFAULT_MARGIN = 0.05

_FORMATS = {
    "int4": ("tq", 4, 4), "int8": ("tq", 8, 8), "k8v4": ("tq", 8, 4), "k4v8": ("tq", 4, 8),
    "mlx4": ("mlx", 4, 4), "mlx8": ("mlx", 8, 8), "fp16": ("fp", 16, 16),
}


def _bit_format(word: str):
    """("tq", k_bits, v_bits) for a name k<a>v<b> with mx.quantize widths, else None."""
    from .cache_storage import BIT_WIDTHS

    m = re.fullmatch(r"k(\d)v(\d)", word)
    if m and int(m[1]) in BIT_WIDTHS and int(m[2]) in BIT_WIDTHS:
        return ("tq", int(m[1]), int(m[2]))
    return None


# ---------------------------------------------------------------------------
# config names


@dataclass(frozen=True)
class CacheConfig:
    name: str
    kind: str  # "tq" (Int4KVCache), "mlx" (QuantizedKVCache), "fp" (KVCache)
    k_bits: int
    v_bits: int
    group_size: int = 64
    window: int = 128
    sinks: int = 4
    rotate_keys: bool = False
    rotate_values: bool = False
    center_keys: bool = False
    attend_before_quantizing: bool = False
    abq_global_only: bool = False  # abqg: not in the sliding-window layers
    channel_scale: float = 0.0  # the exponent alpha of channel_scale; 0: off
    calibrated_scale: bool = False  # chsq: factors from calibrate_channel_scales
    fp_layers: tuple = ()
    k8_layers: tuple = ()
    fp_windows: int = 0  # fpw: sliding-window layers of at most this many tokens stay fp16

    def make_cache(self, model):
        """One cache per layer, following the model's layout (sliding-window
        layers get sliding-window caches)."""
        from mlx_lm.models import cache as mlc

        from .cache import Int4KVCache, RotatingInt4KVCache

        layout = model_cache_layout(model)
        n = len(layout)
        if self.kind == "fp":
            return reference_cache(model)
        if self.kind == "mlx":
            # mlx-lm quantizes only full-attention layers: its
            # RotatingKVCache.to_quantized raises NotImplementedError, so a
            # sliding-window layer keeps an unquantized (float16) cache.
            return [mlc.QuantizedKVCache(group_size=self.group_size, bits=self.k_bits)
                    if w is None else ReferenceRotatingKVCache(w[0], w[1], mx.float16)
                    for w in layout]
        for i in self.fp_layers + self.k8_layers:
            if i >= n:
                raise ValueError(f"config {self.name!r}: layer {i} out of range ({n} layers)")
        given = (calibrated_key_scales(model, self.channel_scale) if self.calibrated_scale
                 else [None] * n)
        out = []
        for i, w in enumerate(layout):
            if i in self.fp_layers or (w is not None and w[0] <= self.fp_windows):
                out.append(ReferenceKVCache(mx.float16) if w is None else
                           ReferenceRotatingKVCache(w[0], w[1], mx.float16))
                continue
            opts = dict(group_size=self.group_size,
                        k_bits=8 if i in self.k8_layers else self.k_bits,
                        v_bits=self.v_bits, window=self.window,
                        rotate_keys=self.rotate_keys, rotate_values=self.rotate_values,
                        center_keys=self.center_keys,
                        attend_before_quantizing=self.attend_before_quantizing,
                        channel_scale=self.channel_scale > 0,
                        channel_scale_alpha=self.channel_scale or 0.5,
                        key_scales=given[i])
            if w is None:
                out.append(Int4KVCache(sinks=self.sinks, **opts))
            else:
                if self.abq_global_only:
                    opts["attend_before_quantizing"] = False
                out.append(RotatingInt4KVCache(w[0], w[1], **opts))
        return out


def parse_config(name: str) -> CacheConfig:
    """A :class:`CacheConfig` from a compact name (see the module docstring)."""
    text = name.strip().lower()
    parts = text.split("-")
    fmt = _FORMATS.get(parts[0]) or _bit_format(parts[0])
    if fmt is None:
        raise ValueError(f"config {name!r}: the format must be one of {', '.join(_FORMATS)} "
                         "or k<bits>v<bits> (bits 2, 3, 4, 5, 6, 8)")
    kind, k_bits, v_bits = fmt
    opts = {}
    for p in parts[1:]:
        key = None
        if p in ("rot", "norot"):
            key, val = "rotate_keys", p == "rot"
        elif p == "abqg":
            opts["abq_global_only"] = True
            key, val = "attend_before_quantizing", True
        elif p in ("vrot", "center", "abq"):
            key = {"vrot": "rotate_values", "center": "center_keys",
                   "abq": "attend_before_quantizing"}[p]
            val = True
        elif p.startswith("chs"):
            key, digits = "channel_scale", p[3:]
            if digits.startswith("q"):
                opts["calibrated_scale"] = True
                digits = digits[1:]
            if digits and not digits.isdigit():
                raise ValueError(f"config {name!r}: {p!r}: chs<N> means exponent N/100")
            val = int(digits) / 100 if digits else 0.5
            if not 0 < val <= 1:
                raise ValueError(f"config {name!r}: {p!r}: the exponent must be in (0, 1]")
        elif p.startswith("fpw"):
            from .cache import FP_WINDOWS

            digits = p[3:]
            if digits and not digits.isdigit():
                raise ValueError(f"config {name!r}: {p!r}: fpw<N> means windows of at most "
                                 "N tokens")
            key, val = "fp_windows", int(digits) if digits else FP_WINDOWS
        elif p.startswith(("fp", "k8l")):
            prefix = "fp" if p.startswith("fp") else "k8l"
            key = {"fp": "fp_layers", "k8l": "k8_layers"}[prefix]
            digits = p[len(prefix):]
            if not all(d.isdigit() for d in digits.split(".")):
                raise ValueError(f"config {name!r}: {p!r}: layer indices are dot-separated "
                                 "integers")
            val = tuple(sorted({int(d) for d in digits.split(".")}))
        elif len(p) > 1 and p[0] in "gws" and p[1:].isdigit():
            key = {"g": "group_size", "w": "window", "s": "sinks"}[p[0]]
            val = int(p[1:])
        if key is None:
            raise ValueError(f"config {name!r}: unknown option {p!r} (g32|g64|g128, w<N>, "
                             "s<N>, rot, norot, vrot, center, abq, abqg, chs[q][<N>], "
                             "fp<i>.<j>, fpw[<N>], k8l<i>.<j>)")
        if key in opts:
            raise ValueError(f"config {name!r}: {p!r} repeats an option")
        opts[key] = val
    if "group_size" in opts and opts["group_size"] not in (32, 64, 128):
        raise ValueError(f"config {name!r}: group size must be 32, 64 or 128")
    if kind == "fp" and opts:
        raise ValueError(f"config {name!r}: fp16 takes no options")
    if kind == "mlx" and opts.keys() - {"group_size"}:
        raise ValueError(f"config {name!r}: mlx-lm's QuantizedKVCache takes only a group size "
                         "(it has no window, sinks or rotation)")
    if kind == "fp":
        opts.update(window=0, sinks=0)
    return CacheConfig(name=text, kind=kind, k_bits=k_bits, v_bits=v_bits, **opts)


# Calibration text of the chsq configs: main() sets the tokens after the evaluated ones.
_CALIBRATION = {"tokens": None, "scales": {}}


def set_calibration_tokens(tokens: Optional[Sequence[int]]) -> None:
    _CALIBRATION["tokens"] = None if tokens is None else list(tokens)
    _CALIBRATION["scales"].clear()


def calibrated_key_scales(model, alpha: float) -> list:
    """``calibrate_channel_scales`` on the calibration tokens, once per model and alpha."""
    from .cache import calibrate_channel_scales

    if _CALIBRATION["tokens"] is None:
        raise ValueError("chsq configs need calibration tokens (set_calibration_tokens)")
    key = (id(model), alpha)
    if key not in _CALIBRATION["scales"]:
        _CALIBRATION["scales"][key] = (model, calibrate_channel_scales(
            model, _CALIBRATION["tokens"], alpha=alpha))
    return _CALIBRATION["scales"][key][1]


def parse_configs(text: str) -> List[CacheConfig]:
    out = [parse_config(n) for n in text.split(",") if n.strip()]
    if not out:
        raise ValueError("no configs given")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"configs repeat: {text!r}")
    return out


# ---------------------------------------------------------------------------
# metrics (on log-probabilities [..., V], float32)


def log_softmax(logits: mx.array) -> mx.array:
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def kl_divergence(ref_logp: mx.array, logp: mx.array) -> mx.array:
    """KL(ref || q) per row, in nats: sum p_ref (log p_ref - log q)."""
    return mx.maximum(mx.sum(mx.exp(ref_logp) * (ref_logp - logp), axis=-1), 0.0)


def top2_margin(logp: mx.array) -> mx.array:
    """log p(top-1) - log p(top-2) per row."""
    top = mx.topk(logp, 2, axis=-1)
    return mx.max(top, axis=-1) - mx.min(top, axis=-1)


def target_nll(logp: mx.array, targets: mx.array) -> mx.array:
    """-log p(target) per row; ``targets`` has one id per row."""
    return -mx.take_along_axis(logp, targets[..., None].astype(mx.int32), axis=-1)[..., 0]


def summarize(kl, ref_top1, top1, margin, ref_nll, nll, margin_threshold=DEFAULT_MARGIN) -> dict:
    """Summary metrics from per-position arrays (numpy or lists).

    ``ref_nll`` / ``nll`` cover the positions that have a next token (one fewer).
    """
    kl = np.asarray(kl, np.float64)
    agree = np.asarray(ref_top1) == np.asarray(top1)
    confident = np.asarray(margin, np.float64) >= margin_threshold
    ref_nll = np.asarray(ref_nll, np.float64)
    nll = np.asarray(nll, np.float64)
    return {
        "kl_mean": float(kl.mean()) if kl.size else float("nan"),
        "kl_p999": float(np.percentile(kl, 99.9)) if kl.size else float("nan"),
        "kl_max": float(kl.max()) if kl.size else float("nan"),
        "top1": float(agree.mean()) if agree.size else float("nan"),
        "top1_confident": float(agree[confident].mean()) if confident.any() else float("nan"),
        "confident_positions": int(confident.sum()),
        "ppl_ref": float(math.exp(ref_nll.mean())) if ref_nll.size else float("nan"),
        "ppl": float(math.exp(nll.mean())) if nll.size else float("nan"),
    }


def first_divergence(ref: Sequence[int], other: Sequence[int]) -> int:
    """Index of the first differing token; the common length when none differs."""
    n = min(len(ref), len(other))
    for i in range(n):
        if ref[i] != other[i]:
            return i
    return n


# ---------------------------------------------------------------------------
# the reference cache: mlx-lm's KVCache, attention through numpy


def numpy_attention(queries, keys, values, scale: float, causal: bool, mask=None):
    """Softmax attention in float32 through numpy's BLAS (GQA; bottom-right causal).

    ``mask``: instead of ``causal``, a boolean (True = attend) or additive array
    broadcastable to ``[B, H_q, L, N]`` (mlx-lm's sliding-window masks).
    """
    q = np.asarray(queries.astype(mx.float32))
    k = np.asarray(keys.astype(mx.float32))
    v = np.asarray(values.astype(mx.float32))
    B, Hq, L, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    q = q.reshape(B, Hkv, rep * L, D)  # query head h reads KV head h // rep
    s = (q @ k.transpose(0, 1, 3, 2)) * np.float32(scale)
    if mask is not None:
        m = np.asarray(mask)
        m = np.broadcast_to(m, (B, Hq, L, N)).reshape(B, Hkv, rep * L, N)
        if m.dtype == np.bool_:
            s = np.where(m, s, np.float32(-np.inf))
        else:
            s = s + m.astype(np.float32)
    elif causal and L > 1:
        allowed = np.arange(N)[None, :] <= np.arange(N - L, N)[:, None]  # [L, N]
        s = np.where(np.tile(allowed, (rep, 1)), s, np.float32(-np.inf))
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    out = (s @ v) / s.sum(axis=-1, keepdims=True)
    return mx.array(out.reshape(B, Hq, L, v.shape[-1])).astype(queries.dtype)


def _reference_cache_classes():
    from mlx_lm.models import cache as mlc

    class _NumpyAttention:
        """Attention through :func:`numpy_attention` (under :func:`tqmetal.patch.patched`);
        ``store_dtype`` float16 stores K/V rounded to float16."""

        def update_and_fetch(self, keys, values):
            if self.store_dtype is None:
                return super().update_and_fetch(keys, values)
            k, v = super().update_and_fetch(keys.astype(self.store_dtype),
                                            values.astype(self.store_dtype))
            return k.astype(keys.dtype), v.astype(values.dtype)

        def fused_attention(self, queries, keys, values, *, scale, mask=None, sinks=None):
            if sinks is not None:
                return None  # mlx-lm's own attention handles these
            if isinstance(mask, str) and mask != "causal":
                return None
            if isinstance(mask, mx.array):
                return numpy_attention(queries, keys, values, scale, False, mask=mask)
            return numpy_attention(queries, keys, values, scale, causal=mask == "causal")

    class ReferenceKVCache(_NumpyAttention, mlc.KVCache):
        """mlx-lm's ``KVCache`` whose attention (under :func:`tqmetal.patch.patched`)
        runs in float32 through numpy: the same function as MLX's CPU attention,
        ~50x faster on this kind of machine for 128-row chunks at long context.

        ``store_dtype``: None keeps the model's dtype (the reference); float16
        stores K/V rounded to float16 (a full-precision layer of a quantized
        configuration, as it would be on a float16 model).
        """

        def __init__(self, store_dtype=None):
            super().__init__()
            self.store_dtype = store_dtype

    class ReferenceRotatingKVCache(_NumpyAttention, mlc.RotatingKVCache):
        """mlx-lm's ``RotatingKVCache`` (a sliding-window layer) with the attention
        of :class:`ReferenceKVCache`; mlx-lm's window masks come as arrays."""

        def __init__(self, max_size, keep=0, store_dtype=None):
            super().__init__(max_size, keep=keep)
            self.store_dtype = store_dtype

    return ReferenceKVCache, ReferenceRotatingKVCache


def _reference_cache_class_cached():
    global _REFERENCE_CLASS
    if _REFERENCE_CLASS is None:
        _REFERENCE_CLASS = _reference_cache_classes()
    return _REFERENCE_CLASS[0]


def ReferenceKVCache(store_dtype=None):
    """See ``_reference_cache_classes``; built on first use so importing this module stays cheap."""
    return _reference_cache_class_cached()(store_dtype)


def ReferenceRotatingKVCache(max_size, keep=0, store_dtype=None):
    """See ``_reference_cache_classes``."""
    _reference_cache_class_cached()
    return _REFERENCE_CLASS[1](max_size, keep, store_dtype)


def model_cache_layout(model) -> list:
    """Per layer, None (full attention) or (max_size, keep) of a sliding window,
    from the model's own ``make_cache()`` (mlx-lm's layout: Gemma 3 slides five
    layers of six)."""
    from mlx_lm.models import cache as mlc

    base = model.make_cache() if hasattr(model, "make_cache") else None
    if base is None:
        return [None] * len(model.layers)
    out = []
    for c in base:
        if type(c) is mlc.RotatingKVCache:
            out.append((c.max_size, c.keep))
        elif type(c) is mlc.KVCache:
            out.append(None)
        else:
            raise ValueError(f"tqmetal eval: unsupported layer cache {type(c).__name__}")
    return out


def reference_cache(model, store_dtype=None) -> list:
    """The reference cache for ``model``: :class:`ReferenceKVCache` per full-attention
    layer, :class:`ReferenceRotatingKVCache` per sliding-window layer."""
    return [ReferenceKVCache(store_dtype) if w is None else
            ReferenceRotatingKVCache(w[0], w[1], store_dtype)
            for w in model_cache_layout(model)]


_REFERENCE_CLASS = None


# ---------------------------------------------------------------------------
# the measurements


def _eval_cache(cache):
    state = []
    for c in cache:
        s = c.state
        state.append([x for x in _leaves(s)])
    mx.eval(state)


def _leaves(tree):
    if isinstance(tree, mx.array):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _leaves(t)


_STRIDE_MODELS = ("llama", "gemma3_text")


def _logits(model, x, cache, rows=None):
    """Logits [L, V] of a chunk; with ``rows`` only those positions go through the
    output layer (the body still runs on every position, filling the cache)."""
    if rows is None:
        return model(x, cache=cache)[0]
    h = model.model(x, cache=cache)[0][rows]
    if "lm_head" in model:
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)


def teacher_forced(model, tokens: Sequence[int], configs: Sequence[CacheConfig],
                   chunk: int = DEFAULT_CHUNK, progress=None, checkpoint=None,
                   checkpoint_every: int = 8, stride: int = 1) -> dict:
    """Per-position metrics of every config against the reference cache.

    Returns ``{"ref": {"top1", "margin", "nll"}, name: {"kl", "top1", "nll"}, ...}``
    as numpy arrays; ``nll[t]`` is for token ``t + 1`` (so one fewer).
    ``checkpoint(partial)`` is called every ``checkpoint_every`` chunks with the
    result so far (long runs keep what they measured if stopped).

    ``stride`` > 1 measures every stride-th position only (positions p with
    p % stride == stride - 1; the arrays then hold those positions): the whole
    text still goes through every cache, but only the measured positions go
    through the output layer, which on a large vocabulary (Gemma 3: 262144) is
    most of a CPU run's time. An unbiased sample of the per-position metrics
    (the 99.9th percentile rests on fewer positions).
    """
    toks = mx.array(list(tokens), dtype=mx.int32)
    T = toks.shape[0]
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if stride > 1 and getattr(model, "model_type", None) not in _STRIDE_MODELS:
        raise ValueError(f"stride > 1 supports model types {_STRIDE_MODELS} (their output "
                         "layer is the last step)")
    ref_cache = reference_cache(model)
    caches = {c.name: c.make_cache(model) for c in configs}
    out = {"ref": {"top1": [], "margin": [], "nll": []}}
    for c in configs:
        out[c.name] = {"kl": [], "top1": [], "nll": []}
    for start in range(0, T, chunk):
        x = toks[start:start + chunk][None]
        L = x.shape[1]
        if stride == 1:
            rows, pos = None, np.arange(start, start + L)
        else:
            pos = np.arange(start, start + L)
            pos = pos[pos % stride == stride - 1]
            rows = mx.array(pos - start, dtype=mx.int32)
        has_next = pos[pos + 1 < T]
        nxt = toks[mx.array(has_next + 1, dtype=mx.int32)] if has_next.size else None
        m = has_next.size
        if pos.size == 0:  # nothing measured in this chunk: just advance the caches
            for cache in [ref_cache] + [caches[c.name] for c in configs]:
                mx.eval(model.model(x, cache=cache))
                _eval_cache(cache)
            continue
        ref_lp = log_softmax(_logits(model, x, ref_cache, rows))
        r = {"top1": mx.argmax(ref_lp, axis=-1), "margin": top2_margin(ref_lp)}
        if m:
            r["nll"] = target_nll(ref_lp[:m], nxt)
        mx.eval(r, ref_lp)
        _eval_cache(ref_cache)
        for k, v in r.items():
            out["ref"][k].append(np.array(v))
        for c in configs:
            lp = log_softmax(_logits(model, x, caches[c.name], rows))
            q = {"kl": kl_divergence(ref_lp, lp), "top1": mx.argmax(lp, axis=-1)}
            if m:
                q["nll"] = target_nll(lp[:m], nxt)
            mx.eval(q)
            _eval_cache(caches[c.name])
            for k, v in q.items():
                out[c.name][k].append(np.array(v))
        if progress is not None:
            progress(min(start + chunk, T), T)
        last = start + chunk >= T
        if checkpoint is not None and not last and (start // chunk + 1) % checkpoint_every == 0:
            checkpoint(_collect(out, caches, ref_cache))
    return _collect(out, caches, ref_cache)


def _collect(out, caches, ref_cache):
    result = {name: {k: np.concatenate(v) for k, v in d.items()} for name, d in out.items()}
    result["_caches"] = caches
    result["_ref_dtype"] = str(ref_cache[0].keys.dtype).replace("mlx.core.", "")
    return result


def key_sensitivity(model, tokens: Sequence[int], group_size: int = 64, bits: int = 4,
                    chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Per layer: how much quantizing that layer's keys moves its attention output.

    One reference pass over ``tokens`` (teacher-forced, in chunks); at every
    layer and chunk the attention is also computed on the layer's keys as
    Int4KVCache stores them with rotation and centering but no window or sinks
    (``bits``-bit, ``group_size``), values exact. Returns, per layer, the
    summed squared error of the attention output over its summed squared norm.
    A cheap proxy (one pass instead of one run per layer) for choosing which
    layers get 8-bit keys (``k8_layers``).
    """
    from .cache import Int4KVCache

    err = np.zeros(len(model.layers))
    norm = np.zeros(len(model.layers))
    probes = []

    class Probe(_reference_cache_class_cached()):
        def fused_attention(self, queries, keys, values, *, scale, mask=None, sinks=None):
            out = super().fused_attention(queries, keys, values, scale=scale, mask=mask,
                                          sinks=sinks)
            if out is None:
                return None
            # attend_before_quantizing off: with it (Int4KVCache's default) the update
            # would hand back the keys it quantized in full precision, and the probe
            # would measure float16 rounding only (as it did until 2026-12-06)
            q = Int4KVCache(group_size, k_bits=bits, v_bits=8, window=0, sinks=0,
                            rotate_keys=True, center_keys=True,
                            attend_before_quantizing=False)
            kq, _ = q.update_and_fetch(keys, values)  # dequantized, un-rotated, re-centered
            arr = mask if isinstance(mask, mx.array) else None  # sliding-window layers
            approx = numpy_attention(queries, kq, values, scale,
                                     causal=isinstance(mask, str), mask=arr)
            d = np.asarray((approx - out).astype(mx.float32))
            i = self.layer
            err[i] += float((d * d).sum())
            norm[i] += float(np.square(np.asarray(out.astype(mx.float32))).sum())
            return out

    for i in range(len(model.layers)):
        probes.append(Probe())
        probes[-1].layer = i
    toks = mx.array(list(tokens), dtype=mx.int32)
    for start in range(0, toks.shape[0], chunk):
        mx.eval(model(toks[start:start + chunk][None], cache=probes))
        _eval_cache(probes)
    return err / np.maximum(norm, 1e-30)


def greedy_tokens(model, prompt: Sequence[int], cache, n: int, prefill_step: int,
                  margins: Optional[list] = None) -> List[int]:
    """``n`` greedy tokens; ``margins`` (a list) receives each step's top-2
    log-probability margin."""
    from mlx_lm.generate import generate_step

    gen = generate_step(mx.array(list(prompt), dtype=mx.int32), model, max_tokens=n,
                        prompt_cache=cache, prefill_step_size=prefill_step)
    out = []
    for t, lp in gen:
        out.append(int(t))
        if margins is not None:
            margins.append(float(top2_margin(lp.astype(mx.float32))))
    return out


def greedy_divergence(model, prompts: Sequence[Sequence[int]], configs: Sequence[CacheConfig],
                      n: int, prefill_step: int = DEFAULT_CHUNK, progress=None,
                      margins: Optional[dict] = None) -> dict:
    """{name: [first divergent position per prompt]}; ``n`` means no divergence.

    ``margins`` (a dict) receives {name: [the reference's top-2 log-prob margin
    at that position per prompt, None where none diverges]}: a divergence
    where the reference itself nearly ties says little about the cache.
    """
    out = {c.name: [] for c in configs}
    for c in configs:
        if margins is not None:
            margins[c.name] = []
    for i, p in enumerate(prompts):
        ref_m = []
        ref = greedy_tokens(model, p, reference_cache(model), n, prefill_step,
                            margins=ref_m)
        for c in configs:
            toks = greedy_tokens(model, p, c.make_cache(model), n, prefill_step)
            d = first_divergence(ref, toks)
            out[c.name].append(d)
            if margins is not None:
                margins[c.name].append(round(ref_m[d], 5) if d < len(ref_m) else None)
        if progress is not None:
            progress(i + 1, len(prompts))
    return out


# ---------------------------------------------------------------------------
# text, report, plot


def kv_bytes_per_token(cache) -> Optional[float]:
    from .generate import kv_report

    r = kv_report(cache)
    return r["used"] / r["fp16"] if r["fp16"] else None


def environment() -> dict:
    """Date, machine and package versions, recorded in the JSON report."""
    import datetime
    import os
    import platform

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    versions = package_versions(("mlx", "mlx-lm", "numpy", "tqmetal"))
    ext = sorted(Path(__file__).parent.glob("_ext*"))
    if not ext:
        from . import _ext as mod
        ext = [Path(mod.__file__)]
    versions["tqmetal_ext_mtime"] = datetime.datetime.fromtimestamp(
        ext[0].stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_model": cpu, "logical_cpus": os.cpu_count(),
                    "mlx_device": str(mx.default_device())},
        "versions": versions,
    }


def format_table(rows: List[dict], margin: float) -> str:
    head = ["config", "KL mean", "KL p99.9", "top1", f"top1 m>={margin:g}", "ppl", "ppl ref",
            "first div", "KV/fp16"]
    lines = []
    table = [head]
    for r in rows:
        div = r.get("first_divergence")
        ms = r.get("first_divergence_ref_margin") or [None] * len(div or [])
        div_s = "-" if not div else ",".join(
            str(d) if m is None else f"{d}({m:.3f})" for d, m in zip(div, ms))
        ratio = r.get("kv_vs_fp16")
        table.append([
            r["config"], f"{r['kl_mean']:.5f}", f"{r['kl_p999']:.4f}", f"{100 * r['top1']:.2f}%",
            f"{100 * r['top1_confident']:.2f}%", f"{r['ppl']:.3f}", f"{r['ppl_ref']:.3f}",
            div_s, "-" if ratio is None else f"{ratio:.3f}",
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for j, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def moving_average(x, n: int):
    x = np.asarray(x, np.float64)
    if n <= 1 or x.size < n:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    return (c[n:] - c[:-n]) / n


def plot_kl(per_position: dict, path: str, title: str = "", smooth: int = 64) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, kl in per_position.items():
        y = moving_average(kl, smooth)
        x = np.arange(y.size) + (smooth - 1 if len(kl) >= smooth > 1 else 0)
        ax.plot(x, np.maximum(y, 1e-7), label=name, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"KL(ref || cache), nats/token (moving average of {smooth})")
    ax.set_title(title or "KL divergence against the reference cache")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tqmetal eval",
        description="Fidelity of quantized KV caches against the full-precision cache on a "
                    "real model: teacher-forced KL divergence, top-1 agreement and perplexity "
                    "over a long text, and where greedy generation first diverges.",
        epilog="Config names: int4|int8|k8v4|k4v8 (tqmetal Int4KVCache), mlx4|mlx8 (mlx-lm "
               "QuantizedKVCache through the fused op), fp16 (the reference); options "
               "-g32|-g64|-g128 (group, default 64), -w<N> (window, default 128), -s<N> "
               "(sinks, default 4), -rot|-norot (key rotation, default off), -vrot (value "
               "rotation), -center (key centering), -abq (attend before quantizing; -abqg: "
               "in the full-attention layers only), "
               "-chs|-chs<N> (per-channel key scaling before rotation, exponent 0.5 or "
               "N/100; -chsq: factors calibrated on queries and keys of held-out text), "
               "-fp<i>.<j> (full-precision layers), -fpw[<N>] (sliding-window layers of "
               "at most N tokens, default 1024, full precision: make_prompt_cache's "
               "default), -k8l<i>.<j> (8-bit-key layers). "
               "The issue's targets are stated at --tokens 8192.",
    )
    p.add_argument("--model", default=None,
                   help="mlx-lm model dir/repo or .gguf path (default: SmolLM2-135M GGUF)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated config names (default {DEFAULT_CONFIGS})")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"context length of the teacher-forced run (default {DEFAULT_TOKENS}; "
                        "the issue's targets are at 8192)")
    p.add_argument("--stride", type=int, default=1,
                   help="measure every N-th position only (all tokens still go through "
                        "every cache; only measured positions go through the output layer: "
                        "for large vocabularies such as Gemma 3's on a CPU; default 1 = all)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                   help=f"tokens fed per step, as a prefill (default {DEFAULT_CHUNK})")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="top-2 log-prob margin (nats) of the reference for the 'confident' "
                        f"top-1 agreement (default {DEFAULT_MARGIN})")
    p.add_argument("--gen-tokens", type=int, default=256,
                   help="greedy tokens per prompt (default 256)")
    p.add_argument("--gen-prompts", type=int, default=3,
                   help="prompts for the greedy comparison (default 3; 0 skips it)")
    p.add_argument("--gen-prompt-tokens", type=int, default=512,
                   help="tokens per greedy prompt, slices of the text (default 512)")
    p.add_argument("--text", default=None,
                   help="evaluation text file (default: the text shipped in tqmetal/data)")
    p.add_argument("--text-kind", choices=tuple(TEXT_KINDS), default=None,
                   help="evaluate on another kind of text instead, none written for this "
                        "project: " + "; ".join(f"{k}: {v}" for k, v in TEXT_KINDS.items()))
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG of KL divergence against position, one line per config")
    p.add_argument("--numpy-matmul", choices=("auto", "on", "off"), default="auto",
                   help="compute the model's linear layers with numpy's BLAS on dequantized "
                        "float32 weights (auto: on when MLX runs on the CPU, whose matmul is "
                        "~25x slower); the attention and caches stay in MLX/tqmetal")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="threads of numpy's OpenBLAS for --numpy-matmul (default 1: on a "
                        "machine whose cores other processes share, more threads wait on "
                        "each other, 8x slower on a shared 2-core machine; 0 keeps "
                        "OpenBLAS's own choice)")
    p.add_argument("--key-sensitivity", action="store_true",
                   help="instead of the comparison: per layer, the relative error of the "
                        "attention output when only that layer's keys are int4 (rotated, "
                        "centered, group 64, no window), over --tokens; to choose k8 layers")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = parse_configs(args.configs)
    except ValueError as e:
        parser.error(str(e))
    for name in ("tokens", "chunk", "stride"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.gen_prompts < 0 or args.gen_tokens < 1 or args.gen_prompt_tokens < 1:
        parser.error("--gen-prompts must be >= 0, --gen-tokens and --gen-prompt-tokens >= 1")

    from . import generate as _gen
    from .patch import patched

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        if args.text is not None and args.text_kind is not None:
            parser.error("give --text or --text-kind, not both")
        text = load_text_kind(args.text_kind) if args.text_kind else load_text(args.text)
    except OSError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    try:
        model, tokenizer = _gen.load_model(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"tqmetal eval: {e}", file=sys.stderr)
        return 1
    use_np = args.numpy_matmul == "on" or (
        args.numpy_matmul == "auto" and mx.default_device() == mx.cpu)
    blas_threads = None
    if use_np:
        numpy_matmuls(model)
        if args.blas_threads > 0:
            from .blas import set_blas_threads

            blas_threads = set_blas_threads(args.blas_threads)
    tokens, repeats = tokenize_text(tokenizer, text, args.tokens)
    if any(c.calibrated_scale for c in configs):
        ids = list(tokenizer.encode(text, add_special_tokens=True))
        held_out = ids[len(tokens):len(tokens) + 512] if repeats == 1 else []
        if len(held_out) < 64:
            held_out = ids[:512]
            log("note: no held-out text after the evaluated tokens; the chsq configs "
                "calibrate on the text's first 512 tokens")
        set_calibration_tokens(held_out)
    if repeats > 1:
        log(f"note: the text has fewer than {args.tokens} tokens; it is repeated {repeats} "
            "times (the repeats are easier to predict, which flatters every cache)")
    log(f"model loaded in {time.perf_counter() - t0:.1f}s; {len(tokens)} tokens, "
        f"configs: {', '.join(c.name for c in configs)}")

    def bar(label):
        def cb(done, total):
            if not args.quiet:
                sys.stderr.write(f"\r{label}: {done}/{total}  ({time.perf_counter() - t1:.0f}s)")
                if done >= total:
                    sys.stderr.write("\n")
                sys.stderr.flush()
        return cb

    if args.key_sensitivity:
        with patched():
            t1 = time.perf_counter()
            sens = key_sensitivity(model, tokens, chunk=args.chunk)
        order = [int(i) for i in np.argsort(-sens)]
        print(f"key sensitivity over {len(tokens)} tokens ({time.perf_counter() - t1:.0f}s): "
              "relative squared error of each layer's attention output with int4 keys")
        for i in order:
            print(f"  layer {i:3d}  {sens[i]:.3e}")
        print("most sensitive first: " + ".".join(str(i) for i in order))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"tokens": len(tokens), "key_sensitivity": [float(x) for x in sens],
                 "most_sensitive_first": order}, indent=1))
        return 0

    div_margins = {c.name: [] for c in configs}

    def rows_of(tf, div):
        ref = tf["ref"]
        rows = []
        for c in configs:
            d = tf[c.name]
            row = {"config": c.name, **summarize(d["kl"], ref["top1"], d["top1"], ref["margin"],
                                                 ref["nll"], d["nll"], args.margin)}
            row["first_divergence"] = div[c.name]
            row["first_divergence_ref_margin"] = div_margins.get(c.name, [])
            row["kv_vs_fp16"] = kv_bytes_per_token(tf["_caches"][c.name])
            rows.append(row)
        return rows

    def to_json(tf, rows, seconds, prompts):
        ref = tf["ref"]
        return {
            "model": args.model or "default (SmolLM2-135M-Instruct GGUF)",
            "text": (f"{args.text_kind}: {TEXT_KINDS[args.text_kind]}" if args.text_kind
                     else args.text or "bundled"),
            "tokens": len(tokens) if args.stride > 1 else len(ref["top1"]),
            "measured_positions": len(ref["top1"]), "stride": args.stride,
            "text_repeats": repeats, "chunk": args.chunk,
            "margin": args.margin, "reference_dtype": tf["_ref_dtype"], "numpy_matmul": use_np,
            "blas_threads": blas_threads,
            "gen_tokens": args.gen_tokens, "gen_prompts": len(prompts),
            "gen_prompt_tokens": len(prompts[0]) if prompts else 0,
            "seconds": seconds,
            **environment(),
            "configs": [dict(asdict(c), **r) for c, r in zip(configs, rows)],
            "per_position": {
                "ref_top2_margin": [round(float(x), 5) for x in ref["margin"]],
                "kl": {c.name: [float(f"{x:.4g}") for x in tf[c.name]["kl"]] for c in configs},
            },
        }

    def checkpoint(tf):
        if args.json:
            out = to_json(tf, rows_of(tf, {c.name: [] for c in configs}), {}, [])
            done = out["measured_positions"] * args.stride
            out["partial"] = f"{done} of {len(tokens)} tokens (run still going)"
            Path(args.json).write_text(json.dumps(out, indent=1))

    with patched():
        t1 = time.perf_counter()
        tf = teacher_forced(model, tokens, configs, chunk=args.chunk, stride=args.stride,
                            progress=bar("teacher-forced"), checkpoint=checkpoint)
        tf_time = time.perf_counter() - t1
        div = {c.name: [] for c in configs}
        gen_time = 0.0
        prompts = []
        if args.gen_prompts:
            ids = list(tokenizer.encode(text, add_special_tokens=True))
            P = min(args.gen_prompt_tokens, max(len(ids) - 1, 1))
            span = max(len(ids) - P, 0)
            starts = [int(span * i / max(args.gen_prompts - 1, 1)) if args.gen_prompts > 1
                      else 0 for i in range(args.gen_prompts)]
            prompts = [ids[s:s + P] for s in starts]
            t1 = time.perf_counter()
            div = greedy_divergence(model, prompts, configs, args.gen_tokens,
                                    prefill_step=args.chunk, progress=bar("greedy prompts"),
                                    margins=div_margins)
            gen_time = time.perf_counter() - t1

    rows = rows_of(tf, div)
    ref_dtype = tf["_ref_dtype"]
    print(f"tqmetal eval: {len(tokens)} tokens in chunks of {args.chunk}, reference = mlx-lm "
          f"KVCache ({ref_dtype}); teacher-forced {tf_time:.1f}s, "
          f"greedy {gen_time:.1f}s")
    print(format_table(rows, args.margin))
    if args.gen_prompts:
        print(f"first div: first greedy token differing from the reference's, per prompt "
              f"({len(prompts)} prompts of {len(prompts[0])} tokens; {args.gen_tokens} = none "
              "in all generated tokens); (m): the reference's top-2 log-prob margin (nats) "
              "at that token")
    print("KV/fp16: bytes the cache holds for these tokens / fp16 bytes for the same tokens "
          "(full-precision window and sinks, scales and biases stored in float16)")

    if args.json:
        out = to_json(tf, rows, {"teacher_forced": tf_time, "greedy": gen_time}, prompts)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot_kl({c.name: tf[c.name]["kl"] for c in configs}, args.plot,
                title=f"KL vs position, {len(tokens)} tokens, chunks of {args.chunk}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
