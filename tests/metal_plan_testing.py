"""Shared by the Metal kernel tests (test_metal_decode.py, test_metal_prefill.py): turn a reference.Case
into the planner's problem dict and the buffers the kernels read, and execute a plan under the MSL emulator
exactly as it says (kernel names, function constants, bindings with byte offsets, argument arrays, scratch
buffers, grid and threadgroup sizes)."""
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mlx.core as mx  # noqa: E402

import reference as R  # noqa: E402
from metal_sources import expanded  # noqa: E402
from mslemu import testing as T  # noqa: E402

from tqmetal import _ext  # noqa: E402

# The kernels as a Mac without Xcode compiles them (metal/*.metal with every #include expanded: the
# source eval_gpu embeds); where no mlx headers are installed the tests skip and these stay the files.
_SRC = pathlib.Path(__file__).resolve().parent.parent / "metal"
METAL = expanded("sdpa_int4") if T.mlx_include() else _SRC / "sdpa_int4.metal"  # decode instances
METAL_PREFILL = expanded("sdpa_int4_prefill") if T.mlx_include() else _SRC / "sdpa_int4_prefill.metal"
METAL_COPY = expanded("sdpa_int4_copy") if T.mlx_include() else _SRC / "sdpa_int4_copy.metal"


def copy_library():
    """The strided-copy kernels the plans launch first for an input whose last axis is strided."""
    return T.mslemu.compile(METAL_COPY, racecheck=T.INSTRUMENTED)


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


def mask_tensor(m: mx.array, B, Hq, L, NT, *, view=False):
    """Right-align a mask on [B, Hq, L, N + T]; broadcast axes get stride 0.

    view=True hands it over as a view into a larger buffer: starting 3 elements in (a
    binding byte offset), every axis strided, the key axis with stride 2 (the rest of the
    buffer holds values that would change the result if read: NaN / True)."""
    x = to_buffer(m)
    if x.ndim == 0:
        x = x.reshape(1)
    name = "bool" if x.dtype == np.bool_ else np_dtype_name(m)
    if view:
        fill = True if x.dtype == np.bool_ else (0x7FC0 if x.dtype == np.uint16 else np.nan)
        big_shape = tuple(n + 1 for n in x.shape[:-1]) + (2 * x.shape[-1] + 1,)
        buf = np.full((3 + int(np.prod(big_shape)),), fill, x.dtype)
        big = buf[3:].reshape(big_shape)
        idx = tuple(slice(0, n) for n in x.shape[:-1]) + (slice(0, 2 * x.shape[-1], 2),)
        big[idx] = x
        es = [s // x.itemsize for s in big[idx].strides]
        st = []
        for i in range(4):
            src = x.ndim - 4 + i
            st.append(0 if src < 0 or x.shape[src] == 1 else int(es[src]))
        return buf, dict(dtype=name, offset=3 * x.itemsize, strides=st)
    shape, es = x.shape, [s // x.itemsize for s in x.strides]
    st = []
    for i in range(4):
        src = x.ndim - 4 + i
        st.append(0 if src < 0 or shape[src] == 1 else int(es[src]))
    return np.ascontiguousarray(x), dict(dtype=name, offset=0, strides=st)


def problem(case: R.Case, rng, *, strided=False, transposed_q=False, blocks=0, gpu_cores=32, mask_view=False):
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
        arrays["mask"], prob["mask"] = mask_tensor(case.mask, B, Hq, L, N + Tn, view=mask_view)
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
    """Run the plan's launches in order, binding exactly what it says. Returns the DispatchStats.
    `lib`: the emulator library of the plan's attention kernels, or {library stem: Library}; copy
    launches (metal/sdpa_int4_copy.metal) run in copy_library() unless the dict names one."""
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
        if isinstance(lib, dict):
            run_lib = lib[launch["library"]] if launch["library"] in lib or launch["library"] != "sdpa_int4_copy" \
                else copy_library()
        else:
            run_lib = copy_library() if launch["library"] == "sdpa_int4_copy" else lib
        st = run_lib.dispatch(launch["kernel"], buffers=bufs, threadgroups=launch["grid"],
                          threads_per_threadgroup=launch["threadgroup"],
                          function_constants=launch["function_constants"], order=order)
        assert st.partial_collectives == 0 and st.races == 0
        stats.append(st)
    return stats


def run_case(lib, case, order, *, strided=False, transposed_q=False, blocks=0, seed=0, expect_two_pass=None,
             planner=None, mask_view=False):
    """Plan (the decode planner unless `planner` says otherwise), execute under the emulator, check against
    the float64 reference. Returns (plan, per-launch DispatchStats, input buffers, output buffer)."""
    rng = np.random.default_rng(seed)
    prob, arrays = problem(case, rng, strided=strided, transposed_q=transposed_q, blocks=blocks,
                           mask_view=mask_view)
    plan = (planner or _ext.plan_sdpa_int4_decode)(prob)
    if expect_two_pass is not None:
        assert plan["two_pass"] == expect_two_pass, plan
    out = out_buffer(case)
    stats = execute(lib, plan, arrays, out, order)
    # the Metal kernels compute in float: the float paths' bound, whatever CPU this is
    R.check_close(out_values(case, out), case.reference(), R.tolerance(case.q.dtype, int16_query=False),
                  context=repr(case))
    return plan, stats, arrays, out
