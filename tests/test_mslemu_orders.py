"""Scheduling orders: forward / reverse / shuffle / runahead / interleave, selectable per dispatch."""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mslemu  # noqa: E402
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)


@pytest.fixture(scope="module")
def lib():
    return T.compile_kernel("orders.metal", racecheck=False)


def tickets(lib, order, n=96, seed=0):
    out = np.zeros(2 * n, np.uint32)
    st = lib.dispatch("take_tickets", buffers={0: out}, threadgroups=(1, 1, 1), threads_per_threadgroup=(n, 1, 1),
                      order=order, seed=seed)
    assert st.order == parse(order)[0]
    return out[:n], out[n:]


def parse(order):
    return mslemu.parse_order(order)


def test_forward_and_reverse(lib):
    a, b = tickets(lib, "forward")
    np.testing.assert_array_equal(a, np.arange(96))
    np.testing.assert_array_equal(b, np.arange(96))
    a, b = tickets(lib, "reverse")
    np.testing.assert_array_equal(a, np.arange(96)[::-1])   # last simdgroup first, lanes descending


def test_shuffle_is_seeded_and_redrawn_every_phase(lib):
    a1, b1 = tickets(lib, "shuffle", seed=1)
    a1b, b1b = tickets(lib, "shuffle:1")
    a2, _ = tickets(lib, "shuffle", seed=2)
    np.testing.assert_array_equal(a1, a1b)                  # same seed -> same schedule
    np.testing.assert_array_equal(b1, b1b)
    assert sorted(a1) == list(range(96)) and not np.array_equal(a1, np.arange(96))
    assert not np.array_equal(a1, a2)                        # another seed -> another schedule
    assert not np.array_equal(a1, b1)                        # re-drawn after the barrier
    # simdgroups still run ahead as units: each simdgroup's tickets are one contiguous block of 32
    assert sorted({int(a1[s * 32:(s + 1) * 32].min()) for s in range(3)}) == [0, 32, 64]


def test_runahead_runs_one_simdgroup_to_the_barrier_first(lib):
    a, _ = tickets(lib, "runahead", seed=3)
    first = [s for s in range(3) if sorted(a[s * 32:(s + 1) * 32]) == list(range(32))]
    assert len(first) == 1                                   # one simdgroup took tickets 0..31


@T.needs_instrumentation
def test_interleave_switches_lanes_at_threadgroup_accesses(lib):
    a, _ = tickets(lib, "interleave")
    assert (a == a[0]).mean() > 0.3                          # lanes read the counter before any of them writes it


@T.needs_instrumentation
@pytest.mark.parametrize("order,expect", [("forward", 64), ("reverse", 64), ("shuffle:5", 64), ("interleave", 1)])
def test_lost_update_depends_on_the_order(lib, order, expect):
    out = np.zeros(1, np.uint32)
    lib.dispatch("lost_update", buffers={0: out}, threadgroups=(1, 1, 1), threads_per_threadgroup=(64, 1, 1), order=order)
    assert out[0] == expect


@T.needs_instrumentation
@pytest.mark.parametrize("order", T.orders())
def test_racecheck_reports_lost_update_in_any_order(lib, order):
    with pytest.raises(mslemu.RaceError, match="race on threadgroup `counter`"):
        lib.dispatch("lost_update", buffers={0: np.zeros(1, np.uint32)}, threadgroups=(1, 1, 1),
                     threads_per_threadgroup=(64, 1, 1), order=order, racecheck=True)


def test_unknown_order(lib):
    with pytest.raises(mslemu.KernelError, match="unknown order"):
        tickets(lib, "backwards")
