#pragma once

#include <vector>

#include "mlx/array.h"
#include "mlx/stream.h"

namespace tqmetal {
class ScaledDotProductAttentionInt4;
}

namespace tqmetal::cpu {

void eval_sdpa_int4_cpu(
    const ScaledDotProductAttentionInt4& prim,
    const std::vector<mlx::core::array>& inputs,
    mlx::core::array& out,
    mlx::core::Stream stream);

const char* isa_name();

} // namespace tqmetal::cpu
