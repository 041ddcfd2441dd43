// Plans of the CUDA kernels; see dispatch_plan.h.
#include "cuda/dispatch_plan.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "gpu/layout_checks.h"

namespace tqmetal::cuda {

namespace {

using gpu::array_mask;
using gpu::stride_or0;

// Codes of cuda/sdpa_int4_params.h (tqc::DT_*, tqc::MK_*, tqc::ST_*).
enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_BOOL = 3 };
enum { MK_NONE = 0, MK_CAUSAL = 1, MK_BOOL = 2, MK_ADDITIVE = 3 };
enum {
  ST_Q = 0, ST_K_PACKED = 3, ST_K_SCALES = 6, ST_K_BIASES = 9, ST_V_PACKED = 12,
  ST_V_SCALES = 15, ST_V_BIASES = 18, ST_K_TAIL = 21, ST_V_TAIL = 24, ST_MASK = 27,
  ST_SINKS = 31
};

// K or V in a width other than 4 and 8 (codes may straddle words).
bool bit_stream(const Problem& p) {
  auto whole = [](int b) { return b == 4 || b == 8; };
  return !whole(p.k_bits) || !whole(p.v_bits);
}

int dtype_code(DType d) {
  return d == DType::f16 ? DT_F16 : d == DType::bf16 ? DT_BF16 : d == DType::boolean ? DT_BOOL : DT_F32;
}

Plan unsupported(std::string why) {
  Plan p;
  p.reason = std::move(why);
  return p;
}

Args make_args(const Problem& p, int64_t blocks, int64_t block_len) {
  Args a;
  a.B = p.B;
  a.Hq = p.Hq;
  a.Hkv = p.Hkv;
  a.L = p.L;
  a.G = p.Hq / p.Hkv;
  a.R = a.G * p.L;
  a.N = int(p.N);
  a.T = int(p.T);
  a.blocks = int(blocks);
  a.block_len = int(block_len);
  auto put3 = [&](int at, const TensorRef& t) {
    for (int i = 0; i < 3; ++i) a.strides[at + i] = stride_or0(t, i);
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
    for (int i = 0; i < 4; ++i) a.strides[ST_MASK + i] = p.mask.strides[i];
  }
  if (p.has_sinks) a.strides[ST_SINKS] = stride_or0(p.sinks, 0);
  a.q_dtype = dtype_code(p.q.dtype);
  a.scale_dtype = dtype_code(p.k_scales.dtype);
  a.tail_dtype = p.has_tail ? dtype_code(p.k_tail.dtype) : DT_F32;
  a.mask_dtype = array_mask(p) ? dtype_code(p.mask.dtype) : DT_F32;
  a.sinks_dtype = p.has_sinks ? dtype_code(p.sinks.dtype) : DT_F32;
  a.mask_kind = p.mask_kind == MaskKind::causal ? MK_CAUSAL
      : p.mask_kind == MaskKind::boolean        ? MK_BOOL
      : p.mask_kind == MaskKind::additive       ? MK_ADDITIVE
                                                : MK_NONE;
  a.qscale = p.scale * 1.4426950408889634f;
  return a;
}

// The inputs a kernel reads, by name (eval_gpu declares them to MLX's encoder).
std::vector<std::string> input_names(const Problem& p) {
  std::vector<std::string> r = {"q", "k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases"};
  if (p.has_tail) {
    r.push_back("k_tail");
    r.push_back("v_tail");
  }
  if (array_mask(p)) r.push_back("mask");
  if (p.has_sinks) r.push_back("sinks");
  return r;
}

// Widest load (16, 8 or 4 bytes, at most `lane_bytes`) every lane's code slice allows
// for a packed cache tensor: its address and its strides (of axes longer than 1).
int vector_width(const TensorRef& t, const std::array<int64_t, 3>& sizes, int lane_bytes) {
  for (int vw : {16, 8, 4}) {
    if (vw > lane_bytes) continue;
    bool ok = t.offset % vw == 0;
    for (int i = 0; i < 3 && ok; ++i) {
      if (sizes[i] > 1) ok = (4 * stride_or0(t, i)) % vw == 0;
    }
    if (ok) return vw;
  }
  return 4;
}

} // namespace

// Decode tuning (tests and benchmarks only): "TL,PF,MINB,CTAS,PIPE" in TQMETAL_CUDA_DECODE
// overrides tiles per warp step, prefetch distance (steps), the launch bound's CTAs per
// SM, the CTAs per SM the split aims at and the register pipeline (next step's loads in
// flight while one computes); absent or negative fields keep the defaults.
DecodeTuning decode_tuning(int D, int groups, bool qsplit, bool bit_stream) {
  DecodeTuning t;
  t.tiles = kDecodeTiles;
  t.prefetch = kDecodePrefetch;
  t.pipeline = kDecodePipeline;
  // fewer CTAs per SM where the fragments need more registers than 128 (no spills);
  // bit-stream widths (2, 3, 5, 6) hold their codes' covering words and unpack them
  // with funnel shifts: K5V3 at D 128, group 64 takes 152 registers (NVRTC 13.0, sm_90)
  t.min_ctas = D > 128 ? 2 : (qsplit || groups > 2 || bit_stream) ? 3 : kDecodeMinCtas;
  t.ctas_per_sm = t.min_ctas;
  if (const char* e = std::getenv("TQMETAL_CUDA_DECODE")) {
    int v[5] = {-1, -1, -1, -1, -1};
    std::sscanf(e, "%d,%d,%d,%d,%d", &v[0], &v[1], &v[2], &v[3], &v[4]);
    if (v[4] >= 0) t.pipeline = v[4] != 0;
    if (v[0] == 1 || v[0] == 2) t.tiles = v[0];
    if (v[1] >= 0) t.prefetch = std::min(v[1], 16);
    if (v[2] > 0) t.min_ctas = std::min(v[2], 8);
    t.ctas_per_sm = v[3] > 0 ? v[3] : t.min_ctas;
  }
  return t;
}

Plan plan_sdpa_int4_decode(const Problem& p) {
  if (p.D != 64 && p.D != 128 && p.D != 256) {
    return unsupported("head dim " + std::to_string(p.D) + " has no decode instance (64, 128, 256)");
  }
  if (p.group_size != 32 && p.group_size != 64 && p.group_size != 128) {
    return unsupported("group size " + std::to_string(p.group_size) + " (decode kernels: 32, 64, 128)");
  }
  if (std::string why = gpu::bits_problem(p, true, "CUDA"); !why.empty()) return unsupported(why);
  if (std::string why = gpu::layout_problem(p); !why.empty()) return unsupported(why);
  for (const TensorRef* t : {&p.k_packed, &p.v_packed, &p.k_scales, &p.k_biases, &p.v_scales, &p.v_biases}) {
    if (p.N > 0 && stride_or0(*t, 2) >= (int64_t(1) << 24)) return unsupported("token stride too large for the decode kernel");
  }
  const int G = p.Hq / p.Hkv;
  const int R = G * p.L;
  const int ROWS = kDecodeRows;
  const int row_tiles = (R + ROWS - 1) / ROWS;
  if (row_tiles > kMaxDecodeRowTiles) {
    return unsupported("too many query rows per KV head for the decode kernel (" + std::to_string(R) +
                       " > " + std::to_string(ROWS * kMaxDecodeRowTiles) + "): prefill");
  }
  const DecodeTuning tune = decode_tuning(p.D, p.D / p.group_size, p.q.dtype == DType::f32, bit_stream(p));
  const int64_t NT = p.N + p.T;

  Plan plan;
  plan.supported = true;
  plan.path = Path::decode;
  plan.rows = R;
  plan.rows_per_cta = ROWS;
  plan.row_tiles = row_tiles;
  plan.warps = kDecodeWarps;
  plan.lanes_per_token = 4; // the K codes of a token: 4 lanes (the mma's k pairs), D / 4 codes each
  plan.elems_per_lane = p.D / 4;
  plan.tiles = tune.tiles;
  plan.prefetch = tune.prefetch;
  plan.min_ctas = tune.min_ctas;
  plan.pipeline = tune.pipeline;
  // Per lane, token and group the kernel loads GS / 4 K codes and GS / 8 V codes as one
  // piece each (2-32 bytes, at piece-aligned offsets in the token's row), in loads of at
  // most vector_bytes: what the rows' alignment allows.
  const std::array<int64_t, 3> sizes = {p.B, p.Hkv, p.N};
  plan.vector_bytes = p.N == 0 ? 16
                               : std::min(vector_width(p.k_packed, sizes, 16), vector_width(p.v_packed, sizes, 16));

  // ---- one pass or split-K ----
  const int64_t base_ctas = int64_t(p.B) * p.Hkv * row_tiles;
  int64_t blocks = 1;
  if (p.blocks > 0) {
    blocks = p.blocks;
  } else {
    const int64_t want = int64_t(tune.ctas_per_sm) * std::max(1, p.gpu_cores);
    if (base_ctas < want) {
      blocks = std::min<int64_t>((want + base_ctas - 1) / base_ctas, std::max<int64_t>(1, NT / kMinBlockLen));
    }
  }
  blocks = std::max<int64_t>(1, std::min<int64_t>({blocks, std::max<int64_t>(1, NT), 65535}));
  const int64_t step = int64_t(kDecodeWarps) * 16 * tune.tiles; // tokens per CTA iteration
  int64_t block_len = (NT + blocks - 1) / blocks;
  block_len = std::max<int64_t>(step, (block_len + step - 1) / step * step);
  blocks = std::max<int64_t>(1, (NT + block_len - 1) / block_len); // no empty block
  if (blocks == 1) block_len = std::max<int64_t>(NT, 1);
  plan.blocks = int(blocks);
  plan.block_len = block_len;
  plan.two_pass = blocks > 1;
  plan.args = make_args(p, blocks, block_len);

  const bool qsplit = p.q.dtype == DType::f32; // float32 q: q and p as float16 hi + lo
  const int sdt = dtype_code(p.k_scales.dtype);
  auto tmpl = [&](bool partial) {
    return std::to_string(p.D) + ", " + std::to_string(p.k_bits) + ", " + std::to_string(p.v_bits) + ", " +
        std::to_string(p.group_size) + ", " + std::to_string(plan.vector_bytes) + ", " + std::to_string(sdt) + ", " +
        (qsplit ? "true" : "false") + ", " + (partial ? "true" : "false") + ", " + std::to_string(tune.tiles) + ", " +
        std::to_string(tune.prefetch) + ", " + (tune.pipeline ? "true" : "false");
  };
  const std::string bounds = "__launch_bounds__(" + std::to_string(32 * kDecodeWarps) + ", " +
      std::to_string(tune.min_ctas) + ")";
  plan.program = "decode_D" + std::to_string(p.D) + "_k" + std::to_string(p.k_bits) + "v" +
      std::to_string(p.v_bits) + "_g" + std::to_string(p.group_size) + "_w" + std::to_string(plan.vector_bytes) +
      "_s" + std::to_string(sdt) + (qsplit ? "_q32" : "_q16") + "_t" + std::to_string(tune.tiles) + "_pf" +
      std::to_string(tune.prefetch) + "_b" + std::to_string(tune.min_ctas) + (tune.pipeline ? "_pipe" : "") + (plan.two_pass ? "_split" : "_1pass");
  const std::array<int, 3> grid = {p.B * p.Hkv, row_tiles, int(blocks)};
  const std::array<int, 3> block = {32 * kDecodeWarps, 1, 1};
  std::vector<std::string> reads = input_names(p);
  if (!plan.two_pass) {
    plan.entry_source = "extern \"C\" __global__ void " + bounds + " tq_decode(TqParams p) { tqc::decode_impl<" +
        tmpl(false) + ">(p); }\n";
    plan.launches.push_back(Launch{"tq_decode", grid, block, 0, reads, {"out"}});
  } else {
    const int64_t prow = int64_t(p.B) * p.Hkv * R;
    plan.scratch = {{"part_out", prow * blocks * p.D * 4}, {"part_max", prow * blocks * 4},
                    {"part_sum", prow * blocks * 4}};
    plan.entry_source = "extern \"C\" __global__ void " + bounds + " tq_decode_partial(TqParams p) { tqc::decode_impl<" +
        tmpl(true) + ">(p); }\n" + "extern \"C\" __global__ void tq_decode_merge(TqParams p) { tqc::decode_merge_impl<" +
        std::to_string(p.D) + ">(p); }\n";
    reads.erase(std::remove(reads.begin(), reads.end(), "sinks"), reads.end()); // pass 2 applies them
    plan.launches.push_back(Launch{"tq_decode_partial", grid, block, 0, reads, {"part_out", "part_max", "part_sum"}});
    std::vector<std::string> merge_reads = {"part_out", "part_max", "part_sum"};
    if (p.has_sinks) merge_reads.push_back("sinks");
    plan.launches.push_back(Launch{"tq_decode_merge", {p.B * p.Hkv, R, 1}, {p.D, 1, 1}, 0, merge_reads, {"out"}});
  }
  return plan;
}

// Which prefill kernel: the fast one (cuda/sdpa_int4_prefill.cuh, prefill_fast_impl)
// where it covers the problem (4 or 8 bits), else the generic one (also every
// bit-stream width). TQMETAL_CUDA_PREFILL = "generic",
// "fast4" or "fast8" (warps per CTA) overrides the choice for tests and benchmarks.
PrefillChoice prefill_choice(const Problem& p) {
  PrefillChoice c;
  const std::array<int64_t, 3> sizes = {p.B, p.Hkv, p.N};
  const bool covered = p.q.dtype != DType::f32 && (p.D == 64 || p.D == 128) && !bit_stream(p) &&
      p.group_size * p.k_bits >= 128 && p.group_size * p.v_bits >= 128 && // a 16-byte piece inside one group
      (p.N == 0 || (vector_width(p.k_packed, sizes, 16) == 16 && vector_width(p.v_packed, sizes, 16) == 16));
  c.fast = covered;
  c.warps = kPrefillFastWarps;
  if (const char* e = std::getenv("TQMETAL_CUDA_PREFILL")) {
    const std::string v = e;
    if (v == "generic") c.fast = false;
    if (v == "fast4") c.warps = 4;
    if (v == "fast8") c.warps = 8;
  }
  if (!c.fast) c.warps = kPrefillWarps;
  return c;
}

Plan plan_sdpa_int4_prefill(const Problem& p) {
  if (p.D != 64 && p.D != 80 && p.D != 96 && p.D != 128 && p.D != 256) {
    return unsupported("head dim " + std::to_string(p.D) + " has no prefill instance (64, 80, 96, 128, 256)");
  }
  if (p.group_size != 16 && p.group_size != 32 && p.group_size != 64 && p.group_size != 128) {
    return unsupported("group size " + std::to_string(p.group_size) + " (prefill kernel: 16, 32, 64, 128)");
  }
  if (std::string why = gpu::bits_problem(p, true, "CUDA"); !why.empty()) return unsupported(why);
  if (std::string why = gpu::layout_problem(p); !why.empty()) return unsupported(why);
  const PrefillChoice choice = prefill_choice(p);
  const int rows_per_cta = choice.fast ? 16 * choice.warps : kPrefillRows;
  const int R = (p.Hq / p.Hkv) * p.L;
  const int row_tiles = (R + rows_per_cta - 1) / rows_per_cta;
  if (int64_t(p.B) * p.Hkv >= (int64_t(1) << 31) || row_tiles > 65535) {
    return unsupported("grid too large for the prefill kernel");
  }
  Plan plan;
  plan.supported = true;
  plan.path = Path::prefill;
  plan.fast_prefill = choice.fast;
  plan.blocks = 1;
  plan.block_len = std::max<int64_t>(1, p.N + p.T);
  plan.rows = R;
  plan.rows_per_cta = rows_per_cta;
  plan.row_tiles = row_tiles;
  plan.warps = choice.warps;
  plan.key_tile = p.D > 128 ? 32 : 64;
  plan.mma_type = p.q.dtype == DType::f32 ? 2 : 0; // bfloat16 q: exact in float16, whose 11-bit K, V and P meet the bounds
  plan.args = make_args(p, 1, plan.block_len);
  const std::string tmpl_bits = std::to_string(p.D) + ", " + std::to_string(p.k_bits) + ", " +
      std::to_string(p.v_bits) + ", " + std::to_string(p.group_size);
  const std::string suffix = "_D" + std::to_string(p.D) + "_k" + std::to_string(p.k_bits) + "v" +
      std::to_string(p.v_bits) + "_g" + std::to_string(p.group_size);
  int smem = 0;
  if (choice.fast) {
    // two stages of K and V tiles, [key][D + 8] float16 each (K: exact codes), and of
    // K's scales and biases, float32 per key and group (applied to the scores)
    smem = 2 * 2 * plan.key_tile * (p.D + 8) * 2 + 2 * int(p.D / p.group_size) * plan.key_tile * 2 * 4;
    // float16 scales and biases: 16-bit loads; V dequantized with one fma.f16x2 per pair
    const bool h16 = p.k_scales.dtype == DType::f16;
    plan.program = "prefillfast_w" + std::to_string(choice.warps) + suffix + (h16 ? "_h16" : "");
    plan.entry_source = "extern \"C\" __global__ void __launch_bounds__(" + std::to_string(32 * choice.warps) + ", " +
        std::to_string(choice.warps >= 8 ? 1 : 2) + ") tq_prefill(TqParams p) { tqc::prefill_fast_impl<" + tmpl_bits +
        ", " + std::to_string(choice.warps) + ", " + (h16 ? "true" : "false") + ">(p); }\n" + "static_assert(tqc::prefill_fast_smem_bytes<" +
        std::to_string(p.D) + ", " + std::to_string(p.group_size) + ">() == " + std::to_string(smem) +
        ", \"host and kernel disagree on shared memory\");\n";
  } else {
    // K as float16 hi + lo (also for float16 q: K's float16 rounding alone moved rows
    // that one key dominates past the float16 bound, at D 80 on the H100)
    const int nsplit = plan.mma_type == 2 ? 2 : 1, nk = 2;
    const int QS = p.D + 8, VS = plan.key_tile + 8;
    smem = (nsplit * kPrefillRows * QS + nk * plan.key_tile * QS + nsplit * p.D * VS) * 2;
    plan.program = "prefill_mt" + std::to_string(plan.mma_type) + suffix + "_ks";
    plan.entry_source = "extern \"C\" __global__ void __launch_bounds__(" + std::to_string(32 * kPrefillWarps) +
        ") tq_prefill(TqParams p) { tqc::prefill_impl<" + std::to_string(plan.mma_type) + ", " + tmpl_bits +
        ", true>(p); }\n" + "static_assert(tqc::prefill_smem_bytes<" + std::to_string(plan.mma_type) + ", " +
        std::to_string(p.D) + ", true>() == " + std::to_string(smem) + ", \"host and kernel disagree on shared memory\");\n";
  }
  plan.launches.push_back(Launch{"tq_prefill", {p.B * p.Hkv, row_tiles, 1}, {32 * plan.warps, 1, 1}, smem,
                                 input_names(p), {"out"}});
  return plan;
}

Plan plan_sdpa_int4(const Problem& p) {
  Plan decode = cuda::plan_sdpa_int4_decode(p);
  if (decode.supported) return decode;
  Plan prefill = cuda::plan_sdpa_int4_prefill(p);
  if (prefill.supported) return prefill;
  prefill.reason = "no CUDA kernel: decode: " + decode.reason + "; prefill: " + prefill.reason;
  return prefill;
}

std::string cuda_unsupported_reason(const Problem& p) {
  Problem c = p;
  for (TensorRef* t : {&c.q, &c.k_packed, &c.k_scales, &c.k_biases, &c.v_packed, &c.v_scales, &c.v_biases,
                       &c.k_tail, &c.v_tail}) {
    t->offset = 0;
    t->strides = {0, 0, 0, 1};
  }
  c.mask.strides = {0, 0, 0, 0};
  c.sinks.strides = {1};
  const Plan plan = cuda::plan_sdpa_int4(c);
  return plan.supported ? std::string() : plan.reason;
}

} // namespace tqmetal::cuda
