// The prefill work unit: many query rows per KV head (kernel_common.h has the map).
#pragma once

#include "cpu/kernel_common.h"

namespace tqmetal::cpu {
namespace TQ_CAT(isa_, TQMETAL_ISA) {

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
                         const float* sc, const float* bi, float* dst, int bits) {
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
      unpack_chunk<W, BITS>(r + c * chunk_bytes<W, BITS>(bits), a, bb, bits);
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
      dequant_tile<KB>(kbase, krow, t0, nq, D, gs, ks, kbias, kf, P.k.bits);
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
      dequant_tile<VB>(vbase, vrow, t0, nq, D, gs, vs, vbias, vf, P.v.bits);
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

} // namespace TQ_CAT(isa_, TQMETAL_ISA)
} // namespace tqmetal::cpu
