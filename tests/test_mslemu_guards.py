"""Guard zones: threadgroup variables are separated by redzones and device buffers by guard windows."""
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
    return T.compile_kernel("guards.metal")


def tg_run(lib, name, n):
    out = np.zeros(n, np.float32)
    lib.dispatch(name, buffers={0: out}, threadgroups=(1, 1, 1), threads_per_threadgroup=(n, 1, 1))
    return out


@T.deliberate_ub
@T.needs_instrumentation
@pytest.mark.parametrize("order", T.orders())
def test_threadgroup_overflow_write_is_caught_at_the_access(lib, order):
    with pytest.raises(mslemu.OutOfBoundsError) as ei:
        lib.dispatch("tg_overflow_write", buffers={0: np.zeros(33, np.float32)}, threadgroups=(1, 1, 1),
                     threads_per_threadgroup=(33, 1, 1), order=order)
    msg = str(ei.value)
    assert "out-of-bounds threadgroup write (4 B) touching threadgroup memory 0 B past the end of `a` (float[32], 128 B)" in msg
    assert "thread 32 (simdgroup 1, lane 0)" in msg and "guards.metal:13" in msg


@T.deliberate_ub
@T.needs_instrumentation
def test_threadgroup_underflow_read_is_caught(lib):
    with pytest.raises(mslemu.OutOfBoundsError, match=r"out-of-bounds threadgroup read \(4 B\) touching threadgroup "
                                                      r"memory 4 B before `a`.*thread 0 .*guards\.metal:25"):
        tg_run(lib, "tg_underflow_read", 32)


@T.deliberate_ub
def test_threadgroup_overflow_caught_by_canaries_without_instrumentation():
    """Without the hooks (e.g. under ASan) the redzones still hold canaries that are checked at every barrier."""
    lib = T.compile_kernel("guards.metal", instrument=False, racecheck=False)
    assert not lib.instrumented
    with pytest.raises(mslemu.OutOfBoundsError, match="redzone after `a` was overwritten"):
        lib.dispatch("tg_overflow_write", buffers={0: np.zeros(33, np.float32)}, threadgroups=(1, 1, 1),
                     threads_per_threadgroup=(33, 1, 1))


@pytest.mark.parametrize("order", T.orders())
def test_neighbouring_variables_are_fine(lib, order):
    out = np.zeros(32, np.float32)
    st = lib.dispatch("ok_neighbours", buffers={0: out}, threadgroups=(1, 1, 1), threads_per_threadgroup=(32, 1, 1),
                      order=order)
    np.testing.assert_array_equal(out, 3.0)
    assert st.threadgroup_bytes == 256  # Metal accounting: redzones are not counted


@T.deliberate_ub
@T.needs_instrumentation
def test_device_write_past_end_is_stopped_before_it_happens(lib):
    big = np.full(64 + 16, -7.0, np.float32)
    out = big[:64]                       # the next 16 floats are the "neighbouring allocation"
    with pytest.raises(mslemu.OutOfBoundsError, match=r"threadgroup \(1,0,0\).*out-of-bounds device write \(4 B\) starting "
                                                      r"0 B past the end of buffer\(0\) \(size 256 B\).*thread 31 .*guards\.metal:43"):
        lib.dispatch("dev_write_past_end", buffers={0: out}, threads=(64, 1, 1), threads_per_threadgroup=(32, 1, 1))
    assert (big[64:] == -7.0).all()      # the faulting store was never executed


@T.deliberate_ub
@T.needs_instrumentation
def test_device_read_before_start(lib):
    x = np.arange(64, dtype=np.float32)
    with pytest.raises(mslemu.OutOfBoundsError, match=r"device read \(4 B\) starting 4 B before the start of buffer\(0\)"):
        lib.dispatch("dev_read_before_start", buffers={0: x, 1: np.zeros(64, np.float32)}, threads=(64, 1, 1),
                     threads_per_threadgroup=(64, 1, 1))


@T.deliberate_ub
@T.needs_instrumentation
def test_device_vector_load_straddling_the_end(lib):
    x = np.arange(6, dtype=np.float32)   # 1.5 float4
    with pytest.raises(mslemu.OutOfBoundsError, match=r"device read \(16 B\) at byte offset 16 of buffer\(0\) "
                                                      r"\(size 24 B\) runs past its end"):
        lib.dispatch("dev_vector_straddle", buffers={0: x, 1: np.zeros(8, np.float32)}, threads=(2, 1, 1),
                     threads_per_threadgroup=(2, 1, 1))


@T.deliberate_ub
@T.needs_instrumentation
def test_unbound_buffer_dereference_does_not_crash_the_process(lib):
    with pytest.raises(mslemu.OutOfBoundsError, match=r"null-pointer read \(4 B at address 0x0: an unbound \[\[buffer\]\]\?\)"
                                                      r".*guards\.metal:67"):
        lib.dispatch("unbound_buffer_read", buffers={0: np.zeros(8, np.float32)}, function_constants={1: False},
                     threads=(8, 1, 1), threads_per_threadgroup=(8, 1, 1))
    x = np.arange(8, dtype=np.float32)
    out = np.zeros(8, np.float32)
    lib.dispatch("unbound_buffer_read", buffers={0: out, 1: x}, function_constants={1: True}, threads=(8, 1, 1),
                 threads_per_threadgroup=(8, 1, 1))
    np.testing.assert_array_equal(out, x)
