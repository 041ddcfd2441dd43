// Host plan of the Metal kernels (metal/sdpa_int4_decode.h, metal/sdpa_int4_prefill.h):
// which path (decode 1-pass, decode split-K 2-pass, prefill), which kernels, function
// constants, buffer bindings, scalar arguments, scratch buffers and grid a launch uses.
// Pure C++ (no Metal headers): eval_gpu executes this plan on a Mac, and the tests run
// the same plan through the MSL emulator (tests/mslemu).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tqmetal::metal {

enum class DType : uint8_t { f32, f16, bf16, boolean };
enum class MaskKind : uint8_t { none, causal, boolean, additive };

// One input as the kernel reads it: byte offset of its first element in its buffer
// (MLX's array offset) and element strides; strides of absent axes are ignored.
struct TensorRef {
  DType dtype = DType::f32;
  int64_t offset = 0; // bytes
  std::vector<int64_t> strides; // elements, one per axis of the array
};

// The problem, as eval_gpu sees the primitive's inputs. Shapes follow
// tqmetal::sdpa_int4: q [B, Hq, L, D], packed [B, Hkv, N, D * bits / 32], scales and
// biases [B, Hkv, N, D / group_size], tails [B, Hkv, T, D], mask right-aligned on
// [B, Hq, L, N + T] (strides already 0 on broadcast axes, 4 entries), sinks [Hq].
struct Problem {
  int B = 1, Hq = 1, Hkv = 1, L = 1, D = 128;
  int64_t N = 0, T = 0;
  int group_size = 64, k_bits = 4, v_bits = 4;
  float scale = 1.f;
  TensorRef q, k_packed, k_scales, k_biases, v_packed, v_scales, v_biases;
  bool has_tail = false;
  TensorRef k_tail, v_tail;
  MaskKind mask_kind = MaskKind::none;
  TensorRef mask; // 4 strides (b, h, l, n)
  bool has_sinks = false;
  TensorRef sinks;
  // Tuning: token blocks (0 = automatic, 1 = force single pass, n = at most n
  // blocks) and the GPU's core count the automatic choice aims to fill.
  int blocks = 0;
  int gpu_cores = 32;
  // Pipeline limits eval_gpu has read (maxTotalThreadsPerThreadgroup of the compiled
  // kernel, which Apple's compiler may lower below the device's 1024 for register-heavy
  // kernels), by kernel name: no launch is planned with a larger threadgroup. The
  // decode kernels' 512 threads then give way to the prefill kernel's 128.
  std::map<std::string, int> max_threads;
};

struct FunctionConstant {
  int index;
  std::string name;
  bool is_bool;
  int value;
};

// What a [[buffer(index)]] is bound to.
struct Binding {
  enum class Kind { input, output, scratch, int32s, int64s, float32 };
  int index;
  Kind kind;
  std::string name; // input/scratch name ("q", "k_packed", ..., "partial_out"), or the argument name
  int64_t offset = 0; // bytes into the input's buffer
  std::vector<int32_t> i32;
  std::vector<int64_t> i64;
  float f32 = 0.f;
};

struct Launch {
  std::string library; // the source that instantiates the kernel: metal/<library>.metal
  std::string kernel; // host name
  std::vector<FunctionConstant> constants;
  std::vector<Binding> buffers;
  std::array<int, 3> grid; // threadgroups (dispatchThreadgroups)
  std::array<int, 3> threadgroup; // threads per threadgroup
};

struct Scratch {
  std::string name; // "partial_*" (split-K), or "<input>_contiguous" (a copied input)
  int64_t bytes;
};

enum class Path : uint8_t { none, decode, prefill };

struct Plan {
  bool supported = false;
  std::string reason; // why not, when !supported (the caller falls back to the CPU op)
  Path path = Path::none;
  bool two_pass = false;
  int blocks = 1;
  int64_t block_len = 0;
  int rows = 0; // query rows per KV head (G * L)
  int rows_per_threadgroup = 0; // decode: the kernel's ROWS; prefill: BQ
  int row_tiles = 0; // threadgroups per (b, KV head) along the rows
  int simdgroups = 0; // decode: the kernel's BN; prefill: BQ / 8
  int key_tile = 0; // prefill: BK, keys per step
  std::vector<Scratch> scratch; // buffers (float32-sized) the launches write and read
  std::vector<Launch> launches; // in order; the first to bind a scratch buffer writes it
};

inline constexpr int kDecodeSimdgroups = 16; // BN of the instances in sdpa_int4.metal
inline constexpr int kMaxDecodeRowTiles = 4; // beyond (> 32 rows, > 16 at D = 256): prefill's job
inline constexpr int64_t kMinBlockLen = 256; // tokens per block of the automatic split
inline constexpr int kPrefillRowTile = 32; // BQ of the prefill instances (4 simdgroups of 8 rows)
inline constexpr int kPrefillKeyTile = 16; // BK of the prefill instances
inline constexpr int kCopyThreadgroup[2] = {32, 8}; // metal/sdpa_int4_copy.metal

// The .metal files (stems) whose kernels the plans launch, in one metallib or compiled
// from their embedded sources at run time (csrc/metal/sdpa_int4_metal.cpp).
inline constexpr const char* kLibraries[] = {"sdpa_int4", "sdpa_int4_prefill", "sdpa_int4_copy"};

// Every plan reads an input whose last axis is strided (a transposed view) through a
// copy into a contiguous scratch buffer (sdpa_int4_copy_4d, planned first); inputs with
// a contiguous last axis (mx.quantize output, caches sliced along N) are read in place.
//
// The decode kernels alone (unsupported beyond kMaxDecodeRowTiles row tiles, head
// dims other than 64/128/256, group 16).
Plan plan_sdpa_int4_decode(const Problem& p);
// The prefill kernel alone (any number of rows; head dims 64/80/96/128/256, groups
// 16-128).
Plan plan_sdpa_int4_prefill(const Problem& p);
// What eval_gpu runs: decode when it covers the problem, else prefill; unsupported
// (reason set) when neither does, and the op then runs on the CPU.
Plan plan_sdpa_int4(const Problem& p);

// The op's explicit fallback, decided when the graph is built (strides are not known
// yet; the plan copies an input whose last axis is not contiguous): why no Metal
// kernel covers the problem's shapes, dtypes, bits and group size, or "" when one
// does. Tensor strides and offsets in `p` are ignored.
std::string metal_unsupported_reason(const Problem& p);

} // namespace tqmetal::metal
