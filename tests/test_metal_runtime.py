"""The Metal path a Mac without Xcode runs, and the plan's answers to what a Mac may throw at it.

* The embedded sources (csrc/metal/embed_sources.py, what eval_gpu compiles at run time where the build
  had no Metal compiler) are self-contained ASCII with every kernel the plans name; the emulator tests
  (test_metal_decode.py, test_metal_prefill.py, this file) compile exactly these texts
  (tests/metal_sources.py).
* An input whose last axis is strided is copied by the plan's own first launches
  (metal/sdpa_int4_copy.metal), not by MLX's unexported contiguous_copy_gpu: run under the emulator.
* A pipeline whose maxTotalThreadsPerThreadgroup is below the plan's threadgroup: the planner moves to
  the prefill kernel's smaller threadgroups (run under the emulator), or says why it cannot.
* tqmetal.gpu_path() on this build.
"""
import pathlib
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import metal_sources  # noqa: E402
import embed_sources  # noqa: E402  (csrc/metal/, put on sys.path by metal_sources)
import reference as R  # noqa: E402
from metal_plan_testing import METAL, METAL_PREFILL, execute, out_buffer, out_values, problem  # noqa: E402
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)

import tqmetal  # noqa: E402
from tqmetal import _ext  # noqa: E402

MLX_INC = T.mlx_include()
needs_mlx = pytest.mark.skipif(not MLX_INC, reason="mlx Metal kernel headers not found (pip install mlx)")
ROOT = pathlib.Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------- the embedded sources
@needs_mlx
@pytest.mark.parametrize("stem", metal_sources.STEMS)
def test_embedded_source_is_self_contained_ascii(stem):
    text = metal_sources.expanded(stem).read_text()
    text.encode("ascii")  # MLX hands it to Metal as NSASCIIStringEncoding
    assert not re.search(r'^\s*#\s*include\s*"', text, re.M), "a quoted #include was left"
    assert not re.search(r"^\s*#\s*pragma\s+once", text, re.M)
    assert f'#line 1 "metal/{stem}.metal"' in text
    if stem != "sdpa_int4_copy":
        assert '#line 1 "mlx/backend/metal/kernels/utils.h"' in text  # MLX's headers expanded, once
        assert text.count('#line 1 "mlx/backend/metal/kernels/utils.h"') == 1


def _dense_problem(**kw):
    """A plan problem with every tensor contiguous (the planner's view of mx.quantize output)."""
    prob = dict(kw)
    for name in ("q", "k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases"):
        prob.setdefault(name, dict(dtype="float16", strides=[0, 0, 0, 1]))
    return prob


@needs_mlx
def test_embedded_sources_hold_every_kernel_the_plans_name():
    names = {}
    for stem in metal_sources.STEMS:
        text = metal_sources.expanded(stem).read_text()
        names[stem] = text
    for prob in (dict(Hq=8, Hkv=2, L=1, N=600, D=128, blocks=3), dict(Hq=8, Hkv=2, L=40, N=60, D=80, group_size=16)):
        for dt in ("float16", "bfloat16", "float32"):
            # q's last axis strided: a copy launch too
            plan = _ext.plan_sdpa_int4(_dense_problem(**prob, q=dict(dtype=dt, strides=[0, 0, 1, 40])))
            assert plan["supported"], plan["reason"]
            for launch in plan["launches"]:
                kernel = launch["kernel"]
                if launch["library"] == "sdpa_int4_copy":
                    assert f'"{kernel}"' in names["sdpa_int4_copy"]
                else:
                    # instantiate_kernel("sdpa_int4_decode_1pass_" #type "_" #d ...): the macro's pieces
                    stem_text = names[launch["library"]]
                    prefix = re.match(r"(sdpa_int4_(?:decode_(?:1pass|2pass_1|2pass_2)|prefill))_", kernel).group(1)
                    assert f'"{prefix}_"' in stem_text, (kernel, launch["library"])


def test_generator_refuses_conditional_include(tmp_path):
    (tmp_path / "a.h").write_text("#pragma once\nint a;\n")
    (tmp_path / "k.metal").write_text('#if FOO\n#include "a.h"\n#endif\n')
    with pytest.raises(embed_sources.ExpandError, match="conditional #include"):
        embed_sources.expand([tmp_path / "k.metal"], [], tmp_path)


def test_generator_expands_once_and_keeps_lines(tmp_path):
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "a.h").write_text("#pragma once\nint a; // \u00a9 not ascii\n")
    (tmp_path / "b.h").write_text('#pragma once\n#include "inc/a.h"\nint b;\n')
    (tmp_path / "k.metal").write_text('#include "inc/a.h"\n#include "b.h"\nint k;\n')
    text = embed_sources.expand([tmp_path / "k.metal"], [], tmp_path)
    assert text.count("int a;") == 1 and "int b;" in text and "int k;" in text
    assert '#line 1 "inc/a.h"' in text and '#line 3 "k.metal"' in text
    text.encode("ascii")
    hdr = embed_sources.header({"k": text})
    assert 'if (stem == "k") return k;' in hdr


# --------------------------------------------------------------------------------------- strided inputs
def _strided_last(arrays, prob, name):
    """Store input `name` with a last-axis stride of 2: its elements interleaved with garbage (NaN, or
    random words), which the result would show if a kernel read them."""
    x = arrays[name]
    assert prob[name]["offset"] == 0 and x.ndim == 4
    if x.dtype == np.uint32:
        buf = np.random.default_rng(1).integers(0, 2**32, size=x.shape[:-1] + (2 * x.shape[-1],),
                                                dtype=np.uint64).astype(np.uint32)
    else:  # float16/float32 NaN, bfloat16 (uint16) NaN
        buf = np.full(x.shape[:-1] + (2 * x.shape[-1],), 0x7FC0 if x.dtype == np.uint16 else np.nan, x.dtype)
    buf[..., ::2] = x
    es = [st // buf.itemsize for st in buf.strides]
    arrays[name] = buf
    prob[name] = dict(prob[name], strides=[es[0], es[1], es[2], 2])


@pytest.fixture(scope="module")
def libs():
    if not MLX_INC:
        pytest.skip("mlx Metal kernel headers not found")
    return {"sdpa_int4": T.mslemu.compile(METAL, include_dirs=[MLX_INC], racecheck=T.INSTRUMENTED),
            "sdpa_int4_prefill": T.mslemu.compile(METAL_PREFILL, include_dirs=[MLX_INC], racecheck=T.INSTRUMENTED)}


STRIDED = [
    # (case, inputs stored with a strided last axis, planner)
    (dict(Hq=4, Hkv=2, L=1, N=70, T=5, D=64, dtype="float16", mask="causal", sinks=True),
     ("q", "k_packed", "v_scales", "k_tail"), "decode"),
    (dict(Hq=4, Hkv=1, L=2, N=50, D=128, dtype="bfloat16", k_bits=8), ("q", "v_packed", "k_biases"), "decode"),
    (dict(Hq=2, Hkv=1, L=37, N=40, T=3, D=64, dtype="float32", group_size=32, mask="causal"),
     ("q", "k_scales", "v_packed", "v_tail"), "prefill"),
]


@pytest.mark.parametrize("kw,names,path", STRIDED, ids=["decode_f16", "decode_bf16_k8", "prefill_f32"])
def test_strided_last_axis_copied_by_the_plan(libs, kw, names, path):
    case = R.make_case(seed=11, **kw)
    prob, arrays = problem(case, np.random.default_rng(0), blocks=1)
    for n in names:
        _strided_last(arrays, prob, n)
    plan = _ext.plan_sdpa_int4(prob)
    assert plan["supported"], plan["reason"]
    assert plan["path"] == path
    copies = [lc for lc in plan["launches"] if lc["library"] == "sdpa_int4_copy"]
    assert [lc["buffers"][0]["name"] for lc in copies] == list(
        n for n in ("q", "k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases", "k_tail", "v_tail")
        if n in names)
    assert plan["launches"][:len(copies)] == copies  # copies first
    attn = plan["launches"][len(copies)]
    bound = {b["name"]: b for b in attn["buffers"]}
    for n in names:
        assert n not in bound and bound[f"{n}_contiguous"]["kind"] == "scratch"
    out = out_buffer(case)
    execute(libs, plan, arrays, out, "reverse")
    R.check_close(out_values(case, out), case.reference(), case.tol(), context=repr(case))


def test_contiguous_inputs_plan_no_copy():
    case = R.make_case(Hq=4, Hkv=2, N=30, D=64, dtype="float16", seed=1)
    prob, _ = problem(case, np.random.default_rng(0), strided=True, transposed_q=True)
    plan = _ext.plan_sdpa_int4(prob)
    assert plan["supported"] and all(lc["library"] != "sdpa_int4_copy" for lc in plan["launches"])
    assert not any(name.endswith("_contiguous") for name in plan["scratch"])


# --------------------------------------------------------------------------------------- pipeline limits
def test_pipeline_limit_moves_decode_to_prefill(libs):
    """A decode pipeline allowing fewer than its 512 threads: the plan runs the 128-thread prefill kernel."""
    case = R.make_case(Hq=8, Hkv=2, L=1, N=90, T=4, D=128, dtype="float16", mask="bool_BHLN", sinks=True, seed=3)
    prob, arrays = problem(case, np.random.default_rng(0), blocks=1)
    first = _ext.plan_sdpa_int4(prob)
    assert first["path"] == "decode" and first["launches"][0]["threadgroup"] == (512, 1, 1)
    prob["max_threads"] = {first["launches"][0]["kernel"]: 384}
    plan = _ext.plan_sdpa_int4(prob)
    assert plan["supported"] and plan["path"] == "prefill", plan
    assert all(np.prod(lc["threadgroup"]) <= 384 for lc in plan["launches"])
    out = out_buffer(case)
    execute(libs, plan, arrays, out, "reverse")
    R.check_close(out_values(case, out), case.reference(), case.tol(), context=repr(case))


def test_pipeline_limit_no_plan_says_why():
    prob = _dense_problem(Hq=8, Hkv=2, L=1, N=90, D=128)
    decode = _ext.plan_sdpa_int4(prob)["launches"][0]["kernel"]
    prefill = _ext.plan_sdpa_int4_prefill(prob)["launches"][0]["kernel"]
    plan = _ext.plan_sdpa_int4({**prob, "max_threads": {decode: 256, prefill: 64}})
    assert not plan["supported"]
    assert f"{decode} allows 256 threads per threadgroup" in plan["reason"]
    assert f"{prefill} allows 64 threads per threadgroup" in plan["reason"]
    # a limit that the plan meets changes nothing
    assert _ext.plan_sdpa_int4({**prob, "max_threads": {decode: 1024}}) == _ext.plan_sdpa_int4(prob)


# --------------------------------------------------------------------------------------- which path
def test_gpu_path_reports_this_build():
    g = tqmetal.gpu_path()
    assert set(g) == {"path", "reason", "metallib_dir"}
    assert g["path"] in ("metallib", "runtime", "none") and g["reason"]
    if not _ext.has_metal_kernels():
        assert g["path"] == "none" and "without Metal" in g["reason"]


def test_metallib_search_dirs_cover_the_bench_binary():
    """tqmetal_bench is installed in tqmetal/bin/, the metallib beside the extension in tqmetal/: the
    search from the bench's directory reaches the extension's (issue 11, defect 3)."""
    assert _ext.metallib_dirs("/site/tqmetal") == ["/site/tqmetal", "/site"]
    assert _ext.metallib_dirs("/site/tqmetal/bin") == ["/site/tqmetal/bin", "/site/tqmetal"]
    assert _ext.metallib_dirs("/site/tqmetal/bin", "/opt/metallib") == ["/opt/metallib"]
    assert _ext.metallib_dirs("/site/tqmetal/bin", "") == ["/site/tqmetal/bin", "/site/tqmetal"]
    assert _ext.metallib_dirs("") == []
    pkg = pathlib.Path(_ext.__file__).resolve().parent
    bench = pkg / "bin" / "tqmetal_bench"
    if bench.exists():
        assert str(pkg) in _ext.metallib_dirs(str(bench.parent))
