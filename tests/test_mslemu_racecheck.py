"""Threadgroup-memory race detector: deliberately racy kernels must be reported, correct ones must pass."""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mslemu  # noqa: E402
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)

pytestmark = T.needs_instrumentation


@pytest.fixture(scope="module")
def lib():
    return T.compile_kernel("races.metal", racecheck=True)


def run(lib, name, n=256, order="forward", **kw):
    x = np.arange(n, dtype=np.float32)
    out = np.zeros(n, np.float32)
    st = lib.dispatch(name, buffers={0: x, 1: out}, threadgroups=(1, 1, 1), threads_per_threadgroup=(n, 1, 1),
                      order=order, **kw)
    return out, st


@pytest.mark.parametrize("order", T.orders())
def test_missing_barrier_is_reported(lib, order):
    with pytest.raises(mslemu.RaceError) as ei:
        run(lib, "racy_exchange", order=order)
    msg = str(ei.value)
    # names the kernel, the variable and offset, both threads and both source lines
    assert "kernel 'racy_exchange'" in msg
    assert "threadgroup `xchg` (float[256], 1024 B) at byte offset" in msg
    assert "(element " in msg
    assert msg.count("thread ") >= 2 and "simdgroup" in msg and "lane" in msg
    assert "races.metal:13" in msg and "races.metal:15" in msg  # the write and the read
    assert "no barrier in between" in msg


@pytest.mark.parametrize("order", T.orders())
def test_correct_exchange_passes(lib, order):
    out, st = run(lib, "ok_exchange", order=order)
    np.testing.assert_array_equal(out, np.arange(256, dtype=np.float32)[::-1])
    assert st.races == 0 and st.racecheck == 1 and st.tg_accesses == 512


@pytest.mark.parametrize("order", T.orders())
def test_tree_reduction(lib, order):
    x = np.random.default_rng(0).standard_normal(4 * 128).astype(np.float32)
    out = np.zeros(4, np.float32)
    kw = dict(buffers={0: x, 1: out}, threadgroups=(4, 1, 1), threads_per_threadgroup=(128, 1, 1), order=order)
    st = lib.dispatch("ok_tree_sum", **kw)
    np.testing.assert_allclose(out, x.reshape(4, 128).sum(1), rtol=1e-5, atol=1e-5)
    assert st.races == 0 and st.barriers == 4 * 8
    with pytest.raises(mslemu.RaceError, match=r"race on threadgroup `acc`.*races\.metal:43"):
        lib.dispatch("racy_tree_sum", **kw)


def test_write_write_is_reported(lib):
    out = np.zeros(64, np.uint32)
    with pytest.raises(mslemu.RaceError, match="write-write race on threadgroup `slot`"):
        lib.dispatch("racy_write_write", buffers={0: out}, threadgroups=(1, 1, 1), threads_per_threadgroup=(64, 1, 1))


def test_race_in_dynamic_threadgroup_memory(lib):
    out = np.zeros(64, np.float32)
    with pytest.raises(mslemu.RaceError, match=r"race on threadgroup `\[\[threadgroup\(0\)\]\]`"):
        lib.dispatch("racy_dynamic_tg", buffers={0: out}, threadgroups=(1, 1, 1), threads_per_threadgroup=(64, 1, 1),
                     threadgroup_memory={0: 64 * 4})


def test_same_thread_read_modify_write_is_not_a_race(lib):
    out = np.zeros(128, np.float32)
    st = lib.dispatch("ok_private_slots", buffers={0: out}, threadgroups=(1, 1, 1), threads_per_threadgroup=(128, 1, 1),
                      order="interleave")
    np.testing.assert_array_equal(out, np.arange(128) + 1)
    assert st.races == 0


# --- SIMD-group semantics (documented in tests/mslemu/README.md)
#   on (default): simdgroup_barrier (any flags) and threadgroup_barrier (any flags) order threadgroup memory;
#                 SIMD collectives do not; lanes of one simdgroup are NOT assumed to run in lockstep
#   strict:       only barriers with mem_flags::mem_threadgroup order threadgroup memory
#   lockstep:     lanes of the same simdgroup never race with each other (hardware behaviour, not the spec)
@pytest.mark.parametrize("mode,publish,racy", [
    ("on", 0, True), ("on", 1, False), ("on", 2, False), ("on", 3, True), ("on", 4, False),
    ("strict", 1, False), ("strict", 2, True), ("strict", 4, True),
    ("lockstep", 0, False), ("lockstep", 3, False),
])
def test_simdgroup_semantics(lib, mode, publish, racy):
    x = np.arange(8, dtype=np.float32) + 1
    out = np.zeros(128, np.float32)
    kw = dict(buffers={0: x, 1: out}, threadgroups=(1, 1, 1), threads_per_threadgroup=(128, 1, 1),
              function_constants={0: publish}, racecheck=mode, order="forward")
    if racy:
        with pytest.raises(mslemu.RaceError, match=r"write-then-read race on threadgroup `pub`.*simdgroup (\d), lane 0.*"
                                                   r"simdgroup \1, lane"):
            lib.dispatch("simd_publish", **kw)
    else:
        st = lib.dispatch("simd_publish", **kw)
        assert st.races == 0
        np.testing.assert_array_equal(out, np.repeat(x[:4], 32) + (32 if publish == 3 else 0))


def test_uninitialised_reads_are_counted(lib):
    out = np.zeros(64, np.float32)
    st = lib.dispatch("uninit_read", buffers={0: out}, threadgroups=(1, 1, 1), threads_per_threadgroup=(64, 1, 1))
    assert st.tg_uninit_read_bytes == 32 * 4
    assert np.isnan(out[32:]).all() and (out[:32] == 1).all()  # poisoned threadgroup memory reads as NaN


def test_racecheck_off_runs_racy_kernel(lib):
    out, st = run(lib, "racy_exchange", racecheck=False)
    assert st.races == 0 and st.racecheck == 0


def test_racecheck_switches(tmp_path, monkeypatch):
    """compile(racecheck=...) sets the Library default, $MSLEMU_RACECHECK applies when it is not given,
    dispatch(racecheck=...) overrides per call."""
    monkeypatch.setenv("MSLEMU_RACECHECK", "1")
    lib_env = T.compile_kernel("races.metal", racecheck=None)
    assert lib_env.racecheck == 1
    with pytest.raises(mslemu.RaceError):
        run(lib_env, "racy_exchange")
    run(lib_env, "racy_exchange", racecheck=False)
    monkeypatch.setenv("MSLEMU_RACECHECK", "strict")
    assert T.compile_kernel("races.metal", racecheck=None).racecheck == 2
    monkeypatch.delenv("MSLEMU_RACECHECK")
    lib_off = T.compile_kernel("races.metal", racecheck=None)
    assert lib_off.racecheck == 0
    run(lib_off, "racy_exchange")
    with pytest.raises(mslemu.RaceError):
        run(lib_off, "racy_exchange", racecheck=True)
    # same source + flags -> same cached library: racecheck is a run-time switch, not a compile flag
    assert lib_off.path == lib_env.path
