// Decode's float path (every object; on VNNI CPUs it serves the shapes the
// integer path does not: kernel_common.h has the map). W-lane float vectors over
// chunks of 2W elements in the permuted order (see kernel_common.h).
#pragma once

#include "cpu/kernel_common.h"

namespace tqmetal::cpu {
namespace TQ_CAT(isa_, TQMETAL_ISA) {

// Scores of token t (packed row kr) for RT rows, before the bias term:
// accs[r * TB + t] holds W lane partial sums of scale_g * q_perm . codes.
template <int W, int KB, int RT>
TQ_INLINE inline void float_token_scores(const uint8_t* kr, const float* qk, int D, int ng, int cpg, const float* ks,
                                         int t, typename Vec<W>::f* accs, int bits) {
  using VF = typename Vec<W>::f;
  constexpr int CH = 2 * W;
  VF acc[RT];
  for (int r = 0; r < RT; ++r) acc[r] = VF{};
  for (int g = 0; g < ng; ++g) {
    const float gsc = ks[g * TB + t];
    for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
      VF a, bb;
      unpack_chunk<W, KB>(kr + c * chunk_bytes<W, KB>(bits), a, bb, bits);
      a *= gsc;
      bb *= gsc;
      for (int r = 0; r < RT; ++r) {
        acc[r] += a * loadv<VF>(qk + r * D + c * CH);
        acc[r] += bb * loadv<VF>(qk + r * D + c * CH + W);
      }
    }
  }
  for (int r = 0; r < RT; ++r) accs[r * TB + t] = acc[r];
}

// o += w * codes for the block's first nq tokens (rows vrow bytes apart from
// vblock), with weights p * scale_g in wts [ng][RT][TB]. Chunk-outer,
// token-inner: a row sub-tile's accumulators stay in registers.
template <int W, int VB, int RT>
TQ_INLINE inline void float_v_update(const uint8_t* vblock, int64_t vrow, int nq, int D, int cpg, const float* wts,
                                     float* o, int bits) {
  using VF = typename Vec<W>::f;
  constexpr int CH = 2 * W;
  constexpr int RS = RT < 4 ? RT : 4;
  const int nch = D / CH;
  for (int c = 0; c < nch && nq > 0; ++c) {
    const int g = c / cpg;
    const uint8_t* vc = vblock + c * chunk_bytes<W, VB>(bits);
    for (int r0 = 0; r0 < RT; r0 += RS) {
      VF oa[RS], ob[RS];
      for (int r = 0; r < RS; ++r) {
        oa[r] = loadv<VF>(o + (r0 + r) * D + c * CH);
        ob[r] = loadv<VF>(o + (r0 + r) * D + c * CH + W);
      }
      for (int t = 0; t < nq; ++t) {
        VF a, bb;
        unpack_chunk<W, VB>(vc + t * vrow, a, bb, bits);
        const float* w = wts + (g * RT + r0) * TB + t;
        for (int r = 0; r < RS; ++r) {
          oa[r] += w[r * TB] * a;
          ob[r] += w[r * TB] * bb;
        }
      }
      for (int r = 0; r < RS; ++r) {
        storev(o + (r0 + r) * D + c * CH, oa[r]);
        storev(o + (r0 + r) * D + c * CH + W, ob[r]);
      }
    }
  }
}

} // namespace TQ_CAT(isa_, TQMETAL_ISA)
} // namespace tqmetal::cpu
