// Decode attention (few query rows per KV head) on an int4/int8 affine-quantized KV
// cache, CUDA. The same work decomposition as metal/sdpa_int4_decode.h, shaped for
// NVIDIA warps:
//
//   grid    (B * H_kv, row_tiles, blocks) CTAs of kDecodeWarps warps. A CTA holds
//           ROWS query rows of one KV head (row r = query position r / G of query
//           head hkv * G + r % G) in registers, so every packed K/V byte it loads
//           serves all of them: with G * L <= ROWS each byte of the cache is read once
//           per KV head, never once per query head.
//   lanes   a warp reads TPS tokens at a time; the LPR = 32 / TPS lanes of one token
//           own EPL consecutive elements each and load their codes with one 8- or
//           16-byte load (VW) per cache (consecutive lanes, consecutive bytes: the
//           warp reads TPS whole rows, fully coalesced). Nibbles/bytes are unpacked in
//           registers.
//   steps   each warp loads U steps (U * TPS tokens) before using any of them; the
//           warps of a CTA interleave their steps so that the CTA streams one range.
//   blocks  split-K: blocks == 1 -> the kernel writes the output; > 1 -> it writes
//           unnormalized float32 partials (output, max, sum) per block and
//           tq_decode_merge combines them (and the sinks).
//
// Numerics as in the Metal kernel: q pre-scaled by scale * log2(e) and, per element,
// by 1 / 2^(BITS * p) for its position p in a 16-bit half word, so that a code is
// unpacked with one AND-OR and one subtraction (shifted_code); a score is
// k_scale * sum(q' * code') + k_bias * sum(q). The V weight is folded into the scale,
// the V bias accumulates once per token and group. Online softmax in float32, exp2.
#pragma once

namespace tqc {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeUnroll = 4;

template <int D, int ROWS>
struct DecodeShape {
  static constexpr int EPL = ROWS == 1 ? 32 : (ROWS <= 4 ? 16 : 8);  // elements per lane
  static constexpr int LPR = D / EPL;  // lanes per token row
  static constexpr int TPS = 32 / LPR;  // tokens per warp step
  static_assert(LPR >= 1 && LPR <= 32 && 32 % LPR == 0, "lane split");
};

// The packed codes of one lane: EPL elements = WORDS uint32 words, loaded with
// VW-byte vector loads (the plan picks VW from the actual alignment).
template <int BITS, int EPL, int VW>
struct LaneCodes {
  static constexpr int WORDS = EPL * BITS / 32;
  u32 w[WORDS];

  __device__ __forceinline__ void load(const u32* p) {
    if constexpr (VW == 16 && WORDS % 4 == 0) {
#pragma unroll
      for (int i = 0; i < WORDS; i += 4) {
        asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(w[i]), "=r"(w[i + 1]), "=r"(w[i + 2]), "=r"(w[i + 3])
                     : "l"(p + i));
      }
    } else if constexpr (VW >= 8 && WORDS % 2 == 0) {
#pragma unroll
      for (int i = 0; i < WORDS; i += 2) {
        asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(w[i]), "=r"(w[i + 1]) : "l"(p + i));
      }
    } else {
#pragma unroll
      for (int i = 0; i < WORDS; ++i) {
        asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(w[i]) : "l"(p + i));
      }
    }
  }

  // Element e, shifted left by BITS * (its position in its 16-bit half word).
  __device__ __forceinline__ float shifted(int e) const {
    constexpr int PER = 32 / BITS, H = 16 / BITS;
    const u32 word = w[e / PER];
    const int in_word = e % PER;
    return shifted_code<BITS>(in_word >= H ? (word >> 16) : word, in_word % H);
  }
  static __device__ __forceinline__ constexpr float inv(int e) {
    return code_inv<BITS>((e % (32 / BITS)) % (16 / BITS));
  }
};

template <int D, int KB, int VB, int GS, int ROWS, int VW, bool PARTIAL>
__device__ __forceinline__ void decode_impl(const TqParams& p) {
  using Shape = DecodeShape<D, ROWS>;
  constexpr int EPL = Shape::EPL, LPR = Shape::LPR, TPS = Shape::TPS;
  constexpr int NW = kDecodeWarps, U = kDecodeUnroll;
  static_assert(EPL <= GS, "a lane's elements lie in one group");
  using KC = LaneCodes<KB, EPL, VW>;
  using VC = LaneCodes<VB, EPL, VW>;

  __shared__ float sm_o[NW][ROWS][D];
  __shared__ float sm_m[NW][ROWS];
  __shared__ float sm_l[NW][ROWS];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tok = lane / LPR, sub = lane % LPR;
  const int Hkv = p.Hkv, G = p.G, R = p.R, N = p.N, NT = p.N + p.T;
  const int b = blockIdx.x / Hkv, hkv = blockIdx.x % Hkv;
  const int row0 = blockIdx.y * ROWS;
  const int t0 = blockIdx.z * p.block_len;
  const int t1 = min(NT, t0 + p.block_len);
  const int e0 = sub * EPL;  // this lane's first element
  const int grp = e0 / GS;  // its quantization group
  constexpr int NG = D / GS;

  // This lane's slice of the ROWS query rows, pre-scaled (rows past R are zero).
  float q[ROWS][EPL];
  float qsum[ROWS];
  float o[ROWS][EPL];
  float ob[ROWS];  // sum of p * v_bias (the lane's elements share one group)
  float m[ROWS], l[ROWS];
  int hq_r[ROWS], qpos_r[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = min(row0 + r, R - 1);
    hq_r[r] = hkv * G + row % G;
    qpos_r[r] = row / G;
    const bool live = row0 + r < R;
    const i64 qo = b * p.st[ST_Q] + hq_r[r] * p.st[ST_Q + 1] + i64(qpos_r[r]) * p.st[ST_Q + 2] + e0;
    qsum[r] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      const float x = live ? load_f(p.q, qo + e, p.q_dtype) * p.qscale : 0.f;
      qsum[r] += x;
      q[r][e] = x * KC::inv(e);
      o[r][e] = 0.f;
    }
    ob[r] = 0.f;
    m[r] = -kInf;
    l[r] = 0.f;
  }

  const u32* kp_head = p.k_packed + b * p.st[ST_K_PACKED] + hkv * p.st[ST_K_PACKED + 1] + e0 * KB / 32;
  const u32* vp_head = p.v_packed + b * p.st[ST_V_PACKED] + hkv * p.st[ST_V_PACKED + 1] + e0 * VB / 32;
  const i64 kp_tok = p.st[ST_K_PACKED + 2], vp_tok = p.st[ST_V_PACKED + 2];
  const i64 ks_off = b * p.st[ST_K_SCALES] + hkv * p.st[ST_K_SCALES + 1] + grp;
  const i64 kb_off = b * p.st[ST_K_BIASES] + hkv * p.st[ST_K_BIASES + 1] + grp;
  const i64 vs_off = b * p.st[ST_V_SCALES] + hkv * p.st[ST_V_SCALES + 1] + grp;
  const i64 vb_off = b * p.st[ST_V_BIASES] + hkv * p.st[ST_V_BIASES + 1] + grp;
  (void)NG;

  for (int base = t0; base < t1; base += NW * TPS * U) {
    KC kc[U];
    VC vc[U];
    float sb[U][4];
    int tt[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      tt[u] = base + (u * NW + warp) * TPS + tok;
      if (tt[u] < t1 && tt[u] < N) {
        const i64 t = tt[u];
        kc[u].load(kp_head + t * kp_tok);
        vc[u].load(vp_head + t * vp_tok);
        sb[u][0] = load_f(p.k_scales, ks_off + t * p.st[ST_K_SCALES + 2], p.scale_dtype);
        sb[u][1] = load_f(p.k_biases, kb_off + t * p.st[ST_K_BIASES + 2], p.scale_dtype);
        sb[u][2] = load_f(p.v_scales, vs_off + t * p.st[ST_V_SCALES + 2], p.scale_dtype);
        sb[u][3] = load_f(p.v_biases, vb_off + t * p.st[ST_V_BIASES + 2], p.scale_dtype);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = tt[u];
      const bool valid = t < t1;
      const bool quant = t < N;
      float s[ROWS];
      float vt[EPL];  // tail V elements
      if (quant || !valid) {
        float x[EPL];
#pragma unroll
        for (int e = 0; e < EPL; ++e) x[e] = kc[u].shifted(e);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float acc = 0.f;
#pragma unroll
          for (int e = 0; e < EPL; ++e) acc = fmaf(q[r][e], x[e], acc);
          s[r] = sb[u][0] * acc + sb[u][1] * qsum[r];
        }
      } else {
        const i64 tt_ = t - N;
        const i64 ko = b * p.st[ST_K_TAIL] + hkv * p.st[ST_K_TAIL + 1] + tt_ * p.st[ST_K_TAIL + 2] + e0;
        const i64 vo = b * p.st[ST_V_TAIL] + hkv * p.st[ST_V_TAIL + 1] + tt_ * p.st[ST_V_TAIL + 2] + e0;
        float kt[EPL];
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          kt[e] = load_f(p.k_tail, ko + e, p.tail_dtype) / KC::inv(e);  // exact power of 2
          vt[e] = load_f(p.v_tail, vo + e, p.tail_dtype);
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float acc = 0.f;
#pragma unroll
          for (int e = 0; e < EPL; ++e) acc = fmaf(q[r][e], kt[e], acc);
          s[r] = acc;
        }
      }
      // Sum over the LPR lanes of this token (all lanes take part: no early exit).
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int off = LPR / 2; off > 0; off >>= 1) s[r] += __shfl_xor_sync(0xffffffffu, s[r], off);
      }
      if (!valid) continue;
      float vx[EPL];
      if (quant) {
#pragma unroll
        for (int e = 0; e < EPL; ++e) vx[e] = vc[u].shifted(e);
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float sr = apply_mask(s[r], p, b, hq_r[r], qpos_r[r], t);
        const float mn = fmaxf(m[r], sr);
        if (mn > m[r]) {  // a new maximum (rare after the first tokens): rescale
          const float f = m[r] == -kInf ? 0.f : exp2a(m[r] - mn);
          l[r] *= f;
          ob[r] *= f;
#pragma unroll
          for (int e = 0; e < EPL; ++e) o[r][e] *= f;
          m[r] = mn;
        }
        const float pr = sr == -kInf ? 0.f : exp2a(sr - m[r]);
        l[r] += pr;
        if (quant) {
          const float ps = pr * sb[u][2];
          ob[r] = fmaf(pr, sb[u][3], ob[r]);
#pragma unroll
          for (int e = 0; e < EPL; ++e) o[r][e] = fmaf(ps * VC::inv(e), vx[e], o[r][e]);
        } else {
#pragma unroll
          for (int e = 0; e < EPL; ++e) o[r][e] = fmaf(pr, vt[e], o[r][e]);
        }
      }
    }
  }

  // Combine the TPS token groups of the warp (lanes with equal `sub`), then the warps.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float M = m[r];
#pragma unroll
    for (int off = LPR; off < 32; off <<= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    const float f = m[r] == -kInf ? 0.f : exp2a(m[r] - M);
    float lr = l[r] * f;
#pragma unroll
    for (int off = LPR; off < 32; off <<= 1) lr += __shfl_xor_sync(0xffffffffu, lr, off);
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      float x = (o[r][e] + ob[r]) * f;
#pragma unroll
      for (int off = LPR; off < 32; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
      if (tok == 0) sm_o[warp][r][e0 + e] = x;
    }
    if (lane == 0) {
      sm_m[warp][r] = M;
      sm_l[warp][r] = lr;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < ROWS * D; i += NW * 32) {
    const int r = i / D, d = i % D;
    const int row = row0 + r;
    if (row >= R) continue;
    float M = -kInf;
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w][r]);
    float acc = 0.f, lsum = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      const float mw = sm_m[w][r];
      const float f = mw == -kInf ? 0.f : exp2a(mw - M);
      acc += f * sm_o[w][r][d];
      lsum += f * sm_l[w][r];
    }
    const i64 prow = i64(blockIdx.x) * R + row;  // (b, hkv, row)
    if constexpr (PARTIAL) {
      p.part_out[(prow * p.blocks + blockIdx.z) * D + d] = acc;
      if (d == 0) {
        p.part_max[prow * p.blocks + blockIdx.z] = M;
        p.part_sum[prow * p.blocks + blockIdx.z] = lsum;
      }
    } else {
      const int hq = hkv * G + row % G;
      const float res = finish_row(acc, M, lsum, p, hq);
      store_f(p.out, ((i64(b) * p.Hq + hq) * p.L + row / G) * D + d, p.q_dtype, res);
    }
  }
}

// Split-K merge: one CTA of D threads per (b, hkv, row); thread d merges column d of
// the blocks' partials, applies the sinks and writes the output element.
template <int D>
__device__ __forceinline__ void decode_merge_impl(const TqParams& p) {
  const int Hkv = p.Hkv, G = p.G, R = p.R, blocks = p.blocks;
  const int b = blockIdx.x / Hkv, hkv = blockIdx.x % Hkv, row = blockIdx.y, d = threadIdx.x;
  const i64 prow = i64(blockIdx.x) * R + row;
  const float* po = p.part_out + prow * blocks * D + d;
  const float* pm = p.part_max + prow * blocks;
  const float* pl = p.part_sum + prow * blocks;
  float M = -kInf;
  for (int i = 0; i < blocks; ++i) M = fmaxf(M, pm[i]);
  float acc = 0.f, lsum = 0.f;
  for (int i = 0; i < blocks; ++i) {
    const float mi = pm[i];
    const float w = mi == -kInf ? 0.f : exp2a(mi - M);
    lsum += w * pl[i];
    acc += w * po[i64(i) * D];
  }
  const int hq = hkv * G + row % G;
  const float res = finish_row(acc, M, lsum, p, hq);
  store_f(p.out, ((i64(b) * p.Hq + hq) * p.L + row / G) * D + d, p.q_dtype, res);
}

}  // namespace tqc
