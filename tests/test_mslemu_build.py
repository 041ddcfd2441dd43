"""Compilation, cache, compilers (g++ / clang++) and the sanitizer pass."""
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mslemu  # noqa: E402
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)

REPO = pathlib.Path(__file__).resolve().parent.parent
CLANG = T.find_clang()


def test_cache_lives_outside_the_repository():
    lib = T.compile_kernel("reduce.metal")
    assert REPO not in lib.path.resolve().parents
    assert lib.path.parent == mslemu.cache_dir()


KERNEL_SRC = ("#include <metal_stdlib>\nusing namespace metal;\n"
              "kernel void k(device float* o [[buffer(0)]], uint i [[thread_position_in_grid]]) { o[i] = VALUE; }\n")


def test_cache_key_covers_source_compiler_and_flags(tmp_path):
    src = tmp_path / "k.metal"
    src.write_text(KERNEL_SRC.replace("VALUE", "1.0f"))
    base = dict(cxx="g++", sanitize="", instrument=True)  # explicit: independent of MSLEMU_* in the environment
    key = lambda **kw: mslemu.plan(src, cache=tmp_path, **{**base, **kw}).so
    a = key()
    assert a.parent == tmp_path and a.name.startswith("k-") and not a.exists()
    assert key() == a
    assert key(racecheck=True) == a                       # a run-time switch, not a build flag
    others = [key(opt="-O2"), key(defines=["FOO=1"]), key(instrument=False), key(sanitize="undefined")]
    assert len({a, *others}) == len(others) + 1
    if CLANG:
        assert key(cxx="g++") != key(cxx=CLANG)            # compiler identity
    src.write_text(KERNEL_SRC.replace("VALUE", "2.0f"))
    assert key() != a                                      # source
    (tmp_path / "inc.h").write_text("#define VALUE 3.0f\n")  # quoted includes are part of the key
    src.write_text('#include "inc.h"\n' + KERNEL_SRC)
    k1 = key()
    (tmp_path / "inc.h").write_text("#define VALUE 4.0f\n")
    assert key() != k1


def test_compiled_library_is_reused():
    """A second compile() of the same source + flags loads the cached library without rebuilding it."""
    lib = T.compile_kernel("reduce.metal")
    mtime = lib.path.stat().st_mtime_ns
    again = T.compile_kernel("reduce.metal", racecheck=False)
    assert again.path == lib.path and lib.path.stat().st_mtime_ns == mtime and again.racecheck == 0
    assert mslemu.plan(T.KERNELS / "reduce.metal").cached
    assert not [p for p in lib.path.parent.iterdir() if p.is_dir() and p.name.startswith("reduce-")]  # no build dirs left


def test_compile_error_is_reported(tmp_path):
    src = tmp_path / "bad.metal"
    src.write_text("kernel void k(device float* o [[buffer(0)]]) { o[0] = undefined_thing; }\n")
    with pytest.raises(mslemu.CompileError, match=r"bad\.metal:1.*undefined_thing"):
        mslemu.compile(src, cache=tmp_path)


def test_dispatch_argument_errors():
    lib = T.compile_kernel("reduce.metal")
    with pytest.raises(mslemu.KernelError, match="no kernel"):
        lib.dispatch("nope", buffers={}, threads=(1, 1, 1), threads_per_threadgroup=(1, 1, 1))
    with pytest.raises(mslemu.KernelError, match=r"buffer\(s\) \[1\] not bound"):
        lib.dispatch("simd_ops", buffers={0: np.zeros(4, np.int32)}, threads=(4, 1, 1), threads_per_threadgroup=(4, 1, 1))


def test_no_runtime_reference_to_the_prototype_location():
    bad = "/work/" + "shared"
    files = [*(REPO / "tests" / "mslemu").rglob("*"), *(REPO / "tests" / "emu_kernels").glob("*"),
             *(REPO / "tests").glob("test_mslemu_*.py")]
    assert not [f for f in files if f.is_file() and bad in f.read_text(errors="replace")]


@pytest.mark.skipif(CLANG is None, reason="no clang++ >= 15 installed")
def test_clang_build_runs_and_detects():
    # sanitize="": a compiler smoke test; clang's sanitizer runtimes differ from the g++ ones a sanitizer pass preloads
    lib = T.compile_kernel("reduce.metal", cxx=CLANG, sanitize="", racecheck=True)
    assert "clang" in mslemu.compiler_id(CLANG).lower()
    n = 256 * 3
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    out = np.zeros(3, np.float32)
    for order in T.orders():
        st = lib.dispatch("reduce_sum_float_256", buffers={0: x, 1: out, 2: np.uint32(n)}, threadgroups=(3, 1, 1),
                          threads_per_threadgroup=(256, 1, 1), order=order)
        np.testing.assert_allclose(out, x.reshape(3, 256).sum(1), rtol=1e-5, atol=1e-5)
    if lib.instrumented:
        assert st.buffers[0].bytes_read == x.nbytes and st.buffers[0].max_reads_per_byte == 1
        with pytest.raises(mslemu.RaceError, match="race on threadgroup `tmp`"):
            lib.dispatch("racy_reverse", buffers={0: np.zeros(256, np.float32), 1: np.zeros(256, np.float32)},
                         threadgroups=(1, 1, 1), threads_per_threadgroup=(256, 1, 1))


ASAN_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from mslemu import testing as T
    lib = T.compile_kernel("reduce.metal", sanitize="address,undefined")
    x = np.arange(4096, dtype=np.float32)
    out = np.zeros(16, np.float32)
    lib.dispatch("reduce_sum_float_256", buffers={{0: x, 1: out, 2: np.uint32(4096)}}, threadgroups=(16, 1, 1),
                 threads_per_threadgroup=(256, 1, 1))
    assert np.allclose(out, x.reshape(16, 256).sum(1)), out
    print("clean kernel ok", flush=True)
    lib.dispatch("oob_read", buffers={{0: x, 1: np.zeros(4096, np.float32)}}, threads=(4096, 1, 1),
                 threads_per_threadgroup=(256, 1, 1))
    print("NOT DETECTED", flush=True)
""")


def asan_env():
    rt = [subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
          for lib in ("libasan.so", "libubsan.so")]
    if not all(os.path.isabs(p) for p in rt):
        pytest.skip("g++ sanitizer runtimes not installed")
    env = dict(os.environ, LD_PRELOAD=" ".join(rt), ASAN_OPTIONS="detect_leaks=0", MSLEMU_CXX="g++")
    env.pop("MSLEMU_SANITIZE", None)
    return env


@T.full_only
def test_asan_ubsan_build_detects_heap_overflow():
    """The ASan+UBSan pass (see README): a clean kernel runs, an out-of-bounds read aborts with a report."""
    p = subprocess.run([sys.executable, "-c", ASAN_SCRIPT.format(tests=str(REPO / "tests"))], env=asan_env(),
                       capture_output=True, text=True, timeout=600)
    assert "clean kernel ok" in p.stdout, p.stderr[-3000:]
    assert "NOT DETECTED" not in p.stdout
    assert "heap-buffer-overflow" in p.stderr and "reduce.metal:78" in p.stderr, p.stderr[-3000:]
