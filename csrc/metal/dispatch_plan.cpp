// Plans of the Metal kernels; see dispatch_plan.h. The layout constants are shared
// with the kernels through metal/sdpa_int4_params.h.
#include "metal/dispatch_plan.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "../../metal/sdpa_int4_params.h"
#include "gpu/layout_checks.h"

namespace tqmetal::metal {

namespace {

using gpu::array_mask;
using gpu::stride_or0;

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

Plan unsupported(std::string why) {
  Plan p;
  p.reason = std::move(why);
  return p;
}

// The arguments every kernel of both paths takes, laid out as sdpa_int4_params.h says.
struct Args {
  std::vector<int32_t> ip;
  std::vector<int64_t> st;
  std::vector<FunctionConstant> fcs;
  std::vector<Binding> inputs; // q, the cache, tails, mask, iparams, strides, scale
};

Binding input(int idx, const char* name, const TensorRef& t) {
  return Binding{idx, Binding::Kind::input, name, t.offset, {}, {}, 0.f};
}

Args make_args(const Problem& p, int64_t blocks, int64_t block_len) {
  using K = Binding::Kind;
  const int G = p.Hq / p.Hkv;
  Args a;
  a.ip.assign(IP_COUNT, 0);
  a.ip[IP_B] = p.B;
  a.ip[IP_HQ] = p.Hq;
  a.ip[IP_HKV] = p.Hkv;
  a.ip[IP_L] = p.L;
  a.ip[IP_G] = G;
  a.ip[IP_ROWS] = G * p.L;
  a.ip[IP_N] = int32_t(p.N);
  a.ip[IP_T] = int32_t(p.T);
  a.ip[IP_BLOCKS] = int32_t(blocks);
  a.ip[IP_BLOCK_LEN] = int32_t(block_len);

  a.st.assign(ST_COUNT, 0);
  auto put3 = [&](int at, const TensorRef& t) {
    for (int i = 0; i < 3; ++i) a.st[at + i] = stride_or0(t, i);
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
  if (array_mask(p)) {
    for (int i = 0; i < 4; ++i) a.st[ST_MASK + i] = p.mask.strides[i];
  }
  if (p.has_sinks) a.st[ST_SINKS] = stride_or0(p.sinks, 0);

  a.fcs = {
      {FC_HAS_MASK, "has_mask", true, array_mask(p)},
      {FC_BOOL_MASK, "bool_mask", true, p.mask_kind == MaskKind::boolean},
      {FC_DO_CAUSAL, "do_causal", true, p.mask_kind == MaskKind::causal},
      {FC_HAS_TAIL, "has_tail", true, p.has_tail},
      {FC_HAS_SINKS, "has_sinks", true, p.has_sinks},
      {FC_GROUP_SIZE, "group_size", false, p.group_size},
      {FC_SCALE_DTYPE, "scale_dtype", false, dtype_code(p.k_scales.dtype)},
      {FC_TAIL_DTYPE, "tail_dtype", false, p.has_tail ? dtype_code(p.k_tail.dtype) : DT_F32},
      {FC_MASK_DTYPE, "mask_dtype", false, p.mask_kind == MaskKind::additive ? dtype_code(p.mask.dtype) : DT_F32},
      {FC_SINKS_DTYPE, "sinks_dtype", false, p.has_sinks ? dtype_code(p.sinks.dtype) : DT_F32},
      // read by the prefill kernel and the decode kernels' bit-stream instances (the
      // k<4|8>v<4|8> instances have them as template parameters)
      {FC_K_BITS, "k_bits", false, p.k_bits},
      {FC_V_BITS, "v_bits", false, p.v_bits},
  };

  a.inputs = {
      input(BUF_Q, "q", p.q),
      input(BUF_K_PACKED, "k_packed", p.k_packed),
      input(BUF_K_SCALES, "k_scales", p.k_scales),
      input(BUF_K_BIASES, "k_biases", p.k_biases),
      input(BUF_V_PACKED, "v_packed", p.v_packed),
      input(BUF_V_SCALES, "v_scales", p.v_scales),
      input(BUF_V_BIASES, "v_biases", p.v_biases),
  };
  if (p.has_tail) {
    a.inputs.push_back(input(BUF_K_TAIL, "k_tail", p.k_tail));
    a.inputs.push_back(input(BUF_V_TAIL, "v_tail", p.v_tail));
  }
  if (array_mask(p)) a.inputs.push_back(input(BUF_MASK, "mask", p.mask));
  a.inputs.push_back(Binding{BUF_IPARAMS, K::int32s, "iparams", 0, a.ip, {}, 0.f});
  a.inputs.push_back(Binding{BUF_STRIDES, K::int64s, "strides", 0, {}, a.st, 0.f});
  a.inputs.push_back(Binding{BUF_SCALE, K::float32, "scale_log2e", 0, {}, {}, p.scale * 1.4426950408889634f});
  return a;
}

void sort_bindings(Plan& plan) {
  for (auto& l : plan.launches) {
    std::sort(l.buffers.begin(), l.buffers.end(), [](const Binding& a, const Binding& b) { return a.index < b.index; });
  }
}

Plan decode_core(const Problem& p) {
  // ---- explicit fallbacks (the caller uses another path) ----
  if (p.D != 64 && p.D != 128 && p.D != 256) {
    return unsupported("head dim " + std::to_string(p.D) + " has no decode instance (64, 128, 256)");
  }
  if (p.group_size != 32 && p.group_size != 64 && p.group_size != 128) {
    return unsupported("group size " + std::to_string(p.group_size) + " (decode kernels: 32, 64, 128)");
  }
  if (std::string why = gpu::bits_problem(p, true, "Metal"); !why.empty()) return unsupported(why);
  if (std::string why = gpu::layout_problem(p); !why.empty()) return unsupported(why);
  const int G = p.Hq / p.Hkv;
  const int R = G * p.L;
  const int ROWS = p.D == 256 ? 4 : 8; // the instances' ROWS (registers: 2 * ROWS * D / 32 floats)
  const int row_tiles = (R + ROWS - 1) / ROWS;
  if (row_tiles > kMaxDecodeRowTiles) {
    return unsupported("too many query rows per KV head for the decode kernel (" + std::to_string(R) +
                       " > " + std::to_string(ROWS * kMaxDecodeRowTiles) + "): prefill");
  }
  const int64_t NT = p.N + p.T;

  Plan plan;
  plan.supported = true;
  plan.path = Path::decode;
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

  const Args a = make_args(p, blocks, block_len);
  using K = Binding::Kind;
  // K and V bits 4 or 8: the instance with both as template parameters; any other pair
  // (a 2-, 3-, 5- or 6-bit side): the bit-stream instance, widths from constants 50/51.
  auto byte_aligned = [](int bits) { return bits == 4 || bits == 8; };
  const std::string suffix = std::string(type_name(p.q.dtype)) + "_" + std::to_string(p.D) +
      (byte_aligned(p.k_bits) && byte_aligned(p.v_bits)
           ? "_k" + std::to_string(p.k_bits) + "v" + std::to_string(p.v_bits)
           : std::string("_stream"));
  const std::array<int, 3> tg = {32 * kDecodeSimdgroups, 1, 1};
  const std::array<int, 3> grid = {p.B * p.Hkv, row_tiles, int(blocks)};

  if (!plan.two_pass) {
    Launch l{"sdpa_int4", "sdpa_int4_decode_1pass_" + suffix, a.fcs, a.inputs, grid, tg};
    l.buffers.push_back(Binding{BUF_OUT, K::output, "out", 0, {}, {}, 0.f});
    if (p.has_sinks) l.buffers.push_back(input(BUF_SINKS, "sinks", p.sinks));
    plan.launches.push_back(std::move(l));
  } else {
    const int64_t prow = int64_t(p.B) * p.Hkv * R; // (b, hkv, row)
    plan.scratch = {{"partial_out", prow * blocks * p.D * 4}, {"partial_max", prow * blocks * 4},
                    {"partial_sum", prow * blocks * 4}};
    Launch l1{"sdpa_int4", "sdpa_int4_decode_2pass_1_" + suffix, a.fcs, a.inputs, grid, tg};
    l1.buffers.push_back(Binding{BUF_OUT, K::scratch, "partial_out", 0, {}, {}, 0.f});
    l1.buffers.push_back(Binding{BUF_PART_MAX, K::scratch, "partial_max", 0, {}, {}, 0.f});
    l1.buffers.push_back(Binding{BUF_PART_SUM, K::scratch, "partial_sum", 0, {}, {}, 0.f});
    plan.launches.push_back(std::move(l1));
    Launch l2{"sdpa_int4", "sdpa_int4_decode_2pass_2_" + std::string(type_name(p.q.dtype)) + "_" + std::to_string(p.D),
              a.fcs, {}, {p.B * p.Hkv, R, 1}, {p.D, 1, 1}};
    l2.buffers = {
        Binding{MBUF_PART_OUT, K::scratch, "partial_out", 0, {}, {}, 0.f},
        Binding{MBUF_PART_MAX, K::scratch, "partial_max", 0, {}, {}, 0.f},
        Binding{MBUF_PART_SUM, K::scratch, "partial_sum", 0, {}, {}, 0.f},
        Binding{MBUF_OUT, K::output, "out", 0, {}, {}, 0.f},
        Binding{MBUF_IPARAMS, K::int32s, "iparams", 0, a.ip, {}, 0.f},
        Binding{MBUF_STRIDES, K::int64s, "strides", 0, {}, a.st, 0.f},
    };
    if (p.has_sinks) l2.buffers.push_back(input(MBUF_SINKS, "sinks", p.sinks));
    plan.launches.push_back(std::move(l2));
  }
  sort_bindings(plan);
  return plan;
}

Plan prefill_core(const Problem& p) {
  if (p.D != 64 && p.D != 80 && p.D != 96 && p.D != 128 && p.D != 256) {
    return unsupported("head dim " + std::to_string(p.D) + " has no prefill instance (64, 80, 96, 128, 256)");
  }
  if (p.group_size != 16 && p.group_size != 32 && p.group_size != 64 && p.group_size != 128) {
    return unsupported("group size " + std::to_string(p.group_size) + " (prefill kernel: 16, 32, 64, 128)");
  }
  if (std::string why = gpu::bits_problem(p, true, "Metal"); !why.empty()) return unsupported(why);
  if (std::string why = gpu::layout_problem(p); !why.empty()) return unsupported(why);
  const int R = (p.Hq / p.Hkv) * p.L;
  const int row_tiles = (R + kPrefillRowTile - 1) / kPrefillRowTile;
  if (int64_t(p.B) * p.Hkv >= (int64_t(1) << 31) || row_tiles >= 65536) {
    return unsupported("grid too large for the prefill kernel");
  }

  Plan plan;
  plan.supported = true;
  plan.path = Path::prefill;
  plan.blocks = 1;
  plan.block_len = std::max<int64_t>(1, p.N + p.T);
  plan.rows = R;
  plan.rows_per_threadgroup = kPrefillRowTile;
  plan.row_tiles = row_tiles;
  plan.simdgroups = kPrefillRowTile / 8;
  plan.key_tile = kPrefillKeyTile;

  // The bits are function constants (make_args), any width bits_problem accepts.
  const Args a = make_args(p, 1, plan.block_len);
  Launch l{"sdpa_int4_prefill", "sdpa_int4_prefill_" + std::string(type_name(p.q.dtype)) + "_" + std::to_string(p.D), a.fcs,
           a.inputs, {p.B * p.Hkv, row_tiles, 1}, {32 * plan.simdgroups, 1, 1}};
  l.buffers.push_back(Binding{BUF_OUT, Binding::Kind::output, "out", 0, {}, {}, 0.f});
  if (p.has_sinks) l.buffers.push_back(input(BUF_SINKS, "sinks", p.sinks));
  plan.launches.push_back(std::move(l));
  sort_bindings(plan);
  return plan;
}

// ---- inputs with a strided last axis: copied first (metal/sdpa_int4_copy.metal) ----

struct DenseInput {
  const char* name;
  TensorRef Problem::*ref;
  std::array<int64_t, 4> shape;
};

// The inputs the kernels read with a contiguous last axis, and their shapes.
std::vector<DenseInput> dense_inputs(const Problem& p) {
  const int64_t kw = int64_t(p.D) * p.k_bits / 32, vw = int64_t(p.D) * p.v_bits / 32;
  const int64_t ng = p.group_size > 0 ? p.D / p.group_size : 0;
  std::vector<DenseInput> r = {
      {"q", &Problem::q, {p.B, p.Hq, p.L, p.D}},
      {"k_packed", &Problem::k_packed, {p.B, p.Hkv, p.N, kw}},
      {"k_scales", &Problem::k_scales, {p.B, p.Hkv, p.N, ng}},
      {"k_biases", &Problem::k_biases, {p.B, p.Hkv, p.N, ng}},
      {"v_packed", &Problem::v_packed, {p.B, p.Hkv, p.N, vw}},
      {"v_scales", &Problem::v_scales, {p.B, p.Hkv, p.N, ng}},
      {"v_biases", &Problem::v_biases, {p.B, p.Hkv, p.N, ng}},
  };
  if (p.has_tail) {
    r.push_back({"k_tail", &Problem::k_tail, {p.B, p.Hkv, p.T, p.D}});
    r.push_back({"v_tail", &Problem::v_tail, {p.B, p.Hkv, p.T, p.D}});
  }
  return r;
}

// `core` on the problem with every strided input replaced by a contiguous scratch copy,
// the copy launches first.
Plan with_copies(const Problem& p, Plan (*core)(const Problem&)) {
  using K = Binding::Kind;
  Problem c = p;
  std::vector<Launch> copies;
  std::vector<Scratch> scratch;
  std::vector<std::string> copied;
  for (const DenseInput& d : dense_inputs(p)) {
    TensorRef& t = c.*d.ref;
    if (t.strides.size() != 4 || t.strides[3] == 1) continue; // in place (or layout_problem says why not)
    const auto [d0, d1, d2, d3] = d.shape;
    const std::vector<int64_t> dense = {d1 * d2 * d3, d2 * d3, d3, 1};
    if (d0 * d1 * d2 * d3 == 0) { // never read
      t.strides = dense;
      continue;
    }
    if (d0 * d1 >= (int64_t(1) << 31) || d2 >= (int64_t(1) << 31) || d3 >= (int64_t(1) << 31)) {
      return unsupported(std::string(d.name) + ": too large to copy");
    }
    const int esize = t.dtype == DType::f16 || t.dtype == DType::bf16 ? 2 : 4;
    const std::string name = std::string(d.name) + "_contiguous";
    scratch.push_back({name, (d0 * d1 * d2 * d3 * esize + 3) / 4 * 4});
    Launch l{"sdpa_int4_copy", esize == 2 ? "sdpa_int4_copy_4d_b2" : "sdpa_int4_copy_4d_b4", {}, {},
             {int((d3 + kCopyThreadgroup[0] - 1) / kCopyThreadgroup[0]),
              int((d2 + kCopyThreadgroup[1] - 1) / kCopyThreadgroup[1]), int(d0 * d1)},
             {kCopyThreadgroup[0], kCopyThreadgroup[1], 1}};
    l.buffers = {
        Binding{0, K::input, d.name, t.offset, {}, {}, 0.f},
        Binding{1, K::scratch, name, 0, {}, {}, 0.f},
        Binding{2, K::int32s, "shape", 0, {int32_t(d0), int32_t(d1), int32_t(d2), int32_t(d3)}, {}, 0.f},
        Binding{3, K::int64s, "strides", 0, {}, t.strides, 0.f},
    };
    copies.push_back(std::move(l));
    copied.push_back(d.name);
    t.offset = 0;
    t.strides = dense;
  }
  Plan plan = core(c);
  if (!plan.supported || copies.empty()) return plan;
  for (auto& l : plan.launches) {
    for (auto& b : l.buffers) {
      if (b.kind == K::input && std::find(copied.begin(), copied.end(), b.name) != copied.end()) {
        b.kind = K::scratch;
        b.name += "_contiguous";
        b.offset = 0;
      }
    }
  }
  plan.scratch.insert(plan.scratch.begin(), scratch.begin(), scratch.end());
  plan.launches.insert(plan.launches.begin(), copies.begin(), copies.end());
  return plan;
}

// Unsupported when a launch's threadgroup exceeds its pipeline's known limit.
Plan within_limits(Plan plan, const Problem& p) {
  if (!plan.supported) return plan;
  for (const Launch& l : plan.launches) {
    const auto it = p.max_threads.find(l.kernel);
    const int threads = l.threadgroup[0] * l.threadgroup[1] * l.threadgroup[2];
    if (it != p.max_threads.end() && threads > it->second) {
      return unsupported(l.kernel + " allows " + std::to_string(it->second) +
                         " threads per threadgroup (maxTotalThreadsPerThreadgroup), the plan needs " +
                         std::to_string(threads));
    }
  }
  return plan;
}

} // namespace

Plan plan_sdpa_int4_decode(const Problem& p) {
  return within_limits(with_copies(p, decode_core), p);
}

Plan plan_sdpa_int4_prefill(const Problem& p) {
  return within_limits(with_copies(p, prefill_core), p);
}

Plan plan_sdpa_int4(const Problem& p) {
  Plan decode = plan_sdpa_int4_decode(p);
  if (decode.supported) return decode;
  Plan prefill = plan_sdpa_int4_prefill(p);
  if (prefill.supported) return prefill;
  prefill.reason = "no Metal kernel: decode: " + decode.reason + "; prefill: " + prefill.reason;
  return prefill;
}

std::string metal_unsupported_reason(const Problem& p) {
  Problem c = p;
  for (TensorRef* t : {&c.q, &c.k_packed, &c.k_scales, &c.k_biases, &c.v_packed, &c.v_scales, &c.v_biases,
                       &c.k_tail, &c.v_tail}) {
    t->offset = 0;
    t->strides = {0, 0, 0, 1};
  }
  c.mask.strides = {0, 0, 0, 0};
  c.sinks.strides = {1};
  const Plan plan = plan_sdpa_int4(c);
  return plan.supported ? std::string() : plan.reason;
}

} // namespace tqmetal::metal
