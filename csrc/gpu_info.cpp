// tqmetal::gpu_info: which GPU path this build has, and why (tqmetal.gpu_info()).
#include <exception>
#include <string>

#include "tqmetal.h"

#ifdef TQMETAL_CUDA
#include "cuda/mlx_cuda_abi.h"
#include "cuda/runtime.h"
#endif

namespace tqmetal {

GpuInfo gpu_info() {
  GpuInfo g;
#if defined(TQMETAL_CUDA)
  g.backend = "cuda";
  g.details.push_back({"compiler", "NVRTC at run time (no CUDA toolkit needed)"});
  std::string nvrtc;
  const std::string problem = cuda::runtime_problem(&nvrtc);
  if (!nvrtc.empty()) g.details.push_back({"nvrtc", nvrtc});
  if (!mlx::core::cu::is_available()) {
    g.reason = "built for MLX's CUDA backend, but MLX sees no CUDA GPU here: sdpa_int4 runs on the CPU";
    return g;
  }
  if (!problem.empty()) {
    g.reason = "built for MLX's CUDA backend, but " + problem + ": sdpa_int4 on a GPU stream would fail";
    return g;
  }
  try {
    mlx::core::cu::device(mlx::core::Device(mlx::core::Device::gpu, 0)).make_current();
    const cuda::DeviceInfo& d = cuda::current_device();
    g.details.push_back({"device", d.name});
    g.details.push_back({"compute_capability", std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor)});
    g.details.push_back({"sms", std::to_string(d.sms)});
    g.details.push_back({"arch", "sm_" + std::to_string(d.cc_major) + std::to_string(d.cc_minor)});
    g.available = true;
    g.reason =
        "MLX's CUDA backend with a GPU: sdpa_int4 on a GPU stream runs the CUDA kernels (decode: split-K "
        "with a merge pass; prefill: tensor-core tiles), compiled by NVRTC on first use; shapes no kernel "
        "covers (head dims other than 64/80/96/128/256) run on the CPU";
  } catch (const std::exception& e) {
    g.reason = std::string("built for MLX's CUDA backend, but the GPU could not be queried: ") + e.what();
  }
#elif defined(_METAL_)
  g.backend = "metal";
  g.available = true;
  g.reason = "built with MLX's Metal backend: sdpa_int4 on a GPU stream runs the Metal kernels "
             "(tqmetal_kernels.metallib); shapes no kernel covers run on the CPU";
#else
  g.backend = "none";
  g.reason = "this build has no GPU kernels: MLX here is a CPU-only build; on Linux with an NVIDIA GPU, "
             "install mlx[cuda13] and reinstall tqmetal (pip install .) for the CUDA path";
#endif
  return g;
}

} // namespace tqmetal
