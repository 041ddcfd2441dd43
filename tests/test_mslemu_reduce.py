"""Threadgroup reduction, SIMD shuffles/prefix sums, barrier diagnostics (tests/emu_kernels/reduce.metal)."""
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
    return T.compile_kernel("reduce.metal")


@pytest.mark.parametrize("order", T.orders())
def test_reduce_float(lib, order):
    rng = np.random.default_rng(0)
    n = 256 * 7 - 13                      # ragged tail
    x = rng.standard_normal(n).astype(np.float32)
    out = np.zeros(7, np.float32)
    st = lib.dispatch("reduce_sum_float_256", buffers={0: x, 1: out, 2: np.uint32(n)},
                      threadgroups=(7, 1, 1), threads_per_threadgroup=(256, 1, 1), order=order, seed=3)
    ref = np.array([x[i * 256:(i + 1) * 256].astype(np.float64).sum() for i in range(7)])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert st.barriers == 7 and st.partial_collectives == 0 and st.threadgroups == 7
    assert st.threadgroup_bytes == 8 * 4


@pytest.mark.parametrize("order", T.orders())
def test_reduce_half(lib, order):
    x = (np.arange(128 * 3) % 7).astype(np.float16)
    out = np.zeros(3, np.float32)
    lib.dispatch("reduce_sum_half_128", buffers={0: x, 1: out, 2: np.uint32(x.size)},
                 threadgroups=(3, 1, 1), threads_per_threadgroup=(128, 1, 1), order=order)
    np.testing.assert_array_equal(out, x.astype(np.float32).reshape(3, 128).sum(1))


@pytest.mark.parametrize("order", T.orders())
def test_divergent_barrier_is_reported(lib, order):
    out = np.zeros(64, np.float32)
    with pytest.raises(mslemu.KernelError, match="returned before threadgroup_barrier|divergent"):
        lib.dispatch("bad_divergent_barrier", buffers={0: out}, threadgroups=(1, 1, 1),
                     threads_per_threadgroup=(64, 1, 1), order=order)


def test_missing_barrier_is_exposed_by_schedules(lib):
    """Without the race detector, a missing barrier shows up as schedule-dependent results."""
    x = np.arange(256, dtype=np.float32)
    res = []
    for order in ["forward", "reverse"]:
        out = np.zeros(256, np.float32)
        lib.dispatch("racy_reverse", buffers={0: x, 1: out}, threadgroups=(1, 1, 1),
                     threads_per_threadgroup=(256, 1, 1), order=order, racecheck=False)
        res.append(out.copy())
    assert not all(np.array_equal(r, x[::-1]) for r in res)
    assert np.isnan(res[0]).any()          # forward order reads poisoned (uninitialised) threadgroup memory


@T.needs_instrumentation
@pytest.mark.parametrize("order", T.orders())
def test_missing_barrier_is_reported_by_racecheck(lib, order):
    x = np.arange(256, dtype=np.float32)
    with pytest.raises(mslemu.RaceError, match="race on threadgroup `tmp`"):
        lib.dispatch("racy_reverse", buffers={0: x, 1: np.zeros(256, np.float32)}, threadgroups=(1, 1, 1),
                     threads_per_threadgroup=(256, 1, 1), order=order)


@pytest.mark.parametrize("order", T.orders())
def test_simd_ops(lib, order):
    x = np.arange(64, dtype=np.int32) * 3 + 1
    out = np.zeros(64 * 4, np.int32)
    lib.dispatch("simd_ops", buffers={0: x, 1: out}, threads=(64, 1, 1), threads_per_threadgroup=(64, 1, 1),
                 order=order)
    out = out.reshape(64, 4)
    lane = np.arange(64) % 32
    base = np.arange(64) - lane
    np.testing.assert_array_equal(out[:, 0], x[base + (lane ^ 1)])
    np.testing.assert_array_equal(out[:, 1], [x[b:b + l].sum() for b, l in zip(base, lane)])
    np.testing.assert_array_equal(out[:, 2], x[base + 5])
    np.testing.assert_array_equal(out[:, 3], np.where(lane + 3 < 32, x[np.minimum(base + lane + 3, 63)], x))
