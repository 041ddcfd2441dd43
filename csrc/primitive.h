// The one primitive behind tqmetal::sdpa_int4.
//
// Inputs, in order: q, k_packed, k_scales, k_biases, v_packed, v_scales, v_biases,
// then k_tail, v_tail (if has_tail), mask (if mask_kind == array), sinks (if has_sinks).
#pragma once

#include "mlx/primitives.h"

namespace tqmetal {

enum class MaskMode { none, causal, array };

class ScaledDotProductAttentionInt4 : public mlx::core::UnaryPrimitive {
 public:
  ScaledDotProductAttentionInt4(
      mlx::core::Stream stream,
      float scale,
      MaskMode mask_kind,
      int group_size,
      int k_bits,
      int v_bits,
      bool has_tail,
      bool has_sinks)
      : mlx::core::UnaryPrimitive(stream),
        scale_(scale),
        mask_kind_(mask_kind),
        group_size_(group_size),
        k_bits_(k_bits),
        v_bits_(v_bits),
        has_tail_(has_tail),
        has_sinks_(has_sinks) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs, mlx::core::array& out) override;
  void eval_gpu(const std::vector<mlx::core::array>& inputs, mlx::core::array& out) override;

  std::vector<mlx::core::array> vjp(
      const std::vector<mlx::core::array>& primals,
      const std::vector<mlx::core::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mlx::core::array>& outputs) override;

  std::vector<mlx::core::Shape> output_shapes(const std::vector<mlx::core::array>& inputs) override {
    return {inputs[0].shape()};
  }

  const char* name() const override {
    return "ScaledDotProductAttentionInt4";
  }
  bool is_equivalent(const mlx::core::Primitive& other) const override;

  float scale() const {
    return scale_;
  }
  MaskMode mask_kind() const {
    return mask_kind_;
  }
  int group_size() const {
    return group_size_;
  }
  int k_bits() const {
    return k_bits_;
  }
  int v_bits() const {
    return v_bits_;
  }
  bool has_tail() const {
    return has_tail_;
  }
  bool has_sinks() const {
    return has_sinks_;
  }

 private:
  float scale_;
  MaskMode mask_kind_;
  int group_size_;
  int k_bits_;
  int v_bits_;
  bool has_tail_;
  bool has_sinks_;
};

} // namespace tqmetal
