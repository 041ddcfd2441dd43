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
import mlx.core as mx  # noqa: E402

import reference as R  # noqa: E402
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)

from tqmetal import _ext  # noqa: E402

METAL = pathlib.Path(__file__).resolve().parent.parent / "metal" / "sdpa_int4.metal"
MLX_INC = T.mlx_include()
pytestmark = pytest.mark.skipif(not MLX_INC, reason="mlx Metal kernel headers not found (pip install mlx / MLX_INCLUDE)")


@pytest.fixture(scope="module")
def lib():
    return T.mslemu.compile(METAL, include_dirs=[MLX_INC], racecheck=T.INSTRUMENTED)


# --------------------------------------------------------------------------------------- buffers
def np_dtype_name(a: mx.array) -> str:
    return {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32", mx.uint32: "uint32",
            mx.bool_: "bool"}[a.dtype]


def to_buffer(a: mx.array) -> np.ndarray:
    """mx array -> C-contiguous NumPy array of the bytes the kernel reads (bfloat16 as uint16)."""
    if a.dtype == mx.bfloat16:
        return T.to_bf16(R.to_numpy(a))
    return np.ascontiguousarray(R.to_numpy(a))


def tensor(a: mx.array, rng, *, pad_rows=0, offset_rows=0, transposed=False):
    """(buffer, plan entry) for a [B, H, n, W] array; optionally a view of rows
    [offset_rows, offset_rows + n) of a larger buffer of garbage (like mlx-lm's preallocated cache),
    or q stored as [B, L, H, D] (mlx-lm's layout)."""
    x = to_buffer(a)
    name = np_dtype_name(a)
    if transposed:
        buf = np.ascontiguousarray(np.swapaxes(x, 1, 2))
        es = np.array(buf.strides) // buf.itemsize
        return buf, dict(dtype=name, offset=0, strides=[int(es[0]), int(es[2]), int(es[1]), int(es[3])])
    if pad_rows or offset_rows:
        B, H, n, W = x.shape
        cap = n + pad_rows + offset_rows
        if x.dtype == np.uint32:
            buf = rng.integers(0, 2**32, size=(B, H, cap, W), dtype=np.uint64).astype(np.uint32)
        elif x.dtype == np.uint16:  # bfloat16 NaN
            buf = np.full((B, H, cap, W), 0x7FC0, np.uint16)
        else:
            buf = np.full((B, H, cap, W), np.nan, x.dtype)
        buf[:, :, offset_rows:offset_rows + n] = x
        return buf, dict(dtype=name, offset=offset_rows * W * x.itemsize, strides=[H * cap * W, cap * W, W, 1])
    es = np.array(x.strides) // max(x.itemsize, 1)
    return x, dict(dtype=name, offset=0, strides=[int(s) for s in es])


def mask_tensor(m: mx.array, B, Hq, L, NT):
    """Right-align a mask on [B, Hq, L, N + T]; broadcast axes get stride 0."""
    x = to_buffer(m)
    if x.ndim == 0:
        x = x.reshape(1)
    shape, es = x.shape, [s // x.itemsize for s in x.strides]
    st = []
    for i in range(4):
        src = x.ndim - 4 + i
        st.append(0 if src < 0 or shape[src] == 1 else int(es[src]))
    name = "bool" if x.dtype == np.bool_ else np_dtype_name(m)
    return np.ascontiguousarray(x), dict(dtype=name, offset=0, strides=st)


def problem(case: R.Case, rng, *, strided=False, transposed_q=False, blocks=0, gpu_cores=32):
    """(plan-problem dict, {input name: buffer}) for a reference.Case."""
    q = case.q
    B, Hq, L, D = q.shape
    Hkv, N = case.k[0].shape[1], case.k[0].shape[2]
    Tn = 0 if case.k_tail is None else case.k_tail.shape[2]
    arrays = {}
    prob = dict(B=B, Hq=Hq, Hkv=Hkv, L=L, D=D, N=N, T=Tn, group_size=case.group_size, k_bits=case.k_bits,
                v_bits=case.v_bits, scale=case.scale, blocks=blocks, gpu_cores=gpu_cores)
    arrays["q"], prob["q"] = tensor(q, rng, transposed=transposed_q)
    kw = dict(pad_rows=37, offset_rows=5) if strided else {}
    for pre, trip in (("k", case.k), ("v", case.v)):
        for suf, a in zip(("packed", "scales", "biases"), trip):
            arrays[f"{pre}_{suf}"], prob[f"{pre}_{suf}"] = tensor(a, rng, **kw)
    if case.k_tail is not None:
        tkw = dict(pad_rows=9, offset_rows=0) if strided else {}
        arrays["k_tail"], prob["k_tail"] = tensor(case.k_tail, rng, **tkw)
        arrays["v_tail"], prob["v_tail"] = tensor(case.v_tail, rng, **tkw)
    if isinstance(case.mask, str):
        prob["mask_kind"] = case.mask
    elif case.mask is not None:
        arrays["mask"], prob["mask"] = mask_tensor(case.mask, B, Hq, L, N + Tn)
        prob["mask_kind"] = "bool" if case.mask.dtype == mx.bool_ else "additive"
    if case.sinks is not None:
        arrays["sinks"], prob["sinks"] = tensor(case.sinks, rng)
    return prob, arrays


def out_buffer(case):
    shape = tuple(case.q.shape)
    if case.q.dtype == mx.bfloat16:
        return np.zeros(shape, np.uint16)
    return np.zeros(shape, {mx.float16: np.float16, mx.float32: np.float32}[case.q.dtype])


def out_values(case, out):
    return T.from_bf16(out) if case.q.dtype == mx.bfloat16 else out


def execute(lib, plan, arrays, out, order="forward"):
    """Run the plan's launches in order, binding exactly what it says. Returns the DispatchStats."""
    assert plan["supported"], plan["reason"]
    scratch = {name: np.full(nbytes // 4, np.nan, np.float32) for name, nbytes in plan["scratch"].items()}
    stats = []
    for launch in plan["launches"]:
        bufs = {}
        for b in launch["buffers"]:
            kind, name, idx = b["kind"], b["name"], b["index"]
            if kind == "input":
                a = arrays[name]
                bufs[idx] = a.reshape(-1).view(np.uint8)[b["offset"]:] if b["offset"] else a
            elif kind == "output":
                bufs[idx] = out
            elif kind == "scratch":
                bufs[idx] = scratch[name]
            elif kind == "int32":
                bufs[idx] = np.array(b["value"], np.int32)
            elif kind == "int64":
                bufs[idx] = np.array(b["value"], np.int64)
            elif kind == "float32":
                bufs[idx] = np.float32(b["value"])
            else:
                raise AssertionError(kind)
        st = lib.dispatch(launch["kernel"], buffers=bufs, threadgroups=launch["grid"],
                          threads_per_threadgroup=launch["threadgroup"],
                          function_constants=launch["function_constants"], order=order)
        assert st.partial_collectives == 0 and st.races == 0
        stats.append(st)
    return stats


def run_case(lib, case, order, *, strided=False, transposed_q=False, blocks=0, seed=0, expect_two_pass=None):
    rng = np.random.default_rng(seed)
    prob, arrays = problem(case, rng, strided=strided, transposed_q=transposed_q, blocks=blocks)
    plan = _ext.plan_sdpa_int4_decode(prob)
    if expect_two_pass is not None:
        assert plan["two_pass"] == expect_two_pass, plan
    out = out_buffer(case)
    stats = execute(lib, plan, arrays, out, order)
    R.check_close(out_values(case, out), case.reference(), case.tol(), context=repr(case))
    return plan, stats, arrays, out


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


@pytest.mark.parametrize("order", T.orders())
@pytest.mark.parametrize("name,kw,blocks", CASES, ids=[c[0] for c in CASES])
def test_decode_one_and_two_pass(lib, name, kw, blocks, order):
    case = R.make_case(seed=len(name), **kw)
    run_case(lib, case, order, blocks=1, expect_two_pass=False)
    plan, *_ = run_case(lib, case, order, blocks=blocks, expect_two_pass=True)
    assert plan["blocks"] >= 2


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
    R.check_close(out_values(case, out), case.reference(), case.tol(), context=repr(case))
    assert not _ext.plan_sdpa_int4_decode({**prob, "gpu_cores": 32, "N": 200})["two_pass"]


def test_shuffle_and_runahead_orders(lib):
    """Two more scheduling orders (beyond the default reverse/interleave) on a 2-pass case."""
    case = R.make_case(Hq=8, Hkv=2, N=120, D=64, dtype="bfloat16", mask="bool_B1LN", sinks=True, seed=4)
    for order in ("shuffle:3", "runahead:5"):
        run_case(lib, case, order, blocks=3, expect_two_pass=True)


# --------------------------------------------------------------------------------------- traffic
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
    for name, idx in (("k_packed", 1), ("v_packed", 4), ("k_scales", 2), ("k_biases", 3), ("v_scales", 5),
                      ("v_biases", 6)):
        b = st.buffers[idx]
        assert b.bytes_read == b.unique_bytes_read == arrays[name].nbytes, (name, b)
        assert b.max_reads_per_byte == 1
    q = st.buffers[0]
    assert q.unique_bytes_read == arrays["q"].nbytes and q.bytes_read == blocks * arrays["q"].nbytes
    # every input together: each byte once, but q once per block (its threadgroup stages it in threadgroup memory)
    ins = [st.buffers[i] for i in range(7)]
    assert sum(b.bytes_read for b in ins) == sum(b.unique_bytes_read for b in ins) + (blocks - 1) * q.unique_bytes_read


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
    for change, why in [(dict(D=96), "head dim"), (dict(group_size=16), "group size"),
                        (dict(k_bits=4, v_bits=2), "bits"), (dict(L=9), "prefill"),
                        (dict(q=ref("float16", [32 * 128, 128, 1, 32])), "contiguous")]:
        r = _ext.plan_sdpa_int4_decode({**base, **tensors, **change})
        assert not r["supported"] and why in r["reason"], (change, r["reason"])
