"""The macOS static checks (tests/macos_checks/checks.py) on the project, and each on a planted defect.

They need clang++ (>= 17), llvm-nm and pip access to PyPI for the pinned macOS wheels. Where those are
missing the tests skip, unless TQMETAL_MACOS_CHECKS=require (set by .ci/run, which installs clang-19 and
llvm-19 first): then a missing tool fails.
"""
import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from macos_checks import checks as C  # noqa: E402

REQUIRED = os.environ.get("TQMETAL_MACOS_CHECKS", "") == "require"


@pytest.fixture(scope="module", autouse=True)
def tools():
    try:
        return C.tools()
    except C.Unavailable as e:
        if REQUIRED:
            pytest.fail(f"TQMETAL_MACOS_CHECKS=require: {e}")
        pytest.skip(str(e))


def _ok(results):
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(map(str, bad))


def test_lint():
    _ok([C.check_lint()])


def test_host_units_compile_with_clang_for_metal():
    """Every csrc/ and bench/ translation unit, -D_METAL_, macOS headers, libstdc++ and libc++."""
    units = C.host_units()
    assert pathlib.Path(C.ROOT / "csrc" / "metal" / "sdpa_int4_metal.cpp") in units
    _ok(C.check_host())


def test_metal_host_object_links_against_libmlx_dylib():
    _ok([C.check_exports()])


@pytest.mark.parametrize("unit", C.metal_units(), ids=lambda p: p.stem)
def test_metal_unit(unit):
    """As a Mac compiles it at run time: C++14 and C++17 clean in metal/, address spaces, threadgroup memory."""
    _ok(C.check_metal_unit(unit))


@pytest.mark.parametrize("plant", C.PLANTS)
def test_planted_defect_is_caught(plant):
    """Each check fails on the defect it exists for (see checks.py: alias and copy undo the fixes of
    issue 11's defects 2 and 1; as, tgmem, cxx17 and lambda break metal/ in a copy of its text)."""
    results = C.planted(plant)()
    assert results and not all(r.ok for r in results), f"planted defect {plant!r} was not caught"


def test_embedded_sources_match_the_macos_wheel():
    """The emulator tests expand the kernels with the installed (Linux) mlx's headers, a Mac build with the
    mlx-metal wheel's: the texts must be the same for the emulator to have run what a Mac compiles."""
    import metal_sources
    from mslemu.testing import mlx_include

    if not mlx_include():
        pytest.skip("no mlx headers installed")
    for unit in C.metal_units():
        assert C.unit_source(unit) == metal_sources.expanded_text(unit.stem, mlx_include()), unit.name


# --------------------------------------------------------------------------------------- the CMake part
def _configure_metal_part(tmp_path, *, metal_ok, extra=()):
    """Configure cmake/tqmetal_metal.cmake (what CMakeLists.txt includes on macOS) on Linux, with MLX's
    mlx_build_metallib mocked (it records its arguments) and `xcrun` a script that succeeds or fails."""
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if not cmake:
        if REQUIRED:
            pytest.fail("cmake not found")
        pytest.skip("cmake not found")
    from mslemu.testing import mlx_include

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    xcrun = bin_dir / "xcrun"
    xcrun.write_text("#!/bin/sh\n" + ("echo 'Apple metal version 32023.0'\n" if metal_ok else
                                       "echo 'xcrun: error: unable to find utility \"metal\"' >&2; exit 72\n"))
    xcrun.chmod(0o755)
    (tmp_path / "main.cpp").write_text(
        '#include "tqmetal_kernel_sources.h"\n#include <cstdio>\n'
        'int main(int, char** argv) { auto s = tqmetal::metal::embedded::source(argv[1]);\n'
        '  std::fwrite(s.data(), 1, s.size(), stdout); return s.empty(); }\n')
    (tmp_path / "CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.25)
project(metal_part LANGUAGES CXX)
set(CMAKE_CXX_STANDARD 20)
set(TQMETAL_ROOT {C.ROOT})
set(Python_EXECUTABLE {sys.executable})
set(MLX_INCLUDE_DIRS "{mlx_include()};" /nonexistent/metal_cpp)
macro(mlx_build_metallib)
  file(WRITE ${{CMAKE_BINARY_DIR}}/mlx_build_metallib.args "${{ARGN}}")
  cmake_parse_arguments(MOCK "" "TARGET" "" ${{ARGN}})
  add_custom_target(${{MOCK_TARGET}})
endmacro()
add_library(tqmetal_core STATIC main.cpp)
include({C.ROOT}/cmake/tqmetal_metal.cmake)
get_target_property(defs tqmetal_core COMPILE_DEFINITIONS)
file(WRITE ${{CMAKE_BINARY_DIR}}/defs.txt "${{defs}}|${{TQMETAL_METALLIB_FILE}}")
add_executable(show_source main.cpp)
target_include_directories(show_source PRIVATE ${{TQMETAL_GEN_DIR}})
add_dependencies(show_source tqmetal_kernel_sources)
""")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    build = tmp_path / "build"
    p = subprocess.run([cmake, "-S", tmp_path, "-B", build, *extra], capture_output=True, text=True, env=env)
    return p, build, env


def test_cmake_metal_part_builds_the_metallib_for_macos_14(tmp_path):
    p, build, _ = _configure_metal_part(tmp_path, metal_ok=True)
    assert p.returncode == 0, p.stdout + p.stderr
    args = (build / "mlx_build_metallib.args").read_text().split(";")
    assert args[args.index("DEPLOYMENT_TARGET") + 1] == "14.0"
    for stem in ("sdpa_int4", "sdpa_int4_prefill", "sdpa_int4_copy"):
        assert str(C.ROOT / "metal" / f"{stem}.metal") in args
    defs, metallib = (build / "defs.txt").read_text().split("|")
    assert "TQMETAL_METALLIB_BUILT=1" in defs and metallib.endswith("tqmetal_kernels.metallib")


def test_cmake_metal_part_refuses_a_deployment_target_below_14(tmp_path):
    p, _, _ = _configure_metal_part(tmp_path, metal_ok=True, extra=["-DTQMETAL_METAL_DEPLOYMENT_TARGET=13.5"])
    assert p.returncode != 0 and "need macOS 14.0" in " ".join(p.stderr.split())


def test_cmake_metal_part_without_metal_compiler_embeds_the_sources(tmp_path):
    """No Metal compiler: configuring succeeds, no metallib, the reason is compiled in, and the generated
    header holds exactly the expanded sources the emulator tests run."""
    import subprocess

    import metal_sources
    from mslemu.testing import mlx_include

    p, build, env = _configure_metal_part(tmp_path, metal_ok=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not (build / "mlx_build_metallib.args").exists()
    defs, metallib = (build / "defs.txt").read_text().split("|")
    assert "TQMETAL_METALLIB_BUILT=0" in defs and "unable to find utility" in defs and not metallib
    b = subprocess.run(["cmake", "--build", build, "--target", "show_source"], capture_output=True, text=True, env=env)
    assert b.returncode == 0, b.stdout + b.stderr
    exe = next(build.rglob("show_source"))
    for stem in metal_sources.STEMS:
        out = subprocess.run([exe, stem], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout == metal_sources.expanded_text(stem, mlx_include()), stem
