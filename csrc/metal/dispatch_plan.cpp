// Plan of the Metal decode kernels; see dispatch_plan.h. The layout constants are
// shared with the kernels through metal/sdpa_int4_params.h.
#include "metal/dispatch_plan.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "../../metal/sdpa_int4_params.h"

namespace tqmetal::metal {

namespace {

using namespace tqmetal_decode;

const char* type_name(DType d) {
  switch (d) {
    case DType::f16:
      return "float16_t";
    case DType::bf16:
      return "bfloat16_t";
    default:
      return "float";
  }
}

int dtype_code(DType d) {
  return d == DType::f16 ? DT_F16 : d == DType::bf16 ? DT_BF16 : DT_F32;
}

int64_t stride_or0(const TensorRef& t, size_t i) {
  return i < t.strides.size() ? t.strides[i] : 0;
}

DecodePlan unsupported(std::string why) {
  DecodePlan p;
  p.reason = std::move(why);
  return p;
}

} // namespace

DecodePlan plan_sdpa_int4_decode(const DecodeProblem& p) {
  // ---- explicit fallbacks (the caller uses another path) ----
  if (p.D != 64 && p.D != 128 && p.D != 256) {
    return unsupported("head dim " + std::to_string(p.D) + " has no decode instance (64, 128, 256)");
  }
  if (p.group_size != 32 && p.group_size != 64 && p.group_size != 128) {
    return unsupported("group size " + std::to_string(p.group_size) + " (decode kernels: 32, 64, 128)");
  }
  if (p.D % p.group_size != 0) {
    return unsupported("group size does not divide the head dim");
  }
  if ((p.k_bits != 4 && p.k_bits != 8) || (p.v_bits != 4 && p.v_bits != 8)) {
    return unsupported("bits k" + std::to_string(p.k_bits) + "v" + std::to_string(p.v_bits) +
                       " (decode kernels: 4 or 8 bits for K and V)");
  }
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0) {
    return unsupported("H_q must be a multiple of H_kv");
  }
  const int G = p.Hq / p.Hkv;
  const int R = G * p.L;
  const int ROWS = p.D == 256 ? 4 : 8; // the instances' ROWS (registers: 2 * ROWS * D / 32 floats)
  const int row_tiles = (R + ROWS - 1) / ROWS;
  if (row_tiles > kMaxDecodeRowTiles) {
    return unsupported("too many query rows per KV head for the decode kernel (" + std::to_string(R) +
                       " > " + std::to_string(ROWS * kMaxDecodeRowTiles) + "): prefill");
  }
  // Last axes must be contiguous (MLX's quantize output and its N-slices are).
  const std::pair<const char*, const TensorRef*> quant[] = {
      {"q", &p.q}, {"k_packed", &p.k_packed}, {"k_scales", &p.k_scales}, {"k_biases", &p.k_biases},
      {"v_packed", &p.v_packed}, {"v_scales", &p.v_scales}, {"v_biases", &p.v_biases}};
  for (const auto& [name, t] : quant) {
    if (t->strides.size() != 4 || t->strides[3] != 1) {
      return unsupported(std::string(name) + ": last axis must be contiguous (copy first)");
    }
  }
  if (p.has_tail) {
    const std::pair<const char*, const TensorRef*> tails[] = {{"k_tail", &p.k_tail}, {"v_tail", &p.v_tail}};
    for (const auto& [name, t] : tails) {
      if (t->strides.size() != 4 || t->strides[3] != 1) {
        return unsupported(std::string(name) + ": last axis must be contiguous (copy first)");
      }
    }
    if (p.k_tail.dtype != p.v_tail.dtype) {
      return unsupported("k_tail and v_tail dtypes differ");
    }
  }
  if (p.k_scales.dtype != p.k_biases.dtype || p.k_scales.dtype != p.v_scales.dtype ||
      p.k_scales.dtype != p.v_biases.dtype) {
    return unsupported("scales and biases of k and v must share one dtype");
  }
  if ((p.mask_kind == MaskKind::boolean || p.mask_kind == MaskKind::additive) && p.mask.strides.size() != 4) {
    return unsupported("mask strides must be right-aligned on [B, Hq, L, N + T]");
  }
  const int64_t NT = p.N + p.T;
  if (NT >= (int64_t(1) << 31)) {
    return unsupported("context too long for 32-bit token indices");
  }

  DecodePlan plan;
  plan.supported = true;
  plan.rows = R;
  plan.rows_per_threadgroup = ROWS;
  plan.row_tiles = row_tiles;
  plan.simdgroups = kDecodeSimdgroups;

  // ---- 1 pass or split-K ----
  const int64_t base_tgs = int64_t(p.B) * p.Hkv * row_tiles;
  int64_t blocks = 1;
  if (p.blocks > 0) {
    blocks = p.blocks;
  } else {
    // Aim at ~4 threadgroups per GPU core, each block keeping >= kMinBlockLen tokens.
    const int64_t want = 4 * int64_t(std::max(1, p.gpu_cores));
    if (base_tgs < want) {
      blocks = std::min<int64_t>((want + base_tgs - 1) / base_tgs, std::max<int64_t>(1, NT / kMinBlockLen));
    }
  }
  blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, std::max<int64_t>(1, NT)));
  int64_t block_len = std::max<int64_t>(1, (NT + blocks - 1) / blocks);
  if (blocks > 1) {
    block_len = (block_len + 31) / 32 * 32; // whole simdgroup rounds
    blocks = (NT + block_len - 1) / block_len; // no empty block
  }
  if (blocks <= 1) {
    blocks = 1;
    block_len = std::max<int64_t>(NT, 1);
  }
  plan.blocks = int(blocks);
  plan.block_len = block_len;
  plan.two_pass = blocks > 1;

  // ---- arguments ----
  std::vector<int32_t> ip(IP_COUNT, 0);
  ip[IP_B] = p.B;
  ip[IP_HQ] = p.Hq;
  ip[IP_HKV] = p.Hkv;
  ip[IP_L] = p.L;
  ip[IP_G] = G;
  ip[IP_ROWS] = R;
  ip[IP_N] = int32_t(p.N);
  ip[IP_T] = int32_t(p.T);
  ip[IP_BLOCKS] = int32_t(blocks);
  ip[IP_BLOCK_LEN] = int32_t(block_len);

  std::vector<int64_t> st(ST_COUNT, 0);
  auto put3 = [&](int at, const TensorRef& t) {
    for (int i = 0; i < 3; ++i) st[at + i] = stride_or0(t, i);
  };
  put3(ST_Q, p.q);
  put3(ST_K_PACKED, p.k_packed);
  put3(ST_K_SCALES, p.k_scales);
  put3(ST_K_BIASES, p.k_biases);
  put3(ST_V_PACKED, p.v_packed);
  put3(ST_V_SCALES, p.v_scales);
  put3(ST_V_BIASES, p.v_biases);
  if (p.has_tail) {
    put3(ST_K_TAIL, p.k_tail);
    put3(ST_V_TAIL, p.v_tail);
  }
  if (p.mask_kind == MaskKind::boolean || p.mask_kind == MaskKind::additive) {
    for (int i = 0; i < 4; ++i) st[ST_MASK + i] = p.mask.strides[i];
  }
  if (p.has_sinks) st[ST_SINKS] = stride_or0(p.sinks, 0);

  const bool array_mask = p.mask_kind == MaskKind::boolean || p.mask_kind == MaskKind::additive;
  std::vector<FunctionConstant> fcs = {
      {FC_HAS_MASK, "has_mask", true, array_mask},
      {FC_BOOL_MASK, "bool_mask", true, p.mask_kind == MaskKind::boolean},
      {FC_DO_CAUSAL, "do_causal", true, p.mask_kind == MaskKind::causal},
      {FC_HAS_TAIL, "has_tail", true, p.has_tail},
      {FC_HAS_SINKS, "has_sinks", true, p.has_sinks},
      {FC_GROUP_SIZE, "group_size", false, p.group_size},
      {FC_SCALE_DTYPE, "scale_dtype", false, dtype_code(p.k_scales.dtype)},
      {FC_TAIL_DTYPE, "tail_dtype", false, p.has_tail ? dtype_code(p.k_tail.dtype) : DT_F32},
      {FC_MASK_DTYPE, "mask_dtype", false, p.mask_kind == MaskKind::additive ? dtype_code(p.mask.dtype) : DT_F32},
      {FC_SINKS_DTYPE, "sinks_dtype", false, p.has_sinks ? dtype_code(p.sinks.dtype) : DT_F32},
  };

  using K = Binding::Kind;
  auto input = [](int idx, const char* name, const TensorRef& t) {
    return Binding{idx, K::input, name, t.offset, {}, {}, 0.f};
  };
  std::vector<Binding> common = {
      input(BUF_Q, "q", p.q),
      input(BUF_K_PACKED, "k_packed", p.k_packed),
      input(BUF_K_SCALES, "k_scales", p.k_scales),
      input(BUF_K_BIASES, "k_biases", p.k_biases),
      input(BUF_V_PACKED, "v_packed", p.v_packed),
      input(BUF_V_SCALES, "v_scales", p.v_scales),
      input(BUF_V_BIASES, "v_biases", p.v_biases),
  };
  if (p.has_tail) {
    common.push_back(input(BUF_K_TAIL, "k_tail", p.k_tail));
    common.push_back(input(BUF_V_TAIL, "v_tail", p.v_tail));
  }
  if (array_mask) common.push_back(input(BUF_MASK, "mask", p.mask));
  common.push_back(Binding{BUF_IPARAMS, K::int32s, "iparams", 0, ip, {}, 0.f});
  common.push_back(Binding{BUF_STRIDES, K::int64s, "strides", 0, {}, st, 0.f});
  common.push_back(Binding{BUF_SCALE, K::float32, "scale_log2e", 0, {}, {}, p.scale * 1.4426950408889634f});

  const std::string suffix = std::string(type_name(p.q.dtype)) + "_" + std::to_string(p.D) + "_k" +
      std::to_string(p.k_bits) + "v" + std::to_string(p.v_bits);
  const std::array<int, 3> tg = {32 * kDecodeSimdgroups, 1, 1};
  const std::array<int, 3> grid = {p.B * p.Hkv, row_tiles, int(blocks)};

  if (!plan.two_pass) {
    Launch l{"sdpa_int4_decode_1pass_" + suffix, fcs, common, grid, tg};
    l.buffers.push_back(Binding{BUF_OUT, K::output, "out", 0, {}, {}, 0.f});
    if (p.has_sinks) l.buffers.push_back(input(BUF_SINKS, "sinks", p.sinks));
    plan.launches.push_back(std::move(l));
  } else {
    const int64_t prow = int64_t(p.B) * p.Hkv * R; // (b, hkv, row)
    plan.scratch = {{"partial_out", prow * blocks * p.D * 4}, {"partial_max", prow * blocks * 4},
                    {"partial_sum", prow * blocks * 4}};
    Launch l1{"sdpa_int4_decode_2pass_1_" + suffix, fcs, common, grid, tg};
    l1.buffers.push_back(Binding{BUF_OUT, K::scratch, "partial_out", 0, {}, {}, 0.f});
    l1.buffers.push_back(Binding{BUF_PART_MAX, K::scratch, "partial_max", 0, {}, {}, 0.f});
    l1.buffers.push_back(Binding{BUF_PART_SUM, K::scratch, "partial_sum", 0, {}, {}, 0.f});
    plan.launches.push_back(std::move(l1));
    Launch l2{"sdpa_int4_decode_2pass_2_" + std::string(type_name(p.q.dtype)) + "_" + std::to_string(p.D),
              fcs, {}, {p.B * p.Hkv, R, 1}, {p.D, 1, 1}};
    l2.buffers = {
        Binding{MBUF_PART_OUT, K::scratch, "partial_out", 0, {}, {}, 0.f},
        Binding{MBUF_PART_MAX, K::scratch, "partial_max", 0, {}, {}, 0.f},
        Binding{MBUF_PART_SUM, K::scratch, "partial_sum", 0, {}, {}, 0.f},
        Binding{MBUF_OUT, K::output, "out", 0, {}, {}, 0.f},
        Binding{MBUF_IPARAMS, K::int32s, "iparams", 0, ip, {}, 0.f},
        Binding{MBUF_STRIDES, K::int64s, "strides", 0, {}, st, 0.f},
    };
    if (p.has_sinks) l2.buffers.push_back(input(MBUF_SINKS, "sinks", p.sinks));
    plan.launches.push_back(std::move(l2));
  }
  for (auto& l : plan.launches) {
    std::sort(l.buffers.begin(), l.buffers.end(), [](const Binding& a, const Binding& b) { return a.index < b.index; });
  }
  return plan;
}

} // namespace tqmetal::metal
