// Kernels for the threadgroup-memory race detector (tests/test_mslemu_racecheck.py).
// `racy_*` kernels are deliberately broken; `ok_*` kernels are their correct counterparts.
#include <metal_stdlib>
using namespace metal;

// --- cross-simdgroup exchange: write, (missing) barrier, read another thread's slot
kernel void racy_exchange(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint lid [[thread_position_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]]) {
  threadgroup float xchg[256];
  xchg[lid] = in[lid];
  // threadgroup_barrier(mem_flags::mem_threadgroup);   <-- missing
  out[lid] = xchg[tpg - 1 - lid];
}

kernel void ok_exchange(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint lid [[thread_position_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]]) {
  threadgroup float xchg[256];
  xchg[lid] = in[lid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = xchg[tpg - 1 - lid];
}

// --- tree reduction in threadgroup memory; the racy variant drops the barrier inside the loop
//     (write-after-read / read-after-write between iterations)
template <bool kBarrierInLoop>
[[kernel]] void tree_sum(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint lid [[thread_position_in_threadgroup]],
    uint gid [[threadgroup_position_in_grid]],
    uint tpg [[threads_per_threadgroup]]) {
  threadgroup float acc[256];
  acc[lid] = in[gid * tpg + lid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = tpg / 2; s > 0; s /= 2) {
    if (lid < s) {
      acc[lid] += acc[lid + s];
    }
    if (kBarrierInLoop) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
  if (!kBarrierInLoop) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (lid == 0) {
    out[gid] = acc[0];
  }
}
template [[host_name("ok_tree_sum")]] [[kernel]] decltype(tree_sum<true>) tree_sum<true>;
template [[host_name("racy_tree_sum")]] [[kernel]] decltype(tree_sum<false>) tree_sum<false>;

// --- write-write: every thread stores its id into the same slot (last writer wins: schedule-dependent)
kernel void racy_write_write(
    device uint* out [[buffer(0)]],
    uint lid [[thread_position_in_threadgroup]]) {
  threadgroup uint slot[1];
  slot[0] = lid;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = slot[0];
}

// --- within one simdgroup: lane 0 publishes a value that the other lanes of the *same* simdgroup read.
//     MSL requires a simdgroup_barrier (or threadgroup_barrier) between them for memory ordering.
//     mode 0: no barrier, 1: simdgroup_barrier(mem_threadgroup), 2: simdgroup_barrier(mem_none),
//     3: only a SIMD collective (simd_sum) in between, 4: threadgroup_barrier(mem_none)
constant int publish_mode [[function_constant(0)]];

kernel void simd_publish(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint lid [[thread_position_in_threadgroup]],
    uint sgid [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float pub[8];
  if (lane == 0) {
    pub[sgid] = in[sgid];
  }
  float s = 0;
  if (publish_mode == 1) {
    simdgroup_barrier(mem_flags::mem_threadgroup);
  } else if (publish_mode == 2) {
    simdgroup_barrier(mem_flags::mem_none);
  } else if (publish_mode == 3) {
    s = simd_sum(1.0f);
  } else if (publish_mode == 4) {
    threadgroup_barrier(mem_flags::mem_none);
  }
  out[lid] = pub[sgid] + s;
}

// --- thread-private scratch that only one thread ever touches: never a race
kernel void ok_private_slots(
    device float* out [[buffer(0)]],
    uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float mine[128];
  mine[lid] = float(lid);
  mine[lid] += 1.0f;  // same thread: read + write, no race
  out[lid] = mine[lid];
}

// --- reads threadgroup memory nobody wrote (counted in DispatchStats.tg_uninit_read_bytes)
kernel void uninit_read(
    device float* out [[buffer(0)]],
    uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float buf[64];
  if (lid < 32) {
    buf[lid] = 1.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = buf[lid];  // lanes 32..63 read never-written (poisoned = NaN) memory
}

// --- a race through a pointer into dynamic threadgroup memory ([[threadgroup(0)]])
kernel void racy_dynamic_tg(
    device float* out [[buffer(0)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint lid [[thread_position_in_threadgroup]]) {
  scratch[lid] = float(lid);
  out[lid] = scratch[(lid + 1) % 64];
}
