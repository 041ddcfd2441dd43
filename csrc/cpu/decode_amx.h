// Decode's AMX-INT8 K scores (head dim 128, 4 bits; built only into the
// avx512int object, used only after the CPU check and the kernel's permission,
// csrc/cpu/sdpa_int4_cpu.cpp; kernel_common.h has the map). V keeps the VNNI path.
#pragma once

#include "cpu/decode_vnni.h"

namespace tqmetal::cpu {
namespace TQ_CAT(isa_, TQMETAL_ISA) {

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

// The query tiles for RT rows (natural-order scaled rows qn, int16 factors qf),
// built once per unit and loaded into tmm2/3 (and tmm5/6 past 16 columns),
// where they stay. Returns the number of column tiles (1 or 2).
template <int RT>
inline int amx_load_query(AmxBuffers& amx, const float* qn, const float* qf, int D, int gs, int ng, bool exact_q) {
  const int amx_cols = RT * ng * 2, amx_tiles = (amx_cols + 15) / 16;
  for (int ct = 0; ct < amx_tiles; ++ct) {
    for (int k4 = 0; k4 < 16; ++k4) {
      for (int n = 0; n < 16; ++n) {
        const int col = 16 * ct + n;
        const int r = col / (2 * ng), g = col / 2 % ng, half = col % 2;
        for (int j = 0; j < 4; ++j) {
          const int k = 4 * k4 + j; // byte k: dim 2k (X), dim 2k + 1 (Y)
          int8_t xv = 0, yv = 0;
          if (col < amx_cols && !exact_q) {
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
  return amx_tiles;
}

// Token t's packed row (64 bytes) as the X (low nibbles) and Y (high) tile rows.
TQ_INLINE inline void amx_stage_token(AmxBuffers& amx, const uint8_t* kr, int t) {
  const __m512i x = _mm512_loadu_si512(kr);
  const __m512i lo4 = _mm512_set1_epi8(15);
  _mm512_store_si512(amx.x[t], _mm512_and_si512(x, lo4));
  _mm512_store_si512(amx.y[t], _mm512_and_si512(_mm512_srli_epi16(x, 4), lo4));
}

// The block's scores (log2 domain) of RT rows from the nq staged tokens:
// sc[r][t] = qinv_r * sum_g scale_g (256 hi + lo) + qsum_rg * bias_g.
template <int RT>
TQ_INLINE inline void amx_block_scores(AmxBuffers& amx, int nq, int ng, int amx_tiles, const float* ks,
                                       const float* kbias, const float* qsum, const float* qinv, float* sc) {
  for (int t = nq; t < TB; ++t) { // zero keys: scores 0, masked later
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
#else
#define TQ_HAVE_AMX_PATH 0
#endif

} // namespace TQ_CAT(isa_, TQMETAL_ISA)
} // namespace tqmetal::cpu
