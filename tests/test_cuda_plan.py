"""The CUDA launch plan (csrc/cuda/dispatch_plan.h), executed on the CPU.

eval_gpu on MLX's CUDA backend runs exactly what this pure function returns, so its
decisions (path, specialization, split-K, grid, load width, scratch, dependencies)
are checked here on machines without a GPU; tests/test_cuda.py runs the kernels on one.
"""

import numpy as np
import pytest

import tqmetal
from tqmetal import _ext

import reference as R
from test_cuda import K_ROUNDING, k_rounding_case

SMS_H100 = 132


def tensor(dtype, strides, offset=0):
    return {"dtype": dtype, "offset": offset, "strides": list(strides)}


def problem(*, B=1, Hq=32, Hkv=8, L=1, D=128, N=131072, T=0, gs=64, kb=4, vb=4, dtype="float16",
            sdt="float16", mask=None, sinks=False, offset=0, token_stride=None, sms=SMS_H100, blocks=0):
    """A problem dict as eval_gpu builds it: contiguous [B, H, N, ...] arrays unless said."""
    p = dict(B=B, Hq=Hq, Hkv=Hkv, L=L, D=D, N=N, T=T, group_size=gs, k_bits=kb, v_bits=vb,
             scale=D ** -0.5, gpu_cores=sms, blocks=blocks)
    p["q"] = tensor(dtype, (Hq * L * D, L * D, D, 1))
    cap = N if token_stride is None else token_stride
    for name, bits in (("k", kb), ("v", vb)):
        w = D * bits // 32
        p[f"{name}_packed"] = tensor("uint32", (Hkv * cap * w, cap * w, w, 1), offset)
        for part in ("scales", "biases"):
            p[f"{name}_{part}"] = tensor(sdt, (Hkv * cap * (D // gs), cap * (D // gs), D // gs, 1))
    if T:
        for name in ("k_tail", "v_tail"):
            p[name] = tensor(dtype, (Hkv * T * D, T * D, D, 1))
    if mask is not None:
        p["mask_kind"] = mask
        if mask in ("bool", "additive"):
            p["mask"] = tensor("bool" if mask == "bool" else dtype, (0, 0, N + T, 1))
    if sinks:
        p["sinks"] = tensor(dtype, (1,))
    return p


def tokens_covered(plan, NT):
    """Replays the decode kernel's token loop (cuda/sdpa_int4_decode.cuh) from the plan:
    warp w of block z takes steps of 16 * tiles tokens at t0 + w * TT + k * warps * TT."""
    warps, tt = plan["warps"], 16 * plan["tiles"]
    seen = []
    for z in range(plan["blocks"]):
        t0 = z * plan["block_len"]
        t1 = min(NT, t0 + plan["block_len"])
        assert t0 < t1, f"block {z} is empty"
        for w in range(warps):
            for base in range(t0 + w * tt, t1, warps * tt):
                seen.extend(t for t in range(base, base + tt) if t < t1)
    return seen


def test_benchmark_decode_shape():
    """B=1, 32 query / 8 KV heads, D=128, 128K: one CTA row tile per KV head (each byte read once)."""
    plan = _ext.cuda_plan_sdpa_int4(problem())
    assert plan["supported"] and plan["path"] == "decode"
    assert plan["rows"] == 4 and plan["rows_per_cta"] == 8 and plan["row_tiles"] == 1
    assert plan["elems_per_lane"] == 32 and plan["lanes_per_token"] == 4 and plan["vector_bytes"] == 16
    assert (plan["tiles"], plan["prefetch"], plan["min_ctas"], plan["pipeline"]) == (1, 0, 4, False)
    assert plan["two_pass"] and plan["blocks"] > 1
    # the split fills the GPU: about min_ctas CTAs per SM, each block >= 256 tokens
    ctas = 8 * plan["blocks"]
    assert ctas >= 4 * SMS_H100 * 0.9 and plan["block_len"] >= 256 and plan["block_len"] % 64 == 0
    names = [l["kernel"] for l in plan["launches"]]
    assert names == ["tq_decode_partial", "tq_decode_merge"]
    part, merge = plan["launches"]
    assert part["grid"] == (8, 1, plan["blocks"]) and part["block"] == (128, 1, 1)
    assert set(part["writes"]) == {"part_out", "part_max", "part_sum"}
    assert set(merge["reads"]) == {"part_out", "part_max", "part_sum"} and merge["writes"] == ["out"]
    assert merge["grid"] == (8, 4, 1) and merge["block"] == (128, 1, 1)
    rows = 8 * 4
    assert plan["scratch"] == {"part_out": rows * plan["blocks"] * 128 * 4,
                               "part_max": rows * plan["blocks"] * 4, "part_sum": rows * plan["blocks"] * 4}
    assert "decode_impl<128, 4, 4, 64, 16, 1, false, true, 1, 0, false>" in plan["entry_source"]
    assert "__launch_bounds__(128, 4)" in plan["entry_source"]


@pytest.mark.parametrize("N,T", [(1, 0), (31, 0), (255, 1), (4097, 0), (12345, 7), (131072, 0), (0, 17)])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("tune", [None, "2,0,3,6,1"])
def test_decode_covers_every_token_once(N, T, G, tune, monkeypatch):
    if tune:
        monkeypatch.setenv("TQMETAL_CUDA_DECODE", tune)
    plan = _ext.cuda_plan_sdpa_int4_decode(problem(Hq=2 * G, Hkv=2, N=N, T=T))
    assert plan["supported"]
    if tune:
        assert (plan["tiles"], plan["prefetch"], plan["min_ctas"], plan["pipeline"]) == (2, 0, 3, True)
    NT = N + T
    seen = tokens_covered(plan, NT)
    assert sorted(seen) == list(range(NT))
    assert plan["two_pass"] == (plan["blocks"] > 1)
    assert plan["args"]["blocks"] == plan["blocks"] and plan["args"]["block_len"] == plan["block_len"]


@pytest.mark.parametrize("G,L,tiles", [(1, 1, 1), (2, 1, 1), (4, 1, 1), (8, 1, 1), (4, 2, 1), (8, 3, 3),
                                       (4, 8, 4)])
def test_decode_rows_share_each_byte(G, L, tiles):
    """All G * L rows of a KV head sit in one CTA up to 8 rows (the mma's N)."""
    plan = _ext.cuda_plan_sdpa_int4(problem(Hq=2 * G, Hkv=2, L=L, N=5000, mask="causal"))
    assert plan["path"] == "decode"
    assert (plan["rows_per_cta"], plan["row_tiles"], plan["elems_per_lane"]) == (8, tiles, 32)
    assert plan["lanes_per_token"] == 4


def test_many_rows_go_to_prefill():
    plan = _ext.cuda_plan_sdpa_int4(problem(Hq=32, Hkv=8, L=9, N=5000, mask="causal"))
    assert plan["path"] == "prefill" and plan["fast_prefill"] and plan["rows_per_cta"] == 128
    assert plan["row_tiles"] == (4 * 9 + 127) // 128


@pytest.mark.parametrize("offset,want", [(0, 16), (4, 4), (8, 8), (24, 8), (48, 16)])
def test_decode_load_width_follows_alignment(offset, want):
    """16-byte loads only where every token row's address allows (64-byte int4 rows)."""
    assert _ext.cuda_plan_sdpa_int4(problem(offset=offset))["vector_bytes"] == want


def test_decode_load_width_token_stride():
    # D=64 int4: 32-byte rows: 16-byte loads; a 36-byte token stride allows only 4
    assert _ext.cuda_plan_sdpa_int4(problem(D=64, gs=32))["vector_bytes"] == 16
    assert _ext.cuda_plan_sdpa_int4(problem(D=64, gs=32, token_stride=None))["vector_bytes"] == 16
    p = problem(D=64, gs=32)
    p["k_packed"]["strides"] = [p["k_packed"]["strides"][0], p["k_packed"]["strides"][1], 9, 1]
    assert _ext.cuda_plan_sdpa_int4(p)["vector_bytes"] == 4


def test_decode_specializations():
    """float32 q: hi + lo operands; scale dtype and D > 128 (2 CTAs per SM) in the program."""
    plan = _ext.cuda_plan_sdpa_int4(problem(dtype="float32", sdt="float32", N=1000))
    assert ", 0, true, " in plan["entry_source"] and "_q32" in plan["program"]
    plan = _ext.cuda_plan_sdpa_int4(problem(D=256, gs=128, N=1000))
    assert "__launch_bounds__(128, 2)" in plan["entry_source"] and plan["min_ctas"] == 2


def test_decode_tuning_override():
    plan = _ext.cuda_plan_sdpa_int4(problem(N=10000, blocks=1))
    assert not plan["two_pass"] and plan["blocks"] == 1 and plan["block_len"] == 10000
    assert [l["kernel"] for l in plan["launches"]] == ["tq_decode"]
    assert plan["launches"][0]["writes"] == ["out"]


def test_sinks_applied_by_the_merge():
    plan = _ext.cuda_plan_sdpa_int4(problem(sinks=True))
    part, merge = plan["launches"]
    assert "sinks" not in part["reads"] and "sinks" in merge["reads"]
    plan = _ext.cuda_plan_sdpa_int4(problem(sinks=True, N=100))
    assert not plan["two_pass"] and "sinks" in plan["launches"][0]["reads"]


@pytest.mark.parametrize("dtype,mt", [("float16", 0), ("bfloat16", 0), ("float32", 2)])
@pytest.mark.parametrize("D,bk", [(64, 64), (80, 64), (96, 64), (128, 64), (256, 32)])
def test_prefill_plan(dtype, mt, D, bk):
    gs = 16 if D in (80, 96) else 32
    plan = _ext.cuda_plan_sdpa_int4(problem(L=300, D=D, gs=gs, kb=8, vb=4, dtype=dtype, N=700, T=9,
                                            mask="causal"))
    assert plan["path"] == "prefill" and plan["mma_type"] == mt and plan["key_tile"] == bk
    (l,) = plan["launches"]
    R = 4 * 300
    fast = mt == 0 and D in (64, 128)  # gs 32: 16-byte pieces of 8-bit K and 4-bit V stay in one group
    assert plan["fast_prefill"] == fast
    assert set(l["reads"]) >= {"q", "k_packed", "v_packed", "k_tail", "v_tail"}
    assert l["smem_bytes"] <= 227 * 1024  # an H100 CTA's shared memory
    if fast:
        assert plan["rows_per_cta"] == 128 and plan["warps"] == 8
        assert l["grid"] == (8, (R + 127) // 128, 1) and l["block"] == (256, 1, 1)
        # two stages of K and V tiles (float16) and of K's scales and biases (float32)
        assert l["smem_bytes"] == 2 * 2 * 64 * (D + 8) * 2 + 2 * (D // gs) * 64 * 2 * 4
        assert f"prefill_fast_smem_bytes<{D}, {gs}>() == {l['smem_bytes']}" in plan["entry_source"]
        assert f"prefill_fast_impl<{D}, 8, 4, {gs}, 8, true>" in plan["entry_source"]  # float16 scales
        assert plan["program"].endswith("_h16")
        assert "__launch_bounds__(256, 1)" in plan["entry_source"]
        return
    assert l["grid"] == (8, (R + 63) // 64, 1) and l["block"] == (128, 1, 1)
    nsplit = 2 if mt == 2 else 1  # q and V: float32 as hi + lo; K always hi + lo
    assert l["smem_bytes"] == (nsplit * 64 * (D + 8) + 2 * bk * (D + 8) + nsplit * D * (bk + 8)) * 2
    assert f"prefill_impl<{mt}, {D}, 8, 4, {gs}, true>" in plan["entry_source"]
    assert plan["program"].endswith("_ks")


@pytest.mark.parametrize("kw,fast", [
    (dict(), True),
    (dict(gs=16, kb=8, vb=8), True),  # 8-bit: 16 codes per piece, inside a group of 16
    (dict(gs=16), False),  # 4-bit: a 32-code piece spans two groups of 16
    (dict(gs=16, kb=8), False),  # V still 4-bit
    (dict(offset=4), False),  # rows not 16-byte aligned: no 16-byte loads
    (dict(offset=16), True),
    (dict(token_stride=70000), True),  # a view of a longer cache: 64-byte rows stay aligned
    (dict(dtype="float32", sdt="float32"), False),  # float32 q: hi + lo operands (generic kernel)
    (dict(D=256, gs=64), False),
    (dict(D=64, gs=64, N=0, T=40), True),  # only a tail: every tile through the element loop
    (dict(sdt="bfloat16"), True),  # (float32 dequantize, not the fma.f16x2 one)
])
def test_prefill_fast_path_choice(kw, fast):
    args = dict(L=50, N=3000, mask="causal")
    args.update(kw)
    plan = _ext.cuda_plan_sdpa_int4(problem(**args))
    assert plan["path"] == "prefill" and plan["fast_prefill"] == fast
    assert ("prefillfast_w8" in plan["program"]) == fast
    if fast:
        h16 = kw.get("sdt", "float16") == "float16"
        assert plan["program"].endswith("_h16") == h16
        assert f", 8, {'true' if h16 else 'false'}>(p)" in plan["entry_source"]


@pytest.mark.parametrize("env,fast,warps", [("generic", False, 4), ("fast4", True, 4), ("fast8", True, 8)])
def test_prefill_override(monkeypatch, env, fast, warps):
    monkeypatch.setenv("TQMETAL_CUDA_PREFILL", env)
    plan = _ext.cuda_plan_sdpa_int4(problem(L=50, N=3000, mask="causal"))
    assert plan["fast_prefill"] == fast and plan["warps"] == warps
    assert plan["launches"][0]["block"] == (32 * warps, 1, 1)
    assert plan["rows_per_cta"] == (16 * warps if fast else 64)
    if fast and warps == 4:
        assert "__launch_bounds__(128, 2)" in plan["entry_source"] and "prefillfast_w4" in plan["program"]


def test_args_block():
    p = problem(L=3, Hq=8, Hkv=2, N=1000, T=5, dtype="bfloat16", sdt="float32", mask="additive",
                sinks=True)
    plan = _ext.cuda_plan_sdpa_int4(p)
    a = plan["args"]
    assert (a["B"], a["Hq"], a["Hkv"], a["L"], a["G"], a["R"], a["N"], a["T"]) == (1, 8, 2, 3, 4, 12, 1000, 5)
    assert (a["q_dtype"], a["scale_dtype"], a["tail_dtype"], a["mask_dtype"]) == (2, 0, 2, 2)
    assert a["mask_kind"] == 3 and a["sinks_dtype"] == 2
    assert a["qscale"] == pytest.approx(128 ** -0.5 * 1.4426950408889634, rel=1e-6)
    st = a["strides"]
    assert st[0:3] == p["q"]["strides"][:3] and st[3:6] == p["k_packed"]["strides"][:3]
    assert st[27:31] == [0, 0, 1005, 1] and st[31] == 1


@pytest.mark.parametrize("D,gs,kb,why", [(48, 16, 4, "head dim 48"), (128, 64, 7, "bits k7v4"),
                                         (80, 16, 2, "bits k2v4"), (64, 16, 3, "groups of 32 or more"),
                                         (32, 32, 4, "head dim 32")])
def test_unsupported_with_a_reason(D, gs, kb, why):
    p = problem(D=D, gs=gs, kb=kb, L=1)
    r = _ext.cuda_unsupported_reason(p)
    assert why in r
    assert not _ext.cuda_plan_sdpa_int4(p)["supported"]


@pytest.mark.parametrize("D,gs", [(64, 32), (80, 16), (96, 32), (128, 16), (128, 64), (256, 128)])
@pytest.mark.parametrize("L", [1, 100])
def test_supported_shapes(D, gs, L):
    assert _ext.cuda_unsupported_reason(problem(D=D, gs=gs, L=L, N=100)) == ""


@pytest.mark.parametrize("kb,vb", [(5, 3), (3, 5), (2, 6), (6, 2), (5, 4), (8, 3), (3, 3)])
@pytest.mark.parametrize("D,gs", [(64, 32), (128, 64), (128, 128), (256, 128)])
def test_bit_stream_widths_decode(kb, vb, D, gs):
    """mx.quantize's 2/3/5/6-bit streams: the decode kernel reads them (3 CTAs per SM at
    D <= 128: the covering words need more than 128 registers), every token once."""
    plan = _ext.cuda_plan_sdpa_int4(problem(D=D, gs=gs, kb=kb, vb=vb, N=20000))
    assert plan["supported"] and plan["path"] == "decode", plan.get("reason")
    assert f"decode_impl<{D}, {kb}, {vb}, {gs}, " in plan["entry_source"]
    assert f"_k{kb}v{vb}_" in plan["program"]
    assert plan["min_ctas"] == (2 if D > 128 else 3)
    assert sorted(tokens_covered(plan, 20000)) == list(range(20000))


@pytest.mark.parametrize("kb,vb", [(5, 3), (3, 5), (4, 3), (5, 8)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_bit_stream_widths_prefill(kb, vb, dtype, monkeypatch):
    """The fast prefill reads 16-byte pieces of 4/8-bit codes; other widths take the
    generic kernel (32-code units), also when the override asks for the fast one."""
    for env in (None, "fast8"):
        if env:
            monkeypatch.setenv("TQMETAL_CUDA_PREFILL", env)
        plan = _ext.cuda_plan_sdpa_int4(problem(L=200, N=3000, kb=kb, vb=vb, dtype=dtype, sdt=dtype,
                                                mask="causal"))
        assert plan["supported"] and plan["path"] == "prefill" and not plan["fast_prefill"]
        assert f"prefill_impl<{2 if dtype == 'float32' else 0}, 128, {kb}, {vb}, 64, true>" in plan["entry_source"]


def test_group16_decode_goes_to_prefill():
    plan = _ext.cuda_plan_sdpa_int4(problem(D=80, gs=16, L=1, N=100, Hq=4, Hkv=2))
    assert plan["path"] == "prefill"


def test_gpu_info_shape():
    g = tqmetal.gpu_info()
    assert g["backend"] in ("cuda", "metal", "none")
    assert isinstance(g["available"], bool) and isinstance(g["reason"], str) and g["reason"]
    if g["backend"] == "none":
        assert not g["available"] and "mlx[cuda13]" in g["reason"]


@pytest.mark.parametrize("p", K_ROUNDING)
def test_k_rounding_cases_need_exact_k(p):
    """test_cuda.py's exact-K cases can fail: there, rounding K to float16 (as the fast
    prefill did) puts some row past the float16 bound, while exact K with V and the
    output rounded to float16 stays at a fifth of it (float64 emulation on the CPU)."""
    c = k_rounding_case(p)
    K, V = c.kv_ref()
    f16 = lambda x: x.astype(np.float16).astype(np.float64)  # noqa: E731
    ref = c.reference()

    def worst_row(k):
        return R.row_nmse(f16(R.attention_ref(c.q, k, f16(V), scale=c.kwargs()["scale"])), ref).max()

    assert worst_row(f16(K)) > c.tol()
    assert worst_row(K) < c.tol() / 5
