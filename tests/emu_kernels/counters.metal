// Kernels with known device-memory traffic (tests/test_mslemu_counters.py).
#include <metal_stdlib>
using namespace metal;

// 16-byte vector loads and stores: each byte of `in` read once, each byte of `out` written once
kernel void copy_float4(
    const device float4* in [[buffer(0)]],
    device float4* out [[buffer(1)]],
    uint tid [[thread_position_in_grid]]) {
  out[tid] = in[tid] * 2.0f;
}

// every element read by two threads (its own and its left neighbour's)
kernel void stencil2(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    const constant uint& n [[buffer(2)]],
    uint tid [[thread_position_in_grid]]) {
  out[tid] = in[tid] + in[(tid + 1) % n];
}

// a by-value constant struct: bound once per thread (one sizeof(Params) load per thread)
struct Params {
  float scale;
  float bias;
  int pad[2];
};
kernel void affine(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant Params p [[buffer(2)]],
    uint tid [[thread_position_in_grid]]) {
  out[tid] = in[tid] * p.scale + p.bias;
}
