// Decode attention (few query rows per KV head) on an int4/int8 affine-quantized KV
// cache, CUDA, on tensor cores. The same work decomposition as the Metal decode (each
// packed byte read once per KV head, split-K over the context, a merge pass), with the
// per-token arithmetic moved onto mma.sync.m16n8k16 so that the kernel needs few
// registers and few instructions per byte and HBM, not the issue rate, bounds it:
//
//   grid    (B * H_kv, row_tiles, blocks) CTAs of kDecodeWarps warps. A CTA holds
//           NR = 8 query rows of one KV head (row r = query position r / G of query
//           head hkv * G + r % G): the N dimension of the mma. With G * L <= 8 each
//           packed byte of the cache is read once per KV head.
//   warps   a warp takes 32 consecutive tokens (two 16-token tiles) per step, the
//           CTA's warps interleave their steps over the block's token range; all
//           loads of a step are issued before any is used.
//   scores  S^T = K Q^T per quantization group: A = the tile's K codes as exact
//           float16 integers (M = 16 tokens, unpacked from the packed words with one
//           shift + AND-OR + subtract per two codes: 0x6400 | code is 1024 + code),
//           B = q (float16; float32 q as hi + lo). score = k_scale * S + k_bias * sum(q)
//           per group, so the codes never meet the scales inside the mma.
//   softmax the 16 x 8 score fragment gives each lane 2 tokens x 2 rows; one online-
//           softmax update (max over the warp: 3 shuffles per row) per 32 tokens.
//   output  O^T += V^T P_g^T per group: A = V codes (M = 16 head-dim elements, K = 16
//           tokens; two tokens' words interleaved with one prmt), B = p * v_scale
//           (float16, transposed from the score fragment with movmatrix; hi + lo for
//           float32 q); the bias enters once per token and group as sum(p * v_bias).
//   blocks  split-K: blocks == 1 -> the kernel writes the output; > 1 -> it writes
//           unnormalized float32 partials (output, max, sum) per block and
//           tq_decode_merge combines them (and the sinks).
//
// Tiles that are not 16 whole quantized tokens of the block (the block's end, the
// unquantized tail) take a slower path that builds the same fragments element by
// element (tail values as float16 hi + lo, scale 1, bias 0).
#pragma once

namespace tqc {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeRows = 8;  // query rows per CTA (the mma's N)
constexpr int kDecodeTiles = 2;  // default 16-token tiles per warp step (the plan picks TL)

__device__ __forceinline__ void dmma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// The transpose of an 8 x 8 float16 fragment (row lane / 4, columns 2 (lane % 4) + {0, 1}).
__device__ __forceinline__ u32 dtrans(u32 x) {
  u32 y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}
// Two floats as float16x2 (`lo` in bits 0-15), and the float16 remainders of the two.
__device__ __forceinline__ u32 h2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ u32 h2rest(float lo, float hi) {
  return h2(lo - f16_to_f32(f32_to_f16(lo)), hi - f16_to_f32(f32_to_f16(hi)));
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}
// Code k of each 16-bit half of x (bits [BITS k, BITS (k + 1)) of the half) as an exact
// float16 pair: 0x6400 | code is the float16 1024 + code. 4-bit codes 1 and 3 are taken
// in place (1024 + 16 code, then * 1/16 - 64), so a word costs one shift, not three.
template <int BITS>
__device__ __forceinline__ u32 codes2(u32 x, int k) {
  u32 r;
  if constexpr (BITS == 4) {
    const u32 xs = k >= 2 ? x >> 8 : x;
    if (k & 1) {
      const u32 y = (xs & 0x00F000F0u) | 0x64006400u;
      asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(y), "r"(0x2C002C00u), "r"(0xD400D400u));
      return r;
    }
    const u32 y = (xs & 0x000F000Fu) | 0x64006400u;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(y), "r"(0x64006400u));
    return r;
  } else {
    const u32 y = ((x >> (8 * k)) & 0x00FF00FFu) | 0x64006400u;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(y), "r"(0x64006400u));
    return r;
  }
}

// Read-only streaming loads of the packed codes (each byte is read once).
__device__ __forceinline__ void ld_v4(u32* w, const u32* p) {
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}
__device__ __forceinline__ void ld_v2(u32* w, const u32* p) {
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
}
__device__ __forceinline__ u32 ld_w(const u32* p) {
  u32 w;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(w) : "l"(p));
  return w;
}
__device__ __forceinline__ u32 ld_h(const u16* p) {
  u16 h;
  asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(h) : "l"(p));
  return u32(h);
}
// W words from p with loads of at most VW bytes.
template <int W, int VW>
__device__ __forceinline__ void ld_words(u32* w, const u32* p) {
  if constexpr (VW >= 16 && W % 4 == 0) {
#pragma unroll
    for (int i = 0; i < W; i += 4) ld_v4(w + i, p + i);
  } else if constexpr (VW >= 8 && W % 2 == 0) {
#pragma unroll
    for (int i = 0; i < W; i += 2) ld_v2(w + i, p + i);
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) w[i] = ld_w(p + i);
  }
}

// ---- bit-stream widths (2, 3, 5, 6 bits: mx.quantize's layout) ----
// A packed row is one little-endian bit stream: code j at bits [j BITS, (j + 1) BITS),
// so a code may straddle two words; with groups of 32 or more every group starts on a
// word. A lane's slice of a group (SL bits from bit `lane_index * SL`) is loaded as the
// words that cover it and shifted down to bit 0 with funnel shifts, after which every
// code sits at a compile-time bit position.

// Words that cover any one of `lanes` consecutive SL-bit slices of a group (the most
// over the slices' offsets within their first word).
constexpr int stream_words(int lanes, int sl) {
  int m = 0;
  for (int i = 0; i < lanes; ++i) {
    const int w = ((i * sl) % 32 + sl + 31) / 32;
    m = m > w ? m : w;
  }
  return m;
}
// (hi:lo) >> sh, the low 32 bits (sh in [0, 32)).
__device__ __forceinline__ u32 funnel(u32 lo, u32 hi, u32 sh) {
  u32 r;
  asm("shf.r.wrap.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(lo), "r"(hi), "r"(sh));
  return r;
}
// The slice's AW words from bit 0, out of the LW loaded words and the slice's offset.
template <int AW, int LW>
__device__ __forceinline__ void align_slice(u32 (&a)[AW], const u32 (&w)[LW], u32 off) {
#pragma unroll
  for (int i = 0; i < AW; ++i) a[i] = funnel(w[i], w[i + 1 < LW ? i + 1 : i], off);
}
// Code j of an aligned slice (j a compile-time constant once unrolled).
template <int BITS, int AW>
__device__ __forceinline__ u32 code_at(const u32 (&a)[AW], int j) {
  const int bit = j * BITS, w = bit >> 5, s = bit & 31;
  const u32 lo = a[w] >> s;
  const u32 v = (s + BITS > 32 && w + 1 < AW) ? (lo | (a[w + 1] << (32 - s))) : lo;
  return v & ((1u << BITS) - 1u);
}
// Codes j and j + 1 of an aligned slice as an exact float16 pair (code j in bits 0-15):
// one shift (a funnel shift where the two straddle a word) brings both down to bit 0.
template <int BITS, int AW>
__device__ __forceinline__ u32 pair_at(const u32 (&a)[AW], int j) {
  const int bit = j * BITS, w = bit >> 5, s = bit & 31;
  const u32 x = (s + 2 * BITS > 32 && w + 1 < AW) ? funnel(a[w], a[w + 1], s) : a[w] >> s;
  constexpr u32 M = (1u << BITS) - 1u;
  const u32 y = (x & M) | ((x << (16 - BITS)) & (M << 16)) | 0x64006400u;
  u32 r;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(y), "r"(0x64006400u));
  return r;
}
// Two codes as an exact float16 pair (`lo` in bits 0-15): 0x6400 | code is 1024 + code.
__device__ __forceinline__ u32 code_pair(u32 lo, u32 hi) {
  u32 r;
  const u32 y = (lo | (hi << 16)) | 0x64006400u;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(y), "r"(0x64006400u));
  return r;
}

// A scale or bias whose dtype is a compile-time code.
template <int SDT>
__device__ __forceinline__ float ld_s(const void* p, i64 i) {
  if constexpr (SDT == DT_F16) return f16_to_f32(static_cast<const u16*>(p)[i]);
  if constexpr (SDT == DT_BF16) return bf16_to_f32(static_cast<const u16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

template <int D, int KB, int VB, int GS, int VW, int SDT, bool QSPLIT, bool PARTIAL, int TL, int PF, bool PIPE>
struct Decoder {
  static constexpr int NW = kDecodeWarps, NR = kDecodeRows, TT = 16 * TL;
  static constexpr int NG = D / GS;  // groups per row
  static constexpr int KS = GS / 16;  // k-steps (scores) = m-tiles (output) per group
  static constexpr int NM = D / 16;  // output m-tiles
  static constexpr int KPER = 32 / KB;  // K codes per word
  static constexpr int SPW = KPER / 4;  // score k-steps per K word
  static constexpr int KCW = GS * KB / 128;  // K words per lane, token and group (GS / 4 codes)
  static constexpr int VCH = GS * VB / 128;  // V 16-bit pieces per lane, token and group (GS / 8 codes)
  static constexpr int VPP = 16 / VB;  // V codes per 16-bit piece
  static constexpr int VCW = VCH >= 2 ? VCH / 2 : 1;  // V words (a lone piece: zero-extended)
  // Bit-stream widths (2, 3, 5, 6): a lane's K slice is GS / 4 codes (SLK bits) from
  // bit c SLK of the group, its V slice GS / 8 codes (SLV bits) from bit g SLV; KLW / VLW
  // words are loaded per token and group, KAW / VAW remain once aligned.
  static constexpr bool KSTREAM = KB != 4 && KB != 8, VSTREAM = VB != 4 && VB != 8;
  static constexpr int SLK = GS / 4 * KB, SLV = GS / 8 * VB;
  static constexpr int GWK = GS * KB / 32, GWV = GS * VB / 32;  // words per group
  static constexpr int KLW = stream_words(4, SLK), VLW = stream_words(8, SLV);
  static constexpr int KAW = (SLK + 31) / 32, VAW = (SLV + 31) / 32;
  static constexpr int KFW = KSTREAM ? KLW : KCW;  // K words a lane holds per token and group
  static constexpr int VFW = VSTREAM ? VLW : VCW;
  static_assert((KSTREAM || KCW >= 1) && (VSTREAM || VCH >= 1) && KS >= 1, "group too small for the decode fragments");
  static_assert(!(KSTREAM || VSTREAM) || GS % 32 == 0, "bit-stream widths need groups that start on a word");

  // Position in the lane's K slice of the code a score k-step st takes as A column pair
  // h (0: a0/a1, 1: a2/a3), element e (0: bits 0-15). 4/8 bits: the codes one AND takes
  // from a word's two 16-bit halves; bit streams: consecutive codes.
  static constexpr int kcol(int st, int h, int e) {
    return KSTREAM ? 4 * st + 2 * h + e : (st / SPW) * KPER + 2 * (st % SPW) + h + e * (KPER / 2);
  }

  const TqParams& p;
  int lane, warp, g, c, b, hkv, row0, t0, t1, N;
  int hq_r[2], qpos_r[2];  // rows 2c, 2c + 1 of the tile (score columns)
  u32 qh[NG][KS][2];
  u32 ql[QSPLIT ? NG : 1][QSPLIT ? KS : 1][2];
  float qs[2][NG];  // scale * log2(e) * sum of q over each group, rows 2c, 2c + 1
  float o[NM][4];
  float m[2], l[2], ob[2][NG];
  const u32* kbase;
  const u32* vbase;
  int kp_tok, vp_tok, ks_tok, kb_tok, vs_tok, vb_tok;  // token strides (the plan keeps them < 2^24)
  const char* ks_p;
  const char* kb_p;
  const char* vs_p;
  const char* vb_p;

  __device__ __forceinline__ Decoder(const TqParams& p_) : p(p_) {}

  // Element d of K (IS_K) or V for token t: the code (quantized), the tail value, or 0.
  template <bool IS_K>
  __device__ __forceinline__ float value(int t, int d) const {
    if (t >= t1) return 0.f;
    if (t < N) {
      constexpr int BITS = IS_K ? KB : VB;
      const u32* row = (IS_K ? kbase : vbase) + i64(t) * (IS_K ? kp_tok : vp_tok);
      const int bit = d * BITS, s = bit & 31;
      u32 w = row[bit >> 5] >> s;
      if (s + BITS > 32) w |= row[(bit >> 5) + 1] << (32 - s);  // a code straddling two words
      return float(w & ((1u << BITS) - 1u));
    }
    const int st = IS_K ? ST_K_TAIL : ST_V_TAIL;
    const i64 o_ = b * p.st[st] + hkv * p.st[st + 1] + i64(t - N) * p.st[st + 2] + d;
    return load_f(IS_K ? p.k_tail : p.v_tail, o_, p.tail_dtype);
  }

  __device__ __forceinline__ void init() {
    lane = threadIdx.x & 31;
    warp = threadIdx.x >> 5;
    g = lane >> 2;
    c = lane & 3;
    const int Hkv = p.Hkv, G = p.G, R = p.R;
    b = blockIdx.x / Hkv;
    hkv = blockIdx.x % Hkv;
    row0 = blockIdx.y * NR;
    N = p.N;
    t0 = blockIdx.z * p.block_len;
    t1 = min(N + p.T, t0 + p.block_len);
    // q as the scores' B fragment: row g, k-step pairs as the K codes are unpacked.
    {
      const int row = min(row0 + g, R - 1);
      const bool live = row0 + g < R;
      const int hq = hkv * G + row % G, qpos = row / G;
      const i64 qo = b * p.st[ST_Q] + hq * p.st[ST_Q + 1] + i64(qpos) * p.st[ST_Q + 2];
      float gsum[NG];
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        gsum[gi] = 0.f;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
          const int d0 = gi * GS + c * (GS / 4);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float x0 = live ? load_f(p.q, qo + d0 + kcol(s, h, 0), p.q_dtype) : 0.f;
            const float x1 = live ? load_f(p.q, qo + d0 + kcol(s, h, 1), p.q_dtype) : 0.f;
            gsum[gi] += x0 + x1;
            qh[gi][s][h] = h2(x0, x1);
            if constexpr (QSPLIT) ql[gi][s][h] = h2rest(x0, x1);
          }
        }
        gsum[gi] += __shfl_xor_sync(0xffffffffu, gsum[gi], 1);
        gsum[gi] += __shfl_xor_sync(0xffffffffu, gsum[gi], 2);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) qs[r][gi] = __shfl_sync(0xffffffffu, gsum[gi], (2 * c + r) * 4) * p.qscale;
        const int rr = min(row0 + 2 * c + r, R - 1);
        hq_r[r] = hkv * G + rr % G;
        qpos_r[r] = rr / G;
      }
    }
#pragma unroll
    for (int i = 0; i < NM; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m[r] = -kInf;
      l[r] = 0.f;
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) ob[r][gi] = 0.f;
    }
    kbase = p.k_packed + b * p.st[ST_K_PACKED] + hkv * p.st[ST_K_PACKED + 1];
    vbase = p.v_packed + b * p.st[ST_V_PACKED] + hkv * p.st[ST_V_PACKED + 1];
    kp_tok = int(p.st[ST_K_PACKED + 2]);
    vp_tok = int(p.st[ST_V_PACKED + 2]);
    ks_tok = int(p.st[ST_K_SCALES + 2]);
    kb_tok = int(p.st[ST_K_BIASES + 2]);
    vs_tok = int(p.st[ST_V_SCALES + 2]);
    vb_tok = int(p.st[ST_V_BIASES + 2]);
    constexpr int SB = SDT == DT_F32 ? 4 : 2;  // bytes per scale
    ks_p = static_cast<const char*>(p.k_scales) + (b * p.st[ST_K_SCALES] + hkv * p.st[ST_K_SCALES + 1]) * SB;
    kb_p = static_cast<const char*>(p.k_biases) + (b * p.st[ST_K_BIASES] + hkv * p.st[ST_K_BIASES + 1]) * SB;
    vs_p = static_cast<const char*>(p.v_scales) + (b * p.st[ST_V_SCALES] + hkv * p.st[ST_V_SCALES + 1]) * SB;
    vb_p = static_cast<const char*>(p.v_biases) + (b * p.st[ST_V_BIASES] + hkv * p.st[ST_V_BIASES + 1]) * SB;
  }

  // What a warp step loads: the codes (FAST steps) and the scales of its tokens.
  template <bool FAST>
  struct Frag {
    u32 kw[FAST ? TL : 1][2][NG][KFW];  // tokens g, g + 8 of each tile
    u32 vw[FAST ? TL : 1][4][NG][VFW];  // tokens 2c, 2c + 1, 2c + 8, 2c + 9
    float ksc[TL][2][NG], kbi[TL][2][NG], vsc[TL][2][NG], vbi[TL][2][NG];  // tokens g, g + 8
  };

  // One warp step: tokens [base, base + TT). FAST: all of them quantized and in the block.
  template <bool FAST>
  __device__ __forceinline__ void step(int base) {
    Frag<FAST> f;
    load<FAST>(f, base);
    compute<FAST>(f, base);
  }

  // ---- loads (every code and scale of the step before any use) ----
  template <bool FAST>
  __device__ __forceinline__ void load(Frag<FAST>& f, int base) const {
    auto& kw = f.kw;
    auto& vw = f.vw;
    auto& ksc = f.ksc;
    auto& kbi = f.kbi;
    auto& vsc = f.vsc;
    auto& vbi = f.vbi;
    // the step's rows, then 32-bit offsets within it (token strides < 2^24, 32 tokens)
    constexpr int SB = SDT == DT_F32 ? 4 : 2;
    const char* ks_s = ks_p + i64(base) * ks_tok * SB;
    const char* kb_s = kb_p + i64(base) * kb_tok * SB;
    const char* vs_s = vs_p + i64(base) * vs_tok * SB;
    const char* vb_s = vb_p + i64(base) * vb_tok * SB;
    const u32* k_s = kbase + i64(base) * kp_tok;
    const u32* v_s = vbase + i64(base) * vp_tok;
#pragma unroll
    for (int tl = 0; tl < TL; ++tl) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int dt = 16 * tl + g + 8 * j;
        const int t = base + dt;
        const bool quant = FAST || (t < t1 && t < N);
        const bool tail = !FAST && t < t1 && t >= N;
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) {
          if (quant) {
            ksc[tl][j][gi] = ld_s<SDT>(ks_s, dt * ks_tok + gi) * p.qscale;
            kbi[tl][j][gi] = ld_s<SDT>(kb_s, dt * kb_tok + gi);
            vsc[tl][j][gi] = ld_s<SDT>(vs_s, dt * vs_tok + gi);
            vbi[tl][j][gi] = ld_s<SDT>(vb_s, dt * vb_tok + gi);
          } else {
            ksc[tl][j][gi] = tail ? p.qscale : 0.f;
            kbi[tl][j][gi] = 0.f;
            vsc[tl][j][gi] = tail ? 1.f : 0.f;
            vbi[tl][j][gi] = 0.f;
          }
          if constexpr (FAST && KSTREAM) {
            // the words covering the slice, clamped to the group (its last lane may need fewer)
            const int sw = (c * SLK) >> 5;
#pragma unroll
            for (int i = 0; i < KLW; ++i) kw[tl][j][gi][i] = ld_w(k_s + (dt * kp_tok + gi * GWK + min(sw + i, GWK - 1)));
          } else if constexpr (FAST) {
            ld_words<KCW, VW>(kw[tl][j][gi], k_s + (dt * kp_tok + (gi * GS + c * (GS / 4)) * KB / 32));
          }
        }
      }
      if constexpr (FAST) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int dt = 16 * tl + 2 * c + (j & 1) + 8 * (j >> 1);
#pragma unroll
          for (int gi = 0; gi < NG; ++gi) {
            const int piece = (gi * GS + g * (GS / 8)) * VB / 16;  // 16-bit units
            if constexpr (VSTREAM) {
              const int sw = (g * SLV) >> 5;
#pragma unroll
              for (int i = 0; i < VLW; ++i) vw[tl][j][gi][i] = ld_w(v_s + (dt * vp_tok + gi * GWV + min(sw + i, GWV - 1)));
            } else if constexpr (VCH == 1) {
              vw[tl][j][gi][0] = ld_h(reinterpret_cast<const u16*>(v_s) + (2 * dt * vp_tok + piece));
            } else {
              ld_words<VCW, VW>(vw[tl][j][gi], v_s + (dt * vp_tok + piece / 2));
            }
          }
        }
      }
    }

  }

  template <bool FAST>
  __device__ __forceinline__ void compute(const Frag<FAST>& f, int base) {
    const auto& kw = f.kw;
    const auto& vw = f.vw;
    const auto& ksc = f.ksc;
    const auto& kbi = f.kbi;
    const auto& vsc = f.vsc;
    const auto& vbi = f.vbi;
    // bit streams: each held slice shifted down to bit 0 (one funnel shift per word)
    u32 ka[KSTREAM && FAST ? TL : 1][2][NG][KAW];
    u32 va[VSTREAM && FAST ? TL : 1][4][NG][VAW];
    if constexpr (FAST && KSTREAM) {
      const u32 off = (c * SLK) & 31;
#pragma unroll
      for (int tl = 0; tl < TL; ++tl)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int gi = 0; gi < NG; ++gi) align_slice(ka[tl][j][gi], kw[tl][j][gi], off);
    }
    if constexpr (FAST && VSTREAM) {
      const u32 off = (g * SLV) & 31;
#pragma unroll
      for (int tl = 0; tl < TL; ++tl)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int gi = 0; gi < NG; ++gi) align_slice(va[tl][j][gi], vw[tl][j][gi], off);
    }
    // ---- scores: S^T (16 tokens x 8 rows) per group, combined with the scales ----
    float s[TL][4];
#pragma unroll
    for (int tl = 0; tl < TL; ++tl) {
      float acc[NG][4];
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        acc[gi][0] = acc[gi][1] = acc[gi][2] = acc[gi][3] = 0.f;
#pragma unroll
        for (int st = 0; st < KS; ++st) {
          if constexpr (FAST && KSTREAM) {
            const u32(&a_0)[KAW] = ka[tl][0][gi];
            const u32(&a_1)[KAW] = ka[tl][1][gi];
            // (kcol(st, h, 1) == kcol(st, h, 0) + 1: consecutive codes of the stream)
            const u32 a0 = pair_at<KB>(a_0, kcol(st, 0, 0)), a1 = pair_at<KB>(a_1, kcol(st, 0, 0));
            const u32 a2 = pair_at<KB>(a_0, kcol(st, 1, 0)), a3 = pair_at<KB>(a_1, kcol(st, 1, 0));
            dmma(acc[gi], a0, a1, a2, a3, qh[gi][st][0], qh[gi][st][1]);
            if constexpr (QSPLIT) dmma(acc[gi], a0, a1, a2, a3, ql[gi][st][0], ql[gi][st][1]);
          } else if constexpr (FAST) {
            const int ws = st / SPW, k0 = 2 * (st % SPW);
            const u32 a0 = codes2<KB>(kw[tl][0][gi][ws], k0), a1 = codes2<KB>(kw[tl][1][gi][ws], k0);
            const u32 a2 = codes2<KB>(kw[tl][0][gi][ws], k0 + 1), a3 = codes2<KB>(kw[tl][1][gi][ws], k0 + 1);
            dmma(acc[gi], a0, a1, a2, a3, qh[gi][st][0], qh[gi][st][1]);
            if constexpr (QSPLIT) dmma(acc[gi], a0, a1, a2, a3, ql[gi][st][0], ql[gi][st][1]);
          } else {
            const int d0 = gi * GS + c * (GS / 4);
            u32 ah[4], al[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // a0: (g, h0), a1: (g + 8, h0), a2: (g, h1), a3: (g + 8, h1)
              const int t = base + 16 * tl + g + 8 * (i & 1);
              const float x0 = value<true>(t, d0 + kcol(st, i >> 1, 0)), x1 = value<true>(t, d0 + kcol(st, i >> 1, 1));
              ah[i] = h2(x0, x1);
              al[i] = h2rest(x0, x1);
            }
            dmma(acc[gi], ah[0], ah[1], ah[2], ah[3], qh[gi][st][0], qh[gi][st][1]);
            dmma(acc[gi], al[0], al[1], al[2], al[3], qh[gi][st][0], qh[gi][st][1]);
            if constexpr (QSPLIT) dmma(acc[gi], ah[0], ah[1], ah[2], ah[3], ql[gi][st][0], ql[gi][st][1]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // (token g + 8 (i >> 1), row 2c + (i & 1))
        const int j = i >> 1, r = i & 1;
        float x = 0.f;
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) x = fmaf(ksc[tl][j][gi], acc[gi][i], fmaf(kbi[tl][j][gi], qs[r][gi], x));
        const int t = base + 16 * tl + g + 8 * j;
        if (!FAST && t >= t1) {
          x = -kInf;  // past the block (and possibly the mask's extent): never read
        } else if (p.mask_kind != MK_NONE) {
          x = apply_mask(x, p, b, hq_r[r], qpos_r[r], t);
        }
        s[tl][i] = x;
      }
    }

    // ---- online softmax: rows 2c, 2c + 1; one max update per step ----
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int tl = 0; tl < TL; ++tl) {
#pragma unroll
      for (int i = 0; i < 4; ++i) mx[i & 1] = fmaxf(mx[i & 1], s[tl][i]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], off));
    }
    // rescale only when some row's maximum grew (rare after the first steps)
    if (__any_sync(0xffffffffu, mx[0] > m[0] || mx[1] > m[1])) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float f = m[r] == -kInf ? 0.f : exp2a(m[r] - mx[r]);
        l[r] *= f;
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) ob[r][gi] *= f;
#pragma unroll
        for (int i = 0; i < NM; ++i) {
          o[i][r] *= f;
          o[i][r + 2] *= f;
        }
      }
    }
    m[0] = mx[0];
    m[1] = mx[1];

    // ---- O^T += V^T P_g^T per group ----
#pragma unroll
    for (int tl = 0; tl < TL; ++tl) {
      float pr[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = i & 1;
        pr[i] = s[tl][i] == -kInf ? 0.f : exp2a(s[tl][i] - m[r]);
        l[r] += pr[i];
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) ob[r][gi] = fmaf(pr[i], vbi[tl][i >> 1][gi], ob[r][gi]);
      }
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        float pv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) pv[i] = pr[i] * vsc[tl][i >> 1][gi];
        const u32 b0 = dtrans(h2(pv[0], pv[1])), b1 = dtrans(h2(pv[2], pv[3]));
        u32 b0l = 0, b1l = 0;
        if constexpr (QSPLIT) {
          b0l = dtrans(h2rest(pv[0], pv[1]));
          b1l = dtrans(h2rest(pv[2], pv[3]));
        }
#pragma unroll
        for (int mt = 0; mt < KS; ++mt) {
          float(&oc)[4] = o[gi * KS + mt];
          if constexpr (FAST && VSTREAM) {
            // rows g, g + 8 of the m-tile: codes 2 mt, 2 mt + 1 of the slice; columns: tokens
            const u32 a0 = code_pair(code_at<VB>(va[tl][0][gi], 2 * mt), code_at<VB>(va[tl][1][gi], 2 * mt));
            const u32 a1 = code_pair(code_at<VB>(va[tl][0][gi], 2 * mt + 1), code_at<VB>(va[tl][1][gi], 2 * mt + 1));
            const u32 a2 = code_pair(code_at<VB>(va[tl][2][gi], 2 * mt), code_at<VB>(va[tl][3][gi], 2 * mt));
            const u32 a3 = code_pair(code_at<VB>(va[tl][2][gi], 2 * mt + 1), code_at<VB>(va[tl][3][gi], 2 * mt + 1));
            dmma(oc, a0, a1, a2, a3, b0, b1);
            if constexpr (QSPLIT) dmma(oc, a0, a1, a2, a3, b0l, b1l);
          } else if constexpr (FAST) {
            const int pc = (2 * mt) / VPP, k = (2 * mt) % VPP;
            const u32 sel = (pc & 1) ? 0x7632u : 0x5410u;
            const u32 x01 = prmt(vw[tl][0][gi][pc / 2], vw[tl][1][gi][pc / 2], sel);
            const u32 x23 = prmt(vw[tl][2][gi][pc / 2], vw[tl][3][gi][pc / 2], sel);
            const u32 a0 = codes2<VB>(x01, k), a1 = codes2<VB>(x01, k + 1);
            const u32 a2 = codes2<VB>(x23, k), a3 = codes2<VB>(x23, k + 1);
            dmma(oc, a0, a1, a2, a3, b0, b1);
            if constexpr (QSPLIT) dmma(oc, a0, a1, a2, a3, b0l, b1l);
          } else {
            const int d = gi * GS + g * (GS / 8) + 2 * mt;
            u32 ah[4], al[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // a0: (d, 2c..), a1: (d + 1, 2c..), a2: (d, 2c + 8..), a3: (d + 1, 2c + 8..)
              const int t = base + 16 * tl + 2 * c + 8 * (i >> 1);
              const float x0 = value<false>(t, d + (i & 1)), x1 = value<false>(t + 1, d + (i & 1));
              ah[i] = h2(x0, x1);
              al[i] = h2rest(x0, x1);
            }
            dmma(oc, ah[0], ah[1], ah[2], ah[3], b0, b1);
            dmma(oc, al[0], al[1], al[2], al[3], b0, b1);
            if constexpr (QSPLIT) dmma(oc, ah[0], ah[1], ah[2], ah[3], b0l, b1l);
          }
        }
      }
    }
  }

  // L2 prefetch of the codes and scales of the warp step starting at token t (one
  // 128-byte line per lane): HBM requests in flight without registers to hold them.
  __device__ __forceinline__ void prefetch(int t, int end) const {
    if (t >= end) return;
    const int n = min(TT, end - t);
    constexpr int SB = SDT == DT_F32 ? 4 : 2;
    const char* a[6] = {reinterpret_cast<const char*>(kbase + i64(t) * kp_tok),
                        reinterpret_cast<const char*>(vbase + i64(t) * vp_tok),
                        ks_p + i64(t) * ks_tok * SB, kb_p + i64(t) * kb_tok * SB,
                        vs_p + i64(t) * vs_tok * SB, vb_p + i64(t) * vb_tok * SB};
    const int len[6] = {n * kp_tok * 4, n * vp_tok * 4, n * ks_tok * SB, n * kb_tok * SB, n * vs_tok * SB,
                        n * vb_tok * SB};
    int i = lane;
#pragma unroll
    for (int k = 0; k < 6; ++k) {
      const u64 start = reinterpret_cast<u64>(a[k]) & ~u64(127);
      const int lines = int((reinterpret_cast<u64>(a[k]) + len[k] - 1 - start) / 128) + 1;
      for (; i < lines; i += 32) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"(start + u64(i) * 128));
      }
      i -= lines;
    }
  }

  __device__ __forceinline__ void run() {
    __shared__ float sm_o[NW][NR][D];
    __shared__ float sm_m[NW][NR];
    __shared__ float sm_l[NW][NR];
    init();
    const int fast_end = min(t1, N);
    int base = t0 + warp * TT;
    if constexpr (PIPE) {
      // software pipeline: the next step's loads are in flight while this one computes
      if (base + TT <= fast_end) {
        Frag<true> cur;
        load<true>(cur, base);
        for (;;) {
          const int nb = base + NW * TT;
          const bool more = nb + TT <= fast_end;
          if constexpr (PF > 0) prefetch(base + PF * NW * TT, fast_end);
          Frag<true> nxt;
          if (more) load<true>(nxt, nb);
          compute<true>(cur, base);
          base = nb;
          if (!more) break;
          cur = nxt;
        }
      }
    }
    for (; base < t1; base += NW * TT) {
      if constexpr (PF > 0) prefetch(base + PF * NW * TT, fast_end);
      if (base + TT <= fast_end) {
        step<true>(base);
      } else {
        step<false>(base);
      }
    }
    // The warp's partial: reduce l and the bias sums over the 8 token lanes (g).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], off);
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) ob[r][gi] += __shfl_xor_sync(0xffffffffu, ob[r][gi], off);
      }
    }
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
#pragma unroll
      for (int mt = 0; mt < KS; ++mt) {
        const int d = gi * GS + g * (GS / 8) + 2 * mt;
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // (d + (i >> 1), row 2c + (i & 1))
          const int r = i & 1;
          sm_o[warp][2 * c + r][d + (i >> 1)] = o[gi * KS + mt][i] + ob[r][gi];
        }
      }
    }
    if (g == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        sm_m[warp][2 * c + r] = m[r];
        sm_l[warp][2 * c + r] = l[r];
      }
    }
    __syncthreads();
    const int R = p.R, G = p.G;
    for (int i = threadIdx.x; i < NR * D; i += NW * 32) {
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
};

template <int D, int KB, int VB, int GS, int VW, int SDT, bool QSPLIT, bool PARTIAL, int TL, int PF, bool PIPE>
__device__ __forceinline__ void decode_impl(const TqParams& p) {
  Decoder<D, KB, VB, GS, VW, SDT, QSPLIT, PARTIAL, TL, PF, PIPE> dec(p);
  dec.run();
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
