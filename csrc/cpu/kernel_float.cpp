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

template <int W, int KB>
UnitFn pick_v_bits(const Problem& p, const Plan& plan) {
  switch (bits_kind(p.v.bits)) {
    case 4:
      return pick_rt<W, KB, 4>(p, plan);
    case 8:
      return pick_rt<W, KB, 8>(p, plan);
    default:
      if constexpr (W == 16) return pick_rt<W, KB, kBitStream>(p, plan);
      return nullptr; // group 16: the host checks the widths first
  }
}

template <int W>
UnitFn pick_bits(const Problem& p, const Plan& plan) {
  switch (bits_kind(p.k.bits)) {
    case 4:
      return pick_v_bits<W, 4>(p, plan);
    case 8:
      return pick_v_bits<W, 8>(p, plan);
    default:
      if constexpr (W == 16) return pick_v_bits<W, kBitStream>(p, plan);
      return nullptr;
  }
}

} // namespace TQ_CAT(isa_, TQMETAL_ISA)

UnitFn TQ_CAT(unit_fn_, TQMETAL_ISA)(const Problem& p, const Plan& plan) {
  using namespace TQ_CAT(isa_, TQMETAL_ISA);
  // A chunk is 2W elements and must not straddle groups: W = 8 for group 16.
  return p.group_size >= 32 ? pick_bits<16>(p, plan) : pick_bits<8>(p, plan);
}

} // namespace tqmetal::cpu
