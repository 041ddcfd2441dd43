// Where eval_gpu looks for the metallib (pure: tested on Linux), and gpu_path() of a
// build without Metal (with Metal it is csrc/metal/sdpa_int4_metal.cpp's).
#include "metal/gpu_path.h"

namespace tqmetal::metal {

std::vector<std::filesystem::path> metallib_dirs(const std::filesystem::path& module_dir, const char* env_dir) {
  if (env_dir && *env_dir) return {env_dir};
  if (module_dir.empty()) return {};
  // The extension module is installed in tqmetal/ beside the metallib; tqmetal_bench in
  // tqmetal/bin/, one level below it.
  return {module_dir, module_dir.parent_path()};
}

#ifndef _METAL_
const GpuPath& gpu_path() {
  static const GpuPath none{
      "none",
      "this build has no Metal kernels: it was compiled against an MLX without Metal (Linux, or "
      "MLX_BUILD_METAL off); sdpa_int4 runs on the CPU",
      ""};
  return none;
}
#endif

} // namespace tqmetal::metal
