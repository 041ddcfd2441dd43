"""Device-memory load/store counters (DispatchStats.buffers): exact per-buffer byte counts."""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)

pytestmark = T.needs_instrumentation


@pytest.fixture(scope="module")
def lib():
    return T.compile_kernel("counters.metal")


@pytest.mark.parametrize("order", T.orders())
def test_reduction_reads_each_byte_once(order):
    lib = T.compile_kernel("reduce.metal")
    n = 256 * 7 - 13
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    out = np.zeros(7, np.float32)
    st = lib.dispatch("reduce_sum_float_256", buffers={0: x, 1: out, 2: np.uint32(n)},
                      threadgroups=(7, 1, 1), threads_per_threadgroup=(256, 1, 1), order=order)
    b = st.buffers[0]
    assert (b.bytes_read, b.loads, b.unique_bytes_read, b.max_reads_per_byte) == (x.nbytes, n, x.nbytes, 1)
    assert (b.bytes_written, b.stores) == (0, 0)
    o = st.buffers[1]
    assert (o.bytes_read, o.bytes_written, o.stores, o.unique_bytes_written) == (0, 7 * 4, 7, 7 * 4)
    assert st.bytes_read(2) >= 4 * 256 * 7  # `n` is read by every thread (at least once)


@pytest.mark.parametrize("order", T.orders())
def test_vector_copy(lib, order):
    x = np.arange(4 * 96, dtype=np.float32)
    out = np.zeros_like(x)
    st = lib.dispatch("copy_float4", buffers={0: x, 1: out}, threads=(96, 1, 1), threads_per_threadgroup=(32, 1, 1),
                      order=order)
    np.testing.assert_array_equal(out, 2 * x)
    # bytes are exact; `loads`/`stores` count CPU accesses (the shim's float4 may be accessed per component)
    assert st.buffers[0].bytes_read == x.nbytes and 96 <= st.buffers[0].loads <= 4 * 96
    assert st.buffers[1].bytes_written == out.nbytes and 96 <= st.buffers[1].stores <= 4 * 96
    assert st.buffers[1].bytes_read == 0 and st.buffers[0].max_reads_per_byte == 1


def test_every_byte_read_twice(lib):
    n = 200
    x = np.arange(n, dtype=np.float32)
    out = np.zeros(n, np.float32)
    st = lib.dispatch("stencil2", buffers={0: x, 1: out, 2: np.uint32(n)}, threads=(n, 1, 1),
                      threads_per_threadgroup=(64, 1, 1))
    np.testing.assert_array_equal(out, x + np.roll(x, -1))
    b = st.buffers[0]
    assert (b.bytes_read, b.unique_bytes_read, b.max_reads_per_byte) == (2 * x.nbytes, x.nbytes, 2)
    assert st.total_bytes_read == 2 * x.nbytes + st.bytes_read(2)


def test_by_value_constant_struct_is_one_load_per_thread(lib):
    params = np.zeros((), np.dtype([("scale", np.float32), ("bias", np.float32), ("pad", np.int32, (2,))]))
    params["scale"], params["bias"] = 3.0, 1.0
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    st = lib.dispatch("affine", buffers={0: x, 1: out, 2: params}, threads=(64, 1, 1), threads_per_threadgroup=(64, 1, 1))
    np.testing.assert_array_equal(out, 3 * x + 1)
    assert st.buffers[2].bytes_read == 64 * params.nbytes and st.buffers[2].loads == 64


@pytest.mark.parametrize("order", T.orders())
def test_int4_decode_reads_each_packed_byte_once_per_query_head(order):
    """sdpa_int4 (one threadgroup per query head, GQA 4): every packed K/V byte is read exactly once per query
    head sharing its KV head, i.e. 4 times in total; each fp16 scale is read by the 8 lanes of its group."""
    lib = T.compile_kernel("sdpa_mini.metal")
    bufs, ref = T.int4_case(Hq=8, Hkv=2, N=300, D=128, G=32)
    gqa = 4
    st = lib.dispatch("sdpa_int4_half_128_g32", buffers=bufs, threadgroups=(8, 1, 1),
                      threads_per_threadgroup=(1024, 1, 1), order=order)
    np.testing.assert_allclose(bufs[7].astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    for i in (1, 4):  # packed K, packed V
        b = st.buffers[i]
        assert b.bytes_read == gqa * bufs[i].nbytes
        assert b.unique_bytes_read == bufs[i].nbytes and b.max_reads_per_byte == gqa
    for i in (2, 3, 5, 6):  # scales / biases
        assert st.buffers[i].bytes_read == gqa * 8 * bufs[i].nbytes
    assert st.buffers[7].unique_bytes_written == bufs[7].nbytes
