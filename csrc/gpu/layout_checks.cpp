// See layout_checks.h.
#include "gpu/layout_checks.h"

#include <utility>

namespace tqmetal::gpu {

int64_t stride_or0(const TensorRef& t, size_t i) {
  return i < t.strides.size() ? t.strides[i] : 0;
}

bool array_mask(const Problem& p) {
  using tqmetal::metal::MaskKind;
  return p.mask_kind == MaskKind::boolean || p.mask_kind == MaskKind::additive;
}

std::string bits_problem(const Problem& p, bool bit_stream, const char* backend) {
  auto whole = [](int b) { return b == 4 || b == 8; };
  auto stream = [](int b) { return b == 2 || b == 3 || b == 5 || b == 6; };
  auto ok = [&](int b) { return whole(b) || (bit_stream && stream(b) && p.group_size >= 32); };
  if (!ok(p.k_bits) || !ok(p.v_bits)) {
    return "bits k" + std::to_string(p.k_bits) + "v" + std::to_string(p.v_bits) + " (" + backend +
        (bit_stream ? " kernels: 2, 3, 4, 5, 6 or 8 bits, widths other than 4 and 8 with groups of 32 or more)"
                    : " kernels: 4 or 8 bits for K and V)");
  }
  return "";
}

std::string layout_problem(const Problem& p) {
  if (p.group_size <= 0 || p.D % p.group_size != 0) {
    return "group size does not divide the head dim";
  }
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0) {
    return "H_q must be a multiple of H_kv";
  }
  // Last axes must be contiguous (MLX's quantize output and its N-slices are; eval_gpu
  // copies any other layout first). An empty cache (N = 0, only a tail) is never read.
  const std::pair<const char*, const TensorRef*> arrays[] = {
      {"q", &p.q},           {"k_packed", &p.k_packed}, {"k_scales", &p.k_scales},
      {"k_biases", &p.k_biases}, {"v_packed", &p.v_packed}, {"v_scales", &p.v_scales},
      {"v_biases", &p.v_biases}, {"k_tail", &p.k_tail},   {"v_tail", &p.v_tail}};
  for (const auto& [name, t] : arrays) {
    const bool tail = t == &p.k_tail || t == &p.v_tail;
    if (tail ? !p.has_tail : (p.N == 0 && t != &p.q)) continue;
    if (t->strides.size() != 4 || t->strides[3] != 1) {
      return std::string(name) + ": expected 4 strides with a contiguous last axis";
    }
  }
  if (p.has_tail && p.k_tail.dtype != p.v_tail.dtype) {
    return "k_tail and v_tail dtypes differ";
  }
  if (p.k_scales.dtype != p.k_biases.dtype || p.k_scales.dtype != p.v_scales.dtype ||
      p.k_scales.dtype != p.v_biases.dtype) {
    return "scales and biases of k and v must share one dtype";
  }
  if (array_mask(p) && p.mask.strides.size() != 4) {
    return "mask strides must be right-aligned on [B, Hq, L, N + T]";
  }
  if (p.N + p.T >= (int64_t(1) << 31)) {
    return "context too long for 32-bit token indices";
  }
  if (int64_t(p.Hq / p.Hkv) * p.L >= (int64_t(1) << 31)) {
    return "too many query rows for 32-bit row indices";
  }
  return {};
}

} // namespace tqmetal::gpu
