// What the Metal and CUDA planners check alike: whether a problem's layout is one
// their kernels read (csrc/metal/dispatch_plan.cpp, csrc/cuda/dispatch_plan.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "metal/dispatch_plan.h"

namespace tqmetal::gpu {

using tqmetal::metal::Problem;
using tqmetal::metal::TensorRef;

// Stride i of t, 0 where t has fewer axes (broadcast).
int64_t stride_or0(const TensorRef& t, size_t i);

// The mask is an array (boolean or additive), not none or causal.
bool array_mask(const Problem& p);

// Empty when the GPU kernels read p's layout as it is, else why not. `backend`
// ("Metal", "CUDA") names the kernels in the message on bits.
std::string layout_problem(const Problem& p, const char* backend);

} // namespace tqmetal::gpu
