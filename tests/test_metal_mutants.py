"""Planted bugs as real edits of the Metal kernels fail the emulated Metal grids.

tests/mutants/metal_mutants.py holds the mutants (dropping the last key, sinks read by KV
head, causal diagonal off by one, an averaging split-K merge, and a bit-stream code that loses
its bits from the second word it straddles); each one is applied to a copy
of metal/, built by the MSL emulator and run on the Metal grids (tests/test_metal_decode.py,
tests/test_metal_prefill.py, tests/test_metal_edges.py).  Every mutant must fail at least
one case of each grid it applies to.

Building an emulator library takes about a minute per mutant and path, so these run only
with TQMETAL_MUTANTS=1 (or by hand: ``python tests/mutants/metal_mutants.py``);
tests/test_planted_bugs.py shows the same on every grid, without building, by comparing
mutated float64 results.
"""
import os
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import reference as R  # noqa: E402
from metal_plan_testing import execute, out_buffer, out_values, problem  # noqa: E402
from mutants import metal_mutants as MM  # noqa: E402
from mslemu import testing as T  # noqa: E402

from tqmetal import _ext  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TQMETAL_MUTANTS") != "1",
                       reason="builds one emulator library per mutant: set TQMETAL_MUTANTS=1"),
    pytest.mark.skipif(not T.mlx_include(), reason="mlx Metal kernel headers not found"),
]


def grid(path: str):
    """(description, case, planner kwargs) of the Metal grid of one path."""
    import test_metal_decode as MD
    import test_metal_edges as ME
    import test_metal_prefill as MP

    out = []
    if path == "decode":
        for name, kw, blocks in MD.CASES + MD.STREAM_CASES:
            c = R.make_case(seed=len(name), **kw)
            out += [(name + "/1pass", c, dict(blocks=1)), (name + f"/{blocks}blocks", c, dict(blocks=blocks))]
        for name, kw in ME.CASES:
            c = R.make_case(seed=len(name), **kw)
            out.append((name, c, dict(blocks=1)))
            if kw["N"] + kw.get("T", 0) > 32:
                out.append((name + "/3blocks", c, dict(blocks=3)))
    else:
        for name, kw in MP.CASES + MP.STREAM_CASES:
            out.append((name, R.make_case(seed=len(name), **kw), {}))
    return out


def run_grid_on_mutant(name: str, path: str):
    """(failed cases, total, first failure message) of the path's grid on mutant `name`."""
    tree = MM.mutated_tree(name)
    lib = T.mslemu.compile(str(tree / MM.PATHS[path]), include_dirs=[T.mlx_include()], instrument=False)
    planner = _ext.plan_sdpa_int4_decode if path == "decode" else _ext.plan_sdpa_int4_prefill
    failed, first, cases = 0, "", grid(path)
    for desc, case, kw in cases:
        prob, arrays = problem(case, np.random.default_rng(0), **kw)
        plan = planner(prob)
        out = out_buffer(case)
        try:
            execute(lib, plan, arrays, out, "reverse")
            R.check_close(out_values(case, out), case.reference(), R.tolerance(case.q.dtype, int16_query=False),
                          context=desc)
        except Exception as e:  # noqa: BLE001  (a failing case is what we want)
            failed += 1
            first = first or f"{desc}: {e}"
    return failed, len(cases), first


PAIRS = [(n, p) for n in MM.ALL_MUTANTS for p in MM.PATHS if MM.applies_to(n, p)]


@pytest.mark.parametrize("name,path", PAIRS, ids=[f"{n}-{p}" for n, p in PAIRS])
def test_mutant_fails_metal_grid(name, path):
    failed, total, first = run_grid_on_mutant(name, path)
    assert failed > 0, f"mutant {name} passes all {total} {path} cases"

