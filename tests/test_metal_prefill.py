"""The Metal prefill kernel (metal/sdpa_int4_prefill.metal) runs under the MSL emulator (tests/mslemu).

Every dispatch follows exactly the plan of the C++ planner (`_ext.plan_sdpa_int4` / `plan_sdpa_int4_prefill`,
csrc/metal/dispatch_plan.cpp), checked against the float64 reference (tests/reference.py) with the CPU tests'
NMSE bounds, with the threadgroup-memory race detector on, under the default scheduling orders.
"""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import reference as R  # noqa: E402
from metal_plan_testing import METAL_PREFILL, execute, out_buffer, out_values, problem, run_case  # noqa: E402
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)

from tqmetal import _ext  # noqa: E402

MLX_INC = T.mlx_include()
pytestmark = pytest.mark.skipif(not MLX_INC, reason="mlx Metal kernel headers not found (pip install mlx / MLX_INCLUDE)")

BQ, BK = 32, 16  # the instances' row tile and key tile (csrc/metal/dispatch_plan.h)


@pytest.fixture(scope="module")
def lib():
    return T.mslemu.compile(METAL_PREFILL, include_dirs=[MLX_INC], racecheck=T.INSTRUMENTED)


def run_prefill(lib, case, order="reverse", **kw):
    plan, stats, arrays, out = run_case(lib, case, order, planner=_ext.plan_sdpa_int4_prefill, **kw)
    assert plan["path"] == "prefill" and plan["key_tile"] == BK
    return plan, stats, arrays, out


# --------------------------------------------------------------------------------------- correctness
# Row counts G * L that are not multiples of the 32-row tile and token counts that are not multiples of
# the 16-key tile throughout.
CASES = [
    ("gqa1_f32_d64_g32_two_row_tiles", dict(Hq=2, Hkv=2, L=37, N=77, D=64, dtype="float32", group_size=32)),
    ("gqa4_f16_causal_tail", dict(Hq=8, Hkv=2, L=6, N=70, T=9, D=128, dtype="float16", mask="causal")),
    ("gqa2_bf16_g128_bool_BHLN", dict(Hq=4, Hkv=2, L=10, N=50, D=128, dtype="bfloat16", group_size=128,
                                      mask="bool_BHLN")),
    ("d80_g16_f16_additive", dict(Hq=2, Hkv=1, L=20, N=45, D=80, dtype="float16", group_size=16, mask="add_LN")),
    ("d96_k8v4_f32_dead_rows_sinks", dict(Hq=3, Hkv=1, L=11, N=40, T=5, D=96, dtype="float32", k_bits=8,
                                          v_bits=4, mask="bool_dead", sinks=True, group_size=32)),
    ("d256_bf16_k4v8_causal_sinks", dict(Hq=2, Hkv=1, L=9, N=30, T=3, D=256, dtype="bfloat16", v_bits=8,
                                         mask="causal", sinks=True)),
    ("bool_dead_rows", dict(Hq=4, Hkv=2, L=9, N=40, D=64, dtype="float16", mask="bool_dead")),
    ("additive_dead_rows", dict(Hq=4, Hkv=2, L=9, N=40, D=64, dtype="float32", mask="add_dead")),
    ("additive_inf_tail_gqa8", dict(Hq=8, Hkv=1, L=5, N=33, T=7, D=64, dtype="bfloat16", mask="add_inf")),
    ("k8v8_batch2_padmask", dict(B=2, Hq=2, Hkv=1, L=17, N=36, D=64, dtype="float16", k_bits=8, v_bits=8,
                                 mask="bool_B11N")),
    ("f32_q_f16_scales_tail_only", dict(Hq=2, Hkv=1, L=12, N=0, T=21, D=64, dtype="float32",
                                        scale_dtype="float16", mask="causal")),
    # the last row's diagonal key is the first key of a tile (31 + 49 - 32 = 48 = 3 * 16): that tile must not
    # be skipped. Keys all 0 (sharpness 0): uniform weights, so a lost key is far above float32's bound.
    ("causal_diagonal_starts_a_tile", dict(Hq=1, Hkv=1, L=32, N=40, T=9, D=64, dtype="float32", mask="causal",
                                           sharpness=0.0)),
    # causal with L > N + T: the first query rows see no key at all (mean of V, as MLX): no block skipping
    ("causal_rows_without_keys", dict(Hq=1, Hkv=1, L=40, N=20, T=4, D=64, dtype="float16", mask="causal")),
]

# mx.quantize's bit-stream widths: a thread dequantizes one unit of whole words (16 codes in one word at
# 2 bits, 32 codes in 3 words at 3 bits, 32 in 5 at 5 bits, 16 in 3 at 6 bits), codes straddling words.
STREAM_CASES = [
    ("k5v3_gqa4_f16_d128_g32_causal_tail", dict(Hq=8, Hkv=2, L=6, N=70, T=9, D=128, dtype="float16",
                                                group_size=32, mask="causal", k_bits=5, v_bits=3)),
    ("k3v5_f32_d64_g64_two_row_tiles", dict(Hq=2, Hkv=2, L=37, N=77, D=64, dtype="float32", k_bits=3,
                                            v_bits=5)),
    ("k2v6_bf16_d256_g128_causal_sinks", dict(Hq=2, Hkv=1, L=9, N=30, T=3, D=256, dtype="bfloat16",
                                              group_size=128, mask="causal", sinks=True, k_bits=2, v_bits=6)),
    ("k6v2_f16_d96_g32_bool_BHLN", dict(Hq=4, Hkv=2, L=10, N=50, D=96, dtype="float16", group_size=32,
                                        mask="bool_BHLN", k_bits=6, v_bits=2)),
    ("k5v4_f16_d128_g64_additive", dict(Hq=2, Hkv=1, L=20, N=45, D=128, dtype="float16", mask="add_LN",
                                        k_bits=5, v_bits=4)),
    ("k8v5_f32_d64_g32_dead_rows_sinks", dict(Hq=3, Hkv=1, L=11, N=40, T=5, D=64, dtype="float32",
                                              group_size=32, mask="bool_dead", sinks=True, k_bits=8, v_bits=5)),
    ("k3v3_f16_d96_g32_additive_inf_tail", dict(Hq=8, Hkv=1, L=5, N=33, T=7, D=96, dtype="float16",
                                                group_size=32, mask="add_inf", k_bits=3, v_bits=3)),
    ("k6v6_bf16_d256_g64_scales_f32", dict(Hq=2, Hkv=1, L=12, N=36, D=256, dtype="bfloat16",
                                           scale_dtype="float32", group_size=64, k_bits=6, v_bits=6)),
    ("k4v6_f16_d128_g32_batch2_padmask", dict(B=2, Hq=2, Hkv=1, L=17, N=36, D=128, dtype="float16",
                                              group_size=32, mask="bool_B11N", k_bits=4, v_bits=6)),
    ("k2v8_f32_d64_g32_tail_only", dict(Hq=2, Hkv=1, L=12, N=0, T=21, D=64, dtype="float32", group_size=32,
                                        mask="causal", k_bits=2, v_bits=8)),
]


@pytest.mark.parametrize("order", T.orders())
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_prefill(lib, name, kw, order):
    case = R.make_case(seed=len(name), **kw)
    plan, *_ = run_prefill(lib, case, order)
    G = kw["Hq"] // kw["Hkv"]
    assert plan["rows"] == G * kw["L"] and plan["row_tiles"] == -(-G * kw["L"] // BQ)


@pytest.mark.parametrize("order", T.orders())
@pytest.mark.parametrize("name,kw", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_prefill_bit_stream_widths(lib, name, kw, order):
    case = R.make_case(seed=len(name), **kw)
    plan, *_ = run_prefill(lib, case, order)
    fc = plan["launches"][0]["function_constants"]
    assert (fc[50], fc[51]) == (kw["k_bits"], kw["v_bits"])


def test_prefill_bit_stream_strided_views_and_transposed_q(lib):
    case = R.make_case(B=2, Hq=4, Hkv=2, L=9, N=37, T=6, D=128, dtype="float16", group_size=32, mask="causal",
                       sinks=True, k_bits=5, v_bits=3, seed=5)
    plan, *_ = run_prefill(lib, case, "interleave", strided=True, transposed_q=True)
    assert any(b["offset"] for b in plan["launches"][0]["buffers"] if b["kind"] == "input")


MASK_KINDS = ["bool_LN", "bool_11LN", "bool_B1LN", "bool_broadcast", "bool_slice", "bool_window", "bool_few",
              "bool_L1", "bool_stride2", "bool_N", "add_scalar", "add_B1LN", "add_broadcast"]


@pytest.mark.parametrize("mask", MASK_KINDS)
def test_prefill_mask_kinds(lib, mask):
    """Every other mask layout of the CPU tests: broadcast (stride 0) axes, strided views, 1-D and 0-D masks."""
    case = R.make_case(B=2, Hq=2, Hkv=1, L=9, N=35, D=64, dtype="float16", mask=mask, seed=11)
    run_prefill(lib, case, "reverse")


@pytest.mark.parametrize("order", T.orders())
def test_prefill_strided_views_and_transposed_q(lib, order):
    """Cache triples and tails as row slices of larger garbage/NaN buffers (binding byte offsets, strides from
    the caller), q in mlx-lm's [B, L, H, D] storage."""
    case = R.make_case(B=2, Hq=4, Hkv=2, L=9, N=37, T=6, D=64, dtype="float16", group_size=64, mask="causal",
                       sinks=True, seed=5)
    plan, *_ = run_prefill(lib, case, order, strided=True, transposed_q=True)
    assert any(b["offset"] for b in plan["launches"][0]["buffers"] if b["kind"] == "input")


def test_prefill_shuffle_and_runahead_orders(lib):
    case = R.make_case(Hq=4, Hkv=1, L=10, N=40, T=3, D=64, dtype="bfloat16", mask="bool_B1LN", sinks=True, seed=4)
    for order in ("shuffle:3", "runahead:5", "forward"):
        run_prefill(lib, case, order)


# --------------------------------------------------------------------------------------- traffic
def _bytes_per_key_tile(arrays, name):
    a = arrays[name]
    return a.nbytes // a.shape[2] * BK  # [B, Hkv, N, W] with B = Hkv = 1 below


@T.needs_instrumentation
@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (3, 5), (6, 2), (5, 8)])
def test_kv_tile_read_once_per_query_tile_and_kv_head(lib, k_bits, v_bits):
    """G * L = 48 query rows of one KV head = 2 row tiles: every packed K/V byte, scale and bias is read from
    device memory exactly twice (once per query tile), whatever the GQA ratio and the code width (a thread
    reads its unit's words once); q once."""
    case = R.make_case(B=1, Hq=8, Hkv=2, L=12, N=64, D=128, dtype="float16", group_size=64, k_bits=k_bits,
                       v_bits=v_bits, seed=2)
    plan, (st,), arrays, _ = run_prefill(lib, case)
    assert plan["row_tiles"] == 2
    for name, idx in (("k_packed", 1), ("v_packed", 4), ("k_scales", 2), ("k_biases", 3), ("v_scales", 5),
                      ("v_biases", 6)):
        b = st.buffers[idx]
        assert b.unique_bytes_read == arrays[name].nbytes, (name, b)
        assert b.bytes_read == 2 * arrays[name].nbytes and b.max_reads_per_byte == 2, (name, b)
    q = st.buffers[0]
    assert q.bytes_read == q.unique_bytes_read == arrays["q"].nbytes


@T.needs_instrumentation
def test_causal_block_skipping(lib):
    """Causal, 64 rows x 64 keys: row tile 0 (queries 0-31) reads key tiles 0-1 only, row tile 1 all 4, so the
    packed cache is read 6 key tiles' worth instead of 8; the result is unchanged."""
    case = R.make_case(B=1, Hq=1, Hkv=1, L=64, N=64, D=64, dtype="float16", mask="causal", seed=8)
    plan, (st,), arrays, _ = run_prefill(lib, case)
    assert plan["row_tiles"] == 2
    for name, idx in (("k_packed", 1), ("v_packed", 4), ("k_scales", 2), ("v_biases", 6)):
        assert st.buffers[idx].bytes_read == 6 * _bytes_per_key_tile(arrays, name), name
    # Without the mask nothing is skipped.
    case = R.make_case(B=1, Hq=1, Hkv=1, L=64, N=64, D=64, dtype="float16", seed=8)
    _, (st,), arrays, _ = run_prefill(lib, case)
    assert st.buffers[1].bytes_read == 8 * _bytes_per_key_tile(arrays, "k_packed")


# --------------------------------------------------------------------------------------- the plan
def _problem(**change):
    case = R.make_case(**{**dict(Hq=8, Hkv=2, L=1, N=40, D=64, dtype="float16"), **change})
    return problem(case, np.random.default_rng(0))[0]


def test_plan_chooses_decode_or_prefill():
    """plan_sdpa_int4 (what eval_gpu runs): decode while the rows of a KV head fit its register tiles and
    it has an instance, the prefill kernel otherwise (more rows, head dims 80/96, group 16)."""
    assert _ext.plan_sdpa_int4(_problem())["path"] == "decode"
    assert _ext.plan_sdpa_int4(_problem(L=8))["path"] == "decode"  # 32 rows: 4 row tiles of 8
    for change in (dict(L=9), dict(D=80, group_size=16), dict(D=96, group_size=32), dict(group_size=16)):
        p = _ext.plan_sdpa_int4(_problem(**change))
        assert p["supported"] and p["path"] == "prefill", (change, p["reason"])
        assert not _ext.plan_sdpa_int4_decode(_problem(**change))["supported"]
    p = _ext.plan_sdpa_int4(_problem(L=37, D=96, group_size=32))
    (launch,) = p["launches"]
    assert launch["kernel"] == "sdpa_int4_prefill_float16_t_96"
    assert launch["grid"] == (2, 5, 1) and launch["threadgroup"] == (128, 1, 1)  # 4 * 37 = 148 rows: 5 tiles of 32
    assert launch["function_constants"][50] == 4 and launch["function_constants"][51] == 4
    p = _ext.plan_sdpa_int4(_problem(L=37, D=96, group_size=32, k_bits=5, v_bits=3))
    assert p["path"] == "prefill" and p["launches"][0]["kernel"] == "sdpa_int4_prefill_float16_t_96"
    assert p["launches"][0]["function_constants"][50] == 5 and p["launches"][0]["function_constants"][51] == 3


def test_plan_prefill_end_to_end_under_emulator(lib):
    """The combined planner's prefill choice, executed as planned."""
    case = R.make_case(Hq=4, Hkv=1, L=9, N=30, D=80, dtype="float16", group_size=16, mask="causal", seed=3)
    run_case(lib, case, "interleave", planner=_ext.plan_sdpa_int4)


def test_plan_unsupported_is_explicit():
    """What neither kernel covers is reported with both reasons (the op then runs on the CPU): never a
    plan that would compute something else."""
    base = _problem(L=40)
    for change, why in [(dict(D=48), "head dim"), (dict(k_bits=7), "bits"), (dict(k_bits=2, group_size=16), "bits"),
                        (dict(q=dict(base["q"], strides=base["q"]["strides"][:3])), "4 strides")]:
        p = _ext.plan_sdpa_int4({**base, **change})
        assert not p["supported"] and p["path"] == "none" and why in p["reason"], (change, p["reason"])
        assert "decode:" in p["reason"] and "prefill:" in p["reason"]


def test_op_fallback_rule():
    """The rule the op applies on a Mac when the graph is built (csrc/sdpa_int4.cpp): shapes no Metal kernel
    covers go to the CPU op; strides do not matter (the plan copies a non-contiguous last axis first)."""
    shapes = dict(B=1, Hq=8, Hkv=2, L=1, D=128, N=100, group_size=64, k_bits=4, v_bits=4)
    assert _ext.metal_unsupported_reason(shapes) == ""
    assert _ext.metal_unsupported_reason({**shapes, "L": 500, "D": 80, "group_size": 16}) == ""
    assert "head dim" in _ext.metal_unsupported_reason({**shapes, "D": 48, "group_size": 16})
    assert "bits" in _ext.metal_unsupported_reason({**shapes, "k_bits": 7})
    # mx.quantize's other widths run on the GPU for groups of 32 or more (the CPU op takes group 16)
    for kb, vb in ((3, 4), (4, 5), (2, 6), (8, 3)):
        assert _ext.metal_unsupported_reason({**shapes, "k_bits": kb, "v_bits": vb}) == ""
        assert _ext.metal_unsupported_reason({**shapes, "k_bits": kb, "v_bits": vb, "L": 500}) == ""
    assert "bits k3v4" in _ext.metal_unsupported_reason({**shapes, "k_bits": 3, "group_size": 16})
