// Decode attention on an affine-quantized KV cache (mx.quantize layout, 2-8 bits),
// adapted from MLX's sdpa_vector (mlx/backend/metal/kernels/sdpa_vector.h).
//
// Work decomposition (planned by csrc/metal/dispatch_plan.cpp):
//   grid      (B * H_kv, row_tiles, blocks) threadgroups of BN simdgroups x 32 lanes.
//   rows      the G * L query rows that share one KV head (row r = query position
//             r / G of query head hkv * G + r % G); a threadgroup holds ROWS of them
//             in registers, so every packed K/V byte it loads serves all its rows:
//             with G * L <= ROWS each byte is read from device memory once per KV
//             head (per block), not once per query head.
//   tokens    simdgroup s takes tokens t0 + s, t0 + s + BN, ... of its block
//             [t0, t1); lane i owns elements [i * D/32, (i + 1) * D/32) of a row.
//   blocks    1 -> sdpa_int4_decode_1pass writes the output; > 1 ->
//             sdpa_int4_decode_2pass_1 writes per-block unnormalized partial outputs,
//             maxima and sums (float32) and sdpa_int4_decode_2pass_2 merges them.
//
// Numerics: the query is pre-multiplied by scale * log2(e) (softmax in exp2), and in
// MLX's qdot form: the q lane of the element at nibble position p of a 16-bit chunk
// is divided by 16^p (256^p for 8 bits), so a masked, unshifted chunk times it is the
// code times q. A score is k_scale * sum(q' * masked) + k_bias * sum(q); V updates fold
// the softmax weight into the scale and bias. Online softmax in float32.
//
// Bits: the k<K>v<V> instances (K, V in {4, 8}) read whole bytes as above. The
// bit-stream instances (KB = VB = kStream, host name suffix "stream") take K's and V's
// widths from function constants 50/51 (2, 3, 4, 5, 6 or 8; mx.quantize's layout: a
// row is ONE little-endian bit stream, code j at bits [j * bits, (j + 1) * bits), so
// a 3-, 5- or 6-bit code may straddle two words): lane i's PT codes are the bits
// [i * PT * bits, (i + 1) * PT * bits), which always lie within two consecutive words
// (PT * bits <= 64, and the start's offset in its word is a multiple of
// gcd(PT * bits, 32)). The simdgroup loads the row's words once (lane i: words i and
// i + 32), each lane takes its two words with simd_shuffle and shifts its codes out
// in registers; so here too each packed byte is read once per KV head.
//
// Masks follow MLX: a boolean/causal-masked key gets the lowest finite score (so a
// row whose every key is masked averages V, as mx.fast does), an additive -inf key
// weighs 0 and a row of only -inf keys is NaN; sinks join the softmax at the end.
#pragma once

#include <metal_simdgroup>
#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h" // bfloat16_t, METAL_FUNC, instantiate_kernel
#include "sdpa_int4_params.h"

using namespace metal;

constant bool tq_has_mask [[function_constant(40)]];
constant bool tq_bool_mask [[function_constant(41)]];
constant bool tq_do_causal [[function_constant(42)]];
constant bool tq_has_tail [[function_constant(43)]];
constant bool tq_has_sinks [[function_constant(44)]];
constant int tq_group_size [[function_constant(45)]];
constant int tq_scale_dtype [[function_constant(46)]];
constant int tq_tail_dtype [[function_constant(47)]];
constant int tq_mask_dtype [[function_constant(48)]];
constant int tq_sinks_dtype [[function_constant(49)]];
// Code widths of the bit-stream decode instances and of the prefill kernel.
constant int tq_k_bits [[function_constant(50)]];
constant int tq_v_bits [[function_constant(51)]];

namespace tq {

constant constexpr float kLog2e = 1.4426950408889634f;
constant constexpr float kInf = numeric_limits<float>::infinity();
constant constexpr float kMasked = -numeric_limits<float>::max(); // MLX: lowest finite

// Element i of a float16/bfloat16/float32 array whose dtype is a function constant
// (the branch is resolved when the pipeline is specialized).
METAL_FUNC float load_f(const device uint8_t* p, int64_t i, int dt) {
  if (dt == tqmetal_decode::DT_F16) {
    return float(((const device half*)p)[i]);
  }
  if (dt == tqmetal_decode::DT_BF16) {
    return float(((const device bfloat16_t*)p)[i]);
  }
  return ((const device float*)p)[i];
}

// The packed bytes one lane owns, read as 16-bit chunks (8-bit chunks when a lane
// owns a single byte: 4-bit, D = 64).
template <int BITS, int PT>
struct Packed {
  static constexpr int bytes = PT * BITS / 8;
  static constexpr int chunk_bits = bytes >= 2 ? 16 : 8;
  static constexpr int chunks = bytes * 8 / chunk_bits;
  static constexpr int per_chunk = chunk_bits / BITS; // elements per chunk
  static constexpr uint mask = (1u << BITS) - 1u;
  uint c[chunks];

  METAL_FUNC void load(const device uint8_t* row, uint lane, int /* bits: BITS */) {
    if (chunk_bits == 16) {
      const device uint16_t* p = (const device uint16_t*)(row) + lane * chunks;
      for (int i = 0; i < chunks; i++) {
        c[i] = p[i];
      }
    } else {
      c[0] = row[lane];
    }
  }
  // element j, still shifted left by BITS * (j % per_chunk)
  METAL_FUNC float masked(int j) const {
    return float(c[j / per_chunk] & (mask << (BITS * (j % per_chunk))));
  }
  // 1 / 2^(BITS * (j % per_chunk)): the factor the query lane / V weight carries
  static METAL_FUNC float inv(int j) {
    return 1.0f / float(1u << (BITS * (j % per_chunk)));
  }
};

// KB / VB of the bit-stream instances: the width is a function constant.
constant constexpr int kStream = 0;

// The PT codes one lane owns in a bit-stream row (any width 2-8), shifted down to
// plain codes: masked(j) is code j itself and inv(j) is 1. A row is D * bits / 32 =
// PT * bits <= 64 words; the simdgroup loads each once (lane i words i and i + 32)
// and every lane gathers the one or two words its codes lie in with simd_shuffle.
template <int PT>
struct Packed<kStream, PT> {
  float c[PT];

  // Word i (< 64) of the row, lane i % 32 holding words i (in a) and i + 32 (in b).
  static METAL_FUNC uint word(uint a, uint b, int i, bool two) {
    const uint x = simd_shuffle(a, ushort(i & 31));
    const uint y = two ? simd_shuffle(b, ushort(i & 31)) : 0u;
    return i < 32 ? x : y;
  }

  // Every lane of the simdgroup calls it (simd_shuffle).
  METAL_FUNC void load(const device uint8_t* row, uint lane, int bits) {
    const device uint32_t* w = (const device uint32_t*)(row);
    const int words = PT * bits; // D * bits / 32
    const bool two = words > 32; // uniform
    const uint a = int(lane) < words ? w[lane] : 0u;
    const uint b = int(lane) + 32 < words ? w[lane + 32] : 0u;
    const int start = int(lane) * PT * bits; // first bit of this lane's codes
    const int w0 = start / 32, sh = start % 32;
    const uint lo = word(a, b, w0, two);
    const uint hi = word(a, b, w0 + 1, two); // bits past the lane's codes are ignored
    const ulong x = ((ulong(hi) << 32) | ulong(lo)) >> sh;
    const uint mask = (1u << bits) - 1u;
    for (int j = 0; j < PT; j++) {
      c[j] = float(uint(x >> (j * bits)) & mask);
    }
  }
  METAL_FUNC float masked(int j) const {
    return c[j];
  }
  static METAL_FUNC float inv(int) {
    return 1.0f;
  }
};

// The shared body of the single-pass kernel (PARTIAL = false) and of pass 1 of the
// two-pass kernel (PARTIAL = true).
template <typename T, int D, int KB, int VB, int BN, int ROWS, bool PARTIAL>
METAL_FUNC void decode_impl(
    const device T* queries,
    const device uint8_t* k_packed,
    const device uint8_t* k_scales,
    const device uint8_t* k_biases,
    const device uint8_t* v_packed,
    const device uint8_t* v_scales,
    const device uint8_t* v_biases,
    device T* out,
    device float* part_out,
    device float* part_max,
    device float* part_sum,
    const device uint8_t* k_tail,
    const device uint8_t* v_tail,
    const device uint8_t* mask,
    const device uint8_t* sinks,
    const constant int* ip,
    const constant int64_t* st,
    float qscale,
    threadgroup float* tg_max,
    threadgroup float* tg_sum,
    threadgroup float* tg_out,
    threadgroup float* tg_q,
    uint3 tid,
    uint sg,
    uint lane,
    uint tix) {
  using namespace tqmetal_decode;
  constexpr int PT = D / 32; // elements per lane
  typedef Packed<KB, PT> KP;
  typedef Packed<VB, PT> VP;
  const int k_bits = KB == kStream ? tq_k_bits : KB;
  const int v_bits = VB == kStream ? tq_v_bits : VB;

  const int Hq = ip[IP_HQ], Hkv = ip[IP_HKV], L = ip[IP_L], G = ip[IP_G];
  const int R = ip[IP_ROWS], N = ip[IP_N], NT = ip[IP_N] + ip[IP_T];
  const int blocks = ip[IP_BLOCKS], block_len = ip[IP_BLOCK_LEN];
  const int b = int(tid.x) / Hkv, hkv = int(tid.x) % Hkv;
  const int row0 = int(tid.y) * ROWS;
  const int nrows = min(ROWS, R - row0);
  const int t0 = int(tid.z) * block_len;
  const int t1 = min(NT, t0 + block_len);
  const int ng = D / tq_group_size; // groups per row (<= 8)
  const int g = int(lane) * PT / tq_group_size; // this lane's group

  // Rows in registers: q pre-scaled for the K chunks, and sum(q) for the bias term.
  thread float q[ROWS][PT];
  thread float qsum[ROWS];
  thread float o[ROWS][PT];
  thread float m[ROWS];
  thread float l[ROWS];
  // The threadgroup's query rows are loaded once (scaled by scale * log2(e)) into
  // threadgroup memory, then every simdgroup takes its lanes' slices from there.
  for (int i = int(tix); i < nrows * D; i += BN * 32) {
    const int row = row0 + i / D;
    tg_q[i] = qscale *
        float(queries[b * st[ST_Q] + (hkv * G + row % G) * st[ST_Q + 1] + (row / G) * st[ST_Q + 2] + i % D]);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int r = 0; r < ROWS; r++) {
    qsum[r] = 0;
    m[r] = -tq::kInf;
    l[r] = 0;
    for (int j = 0; j < PT; j++) {
      q[r][j] = 0;
      o[r][j] = 0;
    }
    if (r < nrows) {
      for (int j = 0; j < PT; j++) {
        const float x = tg_q[r * D + lane * PT + j];
        qsum[r] += x;
        q[r][j] = x * KP::inv(j);
      }
    }
  }

  // Per-lane row data for the mask: lane r < nrows reads row r's mask entries.
  int my_hq = 0, my_qpos = 0;
  if (int(lane) < nrows) {
    my_hq = hkv * G + (row0 + int(lane)) % G;
    my_qpos = (row0 + int(lane)) / G;
  }
  // Lanes [0, 4 * ng) read the scale/bias of group lane % ng of k_s, k_b, v_s, v_b.
  const int which = int(lane) / ng;
  const device uint8_t* sb_src = which == 0 ? k_scales : which == 1 ? k_biases : which == 2 ? v_scales : v_biases;
  const int sb_base = which == 0 ? ST_K_SCALES : which == 1 ? ST_K_BIASES : which == 2 ? ST_V_SCALES : ST_V_BIASES;
  const int64_t sb_off = which < 4 ? b * st[sb_base] + hkv * st[sb_base + 1] + int(lane) % ng : 0;
  const int64_t sb_tok = which < 4 ? st[sb_base + 2] : 0;

  const device uint8_t* kp_head =
      k_packed + 4 * (b * st[ST_K_PACKED] + hkv * st[ST_K_PACKED + 1]);
  const device uint8_t* vp_head =
      v_packed + 4 * (b * st[ST_V_PACKED] + hkv * st[ST_V_PACKED + 1]);

  for (int t = t0 + int(sg); t < t1; t += BN) {
    float s[ROWS];
    thread float vt[PT]; // tail V elements
    VP vc;
    float v_s = 0, v_b = 0;
    const bool quant = t < N;
    if (quant) {
      float sbv = 0;
      if (which < 4) {
        sbv = load_f(sb_src, sb_off + t * sb_tok, tq_scale_dtype);
      }
      const float k_s = simd_shuffle(sbv, ushort(g));
      const float k_b = simd_shuffle(sbv, ushort(ng + g));
      v_s = simd_shuffle(sbv, ushort(2 * ng + g));
      v_b = simd_shuffle(sbv, ushort(3 * ng + g));
      KP kc;
      kc.load(kp_head + 4 * t * st[ST_K_PACKED + 2], lane, k_bits);
      vc.load(vp_head + 4 * t * st[ST_V_PACKED + 2], lane, v_bits);
      for (int r = 0; r < ROWS; r++) {
        if (r < nrows) {
          float acc = 0;
          for (int j = 0; j < PT; j++) {
            acc += q[r][j] * kc.masked(j);
          }
          s[r] = simd_sum(k_s * acc + k_b * qsum[r]);
        }
      }
    } else {
      const int64_t tt = t - N;
      thread float kt[PT];
      const int64_t ko = b * st[ST_K_TAIL] + hkv * st[ST_K_TAIL + 1] + tt * st[ST_K_TAIL + 2] + lane * PT;
      const int64_t vo = b * st[ST_V_TAIL] + hkv * st[ST_V_TAIL + 1] + tt * st[ST_V_TAIL + 2] + lane * PT;
      for (int j = 0; j < PT; j++) {
        kt[j] = load_f(k_tail, ko + j, tq_tail_dtype);
        vt[j] = load_f(v_tail, vo + j, tq_tail_dtype);
      }
      for (int r = 0; r < ROWS; r++) {
        if (r < nrows) {
          float acc = 0;
          for (int j = 0; j < PT; j++) {
            acc += q[r][j] * (kt[j] / KP::inv(j)); // undo the qdot pre-scaling (exact)
          }
          s[r] = simd_sum(acc);
        }
      }
    }

    // Masks.
    float mv = 0;
    if (tq_has_mask && int(lane) < nrows) {
      const int64_t mo = b * st[ST_MASK] + my_hq * st[ST_MASK + 1] + my_qpos * st[ST_MASK + 2] +
          int64_t(t) * st[ST_MASK + 3];
      mv = tq_bool_mask ? (mask[mo] ? 1.0f : 0.0f) : load_f(mask, mo, tq_mask_dtype);
    }
    for (int r = 0; r < ROWS; r++) {
      if (r < nrows) {
        if (tq_has_mask) {
          const float mr = simd_shuffle(mv, ushort(r));
          if (tq_bool_mask) {
            s[r] = mr != 0 ? s[r] : tq::kMasked;
          } else {
            s[r] += mr * kLog2e;
          }
        }
        if (tq_do_causal) {
          const int qpos = (row0 + r) / G;
          s[r] = t <= qpos + NT - L ? s[r] : tq::kMasked;
        }
        // Online softmax (exp2 domain).
        const float mn = max(m[r], s[r]);
        const float f = m[r] == mn ? 1.0f : fast::exp2(m[r] - mn);
        const float p = s[r] == -tq::kInf ? 0.0f : fast::exp2(s[r] - mn);
        m[r] = mn;
        l[r] = l[r] * f + p;
        if (quant) {
          const float ps = p * v_s, pb = p * v_b; // weight folded into scale and bias
          for (int j = 0; j < PT; j++) {
            o[r][j] = o[r][j] * f + (ps * VP::inv(j)) * vc.masked(j) + pb;
          }
        } else {
          for (int j = 0; j < PT; j++) {
            o[r][j] = o[r][j] * f + p * vt[j];
          }
        }
      }
    }
  }

  // Merge the BN simdgroups' states, one row at a time.
  if (lane == 0) {
    for (int r = 0; r < ROWS; r++) {
      tg_max[sg * ROWS + r] = m[r];
      tg_sum[sg * ROWS + r] = l[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int r = 0; r < nrows; r++) {
    float M = -tq::kInf;
    for (int i = 0; i < BN; i++) {
      M = max(M, tg_max[i * ROWS + r]);
    }
    const float f = m[r] == -tq::kInf ? 0.0f : fast::exp2(m[r] - M);
    for (int j = 0; j < PT; j++) {
      tg_out[sg * D + lane * PT + j] = o[r][j] * f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (int(tix) < D) {
      float acc = 0, lsum = 0;
      for (int i = 0; i < BN; i++) {
        acc += tg_out[i * D + tix];
        const float mi = tg_max[i * ROWS + r];
        lsum += mi == -tq::kInf ? 0.0f : fast::exp2(mi - M) * tg_sum[i * ROWS + r];
      }
      const int row = row0 + r;
      const int64_t prow = int64_t(tid.x) * R + row; // (b, hkv, row)
      if (PARTIAL) {
        part_out[(prow * blocks + tid.z) * D + tix] = acc;
        if (tix == 0) {
          part_max[prow * blocks + tid.z] = M;
          part_sum[prow * blocks + tid.z] = lsum;
        }
      } else {
        const int hq = hkv * G + row % G;
        if (tq_has_sinks) {
          const float sk = load_f(sinks, hq * st[ST_SINKS], tq_sinks_dtype) * kLog2e;
          const float Mn = max(M, sk);
          const float a = M == -tq::kInf ? 0.0f : fast::exp2(M - Mn);
          acc *= a;
          lsum = lsum * a + fast::exp2(sk - Mn);
        }
        const float res = lsum == 0 ? numeric_limits<float>::quiet_NaN() : acc / lsum;
        out[((int64_t(b) * Hq + hq) * L + row / G) * D + tix] = static_cast<T>(res);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

} // namespace tq

template <typename T, int D, int KB, int VB, int BN, int ROWS>
[[kernel]] void sdpa_int4_decode_1pass(
    const device T* queries [[buffer(0)]],
    const device uint8_t* k_packed [[buffer(1)]],
    const device uint8_t* k_scales [[buffer(2)]],
    const device uint8_t* k_biases [[buffer(3)]],
    const device uint8_t* v_packed [[buffer(4)]],
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
  threadgroup float tg_max[BN * ROWS];
  threadgroup float tg_sum[BN * ROWS];
  threadgroup float tg_out[BN * D];
  threadgroup float tg_q[ROWS * D];
  tq::decode_impl<T, D, KB, VB, BN, ROWS, false>(
      queries, k_packed, k_scales, k_biases, v_packed, v_scales, v_biases, out, nullptr, nullptr,
      nullptr, k_tail, v_tail, mask, sinks, ip, st, qscale, tg_max, tg_sum, tg_out, tg_q, tid, sg, lane, tix);
}

template <typename T, int D, int KB, int VB, int BN, int ROWS>
[[kernel]] void sdpa_int4_decode_2pass_1(
    const device T* queries [[buffer(0)]],
    const device uint8_t* k_packed [[buffer(1)]],
    const device uint8_t* k_scales [[buffer(2)]],
    const device uint8_t* k_biases [[buffer(3)]],
    const device uint8_t* v_packed [[buffer(4)]],
    const device uint8_t* v_scales [[buffer(5)]],
    const device uint8_t* v_biases [[buffer(6)]],
    device float* part_out [[buffer(7)]],
    device float* part_max [[buffer(8)]],
    device float* part_sum [[buffer(9)]],
    const device uint8_t* k_tail [[buffer(10), function_constant(tq_has_tail)]],
    const device uint8_t* v_tail [[buffer(11), function_constant(tq_has_tail)]],
    const device uint8_t* mask [[buffer(12), function_constant(tq_has_mask)]],
    const constant int* ip [[buffer(14)]],
    const constant int64_t* st [[buffer(15)]],
    const constant float& qscale [[buffer(16)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint tix [[thread_index_in_threadgroup]]) {
  threadgroup float tg_max[BN * ROWS];
  threadgroup float tg_sum[BN * ROWS];
  threadgroup float tg_out[BN * D];
  threadgroup float tg_q[ROWS * D];
  tq::decode_impl<T, D, KB, VB, BN, ROWS, true>(
      queries, k_packed, k_scales, k_biases, v_packed, v_scales, v_biases, nullptr, part_out,
      part_max, part_sum, k_tail, v_tail, mask, nullptr, ip, st, qscale, tg_max, tg_sum, tg_out, tg_q, tid,
      sg, lane, tix);
}

// Pass 2: one threadgroup of D threads per (b, hkv, row); thread d merges column d
// of the blocks' partial outputs, applies the sinks and writes the output row.
template <typename T, int D>
[[kernel]] void sdpa_int4_decode_2pass_2(
    const device float* part_out [[buffer(0)]],
    const device float* part_max [[buffer(1)]],
    const device float* part_sum [[buffer(2)]],
    device T* out [[buffer(3)]],
    const device uint8_t* sinks [[buffer(4), function_constant(tq_has_sinks)]],
    const constant int* ip [[buffer(5)]],
    const constant int64_t* st [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint tix [[thread_index_in_threadgroup]]) {
  using namespace tqmetal_decode;
  const int Hq = ip[IP_HQ], Hkv = ip[IP_HKV], L = ip[IP_L], G = ip[IP_G];
  const int R = ip[IP_ROWS], blocks = ip[IP_BLOCKS];
  const int b = int(tid.x) / Hkv, hkv = int(tid.x) % Hkv, row = int(tid.y);
  const int64_t prow = int64_t(tid.x) * R + row;
  part_out += prow * blocks * D + tix;
  part_max += prow * blocks;
  part_sum += prow * blocks;
  float M = -tq::kInf;
  for (int i = 0; i < blocks; i++) {
    M = max(M, part_max[i]);
  }
  float acc = 0, lsum = 0;
  for (int i = 0; i < blocks; i++) {
    const float mi = part_max[i];
    const float w = mi == -tq::kInf ? 0.0f : fast::exp2(mi - M);
    lsum += w * part_sum[i];
    acc += w * part_out[i * D];
  }
  const int hq = hkv * G + row % G;
  if (tq_has_sinks) {
    const float sk = tq::load_f(sinks, hq * st[ST_SINKS], tq_sinks_dtype) * tq::kLog2e;
    const float Mn = max(M, sk);
    const float a = M == -tq::kInf ? 0.0f : fast::exp2(M - Mn);
    acc *= a;
    lsum = lsum * a + fast::exp2(sk - Mn);
  }
  const float res = lsum == 0 ? numeric_limits<float>::quiet_NaN() : acc / lsum;
  out[((int64_t(b) * Hq + hq) * L + row / G) * D + tix] = static_cast<T>(res);
}
