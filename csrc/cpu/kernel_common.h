// Shared pieces of the CPU kernels: SIMD vector types, exp2, loads and
// conversions of queries, packed rows, scales and biases. Every kernel file is
// compiled once per instruction set (TQMETAL_ISA = generic / avx2 / avx512 /
// avx512int) from one portable source: GCC/Clang vector extensions lower to
// AVX-512, AVX2, SSE or NEON, so the same code also builds for arm64. All of it
// lives in the namespace isa_<TQMETAL_ISA>, so objects built with different
// flags never share an inline function.
//
// Where the paths are:
//   decode.h        the decode work unit (online softmax over 16-token blocks),
//                   with the float K/V path in decode_float.h,
//                   the AVX512-VNNI integer path in decode_vnni.h,
//                   the AMX-INT8 K scores in decode_amx.h
//   prefill.h       the rows-as-lanes prefill work unit
//   kernel_float.cpp / kernel_int.cpp  the instantiations each object exports
//
// Layout trick (after MLX's qdot): a chunk of 2W elements is unpacked into two
// W-lane vectors without any per-element shift. For 4 bits, the low nibbles of W
// bytes are the chunk's even elements and the high nibbles its odd ones; for 8
// bits the halves are the first and last W bytes. Queries and the V accumulator
// are stored in that permuted order, so a score is
//   scale_g * sum(q_perm * nibbles) + bias_g * sum_g(q)
// and a V update is o_perm += (p * scale_g) * nibbles, with p * bias_g summed
// per group and folded in at the end. Nothing dequantized is ever stored.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/sdpa_int4_problem.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#ifndef TQMETAL_ISA
#define TQMETAL_ISA generic
#endif
#define TQ_CAT2(a, b) a##b
#define TQ_CAT(a, b) TQ_CAT2(a, b)
#define TQ_INLINE __attribute__((always_inline))

namespace tqmetal::cpu {
namespace TQ_CAT(isa_, TQMETAL_ISA) {

constexpr int TB = 16; // tokens per softmax block (one 16-lane vector of scores)
constexpr int64_t kPrefetchAhead = 48; // tokens

template <int W>
struct Vec;
template <>
struct Vec<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
  typedef uint32_t u __attribute__((vector_size(64)));
  typedef uint8_t b __attribute__((vector_size(16)));
};
template <>
struct Vec<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
  typedef uint32_t u __attribute__((vector_size(32)));
  typedef uint8_t b __attribute__((vector_size(8)));
};

using f16v = Vec<16>::f;
using i16v = Vec<16>::i;

template <typename V>
inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V>
inline V splat(float x) {
  return V{} + x;
}
// Pairwise (tree) sums: a serial lane loop would be one long dependency chain.
inline float hsum(Vec<8>::f v) {
  typedef float f4 __attribute__((vector_size(16)));
  f4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  a = a + __builtin_shufflevector(a, a, 2, 3, 0, 1);
  return a[0] + a[1];
}
inline float hsum(Vec<16>::f v) {
  Vec<8>::f h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return hsum(h);
}

// Lane sums of 16 vectors at once, result lane t = sum of v[t]: a transpose-add
// tree costs about 3 operations per vector instead of a full reduction each.
inline Vec<16>::f reduce16(const Vec<16>::f* v) {
  using F = Vec<16>::f;
  F c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i) {
    c[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                   20, 21, 22, 23) +
        __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26,
                                27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
        __builtin_shufflevector(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23,
                                28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    e[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
        __builtin_shufflevector(d[2 * i], d[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23,
                                26, 27, 30, 31);
  }
  return __builtin_shufflevector(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
      __builtin_shufflevector(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                              31);
}
inline Vec<16>::f reduce16(const Vec<8>::f* v) {
  Vec<16>::f r;
  for (int t = 0; t < 16; ++t) r[t] = hsum(v[t]);
  return r;
}

// 2^x for 16 lanes; exact 0 below 2^-126 so masked (-inf) scores vanish.
inline f16v exp2v(f16v x) {
#if defined(__AVX512F__)
  // The same polynomial; the power of two by vscalefps instead of integer
  // exponent arithmetic (about half the instructions).
  __m512 xv;
  std::memcpy(&xv, &x, 64);
  // MAXPS returns its second operand when either is NaN: xv second keeps a NaN
  // score a NaN (a NaN key or query must give NaN, as in MLX), for free.
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-127.f), xv);
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, n); // [-0.5, 0.5]
  __m512 px = _mm512_set1_ps(1.535336188319500e-4f);
  px = _mm512_fmadd_ps(px, f, _mm512_set1_ps(1.339887440266574e-3f));
  px = _mm512_fmadd_ps(px, f, _mm512_set1_ps(9.618437357674640e-3f));
  px = _mm512_fmadd_ps(px, f, _mm512_set1_ps(5.550332471162809e-2f));
  px = _mm512_fmadd_ps(px, f, _mm512_set1_ps(2.402264791363012e-1f));
  px = _mm512_fmadd_ps(px, f, _mm512_set1_ps(6.931472028550421e-1f));
  px = _mm512_fmadd_ps(px, f, _mm512_set1_ps(1.f));
  __m512 r = _mm512_scalef_ps(px, n);
  r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(xv, _mm512_set1_ps(-126.f), _CMP_NLT_UQ), r); // 0 below -126
  f16v out;
  std::memcpy(&out, &r, 64);
  return out;
#else
  f16v xc = x;
  xc = xc < -126.f ? splat<f16v>(-126.f) : xc;
  xc = xc > 127.f ? splat<f16v>(127.f) : xc;
  f16v t = xc + 0.5f;
  i16v ti = __builtin_convertvector(t, i16v);
  f16v tf = __builtin_convertvector(ti, f16v);
  ti -= (tf > t) ? 1 : 0; // floor
  f16v n = __builtin_convertvector(ti, f16v);
  f16v f = xc - n; // [-0.5, 0.5]
  f16v px = splat<f16v>(1.535336188319500e-4f);
  px = px * f + 1.339887440266574e-3f;
  px = px * f + 9.618437357674640e-3f;
  px = px * f + 5.550332471162809e-2f;
  px = px * f + 2.402264791363012e-1f;
  px = px * f + 6.931472028550421e-1f;
  f16v r = px * f + 1.f;
  i16v bits = (ti + 127) << 23;
  f16v pow2;
  std::memcpy(&pow2, &bits, sizeof(bits));
  r = r * pow2;
  return (x < -126.f) ? splat<f16v>(0.f) : r;
#endif
}

// Convert n strided elements to float.
inline void load_row(const void* base, int64_t off, int64_t stride, int n, DType dt, float* out) {
  switch (dt) {
    case DType::f32: {
      auto* p = static_cast<const float*>(base) + off;
      for (int i = 0; i < n; ++i) out[i] = p[i * stride];
      break;
    }
    case DType::f16: {
      auto* p = static_cast<const half_t*>(base) + off;
      for (int i = 0; i < n; ++i) out[i] = float(p[i * stride]);
      break;
    }
    case DType::bf16: {
      auto* p = static_cast<const uint16_t*>(base) + off;
      for (int i = 0; i < n; ++i) {
        uint32_t u = uint32_t(p[i * stride]) << 16;
        std::memcpy(&out[i], &u, 4);
      }
      break;
    }
    case DType::boolean: {
      auto* p = static_cast<const bool*>(base) + off;
      for (int i = 0; i < n; ++i) out[i] = p[i * stride] ? 1.f : 0.f;
      break;
    }
  }
}

// The KB / VB template value of mx.quantize's other widths (2, 3, 5 and 6 bits):
// one little-endian bit stream whose codes may straddle words, the width read at
// run time (QuantView::bits). Only for groups of 32 or more (W = 16), where every
// chunk of 32 codes is `bits` whole words. Natural element order.
constexpr int kBitStream = 0;

// The template value of one width: 4 and 8 bits have their own unpack, the others
// share the bit-stream one.
constexpr int bits_kind(int bits) {
  return bits == 4 || bits == 8 ? bits : kBitStream;
}

// Bytes of one chunk (2W codes) of a packed row.
template <int W, int BITS>
constexpr int chunk_bytes(int bits) {
  return 2 * W * (BITS == kBitStream ? bits : BITS) / 8;
}

// Position of element e of a chunk (2W elements) in the permuted chunk layout.
template <int W, int BITS>
constexpr int perm_pos(int e) {
  if constexpr (BITS == 4) {
    return (e % 2 == 0) ? e / 2 : W + e / 2;
  } else {
    return e;
  }
}

// W bytes widened to W 32-bit lanes. Compilers lower a generic u8 -> u32
// convertvector to a byte-by-byte insert sequence, so use the ISA's widening
// load where there is one.
template <int W>
inline typename Vec<W>::i widen_bytes(const uint8_t* p) {
  using VI = typename Vec<W>::i;
  VI r;
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&r, &x, sizeof(r));
  } else {
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&r, &x, sizeof(r));
  }
#elif defined(__AVX2__)
  for (int h = 0; h < W / 8; ++h) {
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * h)));
    std::memcpy(reinterpret_cast<char*>(&r) + 32 * h, &x, 32);
  }
#elif defined(__ARM_NEON)
  for (int h = 0; h < W / 8; ++h) {
    uint16x8_t w16 = vmovl_u8(vld1_u8(p + 8 * h));
    uint32x4_t lo = vmovl_u16(vget_low_u16(w16));
    uint32x4_t hi = vmovl_u16(vget_high_u16(w16));
    std::memcpy(reinterpret_cast<char*>(&r) + 32 * h, &lo, 16);
    std::memcpy(reinterpret_cast<char*>(&r) + 32 * h + 16, &hi, 16);
  }
#else
  for (int i = 0; i < W; ++i) r[i] = p[i];
#endif
  return r;
}

// Eight codes of `bits` bits each from the low 8 * bits bits of x, as int32 lanes.
inline Vec<8>::i stream_codes8(uint64_t x, int bits) {
  typedef uint64_t u64x8 __attribute__((vector_size(64)));
  const u64x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const u64x8 codes = (u64x8{} + x) >> (lane * uint64_t(bits)) & uint64_t((1u << bits) - 1);
  return __builtin_convertvector(codes, Vec<8>::i);
}

// One chunk of 32 codes of a bit-stream width B (4*B bytes) as float halves:
// each 8-code piece (B bytes at byte i*B) is one 8-byte load, taken so that it
// never leaves the chunk (the last pieces load the chunk's last 8 bytes and
// shift), with B a compile-time constant so the loads and shifts are plain.
template <int B>
inline void unpack_stream32(const uint8_t* p, Vec<16>::f& a, Vec<16>::f& b) {
  static_assert(B >= 2 && B <= 6, "bit-stream widths are 2, 3, 5, 6");
  Vec<8>::i c[4];
  for (int i = 0; i < 4; ++i) {
    const int off = i * B;
    uint64_t x;
    if (off + 8 <= 4 * B) {
      std::memcpy(&x, p + off, 8);
    } else {
      std::memcpy(&x, p + 4 * B - 8, 8);
      x >>= 8 * (off - (4 * B - 8));
    }
    c[i] = stream_codes8(x, B);
  }
  const Vec<16>::i lo = __builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec<16>::i hi = __builtin_shufflevector(c[2], c[3], 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  a = __builtin_convertvector(lo, Vec<16>::f);
  b = __builtin_convertvector(hi, Vec<16>::f);
}

// Unpack one chunk (2W elements) of a packed row into float halves a, b.
// `bits` is read only for BITS == kBitStream.
template <int W, int BITS>
inline void unpack_chunk(const uint8_t* bytes, typename Vec<W>::f& a, typename Vec<W>::f& b, int bits = BITS) {
  using VF = typename Vec<W>::f;
  if constexpr (BITS == kBitStream) {
    static_assert(W == 16, "bit-stream widths need chunks of 32 codes (groups of 32 or more)");
    switch (bits) { // one predictable branch per chunk; each width's unpack is compile-time
      case 2:
        unpack_stream32<2>(bytes, a, b);
        break;
      case 3:
        unpack_stream32<3>(bytes, a, b);
        break;
      case 5:
        unpack_stream32<5>(bytes, a, b);
        break;
      default:
        unpack_stream32<6>(bytes, a, b);
        break;
    }
  } else if constexpr (BITS == 4) {
    const auto w = widen_bytes<W>(bytes);
    a = __builtin_convertvector(w & 15, VF);
    b = __builtin_convertvector(w >> 4, VF);
  } else {
    a = __builtin_convertvector(widen_bytes<W>(bytes), VF);
    b = __builtin_convertvector(widen_bytes<W>(bytes + W), VF);
  }
}

// Scales/biases of nt tokens for one KV head, converted once per block into
// [group][TB] order so per-group work vectorizes over tokens.
template <typename T>
inline void load_params_t(const T* p, int64_t st_n, int64_t st_g, int nt, int ng, float* out) {
  for (int t = 0; t < nt; ++t) {
    for (int g = 0; g < ng; ++g) {
      if constexpr (std::is_same_v<T, uint16_t>) { // bfloat16
        uint32_t u = uint32_t(p[t * st_n + g * st_g]) << 16;
        std::memcpy(&out[g * TB + t], &u, 4);
      } else {
        out[g * TB + t] = float(p[t * st_n + g * st_g]);
      }
    }
  }
  for (int g = 0; g < ng; ++g) {
    for (int t = nt; t < TB; ++t) out[g * TB + t] = 0.f;
  }
}

// 16 consecutive values as floats, with one vector conversion.
template <typename T>
inline f16v load16_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return loadv<f16v>(p);
  } else if constexpr (std::is_same_v<T, uint16_t>) { // bfloat16: the high half of a float
    typedef uint16_t u16x16 __attribute__((vector_size(32)));
    u16x16 h;
    std::memcpy(&h, p, sizeof(h));
    i16v bits = __builtin_convertvector(h, i16v) << 16;
    f16v r;
    std::memcpy(&r, &bits, sizeof(r));
    return r;
  } else { // IEEE half: GCC lowers a generic half-vector conversion element by element
    f16v r;
#if defined(__AVX512F__)
    const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    std::memcpy(&r, &x, 64);
#elif defined(__F16C__)
    const __m256 x0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    std::memcpy(&r, &x0, 32);
    std::memcpy(reinterpret_cast<char*>(&r) + 32, &x1, 32);
#else
    for (int i = 0; i < 16; ++i) r[i] = float(p[i]);
#endif
    return r;
  }
}

// The usual layout (a full block of TB tokens whose [token][group] values are
// contiguous): convert with vector loads, then de-interleave the groups with
// shuffles. Per-element scalar conversion was ~15% of decode time.
template <typename T>
TQ_INLINE inline bool load_params_block(const T* p, int ng, float* out) {
  static_assert(TB == 16, "the shuffles below assume 16-token blocks");
  using F = f16v;
  if (ng == 1) {
    storev(out, load16_as_float(p));
    return true;
  }
  if (ng == 2) {
    const F v0 = load16_as_float(p), v1 = load16_as_float(p + 16);
    storev(out, __builtin_shufflevector(v0, v1, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
    storev(out + TB, __builtin_shufflevector(v0, v1, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
    return true;
  }
  if (ng == 4) {
    const F v0 = load16_as_float(p), v1 = load16_as_float(p + 16);
    const F v2 = load16_as_float(p + 32), v3 = load16_as_float(p + 48);
    // a, c: groups 0 and 2 interleaved (tokens 0-7, 8-15); b, d: groups 1 and 3.
    const F a = __builtin_shufflevector(v0, v1, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const F b = __builtin_shufflevector(v0, v1, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const F c = __builtin_shufflevector(v2, v3, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const F d = __builtin_shufflevector(v2, v3, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    storev(out, __builtin_shufflevector(a, c, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
    storev(out + 2 * TB, __builtin_shufflevector(a, c, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
    storev(out + TB, __builtin_shufflevector(b, d, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
    storev(out + 3 * TB, __builtin_shufflevector(b, d, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
    return true;
  }
  if (ng <= 16) {
    float tmp[TB * 16];
    for (int i = 0; i < ng; ++i) storev(tmp + 16 * i, load16_as_float(p + 16 * i));
    for (int g = 0; g < ng; ++g)
      for (int t = 0; t < TB; ++t) out[g * TB + t] = tmp[t * ng + g];
    return true;
  }
  return false;
}

template <typename T>
TQ_INLINE inline void load_params(const T* p, int64_t st_n, int64_t st_g, int nt, int ng, float* out) {
  if (nt == TB && st_g == 1 && st_n == ng && load_params_block(p, ng, out)) return;
  load_params_t(p, st_n, st_g, nt, ng, out);
}

// Whether the first ng [TB] rows of a and b are all finite (x * 0 is NaN exactly
// for inf and NaN). Once per block of 16 tokens: a few vector operations.
inline bool params_finite(const float* a, const float* b, int ng) {
  f16v z{};
  for (int g = 0; g < ng; ++g) z += loadv<f16v>(a + g * TB) * 0.f + loadv<f16v>(b + g * TB) * 0.f;
  const float h = hsum(z);
  return h == h;
}

TQ_INLINE inline void load_group_params(
    const View4& s,
    int b,
    int h,
    int64_t n0,
    int nt,
    int ng,
    float* out /* [ng][TB] */) {
  const int64_t off = b * s.st[0] + h * s.st[1] + n0 * s.st[2];
  switch (s.dt) {
    case DType::f16:
      load_params(static_cast<const half_t*>(s.ptr) + off, s.st[2], s.st[3], nt, ng, out);
      break;
    case DType::bf16:
      load_params(static_cast<const uint16_t*>(s.ptr) + off, s.st[2], s.st[3], nt, ng, out);
      break;
    default:
      load_params(static_cast<const float*>(s.ptr) + off, s.st[2], s.st[3], nt, ng, out);
      break;
  }
}


// Where element e of a row sits in the unit's V accumulator (and in the permuted
// query for K). The float path uses the chunk permutation; the VNNI V path the
// order its token-pair unpack produces: for a 32-byte segment s of packed bytes,
// int32 lane 4k+j of the low/high unpack holds byte 32s+8k+j / 32s+8k+4+j, and
// with 4 bits each byte gives a low-nibble and a high-nibble vector.
template <int W, int BITS, bool VNNI>
inline int v_slot(int e) {
  if constexpr (!VNNI) {
    constexpr int CH = 2 * W;
    return e / CH * CH + perm_pos<W, BITS>(e % CH);
  } else if constexpr (BITS == 4) {
    const int s = e / 64, b = (e % 64) / 2, hi = e % 2; // segment, byte in segment, nibble
    const int k = b / 8, j = b % 8 % 4, h = b % 8 / 4; // 128-bit lane, lane slot, unpack half
    return s * 64 + (2 * h + hi) * 16 + 4 * k + j;
  } else {
    const int s = e / 32, b = e % 32;
    const int k = b / 8, j = b % 8 % 4, h = b % 8 / 4;
    return s * 32 + h * 16 + 4 * k + j;
  }
}

} // namespace TQ_CAT(isa_, TQMETAL_ISA)
} // namespace tqmetal::cpu
