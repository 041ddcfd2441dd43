// Out-of-bounds accesses for the guard-zone checks (tests/test_mslemu_guards.py).  All deliberately broken
// except `ok_neighbours`.
#include <metal_stdlib>
using namespace metal;

// threadgroup variables `a` and `b` are neighbours; `a` is written one element past its end
kernel void tg_overflow_write(
    device float* out [[buffer(0)]],
    uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float a[32];
  threadgroup float b[32];
  b[lid % 32] = 2.0f;
  a[lid] = 1.0f;                 // lid == 32 writes a[32]
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = b[lid % 32];
}

// reads one element before the start of `a`
kernel void tg_underflow_read(
    device float* out [[buffer(0)]],
    uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float a[32];
  a[lid] = float(lid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = a[int(lid) - 1];    // lid == 0 reads a[-1]
}

kernel void ok_neighbours(
    device float* out [[buffer(0)]],
    uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float a[32];
  threadgroup float b[32];
  a[lid] = 1.0f;
  b[lid] = 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = a[31 - lid] + b[31 - lid];
}

// device buffers: store one element past the end / load one element before the start
kernel void dev_write_past_end(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_grid]]) {
  out[tid + 1] = float(tid);
}

kernel void dev_read_before_start(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint tid [[thread_position_in_grid]]) {
  out[tid] = in[int(tid) - 1];
}

// a float4 load that straddles the end of a 6-float buffer
kernel void dev_vector_straddle(
    const device float4* in [[buffer(0)]],
    device float4* out [[buffer(1)]],
    uint tid [[thread_position_in_grid]]) {
  out[tid] = in[tid];
}

// reads through a buffer pointer that is gated by a function constant and left unbound (nullptr)
constant bool has_extra [[function_constant(1)]];
kernel void unbound_buffer_read(
    device float* out [[buffer(0)]],
    const device float* extra [[buffer(1), function_constant(has_extra)]],
    uint tid [[thread_position_in_grid]]) {
  out[tid] = extra[tid];
}
