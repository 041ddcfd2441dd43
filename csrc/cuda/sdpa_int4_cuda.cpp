// eval_gpu on MLX's CUDA backend (built only against a CUDA MLX: TQMETAL_CUDA). It
// describes the primitive's inputs to the planner (csrc/cuda/dispatch_plan.h) and adds
// exactly the plan's launches to MLX's command encoder (its CUDA graph), declaring each
// launch's reads and writes so MLX orders them against the rest of the graph. The
// kernels are compiled at run time by NVRTC (csrc/cuda/runtime.cpp).
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/dispatch_plan.h"
#include "cuda/mlx_cuda_abi.h"
#include "cuda/runtime.h"
#include "mlx/allocator.h"
#include "primitive.h"

namespace tqmetal {

namespace kabi {
#include "../../cuda/sdpa_int4_params.h"
} // namespace kabi

using namespace mlx::core;
namespace tc = tqmetal::cuda;

namespace {

// The device address of an array's first element: MLX's CUDA buffers are a struct
// whose first member is the device pointer (mlx/backend/cuda/allocator.h: CudaBuffer,
// read the same way by MLX's inline gpu_ptr in mlx/backend/cuda/utils.h).
struct CudaBufferHead {
  void* data;
};

void* gpu_ptr(const array& a) {
  if (a.size() == 0) return nullptr;
  void* buf = const_cast<array&>(a).buffer().ptr();
  if (!buf) return nullptr;
  return static_cast<char*>(static_cast<CudaBufferHead*>(buf)->data) + a.offset();
}

tc::DType plan_dtype(const array& a) {
  if (a.dtype() == float16) return tc::DType::f16;
  if (a.dtype() == bfloat16) return tc::DType::bf16;
  if (a.dtype() == bool_) return tc::DType::boolean;
  return tc::DType::f32; // float32, and uint32 packed words (the dtype is not read for those)
}

tc::TensorRef tensor_ref(const array& a) {
  tc::TensorRef t;
  t.dtype = plan_dtype(a);
  t.offset = int64_t(reinterpret_cast<uintptr_t>(gpu_ptr(a)));
  t.strides.assign(a.strides().begin(), a.strides().end());
  return t;
}

// A mask as the kernels read it: strides right-aligned on [B, Hq, L, N + T], 0 on
// broadcast axes (the op passes masks as they are, never broadcast copies).
tc::TensorRef mask_ref(const array& m) {
  tc::TensorRef t = tensor_ref(m);
  t.strides.assign(4, 0);
  const int nd = int(m.ndim());
  for (int i = 0; i < 4; ++i) {
    const int src = nd - 4 + i;
    if (src >= 0 && m.shape(src) != 1) t.strides[i] = int64_t(m.strides()[src]);
  }
  return t;
}

dim3 to_dim3(const std::array<int, 3>& a) {
  return dim3{unsigned(a[0]), unsigned(a[1]), unsigned(a[2])};
}

array new_buffer(const Shape& shape, Dtype dt) {
  array a(shape, dt, nullptr, {});
  a.set_data(allocator::malloc(a.nbytes()));
  return a;
}

} // namespace

void ScaledDotProductAttentionInt4::eval_gpu(const std::vector<array>& inputs, array& out) {
  const Stream& s = stream();
  mlx::core::cu::device(s.device).make_current();
  auto& enc = mlx::core::cu::get_command_encoder(s);
  std::vector<array> keep; // scratch and copies, alive until the GPU is done with them

  // The kernels read the last axis of q, the cache and the tails contiguously (mx.quantize
  // output, its slices and mlx-lm's caches are): copy only an input that is not.
  auto last_axis_contiguous = [&](const array& a) -> array {
    if (a.ndim() == 0 || a.size() == 0 || a.strides().back() == 1 || a.shape(-1) == 1) return a;
    if (a.ndim() > 4) throw std::runtime_error("[tqmetal.sdpa_int4] unexpected input rank");
    const int isz = int(size_of(a.dtype()));
    if (isz != 1 && isz != 2 && isz != 4) throw std::runtime_error("[tqmetal.sdpa_int4] unexpected dtype");
    array c = new_buffer(a.shape(), a.dtype());
    kabi::TqCopyParams cp{};
    cp.src = gpu_ptr(a);
    cp.dst = gpu_ptr(c);
    cp.count = int64_t(a.size());
    cp.elem_bytes = isz;
    for (int i = 0; i < 4; ++i) {
      const int src = int(a.ndim()) - 4 + i;
      cp.shape[i] = src >= 0 ? a.shape(src) : 1;
      cp.strides[i] = src >= 0 ? int64_t(a.strides()[src]) : 0;
    }
    CUfunc_st* fn = tc::get_kernel("copy", "", "tq_copy_strided", 0);
    void* args[] = {&cp};
    enc.set_input_array(a);
    enc.set_output_array(c);
    const unsigned blocks = unsigned(std::min<int64_t>((cp.count + 255) / 256, 4096));
    enc.add_kernel_node_raw(fn, dim3{blocks, 1, 1}, dim3{256, 1, 1}, dim3{1, 1, 1}, 0, args);
    keep.push_back(c);
    return c;
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
  tc::Problem p;
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
    p.mask_kind = tc::MaskKind::causal;
  } else if (mask_kind_ == MaskMode::array) {
    const array& m = named.at("mask");
    p.mask_kind = m.dtype() == bool_ ? tc::MaskKind::boolean : tc::MaskKind::additive;
    p.mask = mask_ref(m);
  }
  p.has_sinks = has_sinks_;
  if (has_sinks_) p.sinks = tensor_ref(named.at("sinks"));
  p.gpu_cores = tc::current_device().sms;

  const tc::Plan plan = tc::plan_sdpa_int4(p);
  if (!plan.supported) {
    // The op sends shapes no kernel covers to the CPU (cuda_unsupported_reason on
    // contiguous strides); reaching this is a bug, not a user error.
    throw std::runtime_error("[tqmetal.sdpa_int4] no CUDA plan: " + plan.reason);
  }

  out.set_data(allocator::malloc(out.nbytes()));
  std::map<std::string, array> scratch;
  for (const auto& sc : plan.scratch) {
    array a = new_buffer({int(sc.bytes / 4)}, float32);
    keep.push_back(a);
    scratch.emplace(sc.name, a);
  }
  auto lookup = [&](const std::string& name) -> const array& {
    if (name == "out") return out;
    if (auto it = scratch.find(name); it != scratch.end()) return it->second;
    return named.at(name);
  };

  kabi::TqParams kp_args{};
  auto ptr = [&](const char* name) -> const void* {
    auto it = named.find(name);
    return it == named.end() ? nullptr : gpu_ptr(it->second);
  };
  kp_args.q = ptr("q");
  kp_args.k_packed = static_cast<const kabi::u32*>(ptr("k_packed"));
  kp_args.k_scales = ptr("k_scales");
  kp_args.k_biases = ptr("k_biases");
  kp_args.v_packed = static_cast<const kabi::u32*>(ptr("v_packed"));
  kp_args.v_scales = ptr("v_scales");
  kp_args.v_biases = ptr("v_biases");
  kp_args.k_tail = ptr("k_tail");
  kp_args.v_tail = ptr("v_tail");
  kp_args.mask = ptr("mask");
  kp_args.sinks = ptr("sinks");
  kp_args.out = gpu_ptr(out);
  auto scratch_ptr = [&](const char* name) -> float* {
    auto it = scratch.find(name);
    return it == scratch.end() ? nullptr : static_cast<float*>(gpu_ptr(it->second));
  };
  kp_args.part_out = scratch_ptr("part_out");
  kp_args.part_max = scratch_ptr("part_max");
  kp_args.part_sum = scratch_ptr("part_sum");
  const tc::Args& a = plan.args;
  for (int i = 0; i < kabi::tqc::ST_COUNT; ++i) kp_args.st[i] = a.strides[i];
  kp_args.B = a.B;
  kp_args.Hq = a.Hq;
  kp_args.Hkv = a.Hkv;
  kp_args.L = a.L;
  kp_args.G = a.G;
  kp_args.R = a.R;
  kp_args.N = a.N;
  kp_args.T = a.T;
  kp_args.blocks = a.blocks;
  kp_args.block_len = a.block_len;
  kp_args.q_dtype = a.q_dtype;
  kp_args.scale_dtype = a.scale_dtype;
  kp_args.tail_dtype = a.tail_dtype;
  kp_args.mask_dtype = a.mask_dtype;
  kp_args.sinks_dtype = a.sinks_dtype;
  kp_args.mask_kind = a.mask_kind;
  kp_args.qscale = a.qscale;

  for (const auto& launch : plan.launches) {
    CUfunc_st* fn = tc::get_kernel(plan.program, plan.entry_source, launch.kernel, launch.smem_bytes);
    for (const auto& r : launch.reads) enc.set_input_array(lookup(r));
    for (const auto& w : launch.writes) enc.set_output_array(lookup(w));
    void* args[] = {&kp_args}; // the encoder copies the argument block into its graph node
    enc.add_kernel_node_raw(
        fn, to_dim3(launch.grid), to_dim3(launch.block), dim3{1, 1, 1}, uint32_t(launch.smem_bytes), args);
  }
  if (!keep.empty()) {
    enc.add_completed_handler([keep = std::move(keep)]() {});
  }
}

} // namespace tqmetal
