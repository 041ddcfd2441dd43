// Prefill attention (many query rows) on an affine-quantized KV cache (mx.quantize
// layout, 2-8 bits): steel-style tiles of query rows against tiles of keys, with
// simdgroup_matrix MMA for Q*K^T and P*V.
//
// Work decomposition (planned by csrc/metal/dispatch_plan.cpp):
//   grid      (B * H_kv, ceil(G * L / BQ), 1) threadgroups of WM simdgroups x 32 lanes.
//   rows      the G * L query rows that share one KV head, numbered as in the decode
//             kernel (row r = query position r / G of query head hkv * G + r % G); a
//             threadgroup takes BQ consecutive rows, simdgroup s rows [8s, 8s + 8) of
//             them. So a K/V tile serves every query head of the KV head at once.
//   tokens    tiles of BK keys, in order. Each tile's packed words (or tail rows) are
//             read from device memory once per threadgroup and dequantized once into
//             threadgroup memory (K transposed, then V), as float32; its scales and
//             biases are staged first so each is read once too.
//   softmax   S = Q K^T (Q pre-scaled by scale * log2(e)) goes through threadgroup
//             memory; lane r < 8 of a simdgroup owns row r: it applies the masks,
//             keeps the row's running max and sum (float32, exp2 domain), and writes P
//             back; O = diag(f) O + P V stays in simdgroup_matrix registers.
//   causal    tiles that lie past the diagonal of the threadgroup's last row are
//             skipped (they would weigh exactly 0), unless some row sees no key at all
//             (L > N + T), whose result is then the mean of V over every key.
//
// Masks, sinks and fully masked rows follow the decode kernel (and MLX): a
// boolean/causal-masked key scores the lowest finite float, an additive -inf key
// weighs 0, a row of only -inf keys is NaN, sinks join the softmax at the end.
#pragma once

#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#include <metal_stdlib>

#include "mlx/backend/metal/kernels/steel/attn/mma.h" // BaseMMAFrag: the 8x8 fragment's lane layout
#include "sdpa_int4_decode.h" // function constants 40-51, load_f, kMasked
#include "sdpa_int4_params.h"

using namespace metal;

namespace tq {

typedef simdgroup_matrix<float, 8, 8> frag8;

// Dequantize BK tokens [t0, t0 + BK) of K (TRANSPOSED: dst[d * BK + i]) or V
// (dst[i * D + d]) into threadgroup memory: quantized tokens from the packed words
// and the staged scales/biases, tail tokens from the unquantized rows, tokens past
// the end as zeros.
//
// A packed row is one little-endian bit stream (mx.quantize: code j at bits
// [j * bits, (j + 1) * bits), so a 3-, 5- or 6-bit code may straddle two words). It is
// cut into units: the fewest whole words that hold a whole number of codes,
// U = 32 / gcd(bits, 32) codes in U * bits / 32 words (one word of 16, 8 or 4 codes
// for 2, 4 or 8 bits; three words of 32 or 16 codes for 3 or 6 bits; five words of 32
// codes for 5 bits). One thread per unit (or the unit-sized slice of a tail row): it
// reads each of its words once and shifts the codes out through a 64-bit buffer. A
// unit lies in one group (U <= 16 for 2, 4, 8 bits; 32 for 3 and 5, which need groups
// of 32 or more).
template <int D, int BK, int NTHREADS, bool TRANSPOSED>
METAL_FUNC void dequant_tile(
    threadgroup float* dst,
    const device uint32_t* packed_head, // packed + b, hkv offsets (uint32 words)
    int64_t packed_tok_stride, // words between tokens
    const threadgroup float* scales, // [BK][D / group_size], staged
    const threadgroup float* biases,
    const device uint8_t* tail,
    int64_t tail_head, // element offset of (b, hkv, tail token 0)
    int64_t tail_tok_stride,
    int bits,
    int t0,
    int N,
    int NT,
    uint tix) {
  const int unit_codes = 32 / (bits & -bits); // 32 / gcd(bits, 32)
  const int unit_words = bits / (bits & -bits); // unit_codes * bits / 32
  const int units = D / unit_codes;
  const int ng = D / tq_group_size;
  const uint lo_mask = (1u << bits) - 1u;
  for (int i = int(tix); i < BK * units; i += NTHREADS) {
    const int tt = i / units, u = i % units, t = t0 + tt;
    const int d0 = u * unit_codes;
    if (t < N) {
      const device uint32_t* src = packed_head + int64_t(t) * packed_tok_stride + u * unit_words;
      const int gi = d0 / tq_group_size;
      const float sc = scales[tt * ng + gi], bi = biases[tt * ng + gi];
      ulong buf = src[0]; // the unit's next bits, lowest first
      int have = 32, next = 1;
      for (int e = 0; e < unit_codes; e++) {
        if (have < bits) { // code e straddles into the next word
          buf |= ulong(src[next++]) << have;
          have += 32;
        }
        const float x = sc * float(uint(buf) & lo_mask) + bi;
        buf >>= bits;
        have -= bits;
        dst[TRANSPOSED ? (d0 + e) * BK + tt : tt * D + d0 + e] = x;
      }
    } else {
      const int64_t off = tail_head + int64_t(t - N) * tail_tok_stride + d0;
      for (int e = 0; e < unit_codes; e++) {
        const float x = t < NT ? load_f(tail, off + e, tq_tail_dtype) : 0.0f;
        dst[TRANSPOSED ? (d0 + e) * BK + tt : tt * D + d0 + e] = x;
      }
    }
  }
}

} // namespace tq

// BQ query rows (8 per simdgroup, WM = BQ / 8 simdgroups) x BK keys per step; T the
// query/output type; K and V bits (2, 3, 4, 5, 6 or 8) come from function constants 50/51.
template <typename T, int D, int BQ, int BK>
[[kernel]] void sdpa_int4_prefill(
    const device T* queries [[buffer(0)]],
    const device uint32_t* k_packed [[buffer(1)]],
    const device uint8_t* k_scales [[buffer(2)]],
    const device uint8_t* k_biases [[buffer(3)]],
    const device uint32_t* v_packed [[buffer(4)]],
    const device uint8_t* v_scales [[buffer(5)]],
    const device uint8_t* v_biases [[buffer(6)]],
    device T* out [[buffer(7)]],
    const device uint8_t* k_tail [[buffer(10), function_constant(tq_has_tail)]],
    const device uint8_t* v_tail [[buffer(11), function_constant(tq_has_tail)]],
    const device uint8_t* mask [[buffer(12), function_constant(tq_has_mask)]],
    const device uint8_t* sinks [[buffer(13), function_constant(tq_has_sinks)]],
    const constant int* ip [[buffer(14)]],
    const constant int64_t* st [[buffer(15)]],
    const constant float& qscale [[buffer(16)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint tix [[thread_index_in_threadgroup]]) {
  using namespace tqmetal_decode;
  using tq::frag8;
  static_assert(BQ % 8 == 0 && BK % 8 == 0 && D % 16 == 0, "8x8 fragments");
  constexpr int WM = BQ / 8;
  constexpr int NTHREADS = WM * 32;
  constexpr int QC = D % 64 == 0 ? 64 : 16; // columns of Q staged per round
  constexpr int KV_FLOATS = BK * D > BQ * QC ? BK * D : BQ * QC;
  constexpr int MAX_GROUPS = D / 16;
  threadgroup float tg_kv[KV_FLOATS]; // Q staging, then each K^T tile, then each V tile
  threadgroup float tg_s[BQ * BK]; // scores, then probabilities
  threadgroup float tg_sb[4 * BK * MAX_GROUPS]; // the tile's k scales, k biases, v scales, v biases
  threadgroup float tg_row[BQ]; // per-row rescale factor of a step; 1 / sum at the end

  const int Hq = ip[IP_HQ], Hkv = ip[IP_HKV], L = ip[IP_L], G = ip[IP_G];
  const int R = ip[IP_ROWS], N = ip[IP_N], NT = ip[IP_N] + ip[IP_T];
  const int b = int(tid.x) / Hkv, hkv = int(tid.x) % Hkv;
  const int row0 = int(tid.y) * BQ;
  const int srow0 = int(sg) * 8; // this simdgroup's rows in the tile
  const int ng = D / tq_group_size;
  const short2 coord = mlx::steel::BaseMMAFrag<float, 8, 8>::get_coord(ushort(lane));
  const int fm = coord.y, fn = coord.x; // this lane's two elements: (fm, fn), (fm, fn + 1)

  // ---- Q into registers, QC columns at a time through threadgroup memory ----
  // (Loops over fragments are unrolled so the fragment arrays stay in registers.)
  frag8 qf[D / 8];
  STEEL_PRAGMA_UNROLL
  for (int c0 = 0; c0 < D; c0 += QC) {
    for (int i = int(tix); i < BQ * QC; i += NTHREADS) {
      const int row = row0 + i / QC, d = c0 + i % QC;
      tg_kv[i] = row < R ? qscale *
              float(queries[b * st[ST_Q] + (hkv * G + row % G) * st[ST_Q + 1] + (row / G) * st[ST_Q + 2] + d])
                         : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    STEEL_PRAGMA_UNROLL
    for (int j = 0; j < QC / 8; j++) {
      simdgroup_load(qf[c0 / 8 + j], tg_kv + srow0 * QC + 8 * j, QC);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  frag8 of[D / 8];
  STEEL_PRAGMA_UNROLL
  for (int j = 0; j < D / 8; j++) {
    of[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  // ---- the row a lane < 8 owns ----
  const int my_row = row0 + srow0 + int(lane);
  const bool my_valid = lane < 8 && my_row < R;
  const int my_qpos = my_row / G, my_hq = hkv * G + my_row % G;
  float m_row = -tq::kInf, l_row = 0.0f;
  int64_t mask_row = 0;
  if (tq_has_mask && my_valid) {
    mask_row = b * st[ST_MASK] + my_hq * st[ST_MASK + 1] + my_qpos * st[ST_MASK + 2];
  }

  // ---- causal block skipping ----
  int t_end = NT;
  if (tq_do_causal) {
    const int first_qpos = row0 / G, last_qpos = (min(R, row0 + BQ) - 1) / G;
    if (first_qpos + NT - L >= 0) {
      t_end = min(NT, last_qpos + NT - L + 1);
    }
  }

  const device uint32_t* kp_head = k_packed + b * st[ST_K_PACKED] + hkv * st[ST_K_PACKED + 1];
  const device uint32_t* vp_head = v_packed + b * st[ST_V_PACKED] + hkv * st[ST_V_PACKED + 1];
  const int64_t kt_head = tq_has_tail ? b * st[ST_K_TAIL] + hkv * st[ST_K_TAIL + 1] : 0;
  const int64_t vt_head = tq_has_tail ? b * st[ST_V_TAIL] + hkv * st[ST_V_TAIL + 1] : 0;

  for (int t0 = 0; t0 < t_end; t0 += BK) {
    // The previous step's P*V is done with tg_kv, tg_s and tg_sb.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = int(tix); i < 4 * BK * ng; i += NTHREADS) {
      const int which = i / (BK * ng), tt = (i / ng) % BK, gi = i % ng, t = t0 + tt;
      if (t < N) {
        const int base = which == 0 ? ST_K_SCALES : which == 1 ? ST_K_BIASES : which == 2 ? ST_V_SCALES : ST_V_BIASES;
        const device uint8_t* src = which == 0 ? k_scales : which == 1 ? k_biases : which == 2 ? v_scales : v_biases;
        tg_sb[i] = tq::load_f(src, b * st[base] + hkv * st[base + 1] + int64_t(t) * st[base + 2] + gi, tq_scale_dtype);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    tq::dequant_tile<D, BK, NTHREADS, true>(
        tg_kv, kp_head, st[ST_K_PACKED + 2], tg_sb, tg_sb + BK * ng, k_tail, kt_head, st[ST_K_TAIL + 2],
        tq_k_bits, t0, N, NT, tix);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // S = Q K^T for this simdgroup's 8 rows.
    STEEL_PRAGMA_UNROLL
    for (int kb = 0; kb < BK / 8; kb++) {
      frag8 s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      STEEL_PRAGMA_UNROLL
      for (int dd = 0; dd < D / 8; dd++) {
        frag8 kt;
        simdgroup_load(kt, tg_kv + dd * 8 * BK + kb * 8, BK);
        simdgroup_multiply_accumulate(s, qf[dd], kt, s);
      }
      simdgroup_store(s, tg_s + srow0 * BK + kb * 8, BK);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);

    // Online softmax, one row per lane < 8.
    if (lane < 8) {
      threadgroup float* srow = tg_s + (srow0 + int(lane)) * BK;
      float f = 1.0f;
      if (my_valid) {
        float mn = m_row;
        for (int c = 0; c < BK; c++) {
          const int t = t0 + c;
          float s = srow[c];
          if (t >= NT) {
            s = -tq::kInf; // past the last key: no weight
          } else {
            if (tq_has_mask) {
              const int64_t mo = mask_row + int64_t(t) * st[ST_MASK + 3];
              if (tq_bool_mask) {
                s = mask[mo] ? s : tq::kMasked;
              } else {
                s += tq::load_f(mask, mo, tq_mask_dtype) * tq::kLog2e;
              }
            }
            if (tq_do_causal) {
              s = t <= my_qpos + NT - L ? s : tq::kMasked;
            }
          }
          srow[c] = s;
          mn = max(mn, s);
        }
        f = m_row == mn ? 1.0f : fast::exp2(m_row - mn);
        float psum = 0.0f;
        for (int c = 0; c < BK; c++) {
          const float s = srow[c];
          const float p = s == -tq::kInf ? 0.0f : fast::exp2(s - mn);
          srow[c] = p;
          psum += p;
        }
        m_row = mn;
        l_row = l_row * f + psum;
      } else {
        for (int c = 0; c < BK; c++) {
          srow[c] = 0.0f;
        }
      }
      tg_row[srow0 + int(lane)] = f;
    }
    // Every simdgroup is done with K^T: V replaces it.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    tq::dequant_tile<D, BK, NTHREADS, false>(
        tg_kv, vp_head, st[ST_V_PACKED + 2], tg_sb + 2 * BK * ng, tg_sb + 3 * BK * ng, v_tail, vt_head,
        st[ST_V_TAIL + 2], tq_v_bits, t0, N, NT, tix);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // O = diag(f) O + P V.
    const float f_lane = tg_row[srow0 + fm];
    STEEL_PRAGMA_UNROLL
    for (int dd = 0; dd < D / 8; dd++) {
      thread auto& el = of[dd].thread_elements();
      el[0] *= f_lane;
      el[1] *= f_lane;
    }
    STEEL_PRAGMA_UNROLL
    for (int kb = 0; kb < BK / 8; kb++) {
      frag8 pf;
      simdgroup_load(pf, tg_s + srow0 * BK + kb * 8, BK);
      STEEL_PRAGMA_UNROLL
      for (int dd = 0; dd < D / 8; dd++) {
        frag8 vf;
        simdgroup_load(vf, tg_kv + kb * 8 * D + dd * 8, D);
        simdgroup_multiply_accumulate(of[dd], pf, vf, of[dd]);
      }
    }
  }

  // ---- sinks, normalization, output ----
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (my_valid) {
    float a = 1.0f, lsum = l_row;
    if (tq_has_sinks) {
      const float sk = tq::load_f(sinks, my_hq * st[ST_SINKS], tq_sinks_dtype) * tq::kLog2e;
      const float Mn = max(m_row, sk);
      a = m_row == -tq::kInf ? 0.0f : fast::exp2(m_row - Mn);
      lsum = lsum * a + fast::exp2(sk - Mn);
    }
    tg_row[srow0 + int(lane)] = lsum == 0 ? numeric_limits<float>::quiet_NaN() : a / lsum;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int row = row0 + srow0 + fm;
  if (row < R) {
    const float w = tg_row[srow0 + fm];
    device T* orow = out + ((int64_t(b) * Hq + hkv * G + row % G) * L + row / G) * D + fn;
    STEEL_PRAGMA_UNROLL
    for (int dd = 0; dd < D / 8; dd++) {
      thread auto& el = of[dd].thread_elements();
      orow[dd * 8] = static_cast<T>(el[0] * w);
      orow[dd * 8 + 1] = static_cast<T>(el[1] * w);
    }
  }
}
