"""The deterministic edge grid: case specs (tests/fuzz_cases.py) that every CPU kernel variant
(tests/test_edge_values.py) runs, and on which tests/test_planted_bugs.py shows that planted
bugs fail.  Each spec is small; together they cover the shapes and inputs the issue lists:
B = 0, H_kv = 1, N = 1, tail only (N = 0), L from 1 past the prefill threshold, every head
dim / group size, every mask kind with dead rows, sinks near the rows' log-sum-exp, tails /
masks / sinks in other dtypes than q, strided and offset masks, extreme magnitudes.
"""

from __future__ import annotations

import reference as R

_BASE = dict(B=2, Hq=4, Hkv=2, L=1, N=70, T=0, D=64, group_size=32, dtype="float32", k_bits=4, v_bits=4)


def _spec(name: str, **kw) -> tuple:
    return name, {**_BASE, **kw, "seed": len(name) * 31 + sum(map(ord, name))}


GRID = []
# --- degenerate shapes
GRID += [
    _spec("hkv1_n1_decode", Hq=4, Hkv=1, N=1, dtype="float16"),
    _spec("hkv1_n1_tail1", Hq=1, Hkv=1, N=1, T=1, L=2, mask="causal", sinks=True),
    _spec("tail_only_decode", N=0, T=9, dtype="float16", sinks=True),
    _spec("tail_only_prefill", N=0, T=40, L=40, Hq=2, Hkv=1, mask="causal", dtype="bfloat16"),
    _spec("tail_only_dead_rows", N=0, T=12, L=3, mask="bool_dead", dtype="float32"),
    _spec("tail_only_add_dead", N=0, T=12, L=3, mask="add_dead", sinks=True, dtype="float16"),
]
for L in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 31, 32, 33, 40, 65):
    # rows per KV head G * L crosses the decode row tiles (8) and the CPU prefill threshold (32)
    GRID.append(_spec(f"L{L}_causal_sinks", Hq=4, Hkv=1, L=L, N=90, T=3, mask="causal", sinks=True,
                      dtype=("float16", "bfloat16", "float32")[L % 3], k_bits=(4, 8)[L % 2]))
for D in (64, 80, 96, 128, 256):
    for gs in R.valid_group_sizes(D):
        GRID.append(_spec(f"D{D}_g{gs}", D=D, group_size=gs, L=2, N=77, T=2, mask="bool_dead", sinks=gs == 32,
                          dtype="float16" if D % 3 else "float32"))
# --- every mask kind, with and without sinks, decode and a few rows
for i, mask in enumerate(R.MASK_KINDS):
    GRID.append(_spec(f"mask_{mask}_decode", mask=mask, L=1, N=150, T=2, sinks=i % 2 == 0,
                      dtype=("float16", "float32")[i % 2]))
    GRID.append(_spec(f"mask_{mask}_rows", mask=mask, L=5, N=61, T=4, sinks=i % 2 == 1, dtype="bfloat16",
                      k_bits=8))
# --- dtypes of tails, masks and sinks other than q's
for q_dt, other in (("float32", "float16"), ("float32", "bfloat16"), ("float16", "float32"),
                    ("bfloat16", "float16"), ("float16", "bfloat16")):
    GRID.append(_spec(f"mixed_{q_dt}_{other}", dtype=q_dt, scale_dtype="float32", tail_dtype=other,
                      mask_dtype=other, sink_dtype=other, L=3, N=80, T=6, mask="add_inf", sinks=True))
# --- strided cache and strided / offset masks
GRID += [
    _spec("strided_cache_offset_mask", strided=True, view_offset=17, mask="bool_slice", L=3, N=100, T=5,
          dtype="float16"),
    _spec("stride2_mask_prefill", mask="bool_stride2", L=40, N=50, Hq=2, Hkv=1, dtype="float32"),
    _spec("long_split_sinks", N=3000, T=3, L=1, mask="bool_B11N", sinks=True, Hq=8, Hkv=2, D=128,
          group_size=64, dtype="float16"),
    _spec("long_split_rows", N=2500, T=0, L=3, mask="causal", Hq=4, Hkv=1, D=128, group_size=64, dtype="float32"),
]
# --- extreme magnitudes
for ext in ("big_scores", "scales0", "equal_keys", "scale0"):
    GRID.append(_spec(f"extreme_{ext}", extreme=ext, L=2, N=90, T=2, mask="causal", sinks=True,
                      dtype="float16"))

# The inputs of the bugs these tests found: (bug, name, spec, the variants that failed it
# before its fix, measured on generic, avx2, avx512, avx512vnni; AMX untested here).  A bug
# still in fuzz_cases.PENDING_KERNEL_FIXES makes its cases strict xfails on those variants;
# the others run as ordinary cases.  The Metal kernels (emulated) pass every one of them.
ALL = ("generic", "avx2", "avx512", "avx512vnni", "avx512amx")
AVX512 = ("avx512", "avx512vnni", "avx512amx")
INT16 = ("avx512vnni", "avx512amx")
PENDING = [
    ("batch0", *_spec("batch0_decode", B=0, N=256, D=64, Hq=8, Hkv=2, dtype="float16"), ALL),
    ("batch0", *_spec("batch0_prefill", B=0, N=40, L=40, mask="causal"), ALL),
    ("empty_rows", *_spec("no_query_rows", L=0, N=70, T=3, mask="causal"), ALL),
    ("no_keys", *_spec("no_keys_decode", N=0, T=0, L=1, sinks=True, dtype="float16"), ALL),
    ("no_keys", *_spec("no_keys_prefill", N=0, T=0, L=40), ALL),
    ("q_nonfinite", *_spec("q_nan_row_decode", N=300, D=128, group_size=64, Hq=8, Hkv=2,
                           poison=[["q", "nan", 0, 3, 0, 5]]), INT16),
    ("q_nonfinite", *_spec("q_inf_decode", N=70, T=4, poison=[["q", "inf", 0, 1, 0, 3]]), AVX512),
    ("q_nonfinite", *_spec("q_nan_prefill", N=70, T=4, L=40, poison=[["q", "nan", 0, 1, 0, 3]]), AVX512),
    ("k_nonfinite", *_spec("k_scale_nan_decode", N=300, D=128, group_size=64, Hq=8, Hkv=2,
                           poison=[["k_scales", "nan", 0, 1, 77, 1]]), AVX512),
    ("k_nonfinite", *_spec("k_bias_inf_decode", N=300, D=128, group_size=64, Hq=8, Hkv=2,
                           poison=[["k_biases", "inf", 1, 0, 5, 0]]), ALL),
    ("k_nonfinite", *_spec("k_bias_neg_inf_decode", N=70, T=4, poison=[["k_biases", "-inf", 0, 1, 0, 3]]), ALL),
    ("k_nonfinite", *_spec("k_scale_inf_prefill", N=60, L=40, D=64, mask="causal",
                           poison=[["k_scales", "inf", 0, 0, 3, 1]]), AVX512),
    ("k_nonfinite", *_spec("k_tail_nan", N=50, T=4, L=2, poison=[["k_tail", "nan", 0, 1, 2, 9]]), AVX512),
    ("k_nonfinite", *_spec("k_tail_inf_causal", N=50, T=4, L=3, mask="causal",
                           poison=[["k_tail", "inf", 1, 0, 1, 3]]), AVX512),
    ("mask_nonfinite", *_spec("mask_nan", N=50, L=3, mask="add_LN", poison=[["mask", "nan", 1, 30]]), AVX512),
    ("mask_nonfinite", *_spec("mask_pos_inf", N=50, L=3, mask="add_B1LN", dtype="bfloat16",
                              poison=[["mask", "inf", 1, 0, 2, 7]]), AVX512),
    ("v_scale_inf", *_spec("v_scale_inf_decode", N=70, T=4, poison=[["v_scales", "inf", 0, 1, 3, 1]]), INT16),
    ("v_scale_inf", *_spec("v_scale_neg_inf_decode_f16", N=70, T=4, dtype="float16", v_bits=8,
                           poison=[["v_scales", "-inf", 0, 1, 3, 1]]), INT16),
    ("dead_row_neg_inf_sink", *_spec("sink_neg_inf_bool_dead_decode", N=50, L=2, sinks=True, mask="bool_dead",
                                     poison=[["sinks", "-inf", 0]]), ALL),
    ("dead_row_neg_inf_sink", *_spec("sink_neg_inf_bool_dead_prefill", N=50, L=40, sinks=True,
                                     mask="bool_dead", poison=[["sinks", "-inf", 1]]), ALL),
]

# Non-finite inputs every kernel already propagates as MLX does: name -> spec.
NONFINITE = [
    _spec("v_tail_inf", N=50, T=4, L=2, poison=[["v_tail", "-inf", 0, 0, 3, 3]]),
    _spec("v_scale_nan", N=50, L=2, poison=[["v_scales", "nan", 1, 1, 33, 1]]),
    _spec("v_bias_inf", N=50, L=2, dtype="float16", poison=[["v_biases", "inf", 0, 1, 12, 0]]),
    _spec("mask_neg_inf", N=50, L=3, mask="add_LN", poison=[["mask", "-inf", 1, 30]]),
    _spec("sink_nan", N=50, L=2, sinks=True, poison=[["sinks", "nan", 2]]),
    _spec("sink_pos_inf", N=50, L=2, sinks=True, dtype="float16", poison=[["sinks", "inf", 1]]),
    _spec("sink_pos_inf_bool_dead", N=50, L=2, sinks=True, mask="bool_dead", poison=[["sinks", "inf", 0]]),
    _spec("sink_neg_inf", N=50, L=40, sinks=True, mask="causal", poison=[["sinks", "-inf", 3]]),
    _spec("sink_neg_inf_add_dead", N=50, L=2, sinks=True, mask="add_dead", poison=[["sinks", "-inf", 3]]),
]
