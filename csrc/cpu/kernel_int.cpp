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
  // Bit-stream widths (2, 3, 5, 6 bits) are expanded to bytes with AVX512-VBMI;
  // without it they take the float kernels.
  const int kb = bits_kind(p.k.bits), vb = bits_kind(p.v.bits);
  if ((kb == kBitStream || vb == kBitStream) && !cpu_use_vbmi()) return nullptr;
  auto with_v = [&](auto k) -> UnitFn {
    constexpr int K = decltype(k)::value;
    switch (vb) {
      case 4:
        return pick_int_decode<K, 4>(p, plan);
      case 8:
        return pick_int_decode<K, 8>(p, plan);
      default:
        return pick_int_decode<K, kBitStream>(p, plan);
    }
  };
  switch (kb) {
    case 4:
      return with_v(std::integral_constant<int, 4>{});
    case 8:
      return with_v(std::integral_constant<int, 8>{});
    default:
      return with_v(std::integral_constant<int, kBitStream>{});
  }
#else
  // Built without AVX-512 (another architecture, or the macOS checks): no integer kernels.
  return nullptr;
#endif
}

} // namespace tqmetal::cpu
