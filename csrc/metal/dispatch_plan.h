// Host plan of the Metal decode kernels (metal/sdpa_int4_decode.h): which kernels,
// function constants, buffer bindings, scalar arguments, scratch buffers and grid a
// launch uses. Pure C++ (no Metal headers): eval_gpu executes this plan on a Mac,
// and the tests run the same plan through the MSL emulator (tests/mslemu).
#pragma once

#include <array>
#include <cstdint>
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
struct DecodeProblem {
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
  std::string kernel; // host name in metal/sdpa_int4.metal
  std::vector<FunctionConstant> constants;
  std::vector<Binding> buffers;
  std::array<int, 3> grid; // threadgroups (dispatchThreadgroups)
  std::array<int, 3> threadgroup; // threads per threadgroup
};

struct Scratch {
  std::string name;
  int64_t bytes;
};

struct DecodePlan {
  bool supported = false;
  std::string reason; // why not, when !supported (the caller falls back)
  bool two_pass = false;
  int blocks = 1;
  int64_t block_len = 0;
  int rows = 0; // query rows per KV head (G * L)
  int rows_per_threadgroup = 0; // kernel's ROWS
  int row_tiles = 0;
  int simdgroups = 0; // kernel's BN
  std::vector<Scratch> scratch; // float32 buffers the 2-pass launch needs
  std::vector<Launch> launches; // in order
};

inline constexpr int kDecodeSimdgroups = 16; // BN of the instances in sdpa_int4.metal
inline constexpr int kMaxDecodeRowTiles = 4; // beyond (> 32 rows, > 16 at D = 256): prefill's job
inline constexpr int64_t kMinBlockLen = 256; // tokens per block of the automatic split

DecodePlan plan_sdpa_int4_decode(const DecodeProblem& p);

} // namespace tqmetal::metal
