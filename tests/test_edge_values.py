"""The edge grid (tests/edge_grid.py) on every CPU kernel variant this machine supports, and the
inputs of the CPU kernel bugs of issue 14 as strict xfails until their fix is merged.

Each spec runs in one worker process per variant (tests/cpu_variants.py) and must match the
float64 reference: NaN pattern and infinities element for element, every row within the op's
per-row NMSE bound (reference.TOL_OP).
"""

import json

import pytest

import edge_grid
import fuzz_cases as F
from cpu_variants import LEVELS


def _run(cpu_workers, isa, spec):
    if isa not in cpu_workers:
        pytest.skip(f"this CPU does not run {isa}")
    r = cpu_workers[isa].run(spec)
    assert r["ok"], f"[{isa}] spec {json.dumps(spec)}: {r['msg']}"
    return r


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("name,spec", edge_grid.GRID, ids=[g[0] for g in edge_grid.GRID])
def test_edge_grid(cpu_workers, isa, name, spec):
    _run(cpu_workers, isa, spec)


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("name,spec", edge_grid.NONFINITE, ids=[g[0] for g in edge_grid.NONFINITE])
def test_nonfinite_inputs(cpu_workers, isa, name, spec):
    _run(cpu_workers, isa, spec)


def _pending_params():
    out = []
    for bug, name, spec, failing in edge_grid.PENDING:
        for isa in LEVELS:
            marks = []
            if bug in F.PENDING_KERNEL_FIXES and isa in failing:
                marks = [pytest.mark.xfail(strict=True, reason=f"issue 14 CPU kernel bug '{bug}' (lead's fix pending)")]
            out.append(pytest.param(isa, spec, marks=marks, id=f"{name}-{isa}"))
    return out


@pytest.mark.parametrize("isa,spec", _pending_params())
def test_pending_kernel_fixes(cpu_workers, isa, spec):
    """B = 0 -> an empty result (not SIGFPE); NaN/inf in a query row, a key group's scale or
    bias, a tail key or an additive mask -> NaN where mx.fast on the dequantized cache is NaN;
    a hidden row with a -inf sink -> the uniform average."""
    _run(cpu_workers, isa, spec)
