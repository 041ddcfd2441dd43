"""simdgroup_matrix 8x8 MMA GEMM tiled through threadgroup memory (tests/emu_kernels/sgmm.metal)."""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from mslemu import testing as T  # noqa: E402
from mslemu.testing import mslemu_prebuild  # noqa: E402,F401  (session fixture: parallel builds)


@pytest.fixture(scope="module")
def lib():
    return T.compile_kernel("sgmm.metal")


@pytest.mark.parametrize("order", T.orders())
@pytest.mark.parametrize("dtype,name,tol", [(np.float32, "sg_gemm_float", 1e-5), (np.float16, "sg_gemm_half", 2e-3)])
def test_simdgroup_matrix_gemm(lib, dtype, name, tol, order):
    rng = np.random.default_rng(4)
    M, N, K = 45, 70, 40
    A = rng.standard_normal((M, K)).astype(dtype)
    B = rng.standard_normal((K, N)).astype(dtype)
    C = np.zeros((M, N), np.float32)
    st = lib.dispatch(name, buffers={0: A, 1: B, 2: C, 3: np.array([M, N, K, 0], np.int32)},
                      threadgroups=((N + 31) // 32, (M + 31) // 32, 1), threads_per_threadgroup=(128, 1, 1), order=order)
    ref = A.astype(np.float64) @ B.astype(np.float64)
    np.testing.assert_allclose(C, ref, rtol=tol, atol=tol * 10)
    assert st.partial_collectives == 0
