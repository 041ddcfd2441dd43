// tqmetal: attention computed directly on an int4/int8 affine-quantized KV cache.
//
// Public C++ API (used by the Python bindings and the C++ benchmark binary).
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "mlx/array.h"
#include "mlx/utils.h"

namespace tqmetal {

using mlx::core::array;
using mlx::core::StreamOrDevice;

// One quantized cache tensor exactly as mx.quantize(x, group_size, bits) returns it
// for x of shape [B, H_kv, N, D]: packed uint32 [B, H_kv, N, D*bits/32], scales and
// biases [B, H_kv, N, D/group_size]; value = scale * q + bias.
struct QuantizedTensor {
  array packed;
  array scales;
  array biases;
};

// softmax(scale * q @ K^T + mask) @ V over K = [dequantize(k); k_tail] and
// V = [dequantize(v); v_tail], without ever materializing K, V or the score matrix.
//
// q: [B, H_q, L, D] float16/bfloat16/float32, H_q a multiple of H_kv.
// mask_mode: "" (none or mask_arr), or "causal" (bottom-right aligned).
// mask_arr: bool (true = attend) or additive, broadcastable to [B, H_q, L, N + T].
// sinks: [H_q] per-head logits that join the softmax with no value.
// k_tail/v_tail: unquantized [B, H_kv, T, D] segment attended after the quantized one.
// Semantics equal mlx::core::fast::scaled_dot_product_attention on the dequantized,
// concatenated segments, including rows whose every key is masked.
array sdpa_int4(
    const array& q,
    const QuantizedTensor& k,
    const QuantizedTensor& v,
    float scale,
    const std::string& mask_mode = "",
    const std::optional<array>& mask_arr = std::nullopt,
    int group_size = 64,
    int k_bits = 4,
    int v_bits = 4,
    const std::optional<array>& sinks = std::nullopt,
    const std::optional<array>& k_tail = std::nullopt,
    const std::optional<array>& v_tail = std::nullopt,
    StreamOrDevice s = {});

// Affine quantization in mx.quantize's layout for every group size the op supports,
// including 16 (which mx.quantize refuses; head dim 80 needs it).
std::tuple<array, array, array>
quantize(const array& x, int group_size = 64, int bits = 4, StreamOrDevice s = {});

// Which CPU kernel variant the running machine uses ("avx512amx", "avx512vnni",
// "avx512", "avx2", "generic").
const char* cpu_isa();

// Which GPU path this build of tqmetal has, and why.
//   backend:   "cuda" (built against MLX's CUDA backend), "metal" (macOS, MLX with
//              Metal) or "none" (a CPU-only MLX).
//   available: whether sdpa_int4 on a GPU stream runs GPU kernels here and now.
//   reason:    why (or why not), in words.
//   details:   backend facts as (key, value) pairs, e.g. the CUDA device, its compute
//              capability and the NVRTC version that compiles the kernels.
struct GpuInfo {
  std::string backend;
  bool available = false;
  std::string reason;
  std::vector<std::pair<std::string, std::string>> details;
};
GpuInfo gpu_info();

} // namespace tqmetal
