"""Metal kernel cases no other test ran under the MSL emulator, and every branch of the dispatch
planner (csrc/metal/dispatch_plan.cpp).

* decode with N = 0 (only the tail: every short chat, before the cache's window fills),
  one and two passes;
* L = 3-8 with 3 and 4 row tiles per KV head (and the D = 256 instances' 4-row tiles);
* tails, additive masks and sinks in other dtypes than q; scales in another dtype again;
* masks handed over as views (a binding byte offset, every axis strided, stride 2 along
  the keys) on both paths;
* decode and prefill on dead rows, sinks and tail-only prefill; the planner's reasons for
  every shape or layout it refuses, its block choices (explicit, automatic, clamped, no
  empty block), and the combined planner's choice.

Checked against the float64 reference with the op's per-row bounds (reference.TOL_OP).
"""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import reference as R  # noqa: E402
from metal_plan_testing import METAL, METAL_PREFILL, problem, run_case  # noqa: E402
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)

from tqmetal import _ext  # noqa: E402

MLX_INC = T.mlx_include()
needs_emulator = pytest.mark.skipif(not MLX_INC, reason="mlx Metal kernel headers not found")


@pytest.fixture(scope="module")
def dec():
    return T.mslemu.compile(METAL, include_dirs=[MLX_INC], racecheck=T.INSTRUMENTED)


@pytest.fixture(scope="module")
def pre():
    return T.mslemu.compile(METAL_PREFILL, include_dirs=[MLX_INC], racecheck=T.INSTRUMENTED)


# (name, make_case kwargs) -- decode path (the planner must choose it)
CASES = [
    ("tail_only_f16", dict(Hq=4, Hkv=2, N=0, T=9, D=128, dtype="float16")),
    ("tail_only_sinks_causal_L2", dict(Hq=8, Hkv=1, L=2, N=0, T=40, D=64, dtype="float32", mask="causal",
                                      sinks=True)),
    ("tail_only_bool_dead", dict(B=2, Hq=2, Hkv=1, L=3, N=0, T=17, D=64, dtype="bfloat16", mask="bool_dead")),
    ("tail_only_two_pass", dict(Hq=4, Hkv=1, L=3, N=0, T=70, D=128, dtype="bfloat16", mask="add_dead",
                                sinks=True)),
    ("tail_only_one_token", dict(Hq=2, Hkv=1, N=0, T=1, D=256, dtype="float16", group_size=128, sinks=True)),
    ("L3_three_row_tiles", dict(Hq=8, Hkv=1, L=3, N=70, T=2, D=64, dtype="float16", mask="causal", sinks=True)),
    ("L4_four_row_tiles", dict(Hq=8, Hkv=1, L=4, N=45, D=128, dtype="float32", mask="bool_BHLN")),
    ("L5_three_row_tiles", dict(Hq=4, Hkv=1, L=5, N=50, T=5, D=64, dtype="bfloat16", mask="add_inf", k_bits=8)),
    ("L6_three_row_tiles", dict(Hq=4, Hkv=1, L=6, N=33, D=128, dtype="float16", mask="causal", v_bits=8)),
    ("L7_four_row_tiles", dict(Hq=4, Hkv=1, L=7, N=60, T=3, D=64, dtype="float32", mask="bool_dead",
                               sinks=True)),
    ("L8_four_row_tiles", dict(Hq=4, Hkv=1, L=8, N=40, D=128, dtype="float16", mask="causal")),
    ("d256_L3_three_row_tiles", dict(Hq=4, Hkv=1, L=3, N=70, T=2, D=256, dtype="float16", group_size=64,
                                     mask="causal", sinks=True)),
    ("d256_L8_four_row_tiles", dict(Hq=2, Hkv=1, L=8, N=66, D=256, dtype="float32", group_size=128,
                                    mask="bool_B1LN")),
    ("dead_rows_additive_sinks", dict(Hq=4, Hkv=2, L=2, N=66, T=2, D=64, dtype="float16", mask="add_dead",
                                      sinks=True)),
    ("hkv1_n1", dict(Hq=2, Hkv=1, L=1, N=1, D=64, dtype="float32", sinks=True)),
    # mx.quantize's bit-stream widths (the decode "_stream" instances)
    ("k3v5_tail_only", dict(Hq=4, Hkv=2, N=0, T=9, D=128, dtype="float16", group_size=32, k_bits=3, v_bits=5)),
    ("k5v3_L3_three_row_tiles", dict(Hq=8, Hkv=1, L=3, N=70, T=2, D=64, dtype="float16", group_size=32,
                                     mask="causal", sinks=True, k_bits=5, v_bits=3)),
    ("k6v2_L4_four_row_tiles", dict(Hq=8, Hkv=1, L=4, N=45, D=128, dtype="float32", mask="bool_BHLN",
                                    k_bits=6, v_bits=2)),
    ("k2v6_d256_L3_three_row_tiles", dict(Hq=4, Hkv=1, L=3, N=70, T=2, D=256, dtype="bfloat16",
                                          group_size=64, mask="causal", k_bits=2, v_bits=6)),
    ("k5v5_hkv1_n1", dict(Hq=2, Hkv=1, L=1, N=1, D=256, dtype="float32", group_size=32, sinks=True, k_bits=5,
                          v_bits=5)),
    ("k3v6_dead_rows_additive_sinks", dict(Hq=4, Hkv=2, L=2, N=66, T=2, D=64, dtype="float16", group_size=32,
                                           mask="add_dead", sinks=True, k_bits=3, v_bits=6)),
]

# (name, make_case kwargs, tail dtype, mask dtype, sinks dtype)
MIXED = [
    ("q_f32_tail_f16_mask_bf16_sinks_f16", dict(Hq=4, Hkv=2, L=2, N=40, T=6, D=64, dtype="float32",
                                                scale_dtype="float16", mask="add_inf", sinks=True),
     "float16", "bfloat16", "float16"),
    ("q_f16_tail_f32_mask_f32_sinks_bf16", dict(Hq=4, Hkv=1, L=3, N=50, T=5, D=128, dtype="float16",
                                                scale_dtype="bfloat16", mask="add_LN", sinks=True),
     "float32", "float32", "bfloat16"),
    ("q_bf16_tail_f16_mask_f16_sinks_f32", dict(Hq=2, Hkv=1, L=12, N=30, T=7, D=64, dtype="bfloat16",
                                                scale_dtype="float32", mask="add_B1LN", sinks=True),
     "float16", "float16", "float32"),
]

VIEW_MASKS = ["bool_LN", "bool_BHLN", "bool_B11N", "bool_dead", "bool_N", "add_LN", "add_B1LN", "add_dead",
              "add_scalar"]


def _retype(case, tail_dt, mask_dt, sinks_dt):
    import mlx.core as mx

    case.k_tail = case.k_tail.astype(R.DTYPES[tail_dt])
    case.v_tail = case.v_tail.astype(R.DTYPES[tail_dt])
    case.mask = case.mask.astype(R.DTYPES[mask_dt])
    case.sinks = case.sinks.astype(R.DTYPES[sinks_dt])
    mx.eval(case.k_tail, case.v_tail, case.mask, case.sinks)
    return case


# ------------------------------------------------------------------------------------- decode
@needs_emulator
@pytest.mark.parametrize("order", ["reverse", "interleave"])
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_decode_edges(dec, name, kw, order):
    case = R.make_case(seed=len(name), **kw)
    plan, *_ = run_case(dec, case, order, planner=_ext.plan_sdpa_int4, blocks=1)
    assert plan["path"] == "decode"
    G = kw["Hq"] // kw["Hkv"]
    rows = 4 if kw["D"] == 256 else 8
    assert plan["row_tiles"] == -(-G * kw.get("L", 1) // rows)
    NT = kw["N"] + kw.get("T", 0)
    if NT > 32:  # blocks hold whole 32-token simdgroup rounds
        plan, *_ = run_case(dec, case, order, blocks=3, expect_two_pass=True)


@needs_emulator
@pytest.mark.parametrize("name,kw,tail_dt,mask_dt,sinks_dt", MIXED, ids=[m[0] for m in MIXED])
def test_mixed_dtypes(dec, pre, name, kw, tail_dt, mask_dt, sinks_dt):
    """Tails, additive masks and sinks in dtypes other than q's (function constants 47-49)."""
    case = _retype(R.make_case(seed=len(name), **kw), tail_dt, mask_dt, sinks_dt)
    plan = _ext.plan_sdpa_int4(problem(case, np.random.default_rng(0))[0])
    fc = plan["launches"][0]["function_constants"]
    code = {"float32": 0, "float16": 1, "bfloat16": 2}  # DTypeCode, metal/sdpa_int4_params.h
    assert (fc[47], fc[48], fc[49]) == (code[tail_dt], code[mask_dt], code[sinks_dt]), fc
    lib = dec if plan["path"] == "decode" else pre
    run_case(lib, case, "reverse", planner=_ext.plan_sdpa_int4)
    if plan["path"] == "decode":
        run_case(dec, case, "interleave", blocks=2, expect_two_pass=True)


@needs_emulator
@pytest.mark.parametrize("mask", VIEW_MASKS)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_mask_views(dec, pre, mask, path):
    """A mask as a view: binding byte offset, every axis strided, stride 2 along the keys."""
    L = 2 if path == "decode" else 11
    case = R.make_case(B=2, Hq=4, Hkv=2, L=L, N=37, T=3, D=64, dtype="float16", mask=mask, sinks=mask.endswith("dead"),
                       seed=len(mask))
    plan, *_ = run_case(dec if path == "decode" else pre, case, "reverse", mask_view=True,
                        planner=_ext.plan_sdpa_int4 if path == "decode" else _ext.plan_sdpa_int4_prefill)
    assert plan["path"] == path
    m = [b for b in plan["launches"][0]["buffers"] if b["name"] == "mask"][0]
    assert m["offset"] > 0


@needs_emulator
@pytest.mark.parametrize("name,kw", [
    ("tail_only_prefill", dict(Hq=2, Hkv=1, L=33, N=0, T=40, D=128, dtype="float16", mask="causal", sinks=True)),
    ("n1_prefill", dict(Hq=4, Hkv=1, L=9, N=1, T=0, D=64, dtype="float32", mask="causal")),
    ("dead_additive_sinks_prefill", dict(Hq=2, Hkv=1, L=17, N=40, T=2, D=96, dtype="bfloat16", group_size=32,
                                         mask="add_dead", sinks=True)),
    ("k5v6_n1_prefill", dict(Hq=4, Hkv=1, L=9, N=1, T=0, D=64, dtype="float32", group_size=32, mask="causal",
                             k_bits=5, v_bits=6)),
    ("k3v2_dead_additive_sinks_prefill", dict(Hq=2, Hkv=1, L=17, N=40, T=2, D=96, dtype="bfloat16",
                                              group_size=32, mask="add_dead", sinks=True, k_bits=3, v_bits=2)),
    ("bool_L1_prefill", dict(Hq=2, Hkv=2, L=10, N=50, D=80, dtype="float16", group_size=16, mask="bool_L1",
                             sinks=True)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_prefill_edges(pre, name, kw):
    case = R.make_case(seed=len(name), **kw)
    plan, *_ = run_case(pre, case, "reverse", planner=_ext.plan_sdpa_int4_prefill)
    assert plan["path"] == "prefill"


# ------------------------------------------------------------------------------------- the planner
def _prob(**change):
    kw = {**dict(Hq=8, Hkv=2, L=1, N=40, T=4, D=64, dtype="float16", sinks=True, mask="bool_LN"),
          **change.pop("case", {})}
    prob = problem(R.make_case(**kw), np.random.default_rng(0))[0]
    for k, v in change.items():
        if isinstance(v, dict) and isinstance(prob.get(k), dict):
            prob[k] = {**prob[k], **v}
        else:
            prob[k] = v
    return prob


REFUSALS = [
    # (change, planner, words the reason must hold)
    (dict(case=dict(D=80, group_size=16)), "decode", "head dim 80"),
    (dict(case=dict(group_size=16)), "decode", "group size 16"),
    (dict(k_bits=7), "both", "bits k7v4"),
    (dict(v_bits=1), "both", "bits k4v1"),
    # mx.quantize's 2/3/5/6 bits need groups of 32 or more (decode refuses group 16 for any width)
    (dict(case=dict(group_size=16), v_bits=3), "prefill", "bits k4v3"),
    (dict(case=dict(D=80, group_size=16), k_bits=2), "prefill", "bits k2v4"),
    (dict(group_size=48), "prefill", "group size 48"),
    (dict(D=80, group_size=32), "prefill", "does not divide"),
    (dict(Hkv=3), "both", "multiple of H_kv"),
    # (a strided last axis is copied by the plan: tests/test_metal_runtime.py)
    (dict(v_biases=dict(strides=[80, 40, 1])), "both", "v_biases: expected 4 strides"),
    (dict(q=dict(strides=[512, 64])), "both", "q: expected 4 strides"),
    (dict(k_tail=dict(strides=[512, 256, 64])), "both", "k_tail: expected 4 strides"),
    (dict(N=2**31, k_packed=dict(strides=[0, 0, 8, 2])), "both", "k_packed: too large to copy"),
    (dict(v_tail=dict(dtype="float32")), "both", "k_tail and v_tail dtypes differ"),
    (dict(k_biases=dict(dtype="float32")), "both", "share one dtype"),
    (dict(v_scales=dict(dtype="bfloat16")), "both", "share one dtype"),
    (dict(mask=dict(strides=[0, 44, 1])), "both", "mask strides"),
    (dict(N=2**31 - 2), "both", "32-bit token"),
    (dict(L=2**29), "both", "32-bit row"),
    (dict(case=dict(L=9)), "decode", "too many query rows"),  # G 4 x L 9 = 36 rows > 4 tiles of 8
    (dict(case=dict(D=256, L=5)), "decode", "too many query rows"),  # 20 rows > 4 tiles of 4 at D = 256
    (dict(case=dict(D=48, group_size=16)), "prefill", "head dim 48"),
    (dict(B=2**31 - 1), "prefill", "grid too large"),
]


@pytest.mark.parametrize("change,which,why", REFUSALS, ids=[r[2] for r in REFUSALS])
def test_planner_refusals(change, which, why):
    prob = _prob(**change)
    planners = {"decode": [_ext.plan_sdpa_int4_decode], "prefill": [_ext.plan_sdpa_int4_prefill],
                "both": [_ext.plan_sdpa_int4_decode, _ext.plan_sdpa_int4_prefill, _ext.plan_sdpa_int4]}[which]
    for plan_fn in planners:
        p = plan_fn(prob)
        assert not p["supported"] and why in p["reason"], (plan_fn.__name__, change, p["reason"])


def test_planner_empty_cache_layout_ignored():
    """N = 0: the cache tensors are never read, so their strides do not matter (the tail's do)."""
    prob = _prob(case=dict(N=0, T=9), k_packed=dict(strides=[0, 0, 0, 7]), v_scales=dict(strides=[1, 2]))
    for plan_fn in (_ext.plan_sdpa_int4_decode, _ext.plan_sdpa_int4_prefill):
        assert plan_fn(prob)["supported"], plan_fn(prob)["reason"]


def test_planner_combined_choice_and_unsupported_reason():
    assert _ext.plan_sdpa_int4(_prob())["path"] == "decode"
    assert _ext.plan_sdpa_int4(_prob(case=dict(L=8)))["path"] == "decode"  # 32 rows: 4 tiles
    assert _ext.plan_sdpa_int4(_prob(case=dict(L=9)))["path"] == "prefill"
    p = _ext.plan_sdpa_int4(_prob(k_bits=7))
    assert p["path"] == "none" and "decode:" in p["reason"] and "prefill:" in p["reason"]
    assert _ext.plan_sdpa_int4(_prob(case=dict(k_bits=3, v_bits=6)))["path"] == "decode"
    assert _ext.plan_sdpa_int4(_prob(case=dict(L=9, k_bits=5, v_bits=2)))["path"] == "prefill"
    # the op's rule ignores layouts (eval_gpu copies) but not dtypes of the tails
    shapes = dict(B=1, Hq=8, Hkv=2, L=1, D=64, N=40, group_size=64, k_bits=4, v_bits=4)
    assert _ext.metal_unsupported_reason(shapes) == ""


@pytest.mark.parametrize("blocks,NT,want_blocks", [
    (1, 44, 1), (2, 44, 2), (3, 44, 2),  # 3 blocks of 15 -> rounded to 32 tokens -> 2 blocks, none empty
    (7, 300, 5), (100, 44, 2), (50, 5, 1),  # more blocks than tokens: clamped, then rounded
])
def test_planner_explicit_blocks(blocks, NT, want_blocks):
    p = _ext.plan_sdpa_int4_decode(_prob(case=dict(N=NT - 4, T=4), blocks=blocks))
    assert p["blocks"] == want_blocks, p
    assert (p["blocks"] - 1) * p["block_len"] < NT <= p["blocks"] * p["block_len"]
    assert p["two_pass"] == (want_blocks > 1)
    if want_blocks > 1:
        assert p["block_len"] % 32 == 0


def test_planner_automatic_blocks():
    # few threadgroups (B * Hkv * row_tiles = 2) for 32 cores: split, each block >= 256 tokens
    p = _ext.plan_sdpa_int4_decode(_prob(case=dict(N=4000, T=0), gpu_cores=32))
    assert p["two_pass"] and p["block_len"] >= 256 and p["block_len"] % 32 == 0
    assert p["blocks"] == -(-4000 // p["block_len"]) and p["blocks"] <= 15
    # enough threadgroups already: one pass
    assert not _ext.plan_sdpa_int4_decode(_prob(case=dict(N=4000, T=0), B=64, gpu_cores=32))["two_pass"]
    # too short to split into >= 256-token blocks
    assert not _ext.plan_sdpa_int4_decode(_prob(case=dict(N=200, T=0), gpu_cores=32))["two_pass"]
    # gpu_cores 0 counts as 1
    assert _ext.plan_sdpa_int4_decode(_prob(case=dict(N=4000, T=0), gpu_cores=0))["blocks"] >= 1
