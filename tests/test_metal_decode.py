"""The Metal decode kernels (metal/sdpa_int4.metal) run under the MSL emulator (tests/mslemu).

Every dispatch follows exactly the plan of the C++ planner (`_ext.plan_sdpa_int4_decode`,
csrc/metal/dispatch_plan.cpp): kernel names, function constants, buffer bindings with byte
offsets, argument arrays, scratch buffers, grid and threadgroup sizes all come from it.
Results are checked against the float64 reference (tests/reference.py) with the CPU tests'
NMSE bounds, with the race detector on, under the default scheduling orders.
"""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import reference as R  # noqa: E402
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)

from metal_plan_testing import METAL, execute, out_buffer, out_values, problem, run_case  # noqa: E402
from tqmetal import _ext  # noqa: E402

MLX_INC = T.mlx_include()
pytestmark = pytest.mark.skipif(not MLX_INC, reason="mlx Metal kernel headers not found (pip install mlx / MLX_INCLUDE)")


@pytest.fixture(scope="module")
def lib():
    return T.mslemu.compile(METAL, include_dirs=[MLX_INC], racecheck=T.INSTRUMENTED)


# --------------------------------------------------------------------------------------- correctness
# (description, make_case kwargs, blocks for the forced 2-pass run)
CASES = [
    ("gqa1_f32_d64_g32", dict(Hq=2, Hkv=2, N=77, D=64, dtype="float32", group_size=32), 3),
    ("gqa2_f16_causal_L2", dict(Hq=4, Hkv=2, L=2, N=150, D=128, dtype="float16", mask="causal"), 4),
    ("gqa4_bf16_g128_bool", dict(Hq=8, Hkv=2, N=90, D=128, dtype="bfloat16", group_size=128, mask="bool_BHLN"), 2),
    ("gqa8_f16_d64_additive", dict(Hq=8, Hkv=1, N=130, D=64, dtype="float16", mask="add_LN"), 5),
    ("tail_sinks_f32_scales_f16", dict(Hq=4, Hkv=1, N=70, T=13, D=64, dtype="float32", scale_dtype="float16",
                                       sinks=True, mask="causal", L=2), 3),
    ("bool_dead_rows", dict(Hq=4, Hkv=2, N=66, D=64, dtype="float16", mask="bool_dead"), 3),
    ("bool_dead_rows_sinks", dict(Hq=4, Hkv=2, N=66, D=64, dtype="float16", mask="bool_dead", sinks=True), 3),
    ("additive_dead_rows", dict(Hq=2, Hkv=1, L=2, N=70, D=64, dtype="float32", mask="add_dead"), 2),
    ("additive_inf_tail", dict(Hq=4, Hkv=2, N=64, T=7, D=64, dtype="bfloat16", mask="add_inf"), 2),
    ("k8v4_f32_scales", dict(Hq=4, Hkv=2, N=100, D=128, dtype="float32", k_bits=8, v_bits=4), 3),
    ("k8v8_batch2_padmask", dict(B=2, Hq=2, Hkv=1, N=60, D=64, dtype="float16", k_bits=8, v_bits=8,
                                 mask="bool_B11N"), 2),
    ("k4v8_d256_bf16_scales_f32", dict(Hq=4, Hkv=2, N=40, T=5, D=256, dtype="bfloat16", scale_dtype="float32",
                                       k_bits=4, v_bits=8, mask="bool_N", group_size=128), 2),
    ("d256_g32_gqa4_rows_tiles", dict(Hq=4, Hkv=1, L=2, N=36, D=256, dtype="float16", group_size=32,
                                      mask="causal", sinks=True), 2),
    ("rows_two_tiles", dict(Hq=8, Hkv=1, L=2, N=50, D=64, dtype="float16", mask="causal"), 2),
]

# mx.quantize's bit-stream widths (the "_stream" instances: K and V bits from function constants 50/51).
# A lane owns D / 32 codes = PT * bits bits of the row's bit stream: D 64 -> 4-16 bits (3 and 5 bits: lanes
# start mid-byte), D 128 -> 8-32 bits, D 256 -> 16-64 bits (40 and 48 bits end exactly at the end of the
# second word the lane loads; 8 bits at D 256 fill both words).
STREAM_CASES = [
    ("k5v3_gqa4_f16_d128_g32_causal_L2", dict(Hq=8, Hkv=2, L=2, N=83, D=128, dtype="float16", group_size=32,
                                              mask="causal", k_bits=5, v_bits=3), 3),
    ("k3v5_gqa1_f32_d64_g64_bool", dict(Hq=2, Hkv=2, N=77, D=64, dtype="float32", group_size=64,
                                        mask="bool_BHLN", k_bits=3, v_bits=5), 3),
    ("k2v6_gqa8_bf16_d256_g128_tail_sinks", dict(Hq=8, Hkv=1, N=50, T=7, D=256, dtype="bfloat16",
                                                 group_size=128, sinks=True, k_bits=2, v_bits=6), 2),
    ("k6v2_gqa2_f16_d128_g64_additive", dict(Hq=4, Hkv=2, N=100, D=128, dtype="float16", mask="add_LN",
                                             k_bits=6, v_bits=2), 4),
    ("k5v4_d256_g32_tail_causal_L2", dict(Hq=4, Hkv=1, L=2, N=45, T=4, D=256, dtype="float16", group_size=32,
                                          mask="causal", k_bits=5, v_bits=4), 2),
    ("k8v5_d64_g32_bf16_dead_sinks", dict(Hq=4, Hkv=2, N=66, D=64, dtype="bfloat16", group_size=32,
                                          mask="bool_dead", sinks=True, k_bits=8, v_bits=5), 3),
    ("k3v3_d64_g32_f32_additive_dead", dict(Hq=2, Hkv=1, L=2, N=70, D=64, dtype="float32", group_size=32,
                                            mask="add_dead", k_bits=3, v_bits=3), 2),
    ("k6v6_d256_g64_scales_f32", dict(Hq=4, Hkv=2, N=40, T=5, D=256, dtype="float16", scale_dtype="float32",
                                      group_size=64, mask="bool_N", k_bits=6, v_bits=6), 2),
    ("k3v8_d256_g32_gqa4", dict(Hq=4, Hkv=1, N=36, D=256, dtype="float32", group_size=32, k_bits=3, v_bits=8,
                                sinks=True), 2),
    ("k2v2_d128_g32_gqa8_rows_two_tiles", dict(Hq=8, Hkv=1, L=2, N=60, D=128, dtype="float16", group_size=32,
                                               mask="causal", k_bits=2, v_bits=2), 2),
    ("k4v3_d64_g64_batch2_padmask", dict(B=2, Hq=2, Hkv=1, N=60, D=64, dtype="float16", k_bits=4, v_bits=3,
                                         mask="bool_B11N"), 2),
    ("k6v5_d128_g128_tail_additive_inf", dict(Hq=4, Hkv=2, N=64, T=7, D=128, dtype="bfloat16", group_size=128,
                                              mask="add_inf", k_bits=6, v_bits=5), 2),
]


@pytest.mark.parametrize("order", T.orders())
@pytest.mark.parametrize("name,kw,blocks", CASES, ids=[c[0] for c in CASES])
def test_decode_one_and_two_pass(lib, name, kw, blocks, order):
    case = R.make_case(seed=len(name), **kw)
    run_case(lib, case, order, blocks=1, expect_two_pass=False)
    plan, *_ = run_case(lib, case, order, blocks=blocks, expect_two_pass=True)
    assert plan["blocks"] >= 2


@pytest.mark.parametrize("order", T.orders())
@pytest.mark.parametrize("name,kw,blocks", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_decode_bit_stream_widths(lib, name, kw, blocks, order):
    case = R.make_case(seed=len(name), **kw)
    plan, *_ = run_case(lib, case, order, blocks=1, expect_two_pass=False)
    assert plan["launches"][0]["kernel"].endswith("_stream")
    fc = plan["launches"][0]["function_constants"]
    assert (fc[50], fc[51]) == (kw["k_bits"], kw["v_bits"])
    plan, *_ = run_case(lib, case, order, blocks=blocks, expect_two_pass=True)
    assert plan["blocks"] >= 2 and plan["launches"][0]["kernel"].endswith("_stream")


@pytest.mark.parametrize("order", T.orders())
def test_bit_stream_strided_views_and_transposed_q(lib, order):
    """k3v5 cache triples as row slices of larger garbage buffers (a row then starts at any word of the
    buffer: the lanes' word offsets are relative to the row), q in mlx-lm's [B, L, H, D] storage."""
    case = R.make_case(B=2, Hq=4, Hkv=2, L=2, N=45, T=6, D=128, dtype="float16", group_size=32, mask="causal",
                       sinks=True, k_bits=3, v_bits=5, seed=7)
    run_case(lib, case, order, strided=True, transposed_q=True, blocks=1)
    run_case(lib, case, order, strided=True, transposed_q=True, blocks=3, expect_two_pass=True)


@pytest.mark.parametrize("order", T.orders())
def test_strided_views_and_transposed_q(lib, order):
    """Cache triples as row slices of larger garbage/NaN buffers (binding byte offsets, row strides
    from the caller), tails likewise, q in mlx-lm's [B, L, H, D] storage."""
    case = R.make_case(B=2, Hq=4, Hkv=2, L=2, N=45, T=6, D=64, dtype="float16", group_size=64, mask="causal",
                       sinks=True, seed=5)
    plan, *_ = run_case(lib, case, order, strided=True, transposed_q=True, blocks=1)
    assert any(b["offset"] for b in plan["launches"][0]["buffers"] if b["kind"] == "input")
    run_case(lib, case, order, strided=True, transposed_q=True, blocks=3, expect_two_pass=True)


@pytest.mark.parametrize("blocks", [2, 3, 7])
def test_block_counts_ragged(lib, blocks):
    """Ragged N (not a multiple of the block length or of the 16 simdgroups) and several block counts."""
    case = R.make_case(Hq=4, Hkv=1, N=203, T=3, D=128, dtype="float16", group_size=32, mask="bool_LN", seed=9)
    plan, *_ = run_case(lib, case, "reverse", blocks=blocks, expect_two_pass=True)
    assert plan["blocks"] == min(blocks, -(-206 // plan["block_len"]))
    assert (plan["blocks"] - 1) * plan["block_len"] < 206 <= plan["blocks"] * plan["block_len"]


def test_automatic_plan_splits_long_context(lib):
    """blocks=0: the planner's own choice; with few GPU cores to fill, 600 tokens go 2-pass (>= 256 per block)."""
    case = R.make_case(Hq=2, Hkv=1, N=600, D=64, dtype="float16", mask="causal", seed=6)
    rng = np.random.default_rng(0)
    prob, arrays = problem(case, rng, blocks=0, gpu_cores=1)
    plan = _ext.plan_sdpa_int4_decode(prob)
    assert plan["two_pass"] and plan["blocks"] == 2 and plan["block_len"] == 320
    out = out_buffer(case)
    execute(lib, plan, arrays, out, "reverse")
    R.check_close(out_values(case, out), case.reference(), R.tolerance(case.q.dtype, int16_query=False),
                  context=repr(case))
    assert not _ext.plan_sdpa_int4_decode({**prob, "gpu_cores": 32, "N": 200})["two_pass"]


def test_shuffle_and_runahead_orders(lib):
    """Two more scheduling orders (beyond the default reverse/interleave) on a 2-pass case."""
    case = R.make_case(Hq=8, Hkv=2, N=120, D=64, dtype="bfloat16", mask="bool_B1LN", sinks=True, seed=4)
    for order in ("shuffle:3", "runahead:5"):
        run_case(lib, case, order, blocks=3, expect_two_pass=True)


# --------------------------------------------------------------------------------------- traffic
def _assert_cache_read_once(st, arrays):
    """Every packed K/V byte, scale and bias of the launch was read exactly once."""
    for name, idx in (("k_packed", 1), ("v_packed", 4), ("k_scales", 2), ("k_biases", 3), ("v_scales", 5),
                      ("v_biases", 6)):
        b = st.buffers[idx]
        assert b.bytes_read == b.unique_bytes_read == arrays[name].nbytes, (name, b)
        assert b.max_reads_per_byte == 1


@T.needs_instrumentation
@pytest.mark.parametrize("blocks", [1, 3])
def test_packed_kv_read_once_per_kv_head(lib, blocks):
    """GQA 4 x L 2 = 8 query rows per KV head in one threadgroup (per block): every packed K/V byte, scale
    and bias is loaded from device memory exactly once per KV head (MLX's sdpa_vector, and the
    one-threadgroup-per-query-head layout, read them once per query head: G times)."""
    case = R.make_case(B=1, Hq=8, Hkv=2, L=2, N=96, D=128, dtype="float16", group_size=64, seed=2)
    plan, stats, arrays, _ = run_case(lib, case, "reverse", blocks=blocks, expect_two_pass=blocks > 1)
    assert plan["row_tiles"] == 1
    st = stats[0]
    _assert_cache_read_once(st, arrays)
    q = st.buffers[0]
    assert q.unique_bytes_read == arrays["q"].nbytes and q.bytes_read == blocks * arrays["q"].nbytes
    # every input together: each byte once, but q once per block (its threadgroup stages it in threadgroup memory)
    ins = [st.buffers[i] for i in range(7)]
    assert sum(b.bytes_read for b in ins) == sum(b.unique_bytes_read for b in ins) + (blocks - 1) * q.unique_bytes_read


@T.needs_instrumentation
@pytest.mark.parametrize("D,k_bits,v_bits", [(64, 3, 5), (128, 5, 6), (128, 2, 4), (256, 6, 2), (256, 5, 8)])
def test_bit_stream_packed_kv_read_once_per_kv_head(lib, D, k_bits, v_bits):
    """The bit-stream instances too: a simdgroup loads each word of a packed row once (lane i words i and
    i + 32) and the lanes gather theirs with simd_shuffle, so every packed byte, scale and bias is read from
    device memory exactly once per KV head, and nothing past the row."""
    case = R.make_case(B=1, Hq=8, Hkv=2, L=2 if D < 256 else 1, N=96, D=D, dtype="float16", group_size=32,
                       k_bits=k_bits, v_bits=v_bits, seed=2)
    plan, stats, arrays, _ = run_case(lib, case, "reverse", blocks=1)
    assert plan["row_tiles"] == 1 and plan["launches"][0]["kernel"].endswith("_stream")
    _assert_cache_read_once(stats[0], arrays)


@T.needs_instrumentation
def test_rows_beyond_one_tile_reread(lib):
    """G * L = 16 rows > ROWS = 8: two row tiles, each reads the packed cache once (documented)."""
    case = R.make_case(Hq=8, Hkv=1, L=2, N=40, D=64, dtype="float16", seed=3)
    plan, stats, arrays, _ = run_case(lib, case, "reverse", blocks=1)
    assert plan["row_tiles"] == 2
    b = stats[0].buffers[1]
    assert b.unique_bytes_read == arrays["k_packed"].nbytes and b.bytes_read == 2 * arrays["k_packed"].nbytes


# --------------------------------------------------------------------------------------- the plan
def test_plan_auto_blocks_and_fallbacks():
    base = dict(B=1, Hq=32, Hkv=8, L=1, D=128, N=8192, T=0, group_size=64, k_bits=4, v_bits=4, scale=0.1)
    ref = lambda dt, st: dict(dtype=dt, offset=0, strides=st)  # noqa: E731
    W, G = 16, 2
    tensors = dict(q=ref("float16", [32 * 128, 128, 128, 1]),
                   k_packed=ref("uint32", [8 * 8192 * W, 8192 * W, W, 1]),
                   k_scales=ref("float16", [8 * 8192 * G, 8192 * G, G, 1]),
                   k_biases=ref("float16", [8 * 8192 * G, 8192 * G, G, 1]))
    tensors.update(v_packed=tensors["k_packed"], v_scales=tensors["k_scales"], v_biases=tensors["k_biases"])
    p = _ext.plan_sdpa_int4_decode({**base, **tensors})
    assert p["supported"] and p["two_pass"] and p["blocks"] == 16 and p["block_len"] == 512
    (l1, l2) = p["launches"]
    assert l1["kernel"] == "sdpa_int4_decode_2pass_1_float16_t_128_k4v4"
    assert l2["kernel"] == "sdpa_int4_decode_2pass_2_float16_t_128"
    assert l1["grid"] == (8, 1, 16) and l1["threadgroup"] == (512, 1, 1) and l2["grid"] == (8, 4, 1)
    assert p["scratch"] == {"partial_out": 8 * 4 * 16 * 128 * 4, "partial_max": 8 * 4 * 16 * 4,
                            "partial_sum": 8 * 4 * 16 * 4}
    short = _ext.plan_sdpa_int4_decode({**base, **tensors, "N": 300})
    assert short["supported"] and not short["two_pass"] and short["launches"][0]["grid"] == (8, 1, 1)
    assert short["launches"][0]["kernel"] == "sdpa_int4_decode_1pass_float16_t_128_k4v4"
    many_heads = _ext.plan_sdpa_int4_decode({**base, **tensors, "B": 16})  # 128 threadgroups: enough
    assert not many_heads["two_pass"]
    # any other pair of mx.quantize's widths: the one bit-stream instance, widths as constants 50/51
    for kb, vb in [(4, 2), (3, 8), (5, 6), (2, 2)]:
        W_k, W_v = 128 * kb // 32, 128 * vb // 32
        bt = {**tensors, "k_packed": ref("uint32", [8 * 8192 * W_k, 8192 * W_k, W_k, 1]),
              "v_packed": ref("uint32", [8 * 8192 * W_v, 8192 * W_v, W_v, 1])}
        s = _ext.plan_sdpa_int4_decode({**base, **bt, "k_bits": kb, "v_bits": vb, "N": 300})
        assert s["supported"], s["reason"]
        assert s["launches"][0]["kernel"] == "sdpa_int4_decode_1pass_float16_t_128_stream"
        assert (s["launches"][0]["function_constants"][50], s["launches"][0]["function_constants"][51]) == (kb, vb)
        s = _ext.plan_sdpa_int4_decode({**base, **bt, "k_bits": kb, "v_bits": vb})
        assert [l["kernel"] for l in s["launches"]] == ["sdpa_int4_decode_2pass_1_float16_t_128_stream",
                                                        "sdpa_int4_decode_2pass_2_float16_t_128"]
    for change, why in [(dict(D=96), "head dim"), (dict(group_size=16), "group size"),
                        (dict(k_bits=4, v_bits=7), "bits k4v7"), (dict(k_bits=1), "bits k1v4"),
                        (dict(L=9), "prefill")]:
        r = _ext.plan_sdpa_int4_decode({**base, **tensors, **change})
        assert not r["supported"] and why in r["reason"], (change, r["reason"])
    # a strided last axis is copied by the plan's first launch, then read as a scratch buffer
    strided = _ext.plan_sdpa_int4_decode({**base, **tensors, "q": ref("float16", [32 * 128, 128, 1, 32])})
    assert strided["supported"] and strided["launches"][0]["kernel"] == "sdpa_int4_copy_4d_b2"
    assert strided["scratch"]["q_contiguous"] == 32 * 128 * 2
