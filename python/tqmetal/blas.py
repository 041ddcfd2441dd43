"""A model's matrix products through numpy's BLAS: MLX's CPU backend is slow at them.

MLX 0.32's CPU backend multiplies matrices at a few GFLOP/s on x86 (scalar
code, a reference BLAS), and quantized matrices no faster; numpy's bundled
OpenBLAS is about 25x faster here. :func:`numpy_matmuls` swaps a model's
linear layers for ones that send inputs of many rows (prefill chunks) through
numpy on dequantized float32 weights and keep MLX's own layer for a few rows
(decode steps, where the quantized matrix-vector product reads less memory).
The attention, and so every KV cache, stays in MLX / tqmetal.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np




def _openblas_thread_functions():
    """(set, get) of the OpenBLAS numpy was built with, or None (another BLAS)."""
    import ctypes
    import glob
    import os

    libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs",
                                  "*openblas*.so*"))
    libs += glob.glob(os.path.join(os.path.dirname(np.__file__), ".dylibs", "*openblas*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", "_64_", ""):
                try:
                    return (getattr(lib, f"{prefix}set_num_threads{suffix}"),
                            getattr(lib, f"{prefix}get_num_threads{suffix}"))
                except AttributeError:
                    pass
    return None


def set_blas_threads(n: int):
    """Threads numpy's OpenBLAS uses from now on; returns the number now in use (None
    when numpy's BLAS is not an OpenBLAS this can reach).

    On a machine whose cores other processes also use, OpenBLAS's threads wait on each
    other: on the shared 2-core development machine a [128, 640] x [640, 2048] float32
    product ran at 8 GFLOP/s with 2 threads and 65 GFLOP/s with 1, which made one
    thread 5x faster for a whole teacher-forced evaluation (docs/fidelity.md).
    """
    import ctypes

    fns = _openblas_thread_functions()
    if fns is None:
        return None
    set_fn, get_fn = fns
    set_fn.argtypes = [ctypes.c_int]
    set_fn(int(n))
    get_fn.restype = ctypes.c_int
    return int(get_fn())


class _NumpyLinear:
    """``x @ W.T (+ b)`` through numpy's BLAS, for a float32 weight ``W [out, in]``."""

    def __init__(self, weight, bias=None):
        self.wt = np.ascontiguousarray(np.asarray(weight.astype(mx.float32)).T)
        self.b = None if bias is None else np.asarray(bias.astype(mx.float32))

    def __call__(self, x):
        shape = x.shape
        xn = np.asarray(x.astype(mx.float32)).reshape(-1, shape[-1])
        y = xn @ self.wt
        if self.b is not None:
            y += self.b
        return mx.array(y.reshape(*shape[:-1], y.shape[-1])).astype(x.dtype)


def _dense_weight(module):
    import mlx.nn as nn

    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(module.weight, module.scales, module.biases, module.group_size,
                             module.bits, mode=getattr(module, "mode", "affine"))
    return module.weight


def numpy_matmuls(model, embedding_as_linear: bool = True):
    """Route the model's Linear / QuantizedLinear layers (and, with
    ``embedding_as_linear``, a tied embedding's ``as_linear``) through numpy's
    BLAS, on dequantized float32 weights.

    MLX 0.32's CPU backend multiplies matrices at a few GFLOP/s on x86 (about
    25x slower than OpenBLAS here), which makes a full-vocabulary teacher-forced
    evaluation of even a 135M model take tens of minutes. The function computed
    is the same (the dequantized weights are exactly what the quantized layers
    multiply by; only the summation order differs), and the reference and every
    quantized cache go through the same products, so comparisons are unaffected.
    The attention, and so every KV cache, stays in MLX / tqmetal. Inputs of
    fewer than ``NUMPY_MIN_ROWS`` rows (decode steps) keep MLX's own layers,
    whose quantized matrix-vector products read less memory.

    numpy computes eagerly: a replaced ``as_linear`` computes the logits of every
    row, even where MLX would never evaluate them (mlx-lm's prefill keeps only
    the last token's), so generation passes ``embedding_as_linear=False``. The
    float32 weights live in numpy, outside ``mx.get_peak_memory``.
    """
    import mlx.nn as nn

    for _, module in model.named_modules():
        for name, child in list(module.children().items()):
            if isinstance(child, (nn.Linear, nn.QuantizedLinear)) and not isinstance(child, _Fast):
                bias = child["bias"] if "bias" in child else None
                module[name] = _FastLinear(_NumpyLinear(_dense_weight(child), bias), child)
            elif (embedding_as_linear and isinstance(child, (nn.Embedding, nn.QuantizedEmbedding))
                  and not isinstance(child, _Fast)):
                module[name] = _FastEmbedding(_dense_weight(child), child)
    mx.clear_cache()
    return model


class _Fast:
    pass


def _fast_classes():
    import mlx.nn as nn

    def rows(x):
        return x.size // x.shape[-1]

    class FastLinear(nn.Module, _Fast):
        def __init__(self, op, original):
            super().__init__()
            self._op = op
            self._orig = [original]  # in a list: not a child module

        def __call__(self, x):
            # Decode steps (a few rows) read less memory through MLX's own
            # (quantized) matrix-vector product; prefill chunks go to BLAS.
            return self._orig[0](x) if rows(x) < NUMPY_MIN_ROWS else self._op(x)

    class FastEmbedding(nn.Module, _Fast):
        def __init__(self, weight, original):
            super().__init__()
            self.weight = weight.astype(mx.float32)
            mx.eval(self.weight)
            self._op = _NumpyLinear(self.weight)
            self._orig = [original]

        def __call__(self, x):
            return self.weight[x]

        def as_linear(self, x):
            return self._orig[0].as_linear(x) if rows(x) < NUMPY_MIN_ROWS else self._op(x)

    return FastLinear, FastEmbedding


# Inputs with fewer rows than this keep MLX's layer (see FastLinear).
NUMPY_MIN_ROWS = 16


def _FastLinear(op, original):
    return _fast_classes()[0](op, original)


def _FastEmbedding(weight, original):
    return _fast_classes()[1](weight, original)
