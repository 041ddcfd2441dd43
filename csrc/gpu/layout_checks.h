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

// Empty when a backend's kernels read p's bit widths, else why not. 4 and 8 bits
// always; with `bit_stream`, also mx.quantize's 2, 3, 5 and 6 bits (codes in one
// little-endian bit stream, straddling words) for groups of 32 or more, where
// every group starts on a word. `backend` ("Metal", "CUDA") names the kernels.
std::string bits_problem(const Problem& p, bool bit_stream, const char* backend);

// Empty when the GPU kernels read p's layout as it is, else why not.
std::string layout_problem(const Problem& p);

} // namespace tqmetal::gpu
