"""Case specs for the differential fuzz suite (tests/test_fuzz.py) and its workers.

A spec is a plain JSON-able dict, so the same case can be rebuilt in a subprocess that
runs another CPU kernel variant (TQMETAL_CPU_ISA is read once per process) and under the
Metal emulator.  `build(spec)` turns it into a reference.Case, deterministically.

Spec keys (all optional but the shape):
  B, Hq, Hkv, L, N, T, D, group_size, k_bits, v_bits, dtype (q), scale_dtype,
  tail_dtype, mask (a reference.MASK_KINDS name), mask_dtype (additive masks),
  sinks (bool), sink_dtype, strided, scale (None = D ** -0.5), sharpness, seed,
  extreme: None | "big_scores" (float16 scores near overflow) | "scales0" (every K
      and V quantization scale 0: all keys of a group equal) | "equal_keys" (every
      cached key the same) | "scale0" (attention scale 0: uniform weights),
  poison: list of [where, value, index...] non-finite (or any) values planted after
      the case is built; where is one of q, k_scales, k_biases, v_scales, v_biases,
      k_tail, v_tail, mask, sinks; value is a float or "nan" / "inf" / "-inf"; the
      index addresses the array ([b, h, l, d] for q; [b, hkv, n, g] for scales and
      biases; [b, hkv, t, d] for tails; the mask's own shape; [h] for sinks).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

import reference as R

# Bugs found by these tests (issue 14) and not yet fixed on main. While a name is here,
# the fuzz suite does not draw the inputs that hit it and tests/test_edge_values.py marks
# its cases (edge_grid.PENDING) as strict xfails on the variants that fail them; remove the
# name when the fix is merged (the strict xfails then report XPASS until it is).
#   empty_rows            L = 0 is refused (ValueError "needs at least one query"); mx.fast
#                         returns the empty [B, H, 0, D] (csrc/sdpa_int4.cpp)
#   no_keys               N + T = 0 is refused ("the cache is empty"); mx.fast returns zeros
#   dead_row_neg_inf_sink a row whose every key a boolean mask hides, with a -inf sink: NaN
#                         instead of the uniform average MLX gives (every CPU variant; the
#                         Metal kernels give the average)
# Fixed by the lead's 8b74eea (the names edge_grid.PENDING still uses): batch0 (B = 0 was
# SIGFPE), q_nonfinite (NaN/inf query rows came out finite: the int16 query rounding, the
# AVX-512 max), k_nonfinite (NaN/inf key scales, biases or tail keys; an infinite bias in
# every variant's decode), mask_nonfinite (NaN/+inf additive masks on AVX-512), v_scale_inf
# (an infinite V scale gave NaN for +-inf on VNNI).
PENDING_KERNEL_FIXES = {"empty_rows", "no_keys", "dead_row_neg_inf_sink"}

POISON_TARGETS = ("q", "k_scales", "k_biases", "v_scales", "v_biases", "k_tail", "v_tail", "mask", "sinks")


def _value(v) -> float:
    return float(v) if not isinstance(v, str) else {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[v]


def _poke(a: mx.array, index, value: float) -> mx.array:
    """a with one element replaced (a new contiguous array in a's dtype)."""
    x = np.array(R.to_numpy(a))  # bfloat16 arrives as float32 (exact) and goes back
    if x.size == 0:
        return a
    idx = tuple(int(i) % s for i, s in zip(index, x.shape)) if x.ndim else ()
    x[idx] = value
    return mx.array(x).astype(a.dtype)


def build(spec: dict) -> R.Case:
    sp = dict(spec)
    extreme = sp.pop("extreme", None)
    poison = sp.pop("poison", [])
    tail_dtype = sp.pop("tail_dtype", None)
    mask_dtype = sp.pop("mask_dtype", None)
    sink_dtype = sp.pop("sink_dtype", None)
    if extreme == "scale0":
        sp["scale"] = 0.0
    c = R.make_case(**sp)
    dt = c.q.dtype
    if extreme == "big_scores":
        # float16 scores near overflow: |q . k| * scale up to ~6e4 (exact in float64,
        # finite in the op's float32 accumulation); the softmax is then one-hot.
        c.q = (c.q.astype(mx.float32) * 60.0).astype(dt)
        c.scale = c.scale * 40.0
    if extreme == "scales0":
        c.k = (c.k[0], mx.zeros_like(c.k[1]), c.k[2])
        c.v = (c.v[0], mx.zeros_like(c.v[1]), c.v[2])
    if extreme == "equal_keys" and c.k[0].shape[2] > 0:
        p, s, b = c.k
        c.k = tuple(mx.array(np.broadcast_to(R.to_numpy(a)[:, :, :1], a.shape).copy()).astype(a.dtype)
                    for a in (p, s, b))
    if tail_dtype and c.k_tail is not None:
        c.k_tail = c.k_tail.astype(R.DTYPES[tail_dtype])
        c.v_tail = c.v_tail.astype(R.DTYPES[tail_dtype])
    if mask_dtype and isinstance(c.mask, mx.array) and c.mask.dtype != mx.bool_:
        c.mask = c.mask.astype(R.DTYPES[mask_dtype])
    if sink_dtype and c.sinks is not None:
        c.sinks = c.sinks.astype(R.DTYPES[sink_dtype])
    for where, value, *index in poison:
        v = _value(value)
        if where == "q":
            c.q = _poke(c.q, index, v)
        elif where in ("k_scales", "k_biases", "v_scales", "v_biases"):
            trip = list(c.k if where[0] == "k" else c.v)
            i = 1 if where.endswith("scales") else 2
            if trip[i].shape[2] == 0:
                continue
            trip[i] = _poke(trip[i], index, v)
            if where[0] == "k":
                c.k = tuple(trip)
            else:
                c.v = tuple(trip)
        elif where in ("k_tail", "v_tail"):
            t = getattr(c, where)
            if t is None:
                continue
            setattr(c, where, _poke(t, index, v))
        elif where == "mask":
            if not isinstance(c.mask, mx.array) or c.mask.dtype == mx.bool_ or c.mask.ndim == 0:
                continue
            m = mx.broadcast_to(c.mask, c.mask.shape)  # materialize views
            c.mask = _poke(mx.array(R.to_numpy(m)).astype(c.mask.dtype), index, v)
        elif where == "sinks":
            if c.sinks is None:
                continue
            c.sinks = _poke(c.sinks, index, v)
        else:
            raise ValueError(f"unknown poison target {where!r}")
    mx.eval(c.q)
    c.desc += f" spec={spec!r}"
    return c


def run_and_check(spec: dict, sdpa_int4, tol_scale: float = 1.0):
    """Build the spec, run `sdpa_int4` on it, compare with the reference.

    Returns (ok, message, row_nmse)."""
    c = build(spec)
    try:
        out = sdpa_int4(c.q, c.k, c.v, **c.kwargs())
        mx.eval(out)
    except ValueError as e:  # a documented refusal is a result the test judges
        return False, f"ValueError: {e}", None
    try:
        err = R.check_close(out, c.reference(), c.tol() * tol_scale, context=repr(c))
    except AssertionError as e:
        return False, str(e), None
    return True, "", err
