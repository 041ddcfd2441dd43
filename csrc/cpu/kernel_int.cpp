// The integer decode kernels (AVX512-VNNI, and AMX tiles for K): compiled once,
// as the avx512int object, with AVX-512 and AMX code generation allowed; they
// run only after the CPU check (csrc/cpu/sdpa_int4_cpu.cpp). unit_fn_avx512int
// is null where they do not apply, and the avx512 object's kernels run instead.
#ifndef TQMETAL_KERNEL_INT
#define TQMETAL_KERNEL_INT
#endif
#include "cpu/decode.h"

namespace tqmetal::cpu {
namespace TQ_CAT(isa_, TQMETAL_ISA) {

#if TQ_HAVE_VNNI_PATH
template <int KB, int VB>
UnitFn pick_int_decode(const Problem& p, const Plan& plan) {
  // 32-byte segments of packed rows, groups of whole segments or halves.
  if (plan.row_tile == kPrefillRows || !cpu_use_vnni() || p.D % 64 != 0 || p.D > kVnniMaxD) return nullptr;
  // Head dim 128 at compile time for the row tiles of GQA decode (4 or 8 query
  // heads per KV head); other shapes take the run-time head dim.
  if (p.D == 128 && (plan.row_tile == 4 || plan.row_tile == 8)) {
#if TQ_HAVE_AMX_PATH
    const int ng = 128 / p.group_size;
    if constexpr (KB == 4) {
      if (cpu_use_amx() && plan.row_tile * ng * 2 <= kAmxMaxCols) {
        return plan.row_tile == 4 ? &process_unit<16, KB, VB, 4, true, 128, true>
                                  : &process_unit<16, KB, VB, 8, true, 128, true>;
      }
    }
#endif
    return plan.row_tile == 4 ? &process_unit<16, KB, VB, 4, true, 128>
                              : &process_unit<16, KB, VB, 8, true, 128>;
  }
  return pick_rt_decode<16, KB, VB, true>(plan);
}
#endif

} // namespace TQ_CAT(isa_, TQMETAL_ISA)

UnitFn TQ_CAT(unit_fn_, TQMETAL_ISA)(const Problem& p, const Plan& plan) {
#if TQ_HAVE_VNNI_PATH
  using namespace TQ_CAT(isa_, TQMETAL_ISA);
  if (p.group_size < 32) return nullptr;
  // The integer kernels read whole bytes (4 and 8 bits); the bit-stream widths
  // take the float kernels.
  if ((p.k.bits != 4 && p.k.bits != 8) || (p.v.bits != 4 && p.v.bits != 8)) return nullptr;
  if (p.k.bits == 4) {
    return p.v.bits == 4 ? pick_int_decode<4, 4>(p, plan) : pick_int_decode<4, 8>(p, plan);
  }
  return p.v.bits == 4 ? pick_int_decode<8, 4>(p, plan) : pick_int_decode<8, 8>(p, plan);
#else
  // Built without AVX-512 (another architecture, or the macOS checks): no integer kernels.
  return nullptr;
#endif
}

} // namespace tqmetal::cpu
