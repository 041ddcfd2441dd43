// The decode work unit: RT query rows of one KV head against a range of tokens,
// an online softmax over blocks of TB tokens (kernel_common.h has the map). The
// K scores and V updates of a block take the float path (decode_float.h), the
// VNNI path (decode_vnni.h) or AMX tiles for K (decode_amx.h), chosen at
// compile time; masks, the softmax, tails, the exact path and the output are
// shared here.
#pragma once

#include "cpu/decode_amx.h"
#include "cpu/decode_float.h"
#include "cpu/decode_vnni.h"

namespace tqmetal::cpu {
namespace TQ_CAT(isa_, TQMETAL_ISA) {

template <int W, int KB, int VB, int RT, bool VNNI = false, int DC = 0, bool AMX = false>
void process_unit(const Problem& P, const Plan& plan, const Unit& u, float* partials) {
  using VF = typename Vec<W>::f;
  const int D = DC ? DC : P.D; // DC: head dim fixed at compile time (0 = any)
  const int G = P.group();
  const int gs = P.group_size;
  const int ng = D / gs;
  constexpr int CH = 2 * W; // elements per chunk
  const int nch = D / CH;
  const int cpg = gs / CH; // chunks per group
  const int64_t N = P.N;
  const int64_t Ntot = P.n_total();
  const int R = u.nrows;
  const float log2e = 1.4426950408889634f;
  const float qscale = P.scale * log2e; // scores live in the log2 domain
  // The VNNI path reads bit-stream rows (kBitStream) expanded to one byte per
  // code (StreamExpander, L1-resident): the 8-bit path's layout, with the codes'
  // own centre for V.
  constexpr int KX = VNNI && KB == kBitStream ? 8 : KB;
  constexpr int VX = VNNI && VB == kBitStream ? 8 : VB;
  const int vcentre = 1 << ((VB == kBitStream ? P.v.bits : VB) - 1);

  const size_t accn = size_t(RT) * TB; // score accumulators, [RT][TB] vectors
  const size_t need = size_t(RT) * D * 3 + size_t(RT) * ng * (1 + TB) + size_t(TB) * ng * 4 +
      size_t(RT) * TB + 2 * D + size_t(TB) * ng * RT + accn * W + D +
      size_t(ng) * RT * (TB / 2 + 1) + size_t(TB) * ng * 2 + accn * W + size_t(RT) * TB + 128;
  float* qk = thread_scratch(need); // [RT][D] permuted for KB
  float* qn = qk + RT * D; // [RT][D] natural order (tail keys, the exact path)
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
  for (int e = 0; e < D; ++e) vpos[e] = v_slot<W, VX, VNNI>(e);
  // VNNI: queries as int16 in the K unpack's word order (in qk's space), with
  // per-row factors back to float.
  int16_t* kq16 = reinterpret_cast<int16_t*>(qk);
  float qinv[RT], qf[RT];

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

  // Queries: scaled, in natural order (tail keys and the exact path) and in the
  // K loop's form with per-group sums: float in the chunk permutation, or int16
  // for VNNI. A query with a NaN or inf (int16 rounding would make it a plausible
  // number) sends the whole unit down the exact path, as does a block whose
  // scales or biases are not finite: scores and V updates element by element
  // from dequantized rows, so NaN and inf come out exactly as in MLX.
  bool exact_q = false;
  for (int r = 0; r < RT; ++r) {
    float* dst = qn + r * D;
    if (r < R) {
      int64_t off = u.b * P.q.st[0] + int64_t(qhead[r]) * P.q.st[1] + int64_t(qpos[r]) * P.q.st[2];
      load_row(P.q.ptr, off, P.q.st[3], D, P.q.dt, dst);
      float z = 0.f;
      for (int d = 0; d < D; ++d) {
        dst[d] *= qscale;
        z += dst[d] * 0.f;
      }
      exact_q |= z != z;
    } else {
      std::fill(dst, dst + D, 0.f);
    }
  }
  for (int r = 0; r < RT; ++r) {
    const float* dst = qn + r * D;
    if constexpr (VNNI) {
#if TQ_HAVE_VNNI_PATH
      // AMX splits the int16 query into two signed bytes, q = 256 hi + lo: |q| <= 127 * 256.
      constexpr float kQ16Max = AMX ? 32512.f : 32767.f;
      if (exact_q) { // the fast K path does not run
        qf[r] = qinv[r] = 0.f;
        std::fill(qsum + r * ng, qsum + (r + 1) * ng, 0.f);
      } else {
        vnni_query_row<KX>(dst, D, gs, ng, kQ16Max, kq16 + r * D, qsum + r * ng, qf[r], qinv[r]);
      }
#endif
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
  std::conditional_t<AMX, AmxBuffers, char> amx;
  int amx_tiles = 0;
  if constexpr (AMX) amx_tiles = amx_load_query<RT>(amx, qn, qf, D, gs, ng, exact_q);
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
  for (int sg = 0; sg < kVnniMaxD / 32; ++sg) kseg_g0[sg] = sg * (KX == 4 ? 64 : 32) / gs;
#if TQ_HAVE_VNNI_PATH
  // The expanders' tables exist only where a bit-stream width is read (as AMX's buffers).
  const std::conditional_t<VNNI && KB == kBitStream, StreamExpander, int> kx(P.k.bits);
  const std::conditional_t<VNNI && VB == kBitStream, StreamExpander, int> vx(P.v.bits);
  alignas(64) uint8_t kexp[VNNI && KB == kBitStream ? kVnniMaxD : 1];
  alignas(64) uint8_t vexp[VNNI && VB == kBitStream ? TB * kVnniMaxD : 1];
#endif

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
    int nq = int(std::max<int64_t>(0, std::min<int64_t>(nt, N - t0))); // quantized tokens

    // ---- scores s[r][t] = q . k_t (log2 domain) ----
    if (nq > 0) {
      load_group_params(P.k.scales, u.b, u.hkv, t0, nq, ng, ks);
      load_group_params(P.k.biases, u.b, u.hkv, t0, nq, ng, kbias);
    }
    // nq: tokens the factored fast path scores; the rest element by element.
    if (exact_q || (nq > 0 && !params_finite(ks, kbias, ng))) nq = 0;
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
        amx_stage_token(amx, kr, t);
#endif
      } else if constexpr (VNNI) {
#if TQ_HAVE_VNNI_PATH
        if constexpr (KB == kBitStream) {
          kx.row(kr, D, kexp);
          vnni_token_scores<KX, RT>(kexp, kq16, D, gs, kseg_g0, ks, t, accs);
        } else {
          vnni_token_scores<KB, RT>(kr, kq16, D, gs, kseg_g0, ks, t, accs);
        }
#endif
      } else {
        float_token_scores<W, KB, RT>(kr, qk, D, ng, cpg, ks, t, accs, P.k.bits);
      }
    }
    if constexpr (AMX) {
#if TQ_HAVE_AMX_PATH
      if (nq > 0) amx_block_scores<RT>(amx, nq, ng, amx_tiles, ks, kbias, qsum, qinv, sc);
#endif
    } else if (nq > 0) {
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
    for (int t = nq; t < nt; ++t) { // tail keys, and the exact path's
      token_row(P, P.k, P.k_tail, u.b, u.hkv, t0 + t, rowbuf);
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

  // Tokens of the current block whose V update takes the factored fast path
  // (set by softmax_block, used by v_block); the rest go element by element.
  int nqv = 0;
  auto softmax_block = [&](int64_t t0, float* sc) TQ_INLINE {
    const int nt = int(std::min<int64_t>(TB, n_end - t0));
    int nq = int(std::max<int64_t>(0, std::min<int64_t>(nt, N - t0))); // quantized tokens
    if (nq > 0) {
      load_group_params(P.v.scales, u.b, u.hkv, t0, nq, ng, vs);
      load_group_params(P.v.biases, u.b, u.hkv, t0, nq, ng, vbias);
      if (!params_finite(vs, vbias, ng)) nq = 0;
    }
    nqv = nq;
#if TQ_HAVE_VNNI_PATH
    if constexpr (VNNI && RT % 4 == 0) {
      vnni_softmax_rows4<RT, VX>(sc, nq, ng, D, m4, lv, o, obias, vs, vbias, wq, winv, vcentre);
      return;
    }
#endif
    // ---- online softmax over the block ----
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < RT; ++r) {
      f16v s = loadv<f16v>(sc + r * TB);
      Vec<8>::f h8 = __builtin_shufflevector(s, s, 0, 1, 2, 3, 4, 5, 6, 7);
      h8 = h8 > __builtin_shufflevector(s, s, 8, 9, 10, 11, 12, 13, 14, 15)
          ? h8 : __builtin_shufflevector(s, s, 8, 9, 10, 11, 12, 13, 14, 15);
      float bm = h8[0];
      for (int t = 1; t < 8; ++t) bm = std::max(bm, h8[t]);
      const float mnew = std::max(m[r], bm);
      if (mnew == ninf) { // nothing visible yet, or only NaN scores (max drops them)
        const f16v p = (s != s) ? s : f16v{};
        storev(sc + r * TB, p);
        lv[r] += p;
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

    // ---- weights for o += p @ v ----
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
          const f16v vb = VNNI ? loadv<f16v>(vbias + g * TB) + float(vcentre) * loadv<f16v>(vs + g * TB)
                               : loadv<f16v>(vbias + g * TB);
          storev(ob, loadv<f16v>(ob) + pr * vb);
        }
      }
    }
  };
  auto v_block = [&](int64_t t0, float* sc) TQ_INLINE {
    const int nt = int(std::min<int64_t>(TB, n_end - t0));
    const int nq = nqv;
    if constexpr (VNNI) {
#if TQ_HAVE_VNNI_PATH
      if (nq > 0 && RT % 4 != 0) vnni_v_weights(wts, ng * RT, wq, winv); // (else softmax made them)
      if constexpr (VB == kBitStream) {
        for (int t = 0; t < nq; ++t) vx.row(vbase + (t0 + t) * vrow, D, vexp + t * D);
        vnni_v_update<VX, RT>(vexp, D, nq, D, gs, wq, winv, o, vcentre);
      } else {
        vnni_v_update<VB, RT>(vbase + t0 * vrow, vrow, nq, D, gs, wq, winv, o);
      }
#endif
    } else {
      float_v_update<W, VB, RT>(vbase + t0 * vrow, vrow, nq, D, cpg, wts, o, P.v.bits);
    }
    for (int t = nq; t < nt; ++t) { // tail values, and the exact path's
      token_row(P, P.v, P.v_tail, u.b, u.hkv, t0 + t, rowbuf);
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
  // One call site per stage (each is force-inlined): the first pass only
  // scores block n0, every later pass finishes block t0 around block t0+1's scores.
  int cur = 1;
  for (int64_t t0 = u.n0 - TB; t0 < n_end; t0 += TB, cur ^= 1) {
    if (t0 >= u.n0) softmax_block(t0, sc_buf[cur]);
    if (t0 + TB < n_end) score_block(t0 + TB, sc_buf[cur ^ 1], ks_buf[cur ^ 1], kbias_buf[cur ^ 1], accs_buf[cur ^ 1]);
    if (t0 >= u.n0) v_block(t0, sc_buf[cur]);
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

} // namespace TQ_CAT(isa_, TQMETAL_ISA)
} // namespace tqmetal::cpu
