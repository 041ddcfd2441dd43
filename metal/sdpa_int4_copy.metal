// A strided 4-D array copied into a contiguous one (2- or 4-byte elements, copied as bits).
// The attention kernels read the last axis of q, the packed words, scales, biases and tails
// contiguously; csrc/metal/dispatch_plan.cpp plans this copy, into a scratch buffer, only
// for an input whose last axis is strided (a transposed view, never mx.quantize output or
// a cache sliced along N), so eval_gpu needs none of MLX's internal copy routines.
//   grid (ceil(d3 / 32), ceil(d2 / 8), d0 * d1) threadgroups of (32, 8, 1) threads.
#include <metal_stdlib>
#include "mlx/backend/metal/kernels/defines.h" // instantiate_kernel
using namespace metal;

template <typename T>
[[kernel]] void sdpa_int4_copy_4d(
    const device T* src [[buffer(0)]],
    device T* dst [[buffer(1)]],
    const constant int* shape [[buffer(2)]], // d0, d1, d2, d3
    const constant int64_t* strides [[buffer(3)]], // of src, in elements
    uint3 gid [[thread_position_in_grid]]) {
  const int i3 = int(gid.x), i2 = int(gid.y);
  if (i3 >= shape[3] || i2 >= shape[2]) {
    return;
  }
  const int i0 = int(gid.z) / shape[1], i1 = int(gid.z) % shape[1];
  const int64_t from = i0 * strides[0] + i1 * strides[1] + int64_t(i2) * strides[2] + int64_t(i3) * strides[3];
  const int64_t to = (int64_t(gid.z) * shape[2] + i2) * shape[3] + i3;
  dst[to] = src[from];
}

instantiate_kernel("sdpa_int4_copy_4d_b2", sdpa_int4_copy_4d, uint16_t)
instantiate_kernel("sdpa_int4_copy_4d_b4", sdpa_int4_copy_4d, uint32_t)
