// NVRTC + driver API through dlopen; see runtime.h.
#include "cuda/runtime.h"

#include <dlfcn.h>

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace tqmetal::cuda {

namespace {

// ---- the C API subset, declared as cuda.h / nvrtc.h declare it ----
using CUresult = int;
using CUdevice = int;
struct CUmod_st;
using CUmodule = CUmod_st*;
using CUfunction = CUfunc_st*;
constexpr int kAttrMultiprocessorCount = 16; // CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
constexpr int kAttrCcMajor = 75; // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
constexpr int kAttrCcMinor = 76;
constexpr int kFuncMaxDynamicSmem = 8; // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

using nvrtcResult = int;
struct _nvrtcProgram;
using nvrtcProgram = _nvrtcProgram*;

struct Api {
  // driver
  CUresult (*cuCtxGetDevice)(CUdevice*) = nullptr;
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice) = nullptr;
  CUresult (*cuDeviceGetName)(char*, int, CUdevice) = nullptr;
  CUresult (*cuModuleLoadData)(CUmodule*, const void*) = nullptr;
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*cuFuncSetAttribute)(CUfunction, int, int) = nullptr;
  CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;
  // nvrtc
  nvrtcResult (*nvrtcVersion)(int*, int*) = nullptr;
  const char* (*nvrtcGetErrorString)(nvrtcResult) = nullptr;
  nvrtcResult (*nvrtcCreateProgram)(
      nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*) = nullptr;
  nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram, int, const char* const*) = nullptr;
  nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t*) = nullptr;
  nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram, char*) = nullptr;
  nvrtcResult (*nvrtcGetCUBINSize)(nvrtcProgram, size_t*) = nullptr;
  nvrtcResult (*nvrtcGetCUBIN)(nvrtcProgram, char*) = nullptr;
  nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram*) = nullptr;
  std::string problem; // why the API is unusable, "" when it is
  std::string nvrtc_version;
};

void* open_lib(const std::vector<const char*>& names) {
  for (const char* n : names) {
    // Already loaded by libmlx (its DT_NEEDED): take that one.
    if (void* h = dlopen(n, RTLD_NOW | RTLD_NOLOAD)) return h;
  }
  for (const char* n : names) {
    if (void* h = dlopen(n, RTLD_NOW | RTLD_LOCAL)) return h;
  }
  return nullptr;
}

template <typename F>
bool bind(void* lib, const char* name, F& fn, std::string& problem) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn && problem.empty()) problem = std::string("symbol ") + name + " not found";
  return fn != nullptr;
}

const Api& api() {
  static const Api a = [] {
    Api a;
    void* cu = open_lib({"libcuda.so.1", "libcuda.so"});
    if (!cu) {
      a.problem = "the CUDA driver (libcuda.so.1) could not be opened";
      return a;
    }
    void* nv = open_lib({"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"});
    if (!nv) {
      a.problem = "NVRTC (libnvrtc.so.13, from the nvidia-cuda-nvrtc wheel mlx[cuda13] installs) could not be opened";
      return a;
    }
    std::string& e = a.problem;
    bind(cu, "cuCtxGetDevice", a.cuCtxGetDevice, e);
    bind(cu, "cuDeviceGetAttribute", a.cuDeviceGetAttribute, e);
    bind(cu, "cuDeviceGetName", a.cuDeviceGetName, e);
    bind(cu, "cuModuleLoadData", a.cuModuleLoadData, e);
    bind(cu, "cuModuleGetFunction", a.cuModuleGetFunction, e);
    bind(cu, "cuFuncSetAttribute", a.cuFuncSetAttribute, e);
    bind(cu, "cuGetErrorString", a.cuGetErrorString, e);
    bind(nv, "nvrtcVersion", a.nvrtcVersion, e);
    bind(nv, "nvrtcGetErrorString", a.nvrtcGetErrorString, e);
    bind(nv, "nvrtcCreateProgram", a.nvrtcCreateProgram, e);
    bind(nv, "nvrtcCompileProgram", a.nvrtcCompileProgram, e);
    bind(nv, "nvrtcGetProgramLogSize", a.nvrtcGetProgramLogSize, e);
    bind(nv, "nvrtcGetProgramLog", a.nvrtcGetProgramLog, e);
    bind(nv, "nvrtcGetCUBINSize", a.nvrtcGetCUBINSize, e);
    bind(nv, "nvrtcGetCUBIN", a.nvrtcGetCUBIN, e);
    bind(nv, "nvrtcDestroyProgram", a.nvrtcDestroyProgram, e);
    if (e.empty()) {
      int major = 0, minor = 0;
      a.nvrtcVersion(&major, &minor);
      a.nvrtc_version = std::to_string(major) + "." + std::to_string(minor);
    }
    return a;
  }();
  return a;
}

const Api& checked_api() {
  const Api& a = api();
  if (!a.problem.empty()) throw std::runtime_error("[tqmetal.sdpa_int4] CUDA: " + a.problem);
  return a;
}

void check_cu(CUresult r, const char* what) {
  if (r == 0) return;
  const char* msg = nullptr;
  api().cuGetErrorString(r, &msg);
  throw std::runtime_error(
      std::string("[tqmetal.sdpa_int4] CUDA ") + what + " failed: " + (msg ? msg : std::to_string(r)));
}

struct Module {
  CUmodule module = nullptr;
  std::map<std::string, CUfunction> functions;
};

std::mutex g_mutex;

} // namespace

const DeviceInfo& current_device() {
  static std::map<int, DeviceInfo> cache;
  const Api& a = checked_api();
  CUdevice dev = 0;
  check_cu(a.cuCtxGetDevice(&dev), "cuCtxGetDevice");
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  char name[256] = {0};
  check_cu(a.cuDeviceGetName(name, sizeof(name) - 1, dev), "cuDeviceGetName");
  info.name = name;
  check_cu(a.cuDeviceGetAttribute(&info.cc_major, kAttrCcMajor, dev), "cuDeviceGetAttribute");
  check_cu(a.cuDeviceGetAttribute(&info.cc_minor, kAttrCcMinor, dev), "cuDeviceGetAttribute");
  check_cu(a.cuDeviceGetAttribute(&info.sms, kAttrMultiprocessorCount, dev), "cuDeviceGetAttribute");
  return cache.emplace(dev, info).first->second;
}

CUfunc_st* get_kernel(
    const std::string& program,
    const std::string& entry_source,
    const std::string& entry,
    int smem_bytes) {
  const Api& a = checked_api();
  const DeviceInfo& dev = current_device();
  const std::string arch = "sm_" + std::to_string(dev.cc_major) + std::to_string(dev.cc_minor);
  static std::map<std::string, Module> modules; // program@arch -> module
  std::lock_guard<std::mutex> lock(g_mutex);
  const std::string key = program + "@" + arch;
  auto it = modules.find(key);
  if (it == modules.end()) {
    const std::string src = std::string(kernel_source()) + "\n// ---- entry points: " + program + "\n" + entry_source;
    nvrtcProgram prog = nullptr;
    if (nvrtcResult r = a.nvrtcCreateProgram(&prog, src.c_str(), (program + ".cu").c_str(), 0, nullptr, nullptr)) {
      throw std::runtime_error(std::string("[tqmetal.sdpa_int4] nvrtcCreateProgram: ") + a.nvrtcGetErrorString(r));
    }
    std::unique_ptr<nvrtcProgram, void (*)(nvrtcProgram*)> guard(&prog, [](nvrtcProgram* p) {
      api().nvrtcDestroyProgram(p);
    });
    const std::string arch_opt = "--gpu-architecture=" + arch;
    const char* opts[] = {arch_opt.c_str(), "-std=c++17", "-default-device", "-lineinfo"};
    const nvrtcResult r = a.nvrtcCompileProgram(prog, 4, opts);
    if (r != 0) {
      size_t n = 0;
      a.nvrtcGetProgramLogSize(prog, &n);
      std::string log(n, '\0');
      if (n) a.nvrtcGetProgramLog(prog, log.data());
      throw std::runtime_error(
          "[tqmetal.sdpa_int4] NVRTC could not compile " + program + " for " + arch + ": " +
          a.nvrtcGetErrorString(r) + "\n" + log);
    }
    size_t n = 0;
    a.nvrtcGetCUBINSize(prog, &n);
    std::vector<char> cubin(n);
    a.nvrtcGetCUBIN(prog, cubin.data());
    Module m;
    check_cu(a.cuModuleLoadData(&m.module, cubin.data()), "cuModuleLoadData");
    it = modules.emplace(key, std::move(m)).first;
  }
  Module& m = it->second;
  auto f = m.functions.find(entry);
  if (f == m.functions.end()) {
    CUfunction fn = nullptr;
    check_cu(a.cuModuleGetFunction(&fn, m.module, entry.c_str()), "cuModuleGetFunction");
    if (smem_bytes > 48 * 1024) {
      check_cu(a.cuFuncSetAttribute(fn, kFuncMaxDynamicSmem, smem_bytes), "cuFuncSetAttribute");
    }
    f = m.functions.emplace(entry, fn).first;
  }
  return f->second;
}

std::string runtime_problem(std::string* nvrtc_version) {
  const Api& a = api();
  if (nvrtc_version) *nvrtc_version = a.nvrtc_version;
  return a.problem;
}

} // namespace tqmetal::cuda
