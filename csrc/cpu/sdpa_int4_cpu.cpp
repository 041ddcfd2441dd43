// CPU evaluation of ScaledDotProductAttentionInt4: reads the MLX arrays in place,
// plans the work units, runs the best kernel variant on the thread pool and merges
// the per-split softmax states.
#include <alloca.h>
#if defined(TQMETAL_HAVE_X86_VARIANTS)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <limits>
#include <memory>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "cpu/sdpa_int4_cpu.h"
#include "cpu/sdpa_int4_problem.h"
#include "cpu/thread_pool.h"
#include "primitive.h"

namespace tqmetal::cpu {

using namespace mlx::core;

float* thread_scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n + 16) buf.resize(n + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
}

float to_float(const void* base, int64_t idx, DType dt) {
  switch (dt) {
    case DType::f32:
      return static_cast<const float*>(base)[idx];
    case DType::f16:
      return float(static_cast<const half_t*>(base)[idx]);
    case DType::bf16: {
      uint32_t u = uint32_t(static_cast<const uint16_t*>(base)[idx]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    case DType::boolean:
      return static_cast<const bool*>(base)[idx] ? 1.f : 0.f;
  }
  return 0.f;
}

namespace {

DType dtype_of(const array& a) {
  switch (a.dtype()) {
    case float16:
      return DType::f16;
    case bfloat16:
      return DType::bf16;
    case bool_:
      return DType::boolean;
    default:
      return DType::f32;
  }
}

View4 view4(const array& a) {
  View4 v;
  v.ptr = a.data<void>();
  v.dt = dtype_of(a);
  for (int i = 0; i < 4; ++i) v.st[i] = a.strides()[i];
  return v;
}

void store_out(void* out, int64_t idx, DType dt, float x) {
  switch (dt) {
    case DType::f32:
      static_cast<float*>(out)[idx] = x;
      break;
    case DType::f16:
      static_cast<half_t*>(out)[idx] = half_t(x);
      break;
    case DType::bf16: {
      // Round to nearest even, keeping NaN a NaN.
      uint32_t u;
      std::memcpy(&u, &x, 4);
      uint16_t h = std::isnan(x) ? uint16_t(0x7FC0 | (u >> 31 << 15))
                                 : uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
      static_cast<uint16_t*>(out)[idx] = h;
      break;
    }
    case DType::boolean:
      break;
  }
}

} // namespace

// Dequantized element d of token n of a quantized tensor (slow path only).
static float dequant_at(const Problem& p, const QuantView& q, int b, int h, int64_t n, int d) {
  const uint32_t* row = q.packed + b * q.p_st[0] + h * q.p_st[1] + n * q.p_st[2];
  // Codes form one little-endian bit stream (mx.quantize): 3-, 5- and 6-bit
  // codes may straddle two words.
  const int64_t bit = int64_t(d) * q.bits;
  const int shift = int(bit % 32);
  uint64_t pair = row[bit / 32];
  if (shift + q.bits > 32) pair |= uint64_t(row[bit / 32 + 1]) << 32;
  const uint32_t val = uint32_t(pair >> shift) & ((1u << q.bits) - 1);
  const int g = d / p.group_size;
  const float s = to_float(
      q.scales.ptr, b * q.scales.st[0] + h * q.scales.st[1] + n * q.scales.st[2] + g * q.scales.st[3],
      q.scales.dt);
  const float bi = to_float(
      q.biases.ptr, b * q.biases.st[0] + h * q.biases.st[1] + n * q.biases.st[2] + g * q.biases.st[3],
      q.biases.dt);
  return s * float(val) + bi;
}

void dequant_row(const Problem& p, const QuantView& q, int b, int h, int64_t n, float* out) {
  for (int d = 0; d < p.D; ++d) out[d] = dequant_at(p, q, b, h, n, d);
}

void token_row(const Problem& p, const QuantView& q, const View4& tail, int b, int h, int64_t j,
               float* out) {
  if (j < p.N) {
    dequant_row(p, q, b, h, j, out);
    return;
  }
  const int64_t off = b * tail.st[0] + h * tail.st[1] + (j - p.N) * tail.st[2];
  for (int d = 0; d < p.D; ++d) out[d] = to_float(tail.ptr, off + d * tail.st[3], tail.dt);
}

// MLX's mask semantics at the end of a row. A boolean or causal mask that hides
// every key leaves MLX softmaxing equal finfo.min scores: the uniform mean of V.
// An additive mask of -inf everywhere gives 0/0 = NaN, as in MLX. A sink is a
// finite logit, so with sinks such rows come out as 0.
void finalize_row(const Problem& p, int b, int hkv, int row, float m, float l, const float* o) {
  const int G = p.group();
  const int h = hkv * G + row % G;
  const int qpos = row / G;
  const int D = p.D;
  float* tmp = static_cast<float*>(alloca(sizeof(float) * D));
  std::memcpy(tmp, o, sizeof(float) * D);
  const float sk = p.sinks ? p.sinks[h] * 1.4426950408889634f : 0.f;
  // MLX's masked logits are the lowest finite value, which a -inf sink does not
  // outweigh: a row whose every key is masked is then the mean of V, as without sinks.
  const bool dead = l == 0.f && m == -std::numeric_limits<float>::infinity();
  if (p.sinks && !(dead && sk == -std::numeric_limits<float>::infinity())) {
    const float mnew = std::max(m, sk);
    const float alpha = (m == -std::numeric_limits<float>::infinity()) ? 0.f : std::exp2(m - mnew);
    for (int d = 0; d < D; ++d) tmp[d] *= alpha;
    l = l * alpha + std::exp2(sk - mnew);
  } else if (dead && (p.mask_kind == MaskKind::causal || p.mask_kind == MaskKind::boolean)) {
    std::fill(tmp, tmp + D, 0.f);
    float* row_v = static_cast<float*>(alloca(sizeof(float) * D));
    for (int64_t j = 0; j < p.n_total(); ++j) {
      token_row(p, p.v, p.v_tail, b, hkv, j, row_v);
      for (int d = 0; d < D; ++d) tmp[d] += row_v[d];
    }
    l = float(p.n_total());
  }
  const float inv = 1.f / l;
  const int64_t base = ((int64_t(b) * p.Hq + h) * p.L + qpos) * D;
  for (int d = 0; d < D; ++d) store_out(p.out, base + d, p.out_dt, tmp[d] * inv);
}

Plan make_plan(const Problem& p) {
  Plan plan;
  const int R = p.rows();
  // Many rows per KV head (prefill, or long speculative/GQA-8 decode) go to the
  // rows-as-lanes prefill kernel; group 16 (W = 8 chunks) stays on the row kernel.
  int rt = 1;
  while (rt < std::min(R, 16)) rt *= 2;
  if (R >= kPrefillRows && p.group_size >= 32) rt = kPrefillRows;
  plan.row_tile = rt;
  const int tiles_per_head = (R + rt - 1) / rt;
  plan.row_tiles = p.B * p.Hkv * tiles_per_head;
  // Split long contexts so every core gets work even for one sequence and few
  // KV heads; each split keeps at least 512 tokens so merging stays negligible.
  const int64_t want = 4 * int64_t(num_threads());
  int64_t splits = 1;
  if (plan.row_tiles < want) {
    splits = (want + plan.row_tiles - 1) / plan.row_tiles;
    splits = std::min<int64_t>(splits, std::max<int64_t>(1, p.n_total() / 512));
  }
  const int64_t len = (p.n_total() + splits - 1) / splits;
  plan.split_len = (len + 15) / 16 * 16;
  plan.splits = int((p.n_total() + plan.split_len - 1) / plan.split_len);
  return plan;
}

// 4 = AVX-512 with VNNI and AMX-INT8 (tile dot products for decode's K scores),
// 3 = AVX-512 with VNNI (integer dot products in decode), 2 = AVX-512,
// 1 = AVX2 + FMA + F16C, 0 = portable. TQMETAL_CPU_ISA=generic|avx2|avx512|avx512vnni
// lowers the choice (tests cover every variant on one machine); it never raises
// it above what the CPU supports.
static const char* const kIsaNames[] = {"generic", "avx2", "avx512", "avx512vnni", "avx512amx"};

#if defined(TQMETAL_HAVE_X86_VARIANTS)
// AMX tile data is an XSAVE feature Linux enables per process on request
// (arch_prctl ARCH_REQ_XCOMP_PERM); without it the first tile instruction
// faults. Granted once for the whole process, every thread included.
static bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
  if (!tile || !int8) return false;
#if defined(__linux__)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

int isa_level() {
  static const int level = [] {
    int best = 0;
#if defined(TQMETAL_HAVE_X86_VARIANTS)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      best = __builtin_cpu_supports("avx512vnni") ? 3 : 2;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = 1;
    }
#endif
    int cap = 4;
    if (const char* s = std::getenv("TQMETAL_CPU_ISA")) {
      for (int i = 0; i < 4; ++i) { // "avx512amx", the top level, lowers nothing
        if (std::string(s) == kIsaNames[i]) cap = i;
      }
    }
    best = std::min(best, cap);
#if defined(TQMETAL_HAVE_X86_VARIANTS)
    // The tile state is requested only when it would be used.
    if (best == 3 && cap == 4 && amx_usable()) best = 4;
#endif
    return best;
  }();
  return level;
}

bool cpu_use_vnni() {
  return isa_level() >= 3;
}

bool cpu_use_vbmi() {
#if defined(TQMETAL_HAVE_X86_VARIANTS)
  static const bool vbmi = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi");
  }();
  return vbmi && cpu_use_vnni();
#else
  return false;
#endif
}

bool cpu_use_amx() {
  return isa_level() == 4;
}

UnitFn pick_kernel(const Problem& p, const Plan& plan) {
  UnitFn fn = nullptr;
#if defined(TQMETAL_HAVE_X86_VARIANTS)
  const int level = isa_level();
  if (level >= 3) fn = unit_fn_avx512int(p, plan);
  if (!fn && level >= 2) fn = unit_fn_avx512(p, plan);
  if (level == 1) fn = unit_fn_avx2(p, plan);
#endif
  if (!fn && isa_level() == 0) fn = unit_fn_generic(p, plan);
  if (!fn) {
    throw std::logic_error("[tqmetal.sdpa_int4] internal error: no kernel for this row tile");
  }
  return fn;
}

const char* isa_name() {
  return kIsaNames[isa_level()];
}

void run_problem(const Problem& p) {
  if (p.B == 0 || p.Hkv == 0 || p.L == 0) return; // an empty output: nothing to compute
  const Plan plan = make_plan(p);
  const UnitFn fn = pick_kernel(p, plan);
  const int R = p.rows();
  const int tiles_per_head = plan.row_tiles / (p.B * p.Hkv);
  auto unit_at = [&](int64_t i) {
    const int split = int(i % plan.splits);
    const int64_t tile = i / plan.splits;
    const int rt = int(tile % tiles_per_head);
    const int bh = int(tile / tiles_per_head);
    Unit u;
    u.b = bh / p.Hkv;
    u.hkv = bh % p.Hkv;
    u.row0 = rt * plan.row_tile;
    u.nrows = std::min(plan.row_tile, R - u.row0);
    u.n0 = int64_t(split) * plan.split_len;
    u.n1 = std::min(p.n_total(), u.n0 + plan.split_len);
    return u;
  };
  if (plan.splits == 1) {
    parallel_for(plan.units(), [&](int64_t i) { fn(p, plan, unit_at(i), nullptr); });
    return;
  }
  // Split-K: each unit leaves [m, l, o] per row; merge per row tile.
  const size_t stride = size_t(p.D + 2);
  const size_t per_unit = size_t(plan.row_tile) * stride;
  std::vector<float> partials(size_t(plan.units()) * per_unit);
  parallel_for(plan.units(), [&](int64_t i) { fn(p, plan, unit_at(i), partials.data() + i * per_unit); });
  parallel_for(plan.row_tiles, [&](int64_t tile) {
    std::vector<float> o(p.D);
    const Unit u0 = unit_at(tile * plan.splits);
    for (int r = 0; r < u0.nrows; ++r) {
      // A NaN in any split's state (a NaN score somewhere in the row) makes the
      // row NaN, as in MLX; std::max would drop it from M.
      float M = -std::numeric_limits<float>::infinity();
      bool nan = false;
      for (int s = 0; s < plan.splits; ++s) {
        const float* src = partials.data() + (tile * plan.splits + s) * per_unit + r * stride;
        nan |= std::isnan(src[0]) || std::isnan(src[1]);
        M = std::max(M, src[0]);
      }
      float l = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      if (nan) {
        l = std::numeric_limits<float>::quiet_NaN();
      } else if (M != -std::numeric_limits<float>::infinity()) {
        for (int s = 0; s < plan.splits; ++s) {
          const float* src = partials.data() + (tile * plan.splits + s) * per_unit + r * stride;
          if (src[0] == -std::numeric_limits<float>::infinity()) continue;
          const float w = std::exp2(src[0] - M);
          l += w * src[1];
          for (int d = 0; d < p.D; ++d) o[d] += w * src[2 + d];
        }
      }
      finalize_row(p, u0.b, u0.hkv, u0.row0 + r, M, l, o.data());
    }
  });
}

namespace {

// Packed rows are read with vector loads; a view whose last axis is strided (never
// produced by slicing a cache along N) is copied once into contiguous words.
struct PackedRows {
  const uint32_t* ptr;
  int64_t st[3];
  std::shared_ptr<std::vector<uint32_t>> owned;
};

PackedRows packed_rows(const array& a) {
  PackedRows r;
  const auto& s = a.strides();
  if (s[3] == 1) {
    r.ptr = a.data<uint32_t>();
    r.st[0] = s[0];
    r.st[1] = s[1];
    r.st[2] = s[2];
    return r;
  }
  const auto& sh = a.shape();
  r.owned = std::make_shared<std::vector<uint32_t>>(a.size());
  const uint32_t* src = a.data<uint32_t>();
  size_t i = 0;
  for (int b = 0; b < sh[0]; ++b)
    for (int h = 0; h < sh[1]; ++h)
      for (int n = 0; n < sh[2]; ++n)
        for (int w = 0; w < sh[3]; ++w)
          (*r.owned)[i++] = src[b * s[0] + h * s[1] + n * s[2] + w * s[3]];
  r.ptr = r.owned->data();
  r.st[2] = sh[3];
  r.st[1] = int64_t(sh[2]) * sh[3];
  r.st[0] = int64_t(sh[1]) * r.st[1];
  return r;
}

} // namespace

void eval_sdpa_int4_cpu(
    const ScaledDotProductAttentionInt4& prim,
    const std::vector<array>& inputs,
    array& out,
    Stream stream) {
  out.set_data(allocator::malloc(out.nbytes()));

  const array& q = inputs[0];
  Problem p;
  p.B = q.shape(0);
  p.Hq = q.shape(1);
  p.L = q.shape(2);
  p.D = q.shape(3);
  p.Hkv = inputs[1].shape(1);
  p.N = inputs[1].shape(2);
  p.group_size = prim.group_size();
  p.scale = prim.scale();
  p.q = view4(q);

  auto kp = packed_rows(inputs[1]);
  auto vp = packed_rows(inputs[4]);
  p.k.packed = kp.ptr;
  std::copy(kp.st, kp.st + 3, p.k.p_st);
  p.k.scales = view4(inputs[2]);
  p.k.biases = view4(inputs[3]);
  p.k.bits = prim.k_bits();
  p.v.packed = vp.ptr;
  std::copy(vp.st, vp.st + 3, p.v.p_st);
  p.v.scales = view4(inputs[5]);
  p.v.biases = view4(inputs[6]);
  p.v.bits = prim.v_bits();

  size_t next = 7;
  if (prim.has_tail()) {
    p.k_tail = view4(inputs[next++]);
    p.v_tail = view4(inputs[next++]);
    p.T = p.k_tail.ptr ? inputs[7].shape(2) : 0;
  }
  switch (prim.mask_kind()) {
    case MaskMode::none:
      p.mask_kind = MaskKind::none;
      break;
    case MaskMode::causal:
      p.mask_kind = MaskKind::causal;
      break;
    case MaskMode::array: {
      // Right-align the mask on [B, H_q, L, N_total]; missing or size-1 axes
      // broadcast through stride 0.
      const array& m = inputs[next++];
      p.mask.ptr = m.data<void>();
      p.mask.dt = dtype_of(m);
      const int nd = int(m.ndim());
      for (int i = 0; i < 4; ++i) {
        const int src = nd - 4 + i;
        p.mask.st[i] = (src < 0 || m.shape(src) == 1) ? 0 : m.strides()[src];
      }
      p.mask_kind = m.dtype() == bool_ ? MaskKind::boolean : MaskKind::additive;
      break;
    }
  }
  std::optional<array> sinks_arr;
  if (prim.has_sinks()) {
    sinks_arr = inputs[next++];
  }
  p.out = out.data<void>();
  p.out_dt = dtype_of(out);

  auto& encoder = mlx::core::cpu::get_command_encoder(stream);
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  encoder.dispatch([p, kp, vp, sinks_arr]() mutable {
    std::vector<float> sk;
    if (sinks_arr) {
      const array& s = *sinks_arr;
      sk.resize(s.shape(0));
      const DType dt = dtype_of(s);
      for (int i = 0; i < s.shape(0); ++i) sk[i] = to_float(s.data<void>(), int64_t(i) * s.strides()[0], dt);
      p.sinks = sk.data();
    }
    run_problem(p);
  });
}

} // namespace tqmetal::cpu
