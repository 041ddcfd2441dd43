// eval_gpu on Metal (built only where MLX has Metal: _METAL_). It describes the
// primitive's inputs to the planner (csrc/metal/dispatch_plan.h) and encodes exactly
// the launches of the plan; every decision (path, kernel instance, function constants,
// bindings and offsets, scratch, grid) is the plan's, which the tests execute under
// the MSL emulator on Linux. Mirrors MLX's own backend/metal/scaled_dot_product_attention.cpp.
#include <dlfcn.h>

#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "metal/dispatch_plan.h"
#include "mlx/backend/gpu/copy.h"
#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"
#include "primitive.h"

namespace tqmetal {

using namespace mlx::core;
namespace tm = tqmetal::metal;

namespace {

// tqmetal_kernels.metallib, installed beside the extension module (CMakeLists.txt):
// a name of our own so MLX's library cache never confuses it with another extension's.
constexpr const char* kMetallib = "tqmetal_kernels";

// The directory of the binary this function is linked into (the extension module).
const std::string& module_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&module_dir), &info) || !info.dli_fname) {
      throw std::runtime_error("[tqmetal.sdpa_int4] cannot locate the extension module for its metallib");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

tm::DType plan_dtype(const array& a) {
  if (a.dtype() == float16) return tm::DType::f16;
  if (a.dtype() == bfloat16) return tm::DType::bf16;
  if (a.dtype() == bool_) return tm::DType::boolean;
  return tm::DType::f32; // float32, and uint32 packed words (the dtype is not read for those)
}

tm::TensorRef tensor_ref(const array& a) {
  tm::TensorRef t;
  t.dtype = plan_dtype(a);
  t.offset = int64_t(a.offset()); // bytes
  t.strides.assign(a.strides().begin(), a.strides().end());
  return t;
}

// A mask as the kernels read it: strides right-aligned on [B, Hq, L, N + T], 0 on
// broadcast axes (the op passes masks as they are, never broadcast copies).
tm::TensorRef mask_ref(const array& m) {
  tm::TensorRef t = tensor_ref(m);
  t.strides.assign(4, 0);
  const int nd = int(m.ndim());
  for (int i = 0; i < 4; ++i) {
    const int src = nd - 4 + i;
    if (src >= 0 && m.shape(src) != 1) t.strides[i] = int64_t(m.strides()[src]);
  }
  return t;
}

} // namespace

void ScaledDotProductAttentionInt4::eval_gpu(const std::vector<array>& inputs, array& out) {
  auto& s = stream();
  auto& d = mlx::core::metal::device(s.device);
  auto& enc = mlx::core::metal::get_command_encoder(s);

  // The kernels read the last axis of q, the cache and the tails contiguously (mx.quantize
  // output, its slices and mlx-lm's caches are): copy only an input that is not.
  std::vector<array> copies;
  auto last_axis_contiguous = [&](const array& a) -> array {
    if (a.ndim() == 0 || a.strides().back() == 1 || a.shape(-1) == 1) return a;
    copies.push_back(contiguous_copy_gpu(a, s));
    return copies.back();
  };
  std::map<std::string, array> named;
  const char* quant_names[] = {"q", "k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases"};
  for (int i = 0; i < 7; ++i) named.emplace(quant_names[i], last_axis_contiguous(inputs[i]));
  size_t next = 7;
  if (has_tail_) {
    named.emplace("k_tail", last_axis_contiguous(inputs[next++]));
    named.emplace("v_tail", last_axis_contiguous(inputs[next++]));
  }
  if (mask_kind_ == MaskMode::array) named.emplace("mask", inputs[next++]);
  if (has_sinks_) named.emplace("sinks", inputs[next++]);

  const array& q = named.at("q");
  const array& kp = named.at("k_packed");
  tm::Problem p;
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
    p.mask_kind = tm::MaskKind::causal;
  } else if (mask_kind_ == MaskMode::array) {
    const array& m = named.at("mask");
    p.mask_kind = m.dtype() == bool_ ? tm::MaskKind::boolean : tm::MaskKind::additive;
    p.mask = mask_ref(m);
  }
  p.has_sinks = has_sinks_;
  if (has_sinks_) p.sinks = tensor_ref(named.at("sinks"));

  const tm::Plan plan = tm::plan_sdpa_int4(p);
  if (!plan.supported) {
    // The op sends shapes no kernel covers to the CPU (tqmetal::metal::plan_sdpa_int4
    // on contiguous strides); reaching this is a bug, not a user error.
    throw std::runtime_error("[tqmetal.sdpa_int4] no Metal plan: " + plan.reason);
  }

  out.set_data(allocator::malloc(out.nbytes()));
  std::map<std::string, array> scratch;
  for (const auto& sc : plan.scratch) {
    array a({int(sc.bytes / 4)}, float32, nullptr, {});
    a.set_data(allocator::malloc(a.nbytes()));
    enc.add_temporary(a);
    scratch.emplace(sc.name, a);
  }

  auto* lib = d.get_library(kMetallib, module_dir());
  std::map<std::string, bool> scratch_written;
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
    auto* kernel = d.get_kernel(launch.kernel, lib, hash, fcs);
    enc.set_compute_pipeline_state(kernel);
    for (const auto& b : launch.buffers) {
      switch (b.kind) {
        case tm::Binding::Kind::input: {
          const array& a = named.at(b.name);
          // set_input_array adds the array's own offset; the plan's offset includes it.
          enc.set_input_array(a, b.index, b.offset - int64_t(a.offset()));
          break;
        }
        case tm::Binding::Kind::output:
          enc.set_output_array(out, b.index);
          break;
        case tm::Binding::Kind::scratch: {
          array& a = scratch.at(b.name);
          // The first launch that binds a scratch buffer writes it, later ones read it.
          if (scratch_written[b.name]) {
            enc.set_input_array(a, b.index);
          } else {
            enc.set_output_array(a, b.index);
          }
          break;
        }
        case tm::Binding::Kind::int32s:
          enc.set_vector_bytes(b.i32, b.index);
          break;
        case tm::Binding::Kind::int64s:
          enc.set_vector_bytes(b.i64, b.index);
          break;
        case tm::Binding::Kind::float32:
          enc.set_bytes(b.f32, b.index);
          break;
      }
    }
    for (const auto& b : launch.buffers) {
      if (b.kind == tm::Binding::Kind::scratch) scratch_written[b.name] = true;
    }
    enc.dispatch_threadgroups(
        MTL::Size(launch.grid[0], launch.grid[1], launch.grid[2]),
        MTL::Size(launch.threadgroup[0], launch.threadgroup[1], launch.threadgroup[2]));
  }
  enc.add_temporaries(std::move(copies));
}

} // namespace tqmetal
