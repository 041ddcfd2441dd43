// Fused attention over an affine-quantized KV cache, one work unit at a time.
//
// Compiled once per instruction set (TQMETAL_ISA = generic / avx2 / avx512) from
// this one portable source: GCC/Clang vector extensions lower to AVX-512, AVX2,
// SSE or NEON, so the same code also builds for arm64.
//
// Layout trick (after MLX's qdot): a chunk of 2W elements is unpacked into two
// W-lane vectors without any per-element shift. For 4 bits, the low nibbles of W
// bytes are the chunk's even elements and the high nibbles its odd ones; for 8
// bits the halves are the first and last W bytes. Queries and the V accumulator
// are stored in that permuted order, so a score is
//   scale_g * sum(q_perm * nibbles) + bias_g * sum_g(q)
// and a V update is o_perm += (p * scale_g) * nibbles, with p * bias_g summed
// per group and folded in at the end. Nothing dequantized is ever stored.
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
  const __m512 xc = _mm512_max_ps(xv, _mm512_set1_ps(-127.f));
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

// Unpack one chunk (2W elements) of a packed row into float halves a, b.
template <int W, int BITS>
inline void unpack_chunk(const uint8_t* bytes, typename Vec<W>::f& a, typename Vec<W>::f& b) {
  using VF = typename Vec<W>::f;
  if constexpr (BITS == 4) {
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

#if defined(__AVX512BW__) && defined(TQMETAL_KERNEL_INT)
// Integer dot products (AVX512-VNNI) for decode, selected at run time only on
// CPUs that have them (built only into the avx512int object). vpdpwssd sums two
// int16 x int16 products per int32 lane: one instruction does the work of two
// float FMAs and needs no int->float conversion of the nibbles. It is written
// as inline asm so that this file keeps one set of compile flags (a VNNI target
// attribute would not let the shared helpers inline).
#define TQ_HAVE_VNNI_PATH 1
constexpr int kVnniMaxD = 512;
inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
  return acc;
}
inline __m512 as_m512(f16v v) {
  __m512 r;
  std::memcpy(&r, &v, 64);
  return r;
}
#else
#define TQ_HAVE_VNNI_PATH 0
constexpr int kVnniMaxD = 512;
#endif

#if TQ_HAVE_VNNI_PATH && defined(__AMX_TILE__) && defined(__AMX_INT8__)
// AMX-INT8 for decode's K scores (head dim 128, 4 bits). One tile product
// C[16 tokens][16 columns] += K[16 tokens][64 bytes] . Q[64 bytes][16 columns]
// does the work of 256 vpdpwssd, and the scores come out with tokens in one
// dimension, so there is no per-token horizontal sum. K is used as stored:
// tile X holds each token's low nibbles (even dims), tile Y its high nibbles
// (odd dims). A column is (row, group, half) of the query: the int16 query is
// split into signed bytes, q = 256 hi + lo, and a column is zero outside its
// group, so per-group sums come out separately for the per-token scales.
#define TQ_HAVE_AMX_PATH 1
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
// tmm0 X, tmm1 Y (K nibbles); tmm2/tmm3 the query for columns 0-15 (X, Y),
// tmm4 their scores; tmm5/6/7 the same for columns 16-31.
constexpr int kAmxMaxCols = 32;
struct AmxBuffers {
  alignas(64) uint8_t x[16][64];
  alignas(64) uint8_t y[16][64];
  alignas(64) int8_t bx[2][16][64];
  alignas(64) int8_t by[2][16][64];
  alignas(64) int32_t c[2][16][16];
};
// In-register 16 x 16 transpose of 32-bit lanes (the same tree as the
// 4-row softmax maxima, one level further).
inline void transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i u[16];
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4i + j], 128-bit lane k: column 4k + j of rows 4i..4i+3.
  for (int j = 0; j < 4; ++j) {
    const __m512i s0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}
#else
#define TQ_HAVE_AMX_PATH 0
#endif

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

template <int W, int KB, int VB, int RT, bool VNNI = false, int DC = 0, bool AMX = false>
void process_unit(const Problem& P, const Plan& plan, const Unit& u, float* partials) {
  using VF = typename Vec<W>::f;
  constexpr int CH = 2 * W; // elements per chunk
  const int D = DC ? DC : P.D; // DC: head dim fixed at compile time (0 = any)
  const int G = P.group();
  const int gs = P.group_size;
  const int ng = D / gs;
  const int nch = D / CH;
  const int cpg = gs / CH; // chunks per group
  const int64_t N = P.N;
  const int64_t Ntot = P.n_total();
  const int R = u.nrows;
  const float log2e = 1.4426950408889634f;
  const float qscale = P.scale * log2e; // scores live in the log2 domain

  const size_t accn = size_t(RT) * TB; // score accumulators, [RT][TB] vectors
  const size_t need = size_t(RT) * D * 3 + size_t(RT) * ng * (1 + TB) + size_t(TB) * ng * 4 +
      size_t(RT) * TB + 2 * D + size_t(TB) * ng * RT + accn * W + D +
      size_t(ng) * RT * (TB / 2 + 1) + size_t(TB) * ng * 2 + accn * W + size_t(RT) * TB + 128;
  float* qk = thread_scratch(need); // [RT][D] permuted for KB
  float* qn = qk + RT * D; // [RT][D] natural order (tail keys)
  float* o = qn + RT * D; // [RT][D] permuted for VB
  float* qsum = o + RT * D; // [RT][ng]
  float* obias = qsum + RT * ng; // [RT][ng][TB]: per-lane sums of p * bias_g
  float* ks = obias + RT * ng * TB; // [TB][ng]
  float* kbias = ks + TB * ng;
  float* vs = kbias + TB * ng;
  float* vbias = vs + TB * ng;
  float* sc = vbias + TB * ng; // [RT][TB] scores then weights
  float* rowbuf = sc + RT * TB; // [D]
  float* rowperm = rowbuf + D; // [D]
  float* wts = rowperm + D; // [ng][RT][TB]
  VF* accs = reinterpret_cast<VF*>(
      (reinterpret_cast<uintptr_t>(wts + TB * ng * RT) + 63) & ~uintptr_t(63));
  int* vpos = reinterpret_cast<int*>(accs + accn); // [D]: element -> slot in o
  int32_t* wq = reinterpret_cast<int32_t*>(vpos + D); // VNNI: [ng][RT][TB/2] int16 weight pairs
  float* winv = reinterpret_cast<float*>(wq + ng * RT * (TB / 2)); // VNNI: [ng][RT]
  // Second score buffers for the pipelined block loop (see below).
  VF* accs2 = reinterpret_cast<VF*>(
      (reinterpret_cast<uintptr_t>(winv + ng * RT) + 63) & ~uintptr_t(63));
  float* sc2 = reinterpret_cast<float*>(accs2 + accn); // [RT][TB]
  float* ks2 = sc2 + RT * TB; // [TB][ng]
  float* kbias2 = ks2 + TB * ng;
  for (int e = 0; e < D; ++e) vpos[e] = v_slot<W, VB, VNNI>(e);
  // VNNI: queries as int16 in the K unpack's word order (in qk's space), with
  // per-row factors back to float. 15 bits keep float32-level accuracy.
  int16_t* kq16 = reinterpret_cast<int16_t*>(qk);
  float qinv[RT], qf[RT];
  // AMX splits the int16 query into two signed bytes, q = 256 hi + lo: |q| <= 127 * 256.
  constexpr float kQ16Max = AMX ? 32512.f : 32767.f;

  float m[RT];
#if TQ_HAVE_VNNI_PATH
  __m512 m4[RT / 4 > 0 ? RT / 4 : 1]; // running maxima of 4 rows, a row per 128-bit quarter
  for (auto& x : m4) x = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
#endif
  f16v lv[RT]; // per-lane sums of p; reduced once at the end
  int64_t lim[RT]; // causal: last visible key index per row
  int qpos[RT], qhead[RT];
  for (int r = 0; r < RT; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    lv[r] = f16v{};
    const int row = u.row0 + std::min(r, R - 1);
    qpos[r] = row / G;
    qhead[r] = u.hkv * G + row % G;
    lim[r] = int64_t(qpos[r]) + Ntot - P.L;
  }

  // Queries: scaled, in natural order (tail keys) and in the K loop's form with
  // per-group sums: float in the chunk permutation, or int16 for VNNI.
  for (int r = 0; r < RT; ++r) {
    float* dst = qn + r * D;
    if (r < R) {
      int64_t off = u.b * P.q.st[0] + int64_t(qhead[r]) * P.q.st[1] + int64_t(qpos[r]) * P.q.st[2];
      load_row(P.q.ptr, off, P.q.st[3], D, P.q.dt, dst);
      for (int d = 0; d < D; ++d) dst[d] *= qscale;
    } else {
      std::fill(dst, dst + D, 0.f);
    }
    if constexpr (VNNI) {
      float qmax = 0.f;
      for (int d = 0; d < D; ++d) qmax = std::max(qmax, std::fabs(dst[d]));
      const float f = qmax > 0.f ? kQ16Max / qmax : 0.f;
      qf[r] = f;
      qinv[r] = qmax > 0.f ? qmax / kQ16Max : 0.f;
      for (int g = 0; g < ng; ++g) qsum[r * ng + g] = 0.f;
      for (int i = 0; i < D; ++i) {
        // 4 bits: segment of 64 elements = 32 low-nibble words, then 32 high.
        const int e = KB == 4 ? i / 64 * 64 + (i % 64 < 32 ? 2 * (i % 64) : 2 * (i % 64 - 32) + 1) : i;
        kq16[r * D + i] = int16_t(std::lrint(dst[e] * f));
        // The bias term uses the rounded query too: the score is then exactly
        // q16 . k, whose rounding error multiplies the (centred) key rather than
        // the all-positive nibbles.
        qsum[r * ng + e / gs] += float(kq16[r * D + i]) * qinv[r];
      }
    } else {
      for (int c = 0; c < nch; ++c) {
        for (int e = 0; e < CH; ++e) {
          qk[r * D + c * CH + perm_pos<W, KB>(e)] = dst[c * CH + e];
        }
      }
      for (int g = 0; g < ng; ++g) {
        float s = 0.f;
        for (int e = 0; e < gs; ++e) s += dst[g * gs + e];
        qsum[r * ng + g] = s;
      }
    }
  }
  std::fill(o, o + RT * D, 0.f);
  std::fill(obias, obias + RT * ng * TB, 0.f);

#if TQ_HAVE_AMX_PATH
  // The query tiles, built once per unit and kept in tile registers.
  std::conditional_t<AMX, AmxBuffers, char> amx;
  const int amx_cols = RT * ng * 2, amx_tiles = (amx_cols + 15) / 16;
  if constexpr (AMX) {
    for (int ct = 0; ct < amx_tiles; ++ct) {
      for (int k4 = 0; k4 < 16; ++k4) {
        for (int n = 0; n < 16; ++n) {
          const int col = 16 * ct + n;
          const int r = col / (2 * ng), g = col / 2 % ng, half = col % 2;
          for (int j = 0; j < 4; ++j) {
            const int k = 4 * k4 + j; // byte k: dim 2k (X), dim 2k + 1 (Y)
            int8_t xv = 0, yv = 0;
            if (col < amx_cols) {
              for (int odd = 0; odd < 2; ++odd) {
                const int d = 2 * k + odd;
                int8_t v = 0;
                if (d / gs == g) {
                  const int q = int(std::lrint(qn[r * D + d] * qf[r]));
                  const int hi = (q + 128) >> 8;
                  v = int8_t(half == 0 ? hi : q - 256 * hi);
                }
                (odd ? yv : xv) = v;
              }
            }
            amx.bx[ct][k4][4 * n + j] = xv;
            amx.by[ct][k4][4 * n + j] = yv;
          }
        }
      }
    }
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) {
      cfg.rows[i] = 16;
      cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
    _tile_loadd(2, amx.bx[0], 64);
    _tile_loadd(3, amx.by[0], 64);
    if (amx_tiles > 1) {
      _tile_loadd(5, amx.bx[1], 64);
      _tile_loadd(6, amx.by[1], 64);
    }
  }
#endif

  int64_t n_end = u.n1;
  if (P.mask_kind == MaskKind::causal) {
    int64_t maxlim = lim[0];
    for (int r = 1; r < RT; ++r) maxlim = std::max(maxlim, lim[r]);
    n_end = std::min(n_end, maxlim + 1);
  }

  const uint8_t* kbase = reinterpret_cast<const uint8_t*>(
      P.k.packed + u.b * P.k.p_st[0] + u.hkv * P.k.p_st[1]);
  const uint8_t* vbase = reinterpret_cast<const uint8_t*>(
      P.v.packed + u.b * P.v.p_st[0] + u.hkv * P.v.p_st[1]);
  const int64_t krow = P.k.p_st[2] * 4; // bytes between tokens
  const int64_t vrow = P.v.p_st[2] * 4;

  // VNNI K: the group of each 32-byte segment's first lane, as a table (an
  // integer division per token and segment showed up in profiles). D <= 512.
  int kseg_g0[kVnniMaxD / 32];
  for (int sg = 0; sg < kVnniMaxD / 32; ++sg) kseg_g0[sg] = sg * (KB == 4 ? 64 : 32) / gs;

  // The block loop is software-pipelined: block j+1's scores are computed
  // between block j's softmax and its V update. The softmax is a short serial
  // chain (horizontal max, exp2, weight scaling) that the V update depends on;
  // the next block's independent K work sits between them in the instruction
  // window. (Measured on the 2-core Sapphire Rapids machine: within noise; the
  // three stages are kept apart because they read more clearly so.)
  // AMX finishes a token's K work sooner: a shorter distance measured faster
  // there (64K cold: 24 tokens ~8% faster than 48), and made no difference to
  // the VNNI path.
  constexpr int64_t pf_ahead = AMX ? 24 : kPrefetchAhead;
  auto score_block = [&](int64_t t0, float* sc, float* ks, float* kbias, VF* accs) TQ_INLINE {
    const int nt = int(std::min<int64_t>(TB, n_end - t0));
    const int nq = int(std::max<int64_t>(0, std::min<int64_t>(nt, N - t0))); // quantized tokens

    // ---- scores s[r][t] = q . k_t (log2 domain) ----
    if (nq > 0) {
      load_group_params(P.k.scales, u.b, u.hkv, t0, nq, ng, ks);
      load_group_params(P.k.biases, u.b, u.hkv, t0, nq, ng, kbias);
    }
    for (int t = 0; t < nq; ++t) {
      const uint8_t* kr = kbase + (t0 + t) * krow;
      // Decode is a stream over two arrays; request rows a few blocks ahead,
      // one token's K and V lines per token so the fill buffers never flood.
      if (t0 + t + pf_ahead < N) {
        const int64_t ahead = (t0 + t + pf_ahead);
        for (int64_t off = 0; off < krow; off += 64) __builtin_prefetch(kbase + ahead * krow + off, 0, 3);
        for (int64_t off = 0; off < vrow; off += 64) __builtin_prefetch(vbase + ahead * vrow + off, 0, 3);
      }
      if constexpr (AMX) {
#if TQ_HAVE_AMX_PATH
        const __m512i x = _mm512_loadu_si512(kr);
        const __m512i lo4 = _mm512_set1_epi8(15);
        _mm512_store_si512(amx.x[t], _mm512_and_si512(x, lo4));
        _mm512_store_si512(amx.y[t], _mm512_and_si512(_mm512_srli_epi16(x, 4), lo4));
#endif
      } else if constexpr (VNNI) {
#if TQ_HAVE_VNNI_PATH
        constexpr int SE = KB == 4 ? 64 : 32; // elements per segment
        // Per 32-byte segment: int16 nibbles (or bytes) . int16 query, lanes
        // summed in int32, then scaled by the lane's group scale in float.
        const bool split = KB == 4 && gs == 32; // lanes 8-15 are the next group
        __m512 facc[RT];
        for (int r = 0; r < RT; ++r) facc[r] = _mm512_setzero_ps();
        for (int sg = 0; sg < D / SE; ++sg) {
          const int g0 = kseg_g0[sg];
          const __m512i w = _mm512_cvtepu8_epi16(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kr + 32 * sg)));
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
#endif
      } else {
        VF acc[RT];
        for (int r = 0; r < RT; ++r) acc[r] = VF{};
        for (int g = 0; g < ng; ++g) {
          const float gsc = ks[g * TB + t];
          for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
            VF a, bb;
            unpack_chunk<W, KB>(kr + c * CH * KB / 8, a, bb);
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
    }
#if TQ_HAVE_AMX_PATH
    if constexpr (AMX) {
      if (nq > 0) {
        for (int t = nq; t < TB; ++t) { // zero keys: scores 0, masked below
          _mm512_store_si512(amx.x[t], _mm512_setzero_si512());
          _mm512_store_si512(amx.y[t], _mm512_setzero_si512());
        }
        _tile_loadd(0, amx.x, 64);
        _tile_loadd(1, amx.y, 64);
        _tile_zero(4);
        _tile_dpbusd(4, 0, 2);
        _tile_dpbusd(4, 1, 3);
        _tile_stored(4, amx.c[0], 64);
        if (amx_tiles > 1) {
          _tile_zero(7);
          _tile_dpbusd(7, 0, 5);
          _tile_dpbusd(7, 1, 6);
          _tile_stored(7, amx.c[1], 64);
        }
        __m512i col[kAmxMaxCols];
        for (int ct = 0; ct < amx_tiles; ++ct) {
          for (int t = 0; t < 16; ++t) col[16 * ct + t] = _mm512_load_si512(amx.c[ct][t]);
          transpose16x16(col + 16 * ct);
        }
        // Column (r, g, half) now holds 16 tokens: s = sum_g scale_g (256 hi + lo).
        for (int r = 0; r < RT; ++r) {
          __m512 acc = _mm512_setzero_ps();
          for (int g = 0; g < ng; ++g) {
            const int n = (r * ng + g) * 2;
            const __m512i q = _mm512_add_epi32(_mm512_slli_epi32(col[n], 8), col[n + 1]);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_loadu_ps(ks + g * TB), acc);
          }
          f16v sv;
          std::memcpy(&sv, &acc, 64);
          sv *= qinv[r];
          for (int g = 0; g < ng; ++g) sv += qsum[r * ng + g] * loadv<f16v>(kbias + g * TB);
          storev(sc + r * TB, sv);
        }
      }
    } else
#endif
    if (nq > 0) {
      for (int t = nq; t < TB; ++t) {
        for (int r = 0; r < RT; ++r) accs[r * TB + t] = VF{};
      }
      // bias_g * sum_g(q), for all tokens of the block at once.
      for (int r = 0; r < RT; ++r) {
        f16v sv = reduce16(accs + r * TB);
        if constexpr (VNNI) sv *= qinv[r];
        for (int g = 0; g < ng; ++g) sv += qsum[r * ng + g] * loadv<f16v>(kbias + g * TB);
        storev(sc + r * TB, sv);
      }
    }
    for (int t = nq; t < nt; ++t) { // unquantized tail keys
      const int64_t j = t0 + t - N;
      int64_t off = u.b * P.k_tail.st[0] + u.hkv * P.k_tail.st[1] + j * P.k_tail.st[2];
      load_row(P.k_tail.ptr, off, P.k_tail.st[3], D, P.k_tail.dt, rowbuf);
      for (int r = 0; r < RT; ++r) {
        float s = 0.f;
        const float* qr = qn + r * D;
        for (int d = 0; d < D; ++d) s += qr[d] * rowbuf[d];
        sc[r * TB + t] = s;
      }
    }

    // ---- masks ----
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < RT; ++r) {
      float* s = sc + r * TB;
      for (int t = nt; t < TB; ++t) s[t] = ninf;
      if (r >= R) continue;
      switch (P.mask_kind) {
        case MaskKind::none:
          break;
        case MaskKind::causal:
          for (int t = 0; t < nt; ++t) {
            if (t0 + t > lim[r]) s[t] = ninf;
          }
          break;
        case MaskKind::boolean:
        case MaskKind::additive: {
          const View4& mk = P.mask;
          int64_t off = u.b * mk.st[0] + int64_t(qhead[r]) * mk.st[1] + int64_t(qpos[r]) * mk.st[2] +
              t0 * mk.st[3];
          load_row(mk.ptr, off, mk.st[3], nt, mk.dt, rowbuf);
          if (P.mask_kind == MaskKind::boolean) {
            for (int t = 0; t < nt; ++t) {
              if (rowbuf[t] == 0.f) s[t] = ninf;
            }
          } else {
            for (int t = 0; t < nt; ++t) s[t] += rowbuf[t] * log2e;
          }
          break;
        }
      }
    }
  };
#if TQ_HAVE_VNNI_PATH
  // VNNI, four rows at a time: the block maxima of 4 rows come out of one
  // transpose-max tree (a row per 128-bit quarter), and the running maxima stay
  // in that layout (m4), instead of a scalar chain per row (horizontal max,
  // compare, branch). The int16 V weights are
  // scaled by a power of two from a bound, max_t(p) * max_t|scale|, instead of
  // a horizontal max per (group, row): max_t(p) = exp2(block max - running max)
  // comes from the same tree.
  auto softmax_rows4 = [&](int64_t t0, float* sc, int nq) TQ_INLINE {
    const __m512 vninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    float vsmax[kVnniMaxD / 32];
    if (nq > 0) {
      load_group_params(P.v.scales, u.b, u.hkv, t0, nq, ng, vs);
      load_group_params(P.v.biases, u.b, u.hkv, t0, nq, ng, vbias);
      for (int g = 0; g < ng; ++g) {
        const __m512 vsg = _mm512_loadu_ps(vs + g * TB);
        vsmax[g] = _mm512_reduce_max_ps(_mm512_abs_ps(vsg));
        // Centred codes (n - 8, or n - 128): the centre moves into the bias term.
        _mm512_storeu_ps(vbias + g * TB, _mm512_fmadd_ps(_mm512_set1_ps(float(1 << (VB - 1))), vsg,
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
      // Rows with nothing visible yet subtract 0: their p is exp2(-inf) = 0.
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
  };
#endif
  auto softmax_block = [&](int64_t t0, float* sc) TQ_INLINE {
    const int nt = int(std::min<int64_t>(TB, n_end - t0));
    const int nq = int(std::max<int64_t>(0, std::min<int64_t>(nt, N - t0))); // quantized tokens
    // ---- online softmax over the block ----
    const float ninf = -std::numeric_limits<float>::infinity();
#if TQ_HAVE_VNNI_PATH
    if constexpr (VNNI && RT % 4 == 0) {
      softmax_rows4(t0, sc, nq);
      return;
    }
#endif
    for (int r = 0; r < RT; ++r) {
      f16v s = loadv<f16v>(sc + r * TB);
      Vec<8>::f h8 = __builtin_shufflevector(s, s, 0, 1, 2, 3, 4, 5, 6, 7);
      h8 = h8 > __builtin_shufflevector(s, s, 8, 9, 10, 11, 12, 13, 14, 15)
          ? h8 : __builtin_shufflevector(s, s, 8, 9, 10, 11, 12, 13, 14, 15);
      float bm = h8[0];
      for (int t = 1; t < 8; ++t) bm = std::max(bm, h8[t]);
      const float mnew = std::max(m[r], bm);
      if (mnew == ninf) { // nothing visible yet
        storev(sc + r * TB, f16v{});
        continue;
      }
      f16v p = exp2v(s - mnew);
      storev(sc + r * TB, p);
      if (mnew != m[r]) { // the running max moved: rescale what was summed so far
        const float alpha = std::exp2(m[r] - mnew);
        lv[r] *= alpha;
        float* orow = o + r * D;
        for (int d = 0; d < D; ++d) orow[d] *= alpha;
        for (int i = 0; i < ng * TB; ++i) obias[r * ng * TB + i] *= alpha;
      }
      lv[r] += p;
      m[r] = mnew;
    }

    // ---- o += p @ v ----
    if (nq > 0) {
      load_group_params(P.v.scales, u.b, u.hkv, t0, nq, ng, vs);
      load_group_params(P.v.biases, u.b, u.hkv, t0, nq, ng, vbias);
    }
    // Weights p * scale per (group, row, token); p * bias summed per group.
    // Lanes past nq hold zero scales and biases, so they add nothing.
    if (nq > 0) {
      for (int r = 0; r < RT; ++r) {
        const f16v pr = loadv<f16v>(sc + r * TB);
        for (int g = 0; g < ng; ++g) {
          storev(wts + (g * RT + r) * TB, pr * loadv<f16v>(vs + g * TB));
          float* ob = obias + (r * ng + g) * TB;
          // VNNI multiplies the weights by centred codes (n - 8, or n - 128 for
          // 8 bits) so their rounding error does not add up coherently over the
          // all-positive nibbles; the centre moves into the bias term.
          const f16v vb = VNNI ? loadv<f16v>(vbias + g * TB) + float(1 << (VB - 1)) * loadv<f16v>(vs + g * TB)
                               : loadv<f16v>(vbias + g * TB);
          storev(ob, loadv<f16v>(ob) + pr * vb);
        }
      }
    }
  };
  auto v_block = [&](int64_t t0, float* sc) TQ_INLINE {
    const int nt = int(std::min<int64_t>(TB, n_end - t0));
    const int nq = int(std::max<int64_t>(0, std::min<int64_t>(nt, N - t0))); // quantized tokens
    constexpr int RS = RT < 4 ? RT : 4;
    if constexpr (VNNI) {
#if TQ_HAVE_VNNI_PATH
      // Weights as int16 pairs of consecutive tokens, scaled per (group, row) to
      // the block's largest |weight| (relative error 2^-16 of the block's top
      // weight), so one vpdpwssd adds two tokens' contributions per lane.
      if (nq > 0 && RT % 4 != 0) { // (softmax_rows4 made them already)
        for (int i = 0; i < ng * RT; ++i) {
          const __m512 w = as_m512(loadv<f16v>(wts + i * TB));
          const float wmax = _mm512_reduce_max_ps(_mm512_abs_ps(w));
          const float f = wmax > 0.f ? 32767.f / wmax : 0.f;
          winv[i] = wmax / 32767.f;
          const __m256i w16 = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(w, _mm512_set1_ps(f))));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(wq + i * (TB / 2)), w16);
        }
      }
      constexpr int SE = VB == 4 ? 64 : 32; // elements per 32-byte segment
      constexpr int NV = VB == 4 ? 4 : 2; // int32 vectors per segment
      const bool split = VB == 4 && gs == 32; // lanes 8-15 are the next group
      const __m512i lo4 = _mm512_set1_epi16(15);
      const __m512i centre = _mm512_set1_epi16(1 << (VB - 1));
      for (int sg = 0; sg < D / SE && nq > 0; ++sg) {
        const int g0 = sg * SE / gs, g1 = split ? g0 + 1 : g0;
        const uint8_t* vseg = vbase + t0 * vrow + 32 * sg;
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
#endif
    }
    // Chunk-outer, token-inner: a row sub-tile's accumulators stay in registers.
    for (int c = 0; c < nch && nq > 0 && !VNNI; ++c) {
      const int g = c / cpg;
      const uint8_t* vc = vbase + t0 * vrow + c * CH * VB / 8;
      for (int r0 = 0; r0 < RT; r0 += RS) {
        VF oa[RS], ob[RS];
        for (int r = 0; r < RS; ++r) {
          oa[r] = loadv<VF>(o + (r0 + r) * D + c * CH);
          ob[r] = loadv<VF>(o + (r0 + r) * D + c * CH + W);
        }
        for (int t = 0; t < nq; ++t) {
          VF a, bb;
          unpack_chunk<W, VB>(vc + t * vrow, a, bb);
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
    for (int t = nq; t < nt; ++t) {
      const int64_t j = t0 + t - N;
      int64_t off = u.b * P.v_tail.st[0] + u.hkv * P.v_tail.st[1] + j * P.v_tail.st[2];
      load_row(P.v_tail.ptr, off, P.v_tail.st[3], D, P.v_tail.dt, rowbuf);
      for (int e = 0; e < D; ++e) rowperm[vpos[e]] = rowbuf[e];
      for (int r = 0; r < RT; ++r) {
        const float pr = sc[r * TB + t];
        float* orow = o + r * D;
        for (int d = 0; d < D; ++d) orow[d] += pr * rowperm[d];
      }
    }
  };
  float* sc_buf[2] = {sc, sc2};
  float* ks_buf[2] = {ks, ks2};
  float* kbias_buf[2] = {kbias, kbias2};
  VF* accs_buf[2] = {accs, accs2};
  if (u.n0 < n_end) score_block(u.n0, sc, ks, kbias, accs);
  int cur = 0;
  for (int64_t t0 = u.n0; t0 < n_end; t0 += TB, cur ^= 1) {
    softmax_block(t0, sc_buf[cur]);
    if (t0 + TB < n_end) score_block(t0 + TB, sc_buf[cur ^ 1], ks_buf[cur ^ 1], kbias_buf[cur ^ 1], accs_buf[cur ^ 1]);
    v_block(t0, sc_buf[cur]);
  }
#if TQ_HAVE_VNNI_PATH
  if constexpr (VNNI && RT % 4 == 0) {
    for (int r = 0; r < RT; ++r) m[r] = m4[r / 4][4 * (r % 4)];
  }
#endif

#if TQ_HAVE_AMX_PATH
  if constexpr (AMX) _tile_release();
#endif

  // ---- un-permute, fold biases, emit ----
  for (int r = 0; r < R; ++r) {
    const float* orow = o + r * D;
    float* ob = rowperm; // ng <= D floats, free by now
    for (int g = 0; g < ng; ++g) ob[g] = hsum(loadv<f16v>(obias + (r * ng + g) * TB));
    for (int e = 0; e < D; ++e) rowbuf[e] = orow[vpos[e]] + ob[e / gs];
    const float l = hsum(lv[r]);
    if (partials) {
      float* dst = partials + size_t(r) * (D + 2);
      dst[0] = m[r];
      dst[1] = l;
      std::memcpy(dst + 2, rowbuf, sizeof(float) * D);
    } else {
      finalize_row(P, u.b, u.hkv, u.row0 + r, m[r], l, rowbuf);
    }
  }
}

// ---------------------------------------------------------------------------
// Prefill: many query rows per KV head. Rows become vector lanes (32 rows = two
// 16-lane vectors), a block of TB tokens of K and V is dequantized once into
// L1-sized float tiles (never more than TB rows), and both products run as
// register-blocked outer products: S^T[t] += K[t][d] * Q^T[d], O^T[d] += V[t][d] * P^T[t].
// No horizontal reductions, and the dequantization is shared by all 32 rows.
constexpr int PROWS = kPrefillRows;
constexpr int PRV = PROWS / 16; // row vectors per unit
static_assert(PROWS % 16 == 0, "prefill rows come in 16-lane vectors");

// Dequantize nq quantized tokens of one head into dst[t][D] (chunk-permuted order).
template <int BITS>
inline void dequant_tile(const uint8_t* base, int64_t row_bytes, int64_t t0, int nq, int D, int gs,
                         const float* sc, const float* bi, float* dst) {
  constexpr int W = 16, CH = 32;
  const int nch = D / CH;
  const int cpg = gs / CH;
  for (int t = 0; t < nq; ++t) {
    const uint8_t* r = base + (t0 + t) * row_bytes;
    float* out = dst + t * D;
    for (int c = 0; c < nch; ++c) {
      const int g = c / cpg;
      const float s = sc[g * TB + t], b = bi[g * TB + t];
      Vec<16>::f a, bb;
      unpack_chunk<W, BITS>(r + c * CH * BITS / 8, a, bb);
      storev(out + c * CH, a * s + b);
      storev(out + c * CH + W, bb * s + b);
    }
  }
}

// Convert tail tokens to float rows in the same chunk-permuted order.
template <int BITS>
inline void tail_tile(const View4& tv, int b, int h, int64_t j0, int n, int D, float* rowbuf, float* dst) {
  constexpr int W = 16, CH = 32;
  for (int t = 0; t < n; ++t) {
    const int64_t off = b * tv.st[0] + h * tv.st[1] + (j0 + t) * tv.st[2];
    load_row(tv.ptr, off, tv.st[3], D, tv.dt, rowbuf);
    for (int c = 0; c < D / CH; ++c) {
      for (int e = 0; e < CH; ++e) dst[t * D + c * CH + perm_pos<W, BITS>(e)] = rowbuf[c * CH + e];
    }
  }
}

template <int KB, int VB>
void process_unit_prefill(const Problem& P, const Plan& plan, const Unit& u, float* partials) {
  using F = Vec<16>::f;
  constexpr int W = 16, CH = 32;
  const int D = P.D;
  const int G = P.group();
  const int gs = P.group_size;
  const int ng = D / gs;
  const int64_t N = P.N;
  const int64_t Ntot = P.n_total();
  const int R = u.nrows;
  const float log2e = 1.4426950408889634f;
  const float ninf = -std::numeric_limits<float>::infinity();

  const size_t need = size_t(D) * PROWS * 2 + size_t(TB) * D * 2 + size_t(TB) * PROWS +
      size_t(TB) * ng * 4 + size_t(PROWS) * ng + 3 * size_t(D) + 64;
  float* base = thread_scratch(need);
  float* qT = base; // [D][PROWS], d in K's chunk-permuted order
  float* oT = qT + D * PROWS; // [D][PROWS], d in V's chunk-permuted order
  float* kf = oT + D * PROWS; // [TB][D]
  float* vf = kf + TB * D; // [TB][D]
  float* sT = vf + TB * D; // [TB][PROWS]
  float* ks = sT + TB * PROWS;
  float* kbias = ks + TB * ng;
  float* vs = kbias + TB * ng;
  float* vbias = vs + TB * ng;
  float* rowbuf = vbias + TB * ng; // [D]
  float* rowbuf2 = rowbuf + D; // [D]

  int qpos[PROWS], qhead[PROWS];
  int64_t lim[PROWS];
  Vec<16>::f limf[PRV];
  for (int r = 0; r < PROWS; ++r) {
    const int row = u.row0 + std::min(r, R - 1);
    qpos[r] = row / G;
    qhead[r] = u.hkv * G + row % G;
    lim[r] = int64_t(qpos[r]) + Ntot - P.L;
    limf[r / 16][r % 16] = float(lim[r]);
  }
  // Q^T, scaled into the log2 domain.
  const float qscale = P.scale * log2e;
  for (int r = 0; r < PROWS; ++r) {
    if (r < R) {
      const int64_t off = u.b * P.q.st[0] + int64_t(qhead[r]) * P.q.st[1] + int64_t(qpos[r]) * P.q.st[2];
      load_row(P.q.ptr, off, P.q.st[3], D, P.q.dt, rowbuf);
    } else {
      std::fill(rowbuf, rowbuf + D, 0.f);
    }
    for (int c = 0; c < D / CH; ++c) {
      for (int e = 0; e < CH; ++e) qT[(c * CH + perm_pos<W, KB>(e)) * PROWS + r] = rowbuf[c * CH + e] * qscale;
    }
  }
  std::fill(oT, oT + D * PROWS, 0.f);
  F m[PRV], l[PRV];
  for (int v = 0; v < PRV; ++v) {
    m[v] = splat<F>(ninf);
    l[v] = F{};
  }

  int64_t n_end = u.n1;
  int64_t minlim = lim[0];
  if (P.mask_kind == MaskKind::causal) {
    int64_t maxlim = lim[0];
    for (int r = 1; r < PROWS; ++r) {
      maxlim = std::max(maxlim, lim[r]);
      minlim = std::min(minlim, lim[r]);
    }
    n_end = std::min(n_end, maxlim + 1);
  }
  const uint8_t* kbase = reinterpret_cast<const uint8_t*>(P.k.packed + u.b * P.k.p_st[0] + u.hkv * P.k.p_st[1]);
  const uint8_t* vbase = reinterpret_cast<const uint8_t*>(P.v.packed + u.b * P.v.p_st[0] + u.hkv * P.v.p_st[1]);
  const int64_t krow = P.k.p_st[2] * 4;
  const int64_t vrow = P.v.p_st[2] * 4;

  for (int64_t t0 = u.n0; t0 < n_end; t0 += TB) {
    const int nt = int(std::min<int64_t>(TB, n_end - t0));
    const int nq = int(std::max<int64_t>(0, std::min<int64_t>(nt, N - t0)));
    // ---- K tile ----
    if (nq > 0) {
      load_group_params(P.k.scales, u.b, u.hkv, t0, nq, ng, ks);
      load_group_params(P.k.biases, u.b, u.hkv, t0, nq, ng, kbias);
      dequant_tile<KB>(kbase, krow, t0, nq, D, gs, ks, kbias, kf);
    }
    if (nq < nt) tail_tile<KB>(P.k_tail, u.b, u.hkv, t0 + nq - N, nt - nq, D, rowbuf2, kf + nq * D);
    for (int t = nt; t < TB; ++t) std::fill(kf + t * D, kf + (t + 1) * D, 0.f);

    // ---- S^T = K Q^T, 8 tokens x 2 row vectors per register block ----
    for (int tb = 0; tb < TB; tb += 8) {
      F acc[8][PRV];
      for (int i = 0; i < 8; ++i)
        for (int v = 0; v < PRV; ++v) acc[i][v] = F{};
      for (int d = 0; d < D; ++d) {
        F qv[PRV];
        for (int v = 0; v < PRV; ++v) qv[v] = loadv<F>(qT + d * PROWS + v * 16);
        for (int i = 0; i < 8; ++i) {
          const float kv = kf[(tb + i) * D + d];
          for (int v = 0; v < PRV; ++v) acc[i][v] += kv * qv[v];
        }
      }
      for (int i = 0; i < 8; ++i)
        for (int v = 0; v < PRV; ++v) storev(sT + (tb + i) * PROWS + v * 16, acc[i][v]);
    }

    // ---- masks ----
    for (int t = nt; t < TB; ++t)
      for (int v = 0; v < PRV; ++v) storev(sT + t * PROWS + v * 16, splat<F>(ninf));
    if (P.mask_kind == MaskKind::causal && t0 + nt - 1 > minlim) {
      for (int t = 0; t < nt; ++t) {
        const float j = float(t0 + t);
        for (int v = 0; v < PRV; ++v) {
          F sv = loadv<F>(sT + t * PROWS + v * 16);
          storev(sT + t * PROWS + v * 16, (splat<F>(j) > limf[v]) ? splat<F>(ninf) : sv);
        }
      }
    } else if (P.mask_kind == MaskKind::boolean || P.mask_kind == MaskKind::additive) {
      const View4& mk = P.mask;
      for (int r = 0; r < R; ++r) {
        const int64_t off = u.b * mk.st[0] + int64_t(qhead[r]) * mk.st[1] + int64_t(qpos[r]) * mk.st[2] + t0 * mk.st[3];
        load_row(mk.ptr, off, mk.st[3], nt, mk.dt, rowbuf);
        for (int t = 0; t < nt; ++t) {
          float& sv = sT[t * PROWS + r];
          if (P.mask_kind == MaskKind::boolean) {
            if (rowbuf[t] == 0.f) sv = ninf;
          } else {
            sv += rowbuf[t] * log2e;
          }
        }
      }
    }

    // ---- online softmax, lanes = rows ----
    bool rescale = false;
    F alpha[PRV];
    for (int v = 0; v < PRV; ++v) {
      F mx = loadv<F>(sT + v * 16);
      for (int t = 1; t < TB; ++t) {
        F sv = loadv<F>(sT + t * PROWS + v * 16);
        mx = sv > mx ? sv : mx;
      }
      F mnew = mx > m[v] ? mx : m[v];
      F muse = (mnew == ninf) ? F{} : mnew; // rows with nothing visible yet
      alpha[v] = exp2v(m[v] - muse);
      F lsum = F{};
      for (int t = 0; t < TB; ++t) {
        F pv = exp2v(loadv<F>(sT + t * PROWS + v * 16) - muse);
        storev(sT + t * PROWS + v * 16, pv);
        lsum += pv;
      }
      l[v] = l[v] * alpha[v] + lsum;
      for (int i = 0; i < 16; ++i) rescale |= (alpha[v][i] != 1.f);
      m[v] = mnew;
    }
    if (rescale) {
      for (int d = 0; d < D; ++d)
        for (int v = 0; v < PRV; ++v) storev(oT + d * PROWS + v * 16, loadv<F>(oT + d * PROWS + v * 16) * alpha[v]);
    }

    // ---- V tile and O^T += V^T P^T, 8 dims x 2 row vectors per register block ----
    if (nq > 0) {
      load_group_params(P.v.scales, u.b, u.hkv, t0, nq, ng, vs);
      load_group_params(P.v.biases, u.b, u.hkv, t0, nq, ng, vbias);
      dequant_tile<VB>(vbase, vrow, t0, nq, D, gs, vs, vbias, vf);
    }
    if (nq < nt) tail_tile<VB>(P.v_tail, u.b, u.hkv, t0 + nq - N, nt - nq, D, rowbuf2, vf + nq * D);
    for (int d0 = 0; d0 < D; d0 += 8) {
      F acc[8][PRV];
      for (int i = 0; i < 8; ++i)
        for (int v = 0; v < PRV; ++v) acc[i][v] = loadv<F>(oT + (d0 + i) * PROWS + v * 16);
      for (int t = 0; t < nt; ++t) {
        F pv[PRV];
        for (int v = 0; v < PRV; ++v) pv[v] = loadv<F>(sT + t * PROWS + v * 16);
        for (int i = 0; i < 8; ++i) {
          const float x = vf[t * D + d0 + i];
          for (int v = 0; v < PRV; ++v) acc[i][v] += x * pv[v];
        }
      }
      for (int i = 0; i < 8; ++i)
        for (int v = 0; v < PRV; ++v) storev(oT + (d0 + i) * PROWS + v * 16, acc[i][v]);
    }
  }

  // ---- emit rows ----
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < D / CH; ++c) {
      for (int e = 0; e < CH; ++e) rowbuf[c * CH + e] = oT[(c * CH + perm_pos<W, VB>(e)) * PROWS + r];
    }
    const float mr = m[r / 16][r % 16], lr = l[r / 16][r % 16];
    if (partials) {
      float* dst = partials + size_t(r) * (D + 2);
      dst[0] = mr;
      dst[1] = lr;
      std::memcpy(dst + 2, rowbuf, sizeof(float) * D);
    } else {
      finalize_row(P, u.b, u.hkv, u.row0 + r, mr, lr, rowbuf);
    }
  }
}

template <int W, int KB, int VB, bool VNNI>
UnitFn pick_rt_decode(const Plan& plan) {
  switch (plan.row_tile) {
    case 1:
      return &process_unit<W, KB, VB, 1, VNNI>;
    case 2:
      return &process_unit<W, KB, VB, 2, VNNI>;
    case 4:
      return &process_unit<W, KB, VB, 4, VNNI>;
    case 8:
      return &process_unit<W, KB, VB, 8, VNNI>;
    case 16:
      return &process_unit<W, KB, VB, 16, VNNI>;
    default:
      return nullptr; // the host checks: a wrong tile would overrun the row arrays
  }
}

#if TQ_HAVE_VNNI_PATH
// The integer decode kernels (this file built as the avx512int object): null
// where they do not apply, and the avx512 object's kernels run instead.
template <int KB, int VB>
UnitFn pick_int_decode(const Problem& p, const Plan& plan) {
  // 32-byte segments of packed rows, groups of whole segments or halves.
  if (plan.row_tile == PROWS || !cpu_use_vnni() || p.D % 64 != 0 || p.D > kVnniMaxD) return nullptr;
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
#else
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
#endif

} // namespace TQ_CAT(isa_, TQMETAL_ISA)

// The host passes the plan through the problem-independent row_tile only.
UnitFn TQ_CAT(unit_fn_, TQMETAL_ISA)(const Problem& p, const Plan& plan);

UnitFn TQ_CAT(unit_fn_, TQMETAL_ISA)(const Problem& p, const Plan& plan) {
  using namespace TQ_CAT(isa_, TQMETAL_ISA);
#if TQ_HAVE_VNNI_PATH
  if (p.group_size < 32) return nullptr;
  if (p.k.bits == 4) {
    return p.v.bits == 4 ? pick_int_decode<4, 4>(p, plan) : pick_int_decode<4, 8>(p, plan);
  }
  return p.v.bits == 4 ? pick_int_decode<8, 4>(p, plan) : pick_int_decode<8, 8>(p, plan);
#else
  // A chunk is 2W elements and must not straddle groups: W = 8 for group 16.
  return p.group_size >= 32 ? pick_bits<16>(p, plan) : pick_bits<8>(p, plan);
#endif
}

} // namespace tqmetal::cpu
