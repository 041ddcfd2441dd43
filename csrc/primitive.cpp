#include "primitive.h"

#include <stdexcept>

#include "cpu/sdpa_int4_cpu.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

namespace tqmetal {

using namespace mlx::core;

void ScaledDotProductAttentionInt4::eval_cpu(const std::vector<array>& inputs, array& out) {
  cpu::eval_sdpa_int4_cpu(*this, inputs, out, stream());
}

#if !defined(_METAL_) && !defined(TQMETAL_CUDA)
// With Metal, eval_gpu is csrc/metal/sdpa_int4_metal.cpp; with MLX's CUDA backend,
// csrc/cuda/sdpa_int4_cuda.cpp.
void ScaledDotProductAttentionInt4::eval_gpu(const std::vector<array>& inputs, array& out) {
  // No GPU kernels in this build (a CPU-only MLX): say so instead
  // of failing somewhere inside MLX.
  throw std::invalid_argument(
      "[tqmetal.sdpa_int4] stream: this build of tqmetal has no GPU kernels; "
      "use stream=mx.cpu");
}
#endif

bool ScaledDotProductAttentionInt4::is_equivalent(const Primitive& other) const {
  const auto& o = static_cast<const ScaledDotProductAttentionInt4&>(other);
  return scale_ == o.scale_ && mask_kind_ == o.mask_kind_ && group_size_ == o.group_size_ &&
      k_bits_ == o.k_bits_ && v_bits_ == o.v_bits_ && has_tail_ == o.has_tail_ &&
      has_sinks_ == o.has_sinks_;
}

// Gradients flow to q only: the cache is integer data. The backward pass is the
// reference composition on the dequantized cache (training-time use; the fused
// forward stays copy-free).
std::vector<array> ScaledDotProductAttentionInt4::vjp(
    const std::vector<array>& primals,
    const std::vector<array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<array>&) {
  for (int a : argnums) {
    if (a != 0) {
      throw std::invalid_argument(
          "[tqmetal.sdpa_int4] gradients are only available with respect to q, "
          "not the quantized cache, tails, mask or sinks");
    }
  }
  auto s = stream();
  auto deq = [&](int i, int bits) {
    return dequantize(
        primals[i], primals[i + 1], primals[i + 2], group_size_, bits, "affine", std::nullopt,
        float32, s);
  };
  array K = deq(1, k_bits_);
  array V = deq(4, v_bits_);
  size_t next = 7;
  if (has_tail_) {
    K = concatenate({K, astype(primals[next], float32, s)}, 2, s);
    V = concatenate({V, astype(primals[next + 1], float32, s)}, 2, s);
    next += 2;
  }
  std::string mode;
  std::optional<array> mask;
  if (mask_kind_ == MaskMode::causal) {
    mode = "causal";
  } else if (mask_kind_ == MaskMode::array) {
    mode = "array";
    mask = primals[next++];
  }
  std::optional<array> sinks;
  if (has_sinks_) sinks = primals[next++];
  const Dtype qdt = primals[0].dtype();
  auto fwd = [&](const std::vector<array>& x) -> std::vector<array> {
    array qf = astype(x[0], float32, s);
    std::optional<array> m = mask;
    if (m && m->dtype() != bool_) m = astype(*m, float32, s);
    return {astype(
        fast::scaled_dot_product_attention(qf, K, V, scale_, mode, m, sinks, false, s), qdt, s)};
  };
  auto [outs, grads] = mlx::core::vjp(fwd, {primals[0]}, {cotangents[0]});
  return {grads[0]};
}

} // namespace tqmetal
