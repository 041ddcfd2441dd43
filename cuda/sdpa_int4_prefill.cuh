// Prefill attention (many query rows per KV head) on an int4/int8 affine-quantized KV
// cache, CUDA, on tensor cores (mma.sync.m16n8k16, float32 accumulators): the
// FlashAttention-2 loop with the cache dequantized tile by tile into shared memory.
//
//   grid     (B * H_kv, row_tiles) CTAs of 4 warps; a CTA holds BQ = 64 of the G * L
//            query rows of one KV head (row r = position r / G of head hkv * G + r % G),
//            16 per warp, so each K/V tile it dequantizes serves 64 rows (all query
//            heads of the group at 64 / G positions). Heaviest (last) row tiles first.
//   keys     tiles of BK keys: the CTA dequantizes K into Ks[key][d] and V into
//            Vt[d][key] (float16) once, then every warp computes its 16 x BK
//            scores, the online softmax, and 16 x D outputs from them.
//   causal   bottom-right aligned: key tiles past the last row's diagonal are never
//            loaded, tiles wholly below the first row's diagonal skip the mask.
//            (When some row of the tile sees no key at all, MLX's semantics give it the
//            average of every V, so such tiles run over all keys, masked.)
//   MT       operand type of the mma: 0 float16 (float16 and bfloat16 q: a bfloat16 q
//            is exact in float16, and float16's 11-bit K, V and P keep the rows within
//            the op's bounds, which bfloat16 operands did not), 1 bfloat16 (kept, not
//            planned), 2 float32 q: every operand split into float16 hi + lo and three
//            products summed (hi*hi + hi*lo + lo*hi), about 21 bits of each operand.
//            q enters unscaled; the scale multiplies the float32 scores.
#pragma once

namespace tqc {

constexpr int kPrefillRows = 64;  // BQ
constexpr int kPrefillWarps = 4;

template <int D>
struct PrefillShape {
  static constexpr int BQ = kPrefillRows;
  static constexpr int BK = D > 128 ? 32 : 64;
  static constexpr int QS = D + 8;  // Qs / Ks row stride (halves): conflict-free fragment loads
  static constexpr int VS = BK + 8;  // Vt row stride (halves)
};

template <int MT>
__device__ __forceinline__ u16 to_op(float x) {
  if constexpr (MT == 1) return f32_to_bf16(x);
  return f32_to_f16(x);
}
template <int MT>
__device__ __forceinline__ float from_op(u16 h) {
  if constexpr (MT == 1) return bf16_to_f32(h);
  return f16_to_f32(h);
}

// Two floats as one mma operand register: `lo` (the lower column/row index) in bits 0-15.
template <int MT>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
  if constexpr (MT == 1) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}
// float16 remainders of two floats after their float16 rounding (the split's lo part).
__device__ __forceinline__ u32 pack2_rest(float lo, float hi) {
  const float lo_r = lo - f16_to_f32(f32_to_f16(lo));
  const float hi_r = hi - f16_to_f32(f32_to_f16(hi));
  return pack2<0>(lo_r, hi_r);
}

template <int MT>
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
  if constexpr (MT == 1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ u32 lds32(const u16* p) {
  return *reinterpret_cast<const u32*>(p);
}

// Column order of a tile row in shared memory. PBITS 0: the head dim's order. PBITS 4 or
// 8 (the fast prefill with float16 scales): within each packed word's 32 / PBITS
// elements, pairs (j, j + 16 / PBITS) side by side -- the two codes one AND takes from
// the word's two 16-bit halves -- so column 2k holds element k and column 2k + 1
// element k + 16 / PBITS. q's columns (K's order) and the output's (V's order) follow.
template <int PBITS>
__device__ __forceinline__ int col_of_elem(int e) {
  if constexpr (PBITS == 0) {
    return e;
  } else {
    constexpr int PER = 32 / PBITS, HP = PER / 2;
    const int j = e % PER;
    return e - j + (j < HP ? 2 * j : 2 * (j - HP) + 1);
  }
}
template <int PBITS>
__device__ __forceinline__ int elem_of_col(int c) {
  if constexpr (PBITS == 0) {
    return c;
  } else {
    constexpr int PER = 32 / PBITS, HP = PER / 2;
    const int pos = c % PER;
    return c - pos + (pos >> 1) + HP * (pos & 1);
  }
}

// Dequantizes keys [kt, kt + BK) of one cache (K or V) into shared memory: K as
// dst[key * QS + d], V transposed as dst[d * VS + key]; `lo` receives the float16
// remainders when SPLIT. Keys past N come from the tail, keys past N + T are zero.
// A thread takes one unit of a key's row at a time: one word (4 and 8 bits) or, for
// the bit-stream widths (2, 3, 5, 6: codes may straddle words), 32 codes = BITS words,
// which groups of 32 or more keep inside one group.
template <int MT, int D, int BITS, int GS, bool TRANSPOSED, int NTHR = kPrefillWarps * 32, int PBITS = 0,
          bool SPLIT = (MT == 2)>
__device__ __forceinline__ void dequant_tile(
    u16* hi, u16* lo, const TqParams& p, const u32* packed, const void* scales, const void* biases,
    const void* tail, int st_packed, int st_scales, int st_biases, int st_tail, int b, int hkv, int kt) {
  using S = PrefillShape<D>;
  constexpr bool WHOLE = BITS == 4 || BITS == 8;
  constexpr int PER = WHOLE ? 32 / BITS : 32;  // elements per unit
  constexpr int WPU = PER * BITS / 32;  // words per unit
  constexpr int UPR = D / PER;  // units per key
  static_assert(WHOLE || GS % 32 == 0, "bit-stream widths need groups of 32 or more");
  const int N = p.N, NT = p.N + p.T;
  for (int i = threadIdx.x; i < S::BK * UPR; i += NTHR) {
    const int key = i / UPR, ui = i % UPR;
    const int t = kt + key;
    const int e0 = ui * PER;
    float v[PER];
    if (t < N) {
      const u32* row = packed + (b * p.st[st_packed] + hkv * p.st[st_packed + 1] + i64(t) * p.st[st_packed + 2]);
      u32 w[WPU];
#pragma unroll
      for (int k = 0; k < WPU; ++k) w[k] = row[ui * WPU + k];
      const int g = e0 / GS;
      const float sc = load_f(scales, b * p.st[st_scales] + hkv * p.st[st_scales + 1] + i64(t) * p.st[st_scales + 2] + g, p.scale_dtype);
      const float bi = load_f(biases, b * p.st[st_biases] + hkv * p.st[st_biases + 1] + i64(t) * p.st[st_biases + 2] + g, p.scale_dtype);
#pragma unroll
      for (int j = 0; j < PER; ++j) {
        const int bit = j * BITS, wi = bit >> 5, sh = bit & 31;  // compile-time once unrolled
        u32 x = w[wi] >> sh;
        if (sh + BITS > 32) x |= w[wi + 1 < WPU ? wi + 1 : wi] << (32 - sh);  // straddles two words
        v[j] = fmaf(sc, float(x & ((1u << BITS) - 1u)), bi);
      }
    } else if (t < NT) {
      const i64 o = b * p.st[st_tail] + hkv * p.st[st_tail + 1] + i64(t - N) * p.st[st_tail + 2] + e0;
#pragma unroll
      for (int j = 0; j < PER; ++j) v[j] = load_f(tail, o + j, p.tail_dtype);
    } else {
#pragma unroll
      for (int j = 0; j < PER; ++j) v[j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int at = TRANSPOSED ? (e0 + j) * S::VS + key : key * S::QS + col_of_elem<PBITS>(e0 + j);
      const u16 h = to_op<MT>(v[j]);
      hi[at] = h;
      if constexpr (SPLIT) lo[at] = f32_to_f16(v[j] - from_op<MT>(h));
    }
  }
}

// This lane's two query rows (g and g + 8 of the 16 rows from `r_base`): query head,
// position, and whether the row exists (rows past R are computed from row R - 1 and
// never stored).
__device__ __forceinline__ void prefill_rows(int r_base, int hkv, const TqParams& p, int (&hq2)[2], int (&qpos2)[2],
                                             bool (&live2)[2]) {
  const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = r_base + g + 8 * h;
    live2[h] = row < p.R;
    const int rr = min(row, p.R - 1);
    hq2[h] = hkv * p.G + rr % p.G;
    qpos2[h] = rr / p.G;
  }
}

// One key tile's softmax step for a warp's 16 x 8 NT8 raw scores `s` (keys from kt):
// mask (keys past N + T and the op's mask, when `need_mask`), update the running max
// and sum in the log2 domain, rescale the output accumulators (only when some row's
// maximum grew), and return the probabilities as the A operand of P V (MT 2: float16
// hi + lo). Unmasked tiles with a positive scale keep the raw scores and fold the scale
// into the exponent (2^(s * scale - max), one fma); masked tiles are scaled first, as the
// masks add in the log2 domain.
template <int MT, int NT8, int DT8, bool need_mask>
__device__ __forceinline__ void prefill_softmax_t(float (&s)[NT8][4], float (&o)[DT8][4], float (&m2)[2], float (&l2)[2],
                                                  u32 (&pa)[MT == 2 ? 2 : 1][NT8 / 2][4], const TqParams& p, int kt,
                                                  int b, const int (&hq2)[2], const int (&qpos2)[2]) {
  constexpr int NSPLIT = MT == 2 ? 2 : 1;
  const int tq = threadIdx.x & 3;
  const int NT = p.N + p.T;
  float mul = p.qscale;
  if (need_mask || !(mul > 0.f)) {  // (constant per kernel launch)
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) s[j][c] *= mul;
    }
    mul = 1.f;
  }
  if constexpr (need_mask) {
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int h = c >> 1;
        const int t = kt + j * 8 + 2 * tq + (c & 1);
        s[j][c] = t >= NT ? -kInf : apply_mask(s[j][c], p, b, hq2[h], qpos2[h], t);
      }
    }
  }
  float f[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -kInf;
#pragma unroll
    for (int j = 0; j < NT8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn = fmaxf(m2[h], mx * mul);  // mul > 0: the max of the scaled scores
    f[h] = m2[h] == mn ? 1.f : exp2a(m2[h] - mn);
    m2[h] = mn;
    float rs = 0.f;
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float x = s[j][2 * h + c];
        float pr = exp2a(fmaf(x, mul, -mn));
        if constexpr (need_mask) pr = x == -kInf ? 0.f : pr;  // (unmasked tiles: finite scores)
        s[j][2 * h + c] = pr;
        rs += pr;
      }
    }
    l2[h] = l2[h] * f[h] + rs;
  }
  if (__any_sync(0xffffffffu, f[0] != 1.f || f[1] != 1.f)) {
#pragma unroll
    for (int j = 0; j < DT8; ++j) {
      o[j][0] *= f[0];
      o[j][1] *= f[0];
      o[j][2] *= f[1];
      o[j][3] *= f[1];
    }
  }
#pragma unroll
  for (int kk = 0; kk < NT8 / 2; ++kk) {
    // A fragment of keys [16 kk, 16 kk + 16): score tiles 2 kk (cols 0-7) and 2 kk + 1.
    pa[0][kk][0] = pack2<MT>(s[2 * kk][0], s[2 * kk][1]);
    pa[0][kk][1] = pack2<MT>(s[2 * kk][2], s[2 * kk][3]);
    pa[0][kk][2] = pack2<MT>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[0][kk][3] = pack2<MT>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    if constexpr (MT == 2) {
      pa[NSPLIT - 1][kk][0] = pack2_rest(s[2 * kk][0], s[2 * kk][1]);
      pa[NSPLIT - 1][kk][1] = pack2_rest(s[2 * kk][2], s[2 * kk][3]);
      pa[NSPLIT - 1][kk][2] = pack2_rest(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[NSPLIT - 1][kk][3] = pack2_rest(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
  }
}

// prefill_softmax_t with the masked and unmasked tiles as separate code.
template <int MT, int NT8, int DT8>
__device__ __forceinline__ void prefill_softmax(float (&s)[NT8][4], float (&o)[DT8][4], float (&m2)[2], float (&l2)[2],
                                                u32 (&pa)[MT == 2 ? 2 : 1][NT8 / 2][4], const TqParams& p, bool need_mask,
                                                int kt, int b, const int (&hq2)[2], const int (&qpos2)[2]) {
  if (need_mask) {
    prefill_softmax_t<MT, NT8, DT8, true>(s, o, m2, l2, pa, p, kt, b, hq2, qpos2);
  } else {
    prefill_softmax_t<MT, NT8, DT8, false>(s, o, m2, l2, pa, p, kt, b, hq2, qpos2);
  }
}

// Normalizes a warp's 16 x D outputs (sinks join here) and writes this lane's elements
// (accumulator column c is element elem_of_col<PBITS>(c) of the head dim).
template <int DT8, int PBITS = 0>
__device__ __forceinline__ void prefill_store(const float (&o)[DT8][4], const float (&m2)[2], const float (&l2)[2],
                                              const TqParams& p, int b, const int (&hq2)[2], const int (&qpos2)[2],
                                              const bool (&live2)[2]) {
  constexpr int D = DT8 * 8;
  const int tq = threadIdx.x & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float lsum = l2[h];
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
    if (!live2[h]) continue;
    const i64 ob = ((i64(b) * p.Hq + hq2[h]) * p.L + qpos2[h]) * D;
#pragma unroll
    for (int j = 0; j < DT8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int d = elem_of_col<PBITS>(j * 8 + 2 * tq + c);
        store_f(p.out, ob + d, p.q_dtype, finish_row(o[j][2 * h + c], m2[h], lsum, p, hq2[h]));
      }
    }
  }
}

// KSPLIT (with MT 0): K enters as float16 hi + lo (two mma per score fragment), so
// that a row whose softmax one key dominates does not see K's float16 rounding (the
// op's float16 bound is a row NMSE of 1e-6). ACC2: each key tile's P V goes into a
// fresh accumulator added to the output in float32 afterwards: the mma's float32
// accumulation is not round-to-nearest, and over thousands of chained mma its bias
// exceeded the float32 bound (1e-9).
template <int MT, int D, int KB, int VB, int GS, bool KSPLIT = false>
__device__ __forceinline__ void prefill_impl(const TqParams& p) {
  using S = PrefillShape<D>;
  constexpr int BQ = S::BQ, BK = S::BK, QS = S::QS, VS = S::VS;
  constexpr int NSPLIT = MT == 2 ? 2 : 1;
  constexpr int NKS = (MT == 2 || KSPLIT) ? 2 : 1;  // K planes (hi, lo)
  constexpr bool ACC2 = MT == 2 && D <= 128;  // (registers: a second D / 2 per lane)
  constexpr int NT8 = BK / 8;  // score n-tiles
  constexpr int DT8 = D / 8;  // output n-tiles
  extern __shared__ __align__(16) unsigned char smem_raw[];
  u16* Qs = reinterpret_cast<u16*>(smem_raw);  // [NSPLIT][BQ][QS]
  u16* Ks = Qs + NSPLIT * BQ * QS;  // [NKS][BK][QS]
  u16* Vt = Ks + NKS * BK * QS;  // [NSPLIT][D][VS]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int Hkv = p.Hkv, G = p.G, R = p.R, L = p.L, NT = p.N + p.T;
  const int b = blockIdx.x / Hkv, hkv = blockIdx.x % Hkv;
  const int tile = gridDim.y - 1 - blockIdx.y;  // heaviest first under a causal mask
  const int r0 = tile * BQ;
  const int r_last = min(r0 + BQ, R) - 1;

  // Q tile as given (exact in the mma's type for float16/bfloat16 q); the scores are
  // scaled by scale * log2(e) in float32, after the mma.
  for (int i = threadIdx.x; i < BQ * D; i += kPrefillWarps * 32) {
    const int r = i / D, d = i % D;
    const int row = r0 + r;
    float x = 0.f;
    if (row < R) {
      const int hq = hkv * G + row % G, qpos = row / G;
      x = load_f(p.q, b * p.st[ST_Q] + hq * p.st[ST_Q + 1] + i64(qpos) * p.st[ST_Q + 2] + d, p.q_dtype);
    }
    const u16 h = to_op<MT>(x);
    Qs[r * QS + d] = h;
    if constexpr (MT == 2) Qs[BQ * QS + r * QS + d] = f32_to_f16(x - f16_to_f32(h));
  }

  // Key range: causal skips tiles past the last row's diagonal, unless some row of
  // this tile sees no key (then every key counts, masked).
  const bool causal = p.mask_kind == MK_CAUSAL;
  const bool array_mask = p.mask_kind == MK_BOOL || p.mask_kind == MK_ADDITIVE;
  const int diag_first = r0 / G + NT - L;  // last key the first row sees
  const int diag_last = r_last / G + NT - L;
  int kend = NT;
  if (causal && diag_first >= 0) kend = min(NT, diag_last + 1);

  int hq2[2], qpos2[2];
  bool live2[2];
  prefill_rows(r0 + warp * 16, hkv, p, hq2, qpos2, live2);

  float o[DT8][4];
#pragma unroll
  for (int j = 0; j < DT8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m2[2] = {-kInf, -kInf}, l2[2] = {0.f, 0.f};

  const u16* Qw = Qs + warp * 16 * QS;
  for (int kt = 0; kt < kend; kt += BK) {
    __syncthreads();  // the previous tile's Ks/Vt are consumed
    dequant_tile<MT, D, KB, GS, false, kPrefillWarps * 32, 0, NKS == 2>(Ks, Ks + BK * QS, p, p.k_packed, p.k_scales,
                                       p.k_biases, p.k_tail, ST_K_PACKED, ST_K_SCALES, ST_K_BIASES, ST_K_TAIL, b, hkv, kt);
    dequant_tile<MT, D, VB, GS, true>(Vt, Vt + D * VS, p, p.v_packed, p.v_scales, p.v_biases, p.v_tail,
                                      ST_V_PACKED, ST_V_SCALES, ST_V_BIASES, ST_V_TAIL, b, hkv, kt);
    __syncthreads();

    // S = Q K^T (16 x BK per warp), log2 domain.
    float s[NT8][4];
#pragma unroll
    for (int j = 0; j < NT8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 a[NSPLIT][4];
#pragma unroll
      for (int sp = 0; sp < NSPLIT; ++sp) {
        const u16* q = Qw + sp * BQ * QS + kk * 16 + 2 * tq;
        a[sp][0] = lds32(q + g * QS);
        a[sp][1] = lds32(q + (g + 8) * QS);
        a[sp][2] = lds32(q + g * QS + 8);
        a[sp][3] = lds32(q + (g + 8) * QS + 8);
      }
#pragma unroll
      for (int j = 0; j < NT8; ++j) {
        u32 bf[NKS][2];
#pragma unroll
        for (int sp = 0; sp < NKS; ++sp) {
          const u16* k = Ks + sp * BK * QS + (j * 8 + g) * QS + kk * 16 + 2 * tq;
          bf[sp][0] = lds32(k);
          bf[sp][1] = lds32(k + 8);
        }
        mma16816<MT>(s[j], a[0], bf[0]);
        if constexpr (NKS == 2) mma16816<MT>(s[j], a[0], bf[NKS - 1]);
        if constexpr (MT == 2) mma16816<MT>(s[j], a[NSPLIT - 1], bf[0]);
      }
    }

    // Masks and padding, online softmax; the probabilities become the A operand of P V.
    const bool need_mask = array_mask || (causal && (kt + BK - 1 > diag_first)) || kt + BK > NT;
    u32 pa[NSPLIT][NT8 / 2][4];
    prefill_softmax<MT, NT8, DT8>(s, o, m2, l2, pa, p, need_mask, kt, b, hq2, qpos2);

    // O += P V.
    float ot[ACC2 ? DT8 : 1][4];
    if constexpr (ACC2) {
#pragma unroll
      for (int j = 0; j < DT8; ++j) ot[j][0] = ot[j][1] = ot[j][2] = ot[j][3] = 0.f;
    }
    float(*oa)[4] = ACC2 ? ot : o;  // (a compile-time choice)
#pragma unroll
    for (int kk = 0; kk < NT8 / 2; ++kk) {
#pragma unroll
      for (int j = 0; j < DT8; ++j) {
        u32 bf[NSPLIT][2];
#pragma unroll
        for (int sp = 0; sp < NSPLIT; ++sp) {
          const u16* v = Vt + sp * D * VS + (j * 8 + g) * VS + kk * 16 + 2 * tq;
          bf[sp][0] = lds32(v);
          bf[sp][1] = lds32(v + 8);
        }
        mma16816<MT>(oa[j], pa[0][kk], bf[0]);
        if constexpr (MT == 2) {
          mma16816<MT>(oa[j], pa[0][kk], bf[1]);
          mma16816<MT>(oa[j], pa[1][kk], bf[0]);
        }
      }
    }
    if constexpr (ACC2) {
#pragma unroll
      for (int j = 0; j < DT8; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) o[j][c] += ot[j][c];
      }
    }
  }

  prefill_store<DT8>(o, m2, l2, p, b, hq2, qpos2, live2);
}

// Dynamic shared memory of one prefill CTA (bytes); the host plan computes the same.
template <int MT, int D, bool KSPLIT = false>
constexpr int prefill_smem_bytes() {
  using S = PrefillShape<D>;
  constexpr int n = MT == 2 ? 2 : 1, nk = (MT == 2 || KSPLIT) ? 2 : 1;
  return (n * S::BQ * S::QS + nk * S::BK * S::QS + n * D * S::VS) * 2;
}

// ---------------------------------------------------------------------------------------
// Fast path (float16/bfloat16 q, D 64 or 128, every 16-byte piece of a token's packed
// codes inside one quantization group, packed rows that allow 16-byte loads):
//
//   grid     (B * H_kv, row_tiles) CTAs of W warps, W * 16 query rows of one KV head.
//   keys     tiles of 64 keys, two stages in shared memory: K's exact codes as
//            Ks[key][d], K's scales and biases per key and group (float32, FastScales)
//            and V dequantized as Vs[key][d] (float16, row stride D + 8 halves:
//            conflict-free ldmatrix). While the warps multiply tile i, the packed words
//            and scales of tile i + 1 are already in flight (16-byte loads into
//            registers, issued before the tile's mma); after the mma each thread writes
//            its pieces into the other stage. One barrier per tile.
//   mma      q's fragments stay in registers for the whole loop; K fragments by
//            ldmatrix.x4, V fragments by ldmatrix.x4.trans (no transposed stores).
//            Q K^T per group into a fresh accumulator, then score += scale * it +
//            bias * (q's group sum) in float32: K is never rounded (a float16 K moved
//            rows that one key dominates past the op's float16 bound).
//   rest     tiles with keys past N (the tail, the end) are filled by element loops;
//            masks, softmax and the epilogue are the generic kernel's.
// ---------------------------------------------------------------------------------------

template <int D>
struct PrefillFastShape {
  static constexpr int BK = 64;
  static constexpr int KS = D + 8;  // row stride (halves) of Ks and Vs
  static constexpr int TILE = BK * KS;  // halves of one K or V stage
};

__device__ __forceinline__ u32 smem_u32(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void sts_v4(u16* p, u32 a, u32 b, u32 c, u32 d) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(smem_u32(p)), "r"(a), "r"(b), "r"(c), "r"(d)
               : "memory");
}
__device__ __forceinline__ void ldg_v4(u32 (&w)[4], const u32* p) {
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}

__device__ __forceinline__ u32 ldg_u16(const void* p) {
  u16 h;
  asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(h) : "l"(p));
  return u32(h);
}

// The 16-byte pieces of one cache's (K's or V's) key tile that a thread loads: piece c
// (thread + i * NTHR) is key c % BK, piece c / BK of the key's row (consecutive threads
// take consecutive keys, so their shared-memory rows are conflict-free).
//   CODES (K): the tile keeps the exact codes as float16 (0x6400 | code, minus 1024), in
//     the permuted column order of col_of_elem<BITS>, and the piece that starts a group
//     writes the key's scale and bias (float32) to the tile's scale block (FastScales);
//     the scores apply them in float32, so K is never rounded.
//   else (V), H16 (float16 scales and biases): one fma.f16x2 gives scale * code + bias
//     rounded once, in the permuted column order; else float32 fma, one rounding, the
//     head dim's order.
// K's scales and biases of one key tile, float32, as the score fragments read them:
// block [group][key pair] of float4 (scale of key 2k, scale of key 2k + 1, bias of 2k,
// bias of 2k + 1), so a lane's two keys of an 8-key n-tile are one 16-byte load.
template <int D, int GS>
struct FastScales {
  static constexpr int NG = D / GS;  // groups per key
  static constexpr int FLOATS = NG * PrefillFastShape<D>::BK * 2;  // one stage
  __device__ static __forceinline__ void put(float* blk, int key, int grp, float sc, float bi) {
    float* q = blk + (grp * (PrefillFastShape<D>::BK / 2) + key / 2) * 4 + (key & 1);
    q[0] = sc;
    q[2] = bi;
  }
};

template <int D, int BITS, int GS, int NTHR, bool H16, bool CODES = false>
struct FastPieces {
  static constexpr int BK = PrefillFastShape<D>::BK;
  static constexpr int EPP = 128 / BITS;  // elements per piece
  static constexpr int PPK = D / EPP;  // pieces per key
  static constexpr int NP = BK * PPK;  // pieces per tile
  static constexpr int PER = (NP + NTHR - 1) / NTHR;  // per thread
  static_assert(GS % EPP == 0, "a piece must lie inside one quantization group");
  u32 w[PER][4];
  u32 sc[PER], bi[PER];  // H16: float16 bits; else float32 bits
  const u32* wp[PER];  // this thread's pieces at key tile 0 (token c % BK)
  i64 si[PER], bj[PER];  // their scale and bias indices at key tile 0
  i64 st_w, st_s, st_b;  // token strides

  __device__ __forceinline__ void init(const TqParams& p, const u32* packed, int st_packed, int st_scales,
                                       int st_biases, int b, int hkv) {
    st_w = p.st[st_packed + 2];
    st_s = p.st[st_scales + 2];
    st_b = p.st[st_biases + 2];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int c = threadIdx.x + i * NTHR;
      const int t = c % BK, pc = c / BK, grp = pc * EPP / GS;
      wp[i] = packed + b * p.st[st_packed] + hkv * p.st[st_packed + 1] + i64(t) * st_w + pc * 4;
      si[i] = b * p.st[st_scales] + hkv * p.st[st_scales + 1] + i64(t) * st_s + grp;
      bj[i] = b * p.st[st_biases] + hkv * p.st[st_biases + 1] + i64(t) * st_b + grp;
    }
  }

  // CODES: only the piece that starts a group needs the group's scale and bias.
  __device__ static __forceinline__ bool wants_scale(int c) {
    return !CODES || (c / BK) * EPP % GS == 0;
  }

  // Issues the loads of key tile kt (keys kt .. kt + BK - 1, all below N).
  __device__ __forceinline__ void load(const TqParams& p, const void* scales, const void* biases, int kt) {
    const i64 ow = i64(kt) * st_w, os = i64(kt) * st_s, ob = i64(kt) * st_b;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int c = threadIdx.x + i * NTHR;
      if (NP % NTHR != 0 && c >= NP) break;
      ldg_v4(w[i], wp[i] + ow);
      if (!wants_scale(c)) continue;
      if constexpr (H16) {
        sc[i] = ldg_u16(static_cast<const u16*>(scales) + si[i] + os);
        bi[i] = ldg_u16(static_cast<const u16*>(biases) + bj[i] + ob);
      } else {
        sc[i] = __float_as_uint(load_f(scales, si[i] + os, p.scale_dtype));
        bi[i] = __float_as_uint(load_f(biases, bj[i] + ob, p.scale_dtype));
      }
    }
  }

  // Writes the loaded tile to dst ([key][KS] halves); CODES: its scales to `sblk`.
  __device__ __forceinline__ void store(u16* dst, float* sblk = nullptr) const {
    constexpr int HP = 16 / BITS;  // codes per 16-bit half of a word
    constexpr int KS = PrefillFastShape<D>::KS;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int c = threadIdx.x + i * NTHR;
      if (NP % NTHR != 0 && c >= NP) break;
      u32 h[EPP / 2];  // float16 pairs, shared-memory column order
      if constexpr (CODES || H16) {
        constexpr u32 M2 = ((1u << BITS) - 1u) * 0x00010001u;
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
#pragma unroll
          for (int k = 0; k < HP; ++k) {
            const u32 y = ((w[i][wi] >> (BITS * k)) & M2) | 0x64006400u;  // 1024 + code, two halves
            u32 code;
            asm("sub.f16x2 %0, %1, %2;" : "=r"(code) : "r"(y), "r"(0x64006400u));
            if constexpr (!CODES) {  // (CODES: sc/bi hold only a group's first piece's scales)
              const u32 s2 = sc[i] | (sc[i] << 16), b2 = bi[i] | (bi[i] << 16);
              asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(code) : "r"(code), "r"(s2), "r"(b2));
            }
            h[wi * HP + k] = code;  // columns 2k, 2k + 1 of word wi: elements k, k + HP
          }
        }
        if constexpr (CODES) {
          if (wants_scale(c)) {
            const float scf = H16 ? f16_to_f32(u16(sc[i])) : __uint_as_float(sc[i]);
            const float bif = H16 ? f16_to_f32(u16(bi[i])) : __uint_as_float(bi[i]);
            FastScales<D, GS>::put(sblk, c % BK, (c / BK) * EPP / GS, scf, bif);
          }
        }
      } else {
        const float scf = __uint_as_float(sc[i]), bif = __uint_as_float(bi[i]);
        float scp[HP];
#pragma unroll
        for (int k = 0; k < HP; ++k) scp[k] = scf * code_inv<BITS>(k);
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
          const u32 halves[2] = {w[i][wi] & 0xFFFFu, w[i][wi] >> 16};
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
            for (int k = 0; k < HP; k += 2) {
              const float v0 = fmaf(scp[k], shifted_code<BITS>(halves[hh], k), bif);
              const float v1 = fmaf(scp[k + 1], shifted_code<BITS>(halves[hh], k + 1), bif);
              h[(wi * 2 * HP + hh * HP + k) / 2] = pack2<0>(v0, v1);
            }
          }
        }
      }
      u16* row = dst + (c % BK) * KS + (c / BK) * EPP;
#pragma unroll
      for (int s = 0; s < EPP / 8; ++s) sts_v4(row + 8 * s, h[4 * s], h[4 * s + 1], h[4 * s + 2], h[4 * s + 3]);
    }
  }
};

// A K tile that the 16-byte pieces cannot fill (it reaches past N): codes and scales as
// FastPieces<CODES> writes them for keys below N; the unquantized tail's values (float16)
// with scale 1, bias 0 for keys in [N, N + T); zeros past N + T (masked).
template <int D, int BITS, int GS, int NTHR>
__device__ __forceinline__ void fill_codes_tile(u16* dst, float* sblk, const TqParams& p, int b, int hkv, int kt) {
  constexpr int BK = PrefillFastShape<D>::BK, KS = PrefillFastShape<D>::KS;
  constexpr int PER = 32 / BITS, UPR = D / PER;  // one word per unit
  const int N = p.N, NT = p.N + p.T;
  for (int i = threadIdx.x; i < BK * UPR; i += NTHR) {
    const int key = i / UPR, e0 = (i % UPR) * PER, t = kt + key;
    float v[PER];
    float sc = 1.f, bi = 0.f;
    if (t < N) {
      const u32 w = p.k_packed[b * p.st[ST_K_PACKED] + hkv * p.st[ST_K_PACKED + 1] + i64(t) * p.st[ST_K_PACKED + 2] + i % UPR];
#pragma unroll
      for (int j = 0; j < PER; ++j) v[j] = float((w >> (j * BITS)) & ((1u << BITS) - 1u));
      if (e0 % GS == 0) {
        sc = load_f(p.k_scales, b * p.st[ST_K_SCALES] + hkv * p.st[ST_K_SCALES + 1] + i64(t) * p.st[ST_K_SCALES + 2] + e0 / GS, p.scale_dtype);
        bi = load_f(p.k_biases, b * p.st[ST_K_BIASES] + hkv * p.st[ST_K_BIASES + 1] + i64(t) * p.st[ST_K_BIASES + 2] + e0 / GS, p.scale_dtype);
      }
    } else if (t < NT) {
      const i64 o = b * p.st[ST_K_TAIL] + hkv * p.st[ST_K_TAIL + 1] + i64(t - N) * p.st[ST_K_TAIL + 2] + e0;
#pragma unroll
      for (int j = 0; j < PER; ++j) v[j] = load_f(p.k_tail, o + j, p.tail_dtype);
    } else {
#pragma unroll
      for (int j = 0; j < PER; ++j) v[j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < PER; ++j) dst[key * KS + col_of_elem<BITS>(e0 + j)] = f32_to_f16(v[j]);
    if (e0 % GS == 0) FastScales<D, GS>::put(sblk, key, e0 / GS, sc, bi);
  }
}

template <int D, int KB, int VB, int GS, int W, bool H16>
__device__ __forceinline__ void prefill_fast_impl(const TqParams& p) {
  using S = PrefillFastShape<D>;
  constexpr int BQ = 16 * W, BK = S::BK, KS = S::KS, TILE = S::TILE, NTHR = 32 * W;
  constexpr int NT8 = BK / 8, DT8 = D / 8, DK16 = D / 16;
  constexpr int PK = KB, PV = H16 ? VB : 0;  // column orders of K (codes) and V tiles
  using SC = FastScales<D, GS>;
  constexpr int NG = SC::NG, KPG = GS / 16;  // groups per key, 16-wide mma steps per group
  extern __shared__ __align__(16) unsigned char smem_raw[];
  u16* sm = reinterpret_cast<u16*>(smem_raw);  // [stage][K, V][BK][KS], then [stage][SC]
  float* scales_sm = reinterpret_cast<float*>(sm + 4 * TILE);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tq = lane & 3;
  const int Hkv = p.Hkv, G = p.G, R = p.R, L = p.L, N = p.N, NT = p.N + p.T;
  const int b = blockIdx.x / Hkv, hkv = blockIdx.x % Hkv;
  const int tile = gridDim.y - 1 - blockIdx.y;  // heaviest first under a causal mask
  const int r0 = tile * BQ;
  const int r_last = min(r0 + BQ, R) - 1;

  int hq2[2], qpos2[2];
  bool live2[2];
  prefill_rows(r0 + warp * 16, hkv, p, hq2, qpos2, live2);

  // q's A fragments for the whole loop: a0 (row g, d 2tq..), a1 (row g + 8), a2/a3 (d + 8).
  u32 qa[DK16][4];
  {
    const i64 qo0 = b * p.st[ST_Q] + hq2[0] * p.st[ST_Q + 1] + i64(qpos2[0]) * p.st[ST_Q + 2];
    const i64 qo1 = b * p.st[ST_Q] + hq2[1] * p.st[ST_Q + 1] + i64(qpos2[1]) * p.st[ST_Q + 2];
#pragma unroll
    for (int kk = 0; kk < DK16; ++kk) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int col = kk * 16 + 2 * tq + (r >> 1) * 8;  // K's columns: elements elem_of_col<PK>
        const i64 o = (r & 1) ? qo1 : qo0;
        qa[kk][r] = pack2<0>(load_f(p.q, o + elem_of_col<PK>(col), p.q_dtype), load_f(p.q, o + elem_of_col<PK>(col + 1), p.q_dtype));
      }
    }
  }
  // Per group, the sum of each of this lane's two rows of q (as the mma sees q): the
  // factor of K's bias in the scores. A 16-wide step lies inside one group.
  float qsum[NG][2];
#pragma unroll
  for (int gi = 0; gi < NG; ++gi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float acc = 0.f;
#pragma unroll
      for (int kk = gi * KPG; kk < (gi + 1) * KPG; ++kk) {
#pragma unroll
        for (int r = h; r < 4; r += 2) {
          acc += f16_to_f32(u16(qa[kk][r] & 0xFFFFu)) + f16_to_f32(u16(qa[kk][r] >> 16));
        }
      }
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      acc += __shfl_xor_sync(0xffffffffu, acc, 2);
      qsum[gi][h] = acc;
    }
  }

  const bool causal = p.mask_kind == MK_CAUSAL;
  const bool array_mask = p.mask_kind == MK_BOOL || p.mask_kind == MK_ADDITIVE;
  const int diag_first = r0 / G + NT - L;
  const int diag_last = r_last / G + NT - L;
  int kend = NT;
  if (causal && diag_first >= 0) kend = min(NT, diag_last + 1);

  FastPieces<D, KB, GS, NTHR, H16, true> kp;
  FastPieces<D, VB, GS, NTHR, H16> vp;
  // Stage s of a tile: K at sm + s * 2 TILE, V after it, K's scales at scales_sm + s *
  // SC::FLOATS. Tiles reaching past N: element loops.
  auto fill = [&](int stage, int kt, bool loaded) {
    u16* ks = sm + stage * 2 * TILE;
    float* sblk = scales_sm + stage * SC::FLOATS;
    if (loaded) {
      kp.store(ks, sblk);
      vp.store(ks + TILE);
    } else {
      fill_codes_tile<D, KB, GS, NTHR>(ks, sblk, p, b, hkv, kt);
      dequant_tile<0, D, VB, GS, false, NTHR, PV>(ks + TILE, nullptr, p, p.v_packed, p.v_scales, p.v_biases, p.v_tail,
                                              ST_V_PACKED, ST_V_SCALES, ST_V_BIASES, ST_V_TAIL, b, hkv, kt);
    }
  };
  kp.init(p, p.k_packed, ST_K_PACKED, ST_K_SCALES, ST_K_BIASES, b, hkv);
  vp.init(p, p.v_packed, ST_V_PACKED, ST_V_SCALES, ST_V_BIASES, b, hkv);
  auto issue = [&](int kt) {
    kp.load(p, p.k_scales, p.k_biases, kt);
    vp.load(p, p.v_scales, p.v_biases, kt);
  };

  float o[DT8][4];
#pragma unroll
  for (int j = 0; j < DT8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m2[2] = {-kInf, -kInf}, l2[2] = {0.f, 0.f};

  // ldmatrix lane offsets (bytes): K matrices (keys +0/+8) x (d +0/+8) in the order
  // b0/b1 of n-tile 2j, b0/b1 of 2j + 1; V (keys +0/+8) x (d +0/+8) transposed likewise.
  const u32 k_lane = 2u * (((lane & 7) + ((lane >> 4) << 3)) * KS + ((lane >> 3) & 1) * 8);
  const u32 v_lane = 2u * (((lane & 7) + (((lane >> 3) & 1) << 3)) * KS + (lane >> 4) * 8);
  const u32 sbase = smem_u32(sm);

  if (kend > 0) {
    const bool full0 = BK <= N;
    if (full0) issue(0);
    fill(0, 0, full0);
  }
  __syncthreads();

  int stage = 0;
  for (int kt = 0; kt < kend; kt += BK, stage ^= 1) {
    const int kn = kt + BK;
    const bool has_next = kn < kend;
    const bool next_full = has_next && kn + BK <= N;
    if (next_full) issue(kn);  // in flight while this tile is multiplied

    const u32 kaddr = sbase + u32(stage) * (4u * TILE);
    const u32 vaddr = kaddr + 2u * TILE;
    const float4* sblk = reinterpret_cast<const float4*>(scales_sm + stage * SC::FLOATS);

    // S = Q K^T: per group, q times the exact codes (float32 accumulators), then
    // scale * that + bias * (q's group sum) in float32 for this lane's keys 2 tq, 2 tq + 1
    // of each n-tile (key pair 4 j + tq of the scale block).
    float s[NT8][4];
#pragma unroll
    for (int j = 0; j < NT8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int jp = 0; jp < NT8 / 2; ++jp) {
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        float t[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = gi * KPG; kk < (gi + 1) * KPG; ++kk) {
          u32 bf[4];
          ldsm_x4(bf, kaddr + k_lane + 2u * (jp * 16 * KS + kk * 16));
          const u32 b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
          mma16816<0>(t[0], qa[kk], b0);
          mma16816<0>(t[1], qa[kk], b1);
        }
#pragma unroll
        for (int hj = 0; hj < 2; ++hj) {
          const int j = 2 * jp + hj;
          const float4 sb = sblk[gi * (BK / 2) + 4 * j + tq];  // (scale 2tq, scale 2tq+1, bias 2tq, bias 2tq+1)
          s[j][0] = fmaf(t[hj][0], sb.x, fmaf(sb.z, qsum[gi][0], s[j][0]));
          s[j][1] = fmaf(t[hj][1], sb.y, fmaf(sb.w, qsum[gi][0], s[j][1]));
          s[j][2] = fmaf(t[hj][2], sb.x, fmaf(sb.z, qsum[gi][1], s[j][2]));
          s[j][3] = fmaf(t[hj][3], sb.y, fmaf(sb.w, qsum[gi][1], s[j][3]));
        }
      }
    }

    const bool need_mask = array_mask || (causal && (kt + BK - 1 > diag_first)) || kt + BK > NT;
    u32 pa[1][NT8 / 2][4];
    prefill_softmax<0, NT8, DT8>(s, o, m2, l2, pa, p, need_mask, kt, b, hq2, qpos2);

#pragma unroll
    for (int kk = 0; kk < NT8 / 2; ++kk) {
#pragma unroll
      for (int jp = 0; jp < DK16; ++jp) {
        u32 bf[4];
        ldsm_x4_t(bf, vaddr + v_lane + 2u * (kk * 16 * KS + jp * 16));
        const u32 b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        mma16816<0>(o[2 * jp], pa[0][kk], b0);
        mma16816<0>(o[2 * jp + 1], pa[0][kk], b1);
      }
    }

    if (has_next) fill(stage ^ 1, kn, next_full);
    __syncthreads();
  }

  prefill_store<DT8, PV>(o, m2, l2, p, b, hq2, qpos2, live2);
}

// Two stages of K and V tiles (float16) and of K's scale blocks (float32).
template <int D, int GS>
constexpr int prefill_fast_smem_bytes() {
  return 2 * 2 * PrefillFastShape<D>::TILE * 2 + 2 * FastScales<D, GS>::FLOATS * 4;
}

}  // namespace tqc
