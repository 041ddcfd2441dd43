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
