"""The attention op and the quantizer, as MLX users call them."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import mlx.core as mx

from . import _ext

QuantizedKV = Sequence[mx.array]  # (packed, scales, biases) from mx.quantize


def _triple(name: str, t) -> tuple:
    if not isinstance(t, (tuple, list)) or len(t) != 3:
        raise ValueError(
            f"[tqmetal.sdpa_int4] {name}: expected a (packed, scales, biases) tuple "
            "as returned by mx.quantize"
        )
    for x in t:
        if not isinstance(x, mx.array):
            raise ValueError(f"[tqmetal.sdpa_int4] {name}: tuple items must be mx.array")
    return tuple(t)


def sdpa_int4(
    q: mx.array,
    k: QuantizedKV,
    v: QuantizedKV,
    *,
    scale: float,
    mask: Union[None, str, mx.array] = None,
    group_size: int = 64,
    bits: int = 4,
    k_bits: Optional[int] = None,
    v_bits: Optional[int] = None,
    sinks: Optional[mx.array] = None,
    k_tail: Optional[mx.array] = None,
    v_tail: Optional[mx.array] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """Scaled dot-product attention over an affine-quantized KV cache.

    Equal to ``mx.fast.scaled_dot_product_attention(q, K, V, scale=scale,
    mask=mask, sinks=sinks)`` where ``K = concat(dequantize(*k), k_tail)`` and
    ``V = concat(dequantize(*v), v_tail)`` along the sequence axis, computed
    without materializing K, V or the score matrix.

    Args:
        q: ``[B, H_q, L, D]`` float16, bfloat16 or float32.
        k, v: ``(packed, scales, biases)`` as ``mx.quantize(x, group_size, bits)``
            returns for ``x`` of shape ``[B, H_kv, N, D]``; H_q % H_kv == 0.
        scale: multiplier of ``q @ K^T``, usually ``D ** -0.5``.
        mask: None, ``"causal"`` (bottom-right aligned), or a boolean (True =
            attend) or additive array broadcastable to ``[B, H_q, L, N + T]``.
        group_size: 16, 32, 64 or 128 (16 comes from :func:`quantize` only).
        bits: 2, 3, 4, 5, 6 or 8 (mx.quantize's widths) for both K and V unless
            ``k_bits`` / ``v_bits`` say otherwise; widths other than 4 and 8 need
            ``group_size`` >= 32.
        sinks: optional ``[H_q]`` logits that join the softmax with no value.
        k_tail, v_tail: optional unquantized ``[B, H_kv, T, D]`` tokens attended
            after the quantized ones (the cache's recent-token window).
        stream: MLX stream or device. A GPU stream runs the GPU kernels where this
            build has them (Metal on macOS; CUDA with ``mlx[cuda13]`` on Linux; shapes
            they do not cover run on the CPU); without them (a CPU-only MLX) an
            explicit GPU stream is a ValueError. :func:`gpu_info` says which.

    Returns:
        ``[B, H_q, L, D]`` in q's dtype.
    """
    if not isinstance(q, mx.array):
        raise ValueError("[tqmetal.sdpa_int4] q: expected an mx.array")
    kp, ks, kb = _triple("k", k)
    vp, vs, vb = _triple("v", v)
    mask_mode, mask_arr = "", None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(
                f'[tqmetal.sdpa_int4] mask: expected None, "causal" or an array, got "{mask}"'
            )
        mask_mode = "causal"
    elif mask is not None:
        if not isinstance(mask, mx.array):
            raise ValueError("[tqmetal.sdpa_int4] mask: expected None, \"causal\" or an mx.array")
        mask_arr = mask
    for name, x in (("sinks", sinks), ("k_tail", k_tail), ("v_tail", v_tail)):
        if x is not None and not isinstance(x, mx.array):
            raise ValueError(f"[tqmetal.sdpa_int4] {name}: expected an mx.array or None")
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"[tqmetal.sdpa_int4] bits: expected 2, 3, 4, 5, 6 or 8, got {bits}")
    k_bits = bits if k_bits is None else k_bits
    v_bits = bits if v_bits is None else v_bits
    return _ext.sdpa_int4(
        q, kp, ks, kb, vp, vs, vb, float(scale), mask_mode, mask_arr,
        int(group_size), int(k_bits), int(v_bits), sinks, k_tail, v_tail, stream,
    )


def quantize(x: mx.array, group_size: int = 64, bits: int = 4, *, stream=None):
    """Affine quantization in ``mx.quantize``'s layout: ``(packed, scales, biases)``.

    Identical to ``mx.quantize`` for group sizes 32, 64, 128; also supports 16,
    which head dim 80 needs.
    """
    return _ext.quantize(x, int(group_size), int(bits), stream)


def cpu_isa() -> str:
    """The CPU kernel variant picked for this machine: avx512amx, avx512vnni, avx512, avx2 or generic.

    ``TQMETAL_CPU_ISA`` (one of those names) lowers the choice, never raises it.
    """
    return _ext.cpu_isa()


def gpu_path() -> dict:
    """Which GPU path ``sdpa_int4`` has in this process, and why.

    ``{"path": ..., "reason": ..., "metallib_dir": ...}`` with path ``"metallib"`` (the kernels
    Xcode's Metal compiler built into tqmetal_kernels.metallib), ``"runtime"`` (no metallib: the
    kernel sources embedded at build time, compiled by Metal's run-time compiler at first use; no
    Xcode needed) or ``"none"`` (a build without Metal, e.g. Linux, or no Metal device: the op runs
    on the CPU). ``TQMETAL_METAL_PATH=runtime`` forces the run-time path; ``TQMETAL_METALLIB_DIR``
    names the metallib's directory.
    """
    return dict(_ext.gpu_path())


def num_threads() -> int:
    """Threads the CPU kernels use (TQMETAL_NUM_THREADS overrides)."""
    return _ext.num_threads()


def gpu_info() -> dict:
    """Which GPU path this build of tqmetal has, and why.

    Returns a dict with at least:

    * ``backend``: ``"cuda"`` (built against MLX's CUDA backend, ``mlx[cuda13]``),
      ``"metal"`` (macOS, MLX with Metal) or ``"none"`` (a CPU-only MLX);
    * ``available``: whether :func:`sdpa_int4` on a GPU stream runs GPU kernels here;
    * ``reason``: why (or why not), in words;

    plus backend details as strings (CUDA: ``device``, ``compute_capability``,
    ``arch``, ``sms``, ``nvrtc``, ``compiler``).
    """
    return dict(_ext.gpu_info())


_GPU_OK = None


def fused_op_available() -> bool:
    """Whether sdpa_int4 runs on the default device (CPU always; GPU with a Metal or CUDA build)."""
    global _GPU_OK
    if mx.default_device() == mx.cpu:
        return True
    if _GPU_OK is None:
        try:
            z = mx.zeros((1, 1, 1, 32))
            zq = quantize(z, 32, 4)
            sdpa_int4(z, zq, zq, scale=1.0, group_size=32, stream=mx.gpu)
            _GPU_OK = True
        except Exception:
            _GPU_OK = False
    return _GPU_OK
