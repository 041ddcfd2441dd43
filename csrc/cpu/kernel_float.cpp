// The float decode and the prefill kernels of one instruction set (this file is
// compiled once per TQMETAL_ISA: generic, avx2, avx512; kernel_common.h has the
// map of the kernel files): unit_fn_<isa> picks the instantiation for a plan.
#include "cpu/decode.h"
#include "cpu/prefill.h"

namespace tqmetal::cpu {
namespace TQ_CAT(isa_, TQMETAL_ISA) {

template <int W, int KB, int VB>
UnitFn pick_rt(const Problem& p, const Plan& plan) {
  if constexpr (W == 16) {
    if (plan.row_tile == PROWS) return &process_unit_prefill<KB, VB>;
  }
  return pick_rt_decode<W, KB, VB, false>(plan);
}

template <int W>
UnitFn pick_bits(const Problem& p, const Plan& plan) {
  if (p.k.bits == 4) {
    return p.v.bits == 4 ? pick_rt<W, 4, 4>(p, plan) : pick_rt<W, 4, 8>(p, plan);
  }
  return p.v.bits == 4 ? pick_rt<W, 8, 4>(p, plan) : pick_rt<W, 8, 8>(p, plan);
}

} // namespace TQ_CAT(isa_, TQMETAL_ISA)

UnitFn TQ_CAT(unit_fn_, TQMETAL_ISA)(const Problem& p, const Plan& plan) {
  using namespace TQ_CAT(isa_, TQMETAL_ISA);
  // A chunk is 2W elements and must not straddle groups: W = 8 for group 16.
  return p.group_size >= 32 ? pick_bits<16>(p, plan) : pick_bits<8>(p, plan);
}

} // namespace tqmetal::cpu
