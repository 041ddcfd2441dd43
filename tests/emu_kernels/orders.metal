// Kernels that make the scheduling order observable (tests/test_mslemu_orders.py).  Deliberately racy:
// run them with racecheck=False.
#include <metal_stdlib>
using namespace metal;

// Each thread takes a ticket from a shared (non-atomic) counter, twice, with a barrier in between: under
// run-to-block orders the tickets record the order in which threads ran in each barrier phase.
kernel void take_tickets(
    device uint* out [[buffer(0)]],
    uint lid [[thread_position_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]]) {
  threadgroup uint ticket[1];
  if (lid == 0) {
    ticket[0] = 0;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  uint t = ticket[0];
  ticket[0] = t + 1;
  out[lid] = t;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lid == 0) {
    ticket[0] = 0;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  t = ticket[0];
  ticket[0] = t + 1;
  out[tpg + lid] = t;
}

// Non-atomic read-modify-write of one threadgroup counter by every thread: the lost-update bug.
kernel void lost_update(
    device uint* out [[buffer(0)]],
    uint lid [[thread_position_in_threadgroup]]) {
  threadgroup uint counter[1];
  if (lid == 0) {
    counter[0] = 0;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  counter[0] += 1;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lid == 0) {
    out[0] = counter[0];
  }
}
