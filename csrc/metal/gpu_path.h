// Which GPU path this build and process have, and why (tqmetal.gpu_path(), `tqmetal
// generate --verbose`):
//   "metallib"  tqmetal_kernels.metallib, compiled by Xcode's `metal` at build time, found
//               beside the extension (or the directory TQMETAL_METALLIB_DIR names);
//   "runtime"   no metallib (the build found no Metal compiler, or the file is missing, or
//               TQMETAL_METAL_PATH=runtime): the kernel sources embedded at build time are
//               compiled by Metal's run-time compiler at first use (no Xcode needed);
//   "none"      no GPU kernels: a build without Metal (Linux), or no Metal device.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace tqmetal::metal {

struct GpuPath {
  std::string path; // "metallib", "runtime" or "none"
  std::string reason;
  std::string metallib_dir; // where the metallib was found ("metallib" only)
};

// Decided once per process (the environment is read at the first call).
const GpuPath& gpu_path();

// The directories searched for tqmetal_kernels.metallib, in order: TQMETAL_METALLIB_DIR
// (`env_dir`) alone when set, else the directory of the binary that links tqmetal_core
// (the extension module, in tqmetal/) and its parent (tqmetal_bench is in tqmetal/bin/).
std::vector<std::filesystem::path> metallib_dirs(const std::filesystem::path& module_dir, const char* env_dir);

} // namespace tqmetal::metal
