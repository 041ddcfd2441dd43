// eval_gpu on Metal (built only where MLX has Metal: _METAL_). It describes the
// primitive's inputs to the planner (csrc/metal/dispatch_plan.h) and encodes exactly
// the launches of the plan; every decision (path, kernel instance, function constants,
// bindings and offsets, scratch, grid) is the plan's, which the tests execute under
// the MSL emulator on Linux. Mirrors MLX's own backend/metal/scaled_dot_product_attention.cpp.
#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "metal/dispatch_plan.h"
#include "metal/gpu_path.h"
#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/metal.h"
#include "mlx/backend/metal/utils.h"
#include "primitive.h"
#include "tqmetal_kernel_sources.h" // generated: csrc/metal/embed_sources.py (CMakeLists.txt)

// Set by CMakeLists.txt: whether tqmetal_kernels.metallib was built, and if not why.
#ifndef TQMETAL_METALLIB_BUILT
#define TQMETAL_METALLIB_BUILT 0
#endif
#ifndef TQMETAL_METALLIB_STATUS
#define TQMETAL_METALLIB_STATUS "unknown"
#endif

namespace tqmetal {

using namespace mlx::core;
namespace tqm = tqmetal::metal;

namespace {

// tqmetal_kernels.metallib, installed beside the extension module (CMakeLists.txt):
// a name of our own so MLX's library cache never confuses it with another extension's.
constexpr const char* kMetallib = "tqmetal_kernels";

// The directory of the binary this function is linked into (the extension module, or
// tqmetal_bench in tqmetal/bin/).
std::filesystem::path module_dir() {
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&module_dir), &info) || !info.dli_fname) return {};
  return std::filesystem::path(info.dli_fname).parent_path();
}

tqm::GpuPath find_gpu_path() {
  if (!mlx::core::metal::is_available()) {
    return {"none", "MLX reports no Metal device (mx.metal.is_available() is False)", ""};
  }
  const char* force = std::getenv("TQMETAL_METAL_PATH");
  const std::string forced = force ? force : "";
  if (!forced.empty() && forced != "runtime" && forced != "metallib") {
    throw std::invalid_argument("TQMETAL_METAL_PATH: expected 'metallib' or 'runtime', got '" + forced + "'");
  }
  const std::string compiled_at_first_use =
      "; the kernels are compiled from the sources embedded at build time (their MLX headers expanded) "
      "by Metal's run-time compiler at first use, once per process";
  if (forced == "runtime") return {"runtime", "TQMETAL_METAL_PATH=runtime" + compiled_at_first_use, ""};

  const auto dirs = tqm::metallib_dirs(module_dir(), std::getenv("TQMETAL_METALLIB_DIR"));
  std::string searched;
  for (const auto& d : dirs) {
    std::error_code ec;
    if (std::filesystem::is_regular_file(d / (std::string(kMetallib) + ".metallib"), ec)) {
      return {"metallib", std::string(kMetallib) + ".metallib (built with Xcode's metal compiler) in " + d.string(),
              d.string()};
    }
    searched += (searched.empty() ? "" : ", ") + d.string();
  }
  if (forced == "metallib") {
    throw std::runtime_error("TQMETAL_METAL_PATH=metallib: no " + std::string(kMetallib) + ".metallib in " + searched);
  }
  if (!TQMETAL_METALLIB_BUILT) {
    return {"runtime", std::string("the build made no metallib (") + TQMETAL_METALLIB_STATUS + ")" +
                compiled_at_first_use, ""};
  }
  return {"runtime", std::string(kMetallib) + ".metallib was built but is not in " + searched + compiled_at_first_use,
          ""};
}

// The library holding `stem`'s kernels (metal/<stem>.metal): the metallib, or the embedded
// source compiled once (MLX caches libraries by name).
MTL::Library* library(mlx::core::metal::Device& d, const std::string& stem) {
  const tqm::GpuPath& g = tqm::gpu_path();
  if (g.path == "metallib") return d.get_library(kMetallib, g.metallib_dir);
  return d.get_library("tqmetal_" + stem, [stem] {
    const std::string_view src = tqm::embedded::source(stem);
    if (src.empty()) throw std::logic_error("[tqmetal.sdpa_int4] no embedded Metal source " + stem);
    return std::string(src);
  });
}

tqm::DType plan_dtype(const array& a) {
  if (a.dtype() == float16) return tqm::DType::f16;
  if (a.dtype() == bfloat16) return tqm::DType::bf16;
  if (a.dtype() == bool_) return tqm::DType::boolean;
  return tqm::DType::f32; // float32, and uint32 packed words (the dtype is not read for those)
}

tqm::TensorRef tensor_ref(const array& a) {
  tqm::TensorRef t;
  t.dtype = plan_dtype(a);
  t.offset = int64_t(a.offset()); // bytes
  t.strides.assign(a.strides().begin(), a.strides().end());
  // A size-1 axis is never stepped along: a stride there (e.g. from expand_dims) is moot.
  for (size_t i = 0; i < t.strides.size(); ++i) {
    if (a.shape(int(i)) == 1) t.strides[i] = i + 1 == t.strides.size() ? 1 : 0;
  }
  return t;
}

// A mask as the kernels read it: strides right-aligned on [B, Hq, L, N + T], 0 on
// broadcast axes (the op passes masks as they are, never broadcast copies).
tqm::TensorRef mask_ref(const array& m) {
  tqm::TensorRef t = tensor_ref(m);
  t.strides.assign(4, 0);
  const int nd = int(m.ndim());
  for (int i = 0; i < 4; ++i) {
    const int src = nd - 4 + i;
    if (src >= 0 && m.shape(src) != 1) t.strides[i] = int64_t(m.strides()[src]);
  }
  return t;
}

} // namespace

const tqm::GpuPath& tqm::gpu_path() {
  static const GpuPath path = find_gpu_path();
  return path;
}

void ScaledDotProductAttentionInt4::eval_gpu(const std::vector<array>& inputs, array& out) {
  auto& s = stream();
  auto& d = mlx::core::metal::device(s.device);
  auto& enc = mlx::core::metal::get_command_encoder(s);

  // Inputs by the names the plan binds. An input whose last axis is strided is read
  // through a copy the plan itself launches (sdpa_int4_copy_4d), so nothing here needs
  // MLX's copy routines (which libmlx.dylib does not export).
  std::map<std::string, array> named;
  const char* quant_names[] = {"q", "k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases"};
  for (int i = 0; i < 7; ++i) named.emplace(quant_names[i], inputs[i]);
  size_t next = 7;
  if (has_tail_) {
    named.emplace("k_tail", inputs[next++]);
    named.emplace("v_tail", inputs[next++]);
  }
  if (mask_kind_ == MaskMode::array) named.emplace("mask", inputs[next++]);
  if (has_sinks_) named.emplace("sinks", inputs[next++]);

  const array& q = named.at("q");
  const array& kp = named.at("k_packed");
  tqm::Problem p;
  p.B = q.shape(0);
  p.Hq = q.shape(1);
  p.L = q.shape(2);
  p.D = q.shape(3);
  p.Hkv = kp.shape(1);
  p.N = kp.shape(2);
  p.T = has_tail_ ? named.at("k_tail").shape(2) : 0;
  p.group_size = group_size_;
  p.k_bits = k_bits_;
  p.v_bits = v_bits_;
  p.scale = scale_;
  p.q = tensor_ref(q);
  p.k_packed = tensor_ref(kp);
  p.k_scales = tensor_ref(named.at("k_scales"));
  p.k_biases = tensor_ref(named.at("k_biases"));
  p.v_packed = tensor_ref(named.at("v_packed"));
  p.v_scales = tensor_ref(named.at("v_scales"));
  p.v_biases = tensor_ref(named.at("v_biases"));
  p.has_tail = has_tail_;
  if (has_tail_) {
    p.k_tail = tensor_ref(named.at("k_tail"));
    p.v_tail = tensor_ref(named.at("v_tail"));
  }
  if (mask_kind_ == MaskMode::causal) {
    p.mask_kind = tqm::MaskKind::causal;
  } else if (mask_kind_ == MaskMode::array) {
    const array& m = named.at("mask");
    p.mask_kind = m.dtype() == bool_ ? tqm::MaskKind::boolean : tqm::MaskKind::additive;
    p.mask = mask_ref(m);
  }
  p.has_sinks = has_sinks_;
  if (has_sinks_) p.sinks = tensor_ref(named.at("sinks"));

  // Plan, then make sure every launch fits its pipeline: Apple's compiler may give a
  // register-heavy kernel a maxTotalThreadsPerThreadgroup below the threadgroup the plan
  // asks for, and dispatching that is invalid. The planner then picks smaller threadgroups
  // (the prefill kernel's 128 threads instead of decode's 512) or says why it cannot.
  tqm::Plan plan;
  std::vector<MTL::ComputePipelineState*> kernels;
  for (int attempt = 0;; ++attempt) {
    plan = tqm::plan_sdpa_int4(p);
    if (!plan.supported) {
      // The op sends shapes no kernel covers to the CPU (tqmetal::metal::plan_sdpa_int4
      // on contiguous strides); reaching this is a pipeline limit or a bug.
      throw std::runtime_error("[tqmetal.sdpa_int4] no Metal plan: " + plan.reason);
    }
    kernels.clear();
    bool replan = false;
    for (const auto& launch : plan.launches) {
      // Function constants: values must outlive get_kernel; the hash names the specialization.
      std::vector<char> bools(launch.constants.size()); // not vector<bool>: addresses are taken
      std::vector<int> ints(launch.constants.size());
      mlx::core::metal::MTLFCList fcs;
      std::string hash = launch.kernel;
      for (size_t i = 0; i < launch.constants.size(); ++i) {
        const auto& c = launch.constants[i];
        if (c.is_bool) {
          bools[i] = c.value != 0;
          fcs.emplace_back(&bools[i], MTL::DataType::DataTypeBool, NS::UInteger(c.index));
        } else {
          ints[i] = c.value;
          fcs.emplace_back(&ints[i], MTL::DataType::DataTypeInt, NS::UInteger(c.index));
        }
        hash += "_" + std::to_string(c.index) + "=" + std::to_string(c.value);
      }
      auto* kernel = d.get_kernel(launch.kernel, library(d, launch.library), hash, fcs);
      const int threads = launch.threadgroup[0] * launch.threadgroup[1] * launch.threadgroup[2];
      const int limit = int(kernel->maxTotalThreadsPerThreadgroup());
      if (threads > limit) {
        if (attempt >= 4) {
          throw std::runtime_error("[tqmetal.sdpa_int4] " + launch.kernel + " allows " + std::to_string(limit) +
                                   " threads per threadgroup, the plan needs " + std::to_string(threads));
        }
        p.max_threads[launch.kernel] = limit;
        replan = true;
        break;
      }
      kernels.push_back(kernel);
    }
    if (!replan) break;
  }

  out.set_data(allocator::malloc(out.nbytes()));
  std::map<std::string, array> scratch;
  for (const auto& sc : plan.scratch) {
    array a({int(sc.bytes / 4)}, float32, nullptr, {});
    a.set_data(allocator::malloc(a.nbytes()));
    enc.add_temporary(a);
    scratch.emplace(sc.name, a);
  }

  std::map<std::string, bool> scratch_written;
  for (size_t li = 0; li < plan.launches.size(); ++li) {
    const auto& launch = plan.launches[li];
    auto* kernel = kernels[li];
    enc.set_compute_pipeline_state(kernel);
    for (const auto& b : launch.buffers) {
      switch (b.kind) {
        case tqm::Binding::Kind::input: {
          const array& a = named.at(b.name);
          // set_input_array adds the array's own offset; the plan's offset includes it.
          enc.set_input_array(a, b.index, b.offset - int64_t(a.offset()));
          break;
        }
        case tqm::Binding::Kind::output:
          enc.set_output_array(out, b.index);
          break;
        case tqm::Binding::Kind::scratch: {
          array& a = scratch.at(b.name);
          // The first launch that binds a scratch buffer writes it, later ones read it.
          if (scratch_written[b.name]) {
            enc.set_input_array(a, b.index);
          } else {
            enc.set_output_array(a, b.index);
          }
          break;
        }
        case tqm::Binding::Kind::int32s:
          enc.set_vector_bytes(b.i32, b.index);
          break;
        case tqm::Binding::Kind::int64s:
          enc.set_vector_bytes(b.i64, b.index);
          break;
        case tqm::Binding::Kind::float32:
          enc.set_bytes(b.f32, b.index);
          break;
      }
    }
    for (const auto& b : launch.buffers) {
      if (b.kind == tqm::Binding::Kind::scratch) scratch_written[b.name] = true;
    }
    enc.dispatch_threadgroups(
        MTL::Size(launch.grid[0], launch.grid[1], launch.grid[2]),
        MTL::Size(launch.threadgroup[0], launch.threadgroup[1], launch.threadgroup[2]));
  }
}

} // namespace tqmetal
