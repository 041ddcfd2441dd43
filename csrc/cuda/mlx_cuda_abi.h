// The few exported (MLX_API) functions of MLX's CUDA backend that eval_gpu calls,
// declared without MLX's CUDA headers: those include cuda_runtime.h, cuda.h and fmt,
// which a machine with `mlx[cuda13]` but no CUDA toolkit does not have, and
// `pip install .` must work there (the kernels are compiled at run time by NVRTC).
//
// Declarations must match mlx 0.32.4's mlx/backend/cuda/device.h exactly (the
// mangled names are what binds): the build links the extension with
// -Wl,--no-undefined against libmlx, so a mismatch fails the build, never a user's
// run. Only non-virtual, out-of-line members are called, on objects MLX owns.
#pragma once

#include <cstdint>
#include <functional>

#include "mlx/array.h"
#include "mlx/stream.h"

// Opaque CUDA driver handle and launch-shape types, named as CUDA names them
// (cuda.h: `typedef struct CUfunc_st* CUfunction`; vector_types.h: `struct dim3`,
// three unsigned ints, trivially copyable, passed by value).
struct CUfunc_st;
struct dim3 {
  unsigned int x, y, z;
};

namespace mlx::core::cu {

class Device {
 public:
  void make_current();
};

class CommandEncoder {
 public:
  void set_input_array(const array& arr);
  void set_output_array(const array& arr);
  void add_kernel_node_raw(
      CUfunc_st* func,
      dim3 grid_dim,
      dim3 block_dim,
      dim3 cluster_dim,
      uint32_t smem_bytes,
      void** params);
  void add_completed_handler(std::function<void()> task);
};

Device& device(mlx::core::Device d);
CommandEncoder& get_command_encoder(Stream s);
bool is_available();

} // namespace mlx::core::cu
