"""The comparisons can fail: planted bugs fail every backend's grid.

A kernel with one of reference.PLANTED_BUGS would return (up to its rounding) the mutated
reference: dropping the last key, reading the sink by KV head instead of query head, an
off-by-one on the causal diagonal, or merging split-K partial results by averaging instead
of weighting by their log-sum-exp.  For the CPU kernels, which these tests cannot edit, the
bug is planted on the reference side: the mutated float64 result, rounded to q's dtype as
the op's output is, is compared with the true one under exactly the check the grids apply
(reference.check_close with the op's per-row bound).  A grid catches a bug when at least one
of its cases fails; every grid here must catch every bug.

The grids: the edge grid every CPU variant runs (tests/edge_grid.py, tests/test_edge_values.py),
the main op grid (tests/test_sdpa_int4.py) and the emulated Metal grids
(tests/test_metal_decode.py, tests/test_metal_prefill.py, tests/test_metal_edges.py).  The
Metal kernels also get the same bugs as real source edits, run through the emulator:
tests/mutants/ (tests/test_metal_mutants.py).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import edge_grid
import fuzz_cases as F
import reference as R


def mutant_output(c: R.Case, bug: str) -> np.ndarray:
    """What a kernel with `bug` returns for c: the mutated reference in q's dtype."""
    K, V = c.kv_ref()
    mut = R.attention_ref(c.q, K, V, scale=c.scale, mask=c.mask, sinks=c.sinks, mutation=bug)
    return R.to_f64(mx.array(mut.astype(np.float32)).astype(c.q.dtype))


def caught(c: R.Case, bug: str, int16_query: bool = False) -> bool:
    try:
        R.check_close(mutant_output(c, bug), c.reference(), R.tolerance(c.q.dtype, int16_query=int16_query))
    except AssertionError:
        return True
    return False


def applicable(c: R.Case, bug: str) -> bool:
    if bug == "sinks_by_kv_head":
        return c.sinks is not None and c.q.shape[1] > c.k[0].shape[1]
    if bug == "causal_off_by_one":
        return isinstance(c.mask, str)
    return True


def grid_catches(cases, bug, int16_query=False):
    cases = [c for c in cases if applicable(c, bug)]
    assert cases, f"no case of the grid can show {bug}"
    hits = [caught(c, bug, int16_query) for c in cases]
    return sum(hits), len(hits)


def metal_cases():
    import test_metal_decode as MD
    import test_metal_prefill as MP

    try:
        import test_metal_edges as ME

        extra = [R.make_case(seed=len(n), **kw) for n, kw in ME.CASES]
    except ImportError:
        extra = []
    dec = [R.make_case(seed=len(name), **kw) for name, kw, _ in MD.CASES]
    pre = [R.make_case(seed=len(name), **kw) for name, kw in MP.CASES]
    return {"metal_decode": dec + extra, "metal_prefill": pre}


def sdpa_grid_cases():
    """A sample of the main op grid (tests/test_sdpa_int4.py), built as its tests build them."""
    import test_sdpa_int4 as S

    cases = []
    for p in S.DTYPE_BITS:
        for L, N, mask in ((1, 1031, "none"), (13, 517, "causal")):
            cases.append(R.make_case(B=2, Hq=8, Hkv=2, L=L, N=N, D=128, dtype=p["dtype"], scale_dtype=p["sdt"],
                                     group_size=64, k_bits=p["kb"], v_bits=p["vb"], mask=mask, seed=L + N))
    for p in S.TAILS:
        cases.append(R.make_case(B=2, Hq=8, Hkv=2, L=p["L"], N=p["N"], T=p["T"], D=128, dtype="float16",
                                 group_size=64, k_bits=8, v_bits=4, mask=p["mask"], sinks=(p["N"] % 2 == 1),
                                 seed=p["N"] + p["T"] + p["L"]))
    return cases


# (grid, bound set): the CPU grids run on the float variants (generic, avx2, avx512) and the
# integer ones (avx512vnni, avx512amx: float32's bound is looser there, reference.TOL_OP_INT16_QUERY)
GRIDS = [("edge", False), ("edge", True), ("sdpa", False), ("sdpa", True), ("metal_decode", False),
         ("metal_prefill", False)]


@pytest.fixture(scope="module")
def grids():
    g = {"edge": [F.build(spec) for _, spec in edge_grid.GRID], "sdpa": sdpa_grid_cases()}
    try:
        g.update(metal_cases())
    except Exception as e:  # noqa: BLE001  (the emulator's modules need its build)
        pytest.skip(f"Metal test modules not importable: {e}")
    return g


@pytest.mark.parametrize("bug", R.PLANTED_BUGS)
@pytest.mark.parametrize("grid,int16_query", GRIDS, ids=[f"{g}{'-int16q' if i else ''}" for g, i in GRIDS])
def test_planted_bug_fails_grid(grids, grid, int16_query, bug):
    hit, n = grid_catches(grids[grid], bug, int16_query)
    assert hit > 0, f"{bug}: no case of the {grid} grid fails ({n} applicable)"


@pytest.mark.parametrize("int16_query", [False, True], ids=["float", "int16q"])
@pytest.mark.parametrize("bug", ["drop_last_key", "sinks_by_kv_head", "causal_off_by_one"])
def test_bug_caught_by_most_cases(grids, bug, int16_query):
    """Not by luck: dropping the last key, misreading a sink or moving the diagonal puts most
    applicable cases of the edge grid past the bound (the data make the last keys and the
    sinks matter)."""
    hit, n = grid_catches(grids["edge"], bug, int16_query)
    assert hit >= 0.8 * n, f"{bug}: only {hit} of {n} edge-grid cases fail"


def test_correct_reference_passes(grids):
    """The control: the unmutated result rounded to q's dtype passes every case."""
    for c in grids["edge"][:40]:
        K, V = c.kv_ref()
        out = R.attention_ref(c.q, K, V, scale=c.scale, mask=c.mask, sinks=c.sinks)
        R.check_close(R.to_f64(mx.array(out.astype(np.float32)).astype(c.q.dtype)), c.reference(),
                      R.tolerance(c.q.dtype, int16_query=False), context=repr(c))


def test_metal_mutants_still_apply(tmp_path):
    """The real Metal mutants (tests/mutants/metal_mutants.py, run by tests/test_metal_mutants.py
    with TQMETAL_MUTANTS=1) still match the kernels: each edit applies exactly once."""
    from mutants import metal_mutants as MM

    assert set(MM.MUTANTS) == set(R.PLANTED_BUGS)
    for name in MM.ALL_MUTANTS:  # with the bit-stream unpacking bugs, which only the kernels can have
        d = tmp_path / name
        d.mkdir()
        MM.mutated_tree(name, d)
