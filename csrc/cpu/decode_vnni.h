// Decode's AVX512-VNNI integer path (built only into the avx512int object and
// selected at run time only on CPUs that have VNNI; kernel_common.h has the map).
//
// K: each query row is rounded once to int16 (scaled to its max), and vpdpwssd
// sums int16 nibble x int16 query products per int32 lane; lanes are scaled by
// their group's scale in float. V: the block's softmax weights become int16
// pairs of consecutive tokens, so one vpdpwssd adds two tokens per lane; codes
// are centred (n - 8, or n - 128) with the centre moved into the bias term.
#pragma once

#include "cpu/kernel_common.h"

namespace tqmetal::cpu {
namespace TQ_CAT(isa_, TQMETAL_ISA) {

constexpr int kVnniMaxD = 512; // the K segment -> group table's size

#if defined(__AVX512BW__) && defined(TQMETAL_KERNEL_INT)
// vpdpwssd is written as inline asm so that the file keeps one set of compile
// flags (a VNNI target attribute would not let the shared helpers inline).
#define TQ_HAVE_VNNI_PATH 1
inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
  return acc;
}
inline __m512 as_m512(f16v v) {
  __m512 r;
  std::memcpy(&r, &v, 64);
  return r;
}

// One scaled query row (natural order) as int16 in the K unpack's word order,
// with its factor back to float (qinv) and per-group sums of the rounded query.
// 15 bits keep float32-level accuracy; AMX needs |q| <= 127 * 256 (q_max).
template <int KB>
inline void vnni_query_row(const float* q, int D, int gs, int ng, float q_max, int16_t* q16, float* qsum,
                           float& qf, float& qinv) {
  float qmax = 0.f;
  for (int d = 0; d < D; ++d) qmax = std::max(qmax, std::fabs(q[d]));
  qf = qmax > 0.f ? q_max / qmax : 0.f;
  qinv = qmax > 0.f ? qmax / q_max : 0.f;
  for (int g = 0; g < ng; ++g) qsum[g] = 0.f;
  for (int i = 0; i < D; ++i) {
    // 4 bits: segment of 64 elements = 32 low-nibble words, then 32 high.
    const int e = KB == 4 ? i / 64 * 64 + (i % 64 < 32 ? 2 * (i % 64) : 2 * (i % 64 - 32) + 1) : i;
    q16[i] = int16_t(std::lrint(q[e] * qf));
    // The bias term uses the rounded query too: the score is then exactly
    // q16 . k, whose rounding error multiplies the (centred) key rather than
    // the all-positive nibbles.
    qsum[e / gs] += float(q16[i]) * qinv;
  }
}

// vpermb and vpmultishiftqb (AVX512-VBMI) as inline asm, as dpwssd: the CPU
// check (cpu_use_vbmi) gates every path that runs them.
inline __m512i permb(__m512i idx, __m512i table) {
  __m512i r;
  asm("vpermb %2, %1, %0" : "=v"(r) : "v"(idx), "vm"(table));
  return r;
}
inline __m512i multishiftqb(__m512i ctrl, __m512i data) {
  __m512i r;
  asm("vpmultishiftqb %2, %1, %0" : "=v"(r) : "v"(ctrl), "vm"(data));
  return r;
}

// Packed rows of a bit-stream width (2, 3, 5, 6 bits; kernel_common.h) as one
// byte per code, the 8-bit layout the VNNI path reads, 64 codes at a time:
// byte 8j+i of the permuted source is stream byte j*bits+i, so qword j starts
// at code 8j and code 8j+i sits at bit i*bits of it. Built once per unit.
struct StreamExpander {
  __m512i idx, ctl, mask;
  __mmask64 load; // 8 * bits <= 48 source bytes per 64 codes: never past the row
  int bits;
  explicit StreamExpander(int b) : bits(b) {
    alignas(64) uint8_t ix[64], ct[64];
    for (int j = 0; j < 8; ++j) {
      for (int i = 0; i < 8; ++i) {
        ix[8 * j + i] = uint8_t(j * b + i);
        ct[8 * j + i] = uint8_t(i * b);
      }
    }
    idx = _mm512_load_si512(ix);
    ctl = _mm512_load_si512(ct);
    mask = _mm512_set1_epi8(char((1 << b) - 1));
    load = (uint64_t(1) << (8 * b)) - 1;
  }
  // One row of D codes (D % 64 == 0) into dst[D].
  TQ_INLINE void row(const uint8_t* src, int D, uint8_t* dst) const {
    for (int c = 0; c < D / 64; ++c) {
      const __m512i raw = _mm512_maskz_loadu_epi8(load, src + c * 8 * bits);
      _mm512_storeu_si512(dst + 64 * c, _mm512_and_si512(multishiftqb(ctl, permb(idx, raw)), mask));
    }
  }
};

// Scores of token t (packed row kr) for RT rows, before the per-row factor and
// the bias term: accs[r * TB + t] holds 16 lane partial sums.
template <int KB, int RT>
TQ_INLINE inline void vnni_token_scores(const uint8_t* kr, const int16_t* kq16, int D, int gs, const int* kseg_g0,
                                        const float* ks, int t, f16v* accs) {
  constexpr int SE = KB == 4 ? 64 : 32; // elements per segment
  // Per 32-byte segment: int16 nibbles (or bytes) . int16 query, lanes
  // summed in int32, then scaled by the lane's group scale in float.
  const bool split = KB == 4 && gs == 32; // lanes 8-15 are the next group
  __m512 facc[RT];
  for (int r = 0; r < RT; ++r) facc[r] = _mm512_setzero_ps();
  for (int sg = 0; sg < D / SE; ++sg) {
    const int g0 = kseg_g0[sg];
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kr + 32 * sg)));
    __m512i a = w, bb = w;
    if constexpr (KB == 4) {
      a = _mm512_and_si512(w, _mm512_set1_epi16(15));
      bb = _mm512_srli_epi16(w, 4);
    }
    __m512 sv = _mm512_set1_ps(ks[g0 * TB + t]);
    if (split) sv = _mm512_mask_mov_ps(sv, 0xFF00, _mm512_set1_ps(ks[(g0 + 1) * TB + t]));
    for (int r = 0; r < RT; ++r) {
      const int16_t* qr = kq16 + r * D + sg * SE;
      __m512i acc = dpwssd(_mm512_setzero_si512(), a, _mm512_loadu_si512(qr));
      if constexpr (KB == 4) acc = dpwssd(acc, bb, _mm512_loadu_si512(qr + 32));
      facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sv, facc[r]);
    }
  }
  for (int r = 0; r < RT; ++r) std::memcpy(&accs[r * TB + t], &facc[r], 64);
}

// The online softmax of one block, four rows at a time: the block maxima of 4
// rows come out of one transpose-max tree (a row per 128-bit quarter), and the
// running maxima stay in that layout (m4), instead of a scalar chain per row
// (horizontal max, compare, branch). The int16 V weights (wq, winv) are scaled
// by a power of two from a bound, max_t(p) * max_t|scale|, instead of a
// horizontal max per (group, row): max_t(p) = exp2(block max - running max)
// comes from the same tree. sc: scores in, weights p out. vs, vbias: the
// block's V scales and biases (vbias gets the code centre folded in); nq: the
// tokens whose V update takes this path (0: none).
template <int RT, int VB>
TQ_INLINE inline void vnni_softmax_rows4(float* sc, int nq, int ng, int D, __m512* m4, f16v* lv, float* o,
                                         float* obias, const float* vs, float* vbias, int32_t* wq, float* winv,
                                         int vcentre = 1 << (VB - 1)) {
  const __m512 vninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float vsmax[kVnniMaxD / 32];
  if (nq > 0) {
    for (int g = 0; g < ng; ++g) {
      const __m512 vsg = _mm512_loadu_ps(vs + g * TB);
      vsmax[g] = _mm512_reduce_max_ps(_mm512_abs_ps(vsg));
      // Centred codes (n - 8, or n - 128): the centre moves into the bias term.
      _mm512_storeu_ps(vbias + g * TB, _mm512_fmadd_ps(_mm512_set1_ps(float(vcentre)), vsg,
                                                       _mm512_loadu_ps(vbias + g * TB)));
    }
  }
  for (int r0 = 0; r0 < RT; r0 += 4) {
    __m512 sv[4];
    for (int i = 0; i < 4; ++i) sv[i] = _mm512_loadu_ps(sc + (r0 + i) * TB);
    const __m512 t01 = _mm512_max_ps(_mm512_shuffle_f32x4(sv[0], sv[1], 0x44), _mm512_shuffle_f32x4(sv[0], sv[1], 0xEE));
    const __m512 t23 = _mm512_max_ps(_mm512_shuffle_f32x4(sv[2], sv[3], 0x44), _mm512_shuffle_f32x4(sv[2], sv[3], 0xEE));
    __m512 bm = _mm512_max_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
    bm = _mm512_max_ps(bm, _mm512_permute_ps(bm, 0x4E));
    bm = _mm512_max_ps(bm, _mm512_permute_ps(bm, 0xB1)); // quarter i: row r0+i's block max
    const __m512 mold = m4[r0 / 4];
    const __m512 mnew = _mm512_max_ps(mold, bm);
    // Rows with nothing visible yet subtract 0: their p is exp2(-inf) = 0 (and
    // a NaN score stays NaN: exp2v keeps NaN).
    const __m512 msafe = _mm512_mask_mov_ps(mnew, _mm512_cmp_ps_mask(mnew, vninf, _CMP_EQ_OQ), _mm512_setzero_ps());
    const __mmask16 moved = _mm512_cmp_ps_mask(mold, mnew, _CMP_NEQ_OQ);
    m4[r0 / 4] = mnew;
    // Weights p * scale become int16 pairs of consecutive tokens (one vpdpwssd
    // adds two tokens per lane), scaled by 2^(14 - e) where 2^e <= bound <
    // 2^(e+1), bound = max_t(p) * max_t|scale|: |w| * 2^(14-e) < 2^15, and the
    // inverse is exact. max_t(p) is quarter i of pmax; one vector per group
    // serves 4 rows.
    __m512 wscale[kVnniMaxD / 32];
    if (nq > 0) {
      const __m512 pmax = as_m512(exp2v(bm - msafe));
      const __m512 one = _mm512_set1_ps(1.f), c14 = _mm512_set1_ps(14.f);
      for (int g = 0; g < ng; ++g) {
        const __m512 bound = _mm512_mul_ps(pmax, _mm512_set1_ps(vsmax[g]));
        // bound 0 (nothing visible, or zero scales): every weight is 0 anyway.
        const __m512 e = _mm512_max_ps(_mm512_getexp_ps(bound), _mm512_set1_ps(-100.f));
        wscale[g] = _mm512_scalef_ps(one, _mm512_sub_ps(c14, e));
        _mm512_mask_compressstoreu_ps(winv + g * RT + r0, 0x1111, _mm512_scalef_ps(one, _mm512_sub_ps(e, c14)));
      }
    }
    if (moved) { // a running max moved: rescale what those rows summed so far
      alignas(64) float alpha[16];
      _mm512_store_ps(alpha, as_m512(exp2v(mold - msafe)));
      for (int i = 0; i < 4; ++i) {
        if (!((moved >> (4 * i)) & 1)) continue;
        const int r = r0 + i;
        const float a = alpha[4 * i];
        lv[r] *= a;
        float* orow = o + r * D;
        for (int d = 0; d < D; ++d) orow[d] *= a;
        for (int j = 0; j < ng * TB; ++j) obias[r * ng * TB + j] *= a;
      }
    }
    for (int i = 0; i < 4; ++i) {
      const int r = r0 + i;
      const f16v p = exp2v(sv[i] - _mm512_permutexvar_ps(_mm512_set1_epi32(4 * i), msafe));
      storev(sc + r * TB, p);
      lv[r] += p;
      if (nq == 0) continue;
      const __m512 pv = as_m512(p);
      for (int g = 0; g < ng; ++g) {
        const __m512 f = _mm512_permutexvar_ps(_mm512_set1_epi32(4 * i), wscale[g]);
        const __m512 w = _mm512_mul_ps(_mm512_mul_ps(pv, _mm512_loadu_ps(vs + g * TB)), f);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wq + (g * RT + r) * (TB / 2)),
                            _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(w)));
        float* ob = obias + (r * ng + g) * TB;
        _mm512_storeu_ps(ob, _mm512_fmadd_ps(pv, _mm512_loadu_ps(vbias + g * TB), _mm512_loadu_ps(ob)));
      }
    }
  }
}

// Weights as int16 pairs of consecutive tokens, scaled per (group, row) to the
// block's largest |weight| (relative error 2^-16 of the block's top weight):
// the row tiles that vnni_softmax_rows4 does not serve (RT % 4 != 0).
inline void vnni_v_weights(const float* wts, int n /* ng * RT */, int32_t* wq, float* winv) {
  for (int i = 0; i < n; ++i) {
    const __m512 w = as_m512(loadv<f16v>(wts + i * TB));
    const float wmax = _mm512_reduce_max_ps(_mm512_abs_ps(w));
    const float f = wmax > 0.f ? 32767.f / wmax : 0.f;
    winv[i] = wmax / 32767.f;
    const __m256i w16 = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(w, _mm512_set1_ps(f))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(wq + i * (TB / 2)), w16);
  }
}

// o += w . (codes - centre) for the block's first nq tokens (vseg rows vrow
// bytes apart), with the int16 weight pairs wq [ng][RT][TB/2] and their
// factors winv [ng][RT]. o is in the order v_slot<.., VNNI = true> gives.
// vcentre: the codes' centre (bit-stream rows expanded to bytes keep their own).
template <int VB, int RT>
TQ_INLINE inline void vnni_v_update(const uint8_t* vblock, int64_t vrow, int nq, int D, int gs, const int32_t* wq,
                                    const float* winv, float* o, int vcentre = 1 << (VB - 1)) {
  constexpr int RS = RT < 4 ? RT : 4;
  constexpr int SE = VB == 4 ? 64 : 32; // elements per 32-byte segment
  constexpr int NV = VB == 4 ? 4 : 2; // int32 vectors per segment
  const bool split = VB == 4 && gs == 32; // lanes 8-15 are the next group
  const __m512i lo4 = _mm512_set1_epi16(15);
  const __m512i centre = _mm512_set1_epi16(int16_t(vcentre));
  for (int sg = 0; sg < D / SE && nq > 0; ++sg) {
    const int g0 = sg * SE / gs, g1 = split ? g0 + 1 : g0;
    const uint8_t* vseg = vblock + 32 * sg;
    for (int r0 = 0; r0 < RT; r0 += RS) {
      __m512i acc[RS][NV];
      for (int r = 0; r < RS; ++r)
        for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_si512();
      for (int t = 0; t < nq; t += 2) {
        const uint8_t* ra = vseg + t * vrow;
        const uint8_t* rb = t + 1 < nq ? ra + vrow : ra; // its weight is 0
        const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra)));
        const __m512i y = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb)));
        const __m512i lo = _mm512_unpacklo_epi16(x, y), hi = _mm512_unpackhi_epi16(x, y);
        __m512i v[NV];
        if constexpr (VB == 4) {
          v[0] = _mm512_sub_epi16(_mm512_and_si512(lo, lo4), centre);
          v[1] = _mm512_sub_epi16(_mm512_srli_epi16(lo, 4), centre);
          v[2] = _mm512_sub_epi16(_mm512_and_si512(hi, lo4), centre);
          v[3] = _mm512_sub_epi16(_mm512_srli_epi16(hi, 4), centre);
        } else {
          v[0] = _mm512_sub_epi16(lo, centre);
          v[1] = _mm512_sub_epi16(hi, centre);
        }
        for (int r = 0; r < RS; ++r) {
          __m512i wv = _mm512_set1_epi32(wq[(g0 * RT + r0 + r) * (TB / 2) + t / 2]);
          if (split) wv = _mm512_mask_set1_epi32(wv, 0xFF00, wq[(g1 * RT + r0 + r) * (TB / 2) + t / 2]);
          for (int i = 0; i < NV; ++i) acc[r][i] = dpwssd(acc[r][i], v[i], wv);
        }
      }
      for (int r = 0; r < RS; ++r) {
        __m512 wi = _mm512_set1_ps(winv[g0 * RT + r0 + r]);
        if (split) wi = _mm512_mask_mov_ps(wi, 0xFF00, _mm512_set1_ps(winv[g1 * RT + r0 + r]));
        float* od = o + (r0 + r) * D + sg * SE;
        for (int i = 0; i < NV; ++i) {
          _mm512_storeu_ps(od + 16 * i,
                           _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][i]), wi, _mm512_loadu_ps(od + 16 * i)));
        }
      }
    }
  }
}
#else
#define TQ_HAVE_VNNI_PATH 0
#endif

} // namespace TQ_CAT(isa_, TQMETAL_ISA)
} // namespace tqmetal::cpu
