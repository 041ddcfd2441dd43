// nanobind bindings: thin, the Python package (tqmetal/ops.py) shapes the API.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "cpu/thread_pool.h"
#include "cuda/dispatch_plan.h"
#include "metal/dispatch_plan.h"
#include "metal/gpu_path.h"
#include "tqmetal.h"

namespace nb = nanobind;
using namespace nb::literals;
using mlx::core::array;

namespace {

// Not `tm`: Python.h brings in <time.h>'s global `struct tm`, and clang (AppleClang) rejects
// the unqualified name as ambiguous where g++ accepts it.
namespace tqm = tqmetal::metal;

// The Metal plans (csrc/metal/dispatch_plan.h) for tests and tools: a problem dict
// in, the plan as a dict out. Tensors are given as
// {"dtype": "float16", "offset": bytes, "strides": [...]}.
tqm::Problem problem_from_dict(const nb::dict& d) {
  auto get_int = [&](const char* k, int64_t dflt) {
    return d.contains(k) ? nb::cast<int64_t>(d[k]) : dflt;
  };
  auto dtype = [](const std::string& s) {
    if (s == "float16") return tqm::DType::f16;
    if (s == "bfloat16") return tqm::DType::bf16;
    if (s == "bool") return tqm::DType::boolean;
    if (s == "float32" || s == "uint32") return tqm::DType::f32;
    throw nb::value_error(("unknown dtype " + s).c_str());
  };
  auto tensor = [&](const char* k) {
    tqm::TensorRef t;
    if (!d.contains(k)) return t;
    nb::dict td = nb::cast<nb::dict>(d[k]);
    t.dtype = dtype(nb::cast<std::string>(td["dtype"]));
    if (td.contains("offset")) t.offset = nb::cast<int64_t>(td["offset"]);
    for (auto h : nb::cast<nb::list>(td["strides"])) t.strides.push_back(nb::cast<int64_t>(h));
    return t;
  };
  tqm::Problem p;
  p.B = int(get_int("B", 1));
  p.Hq = int(get_int("Hq", 1));
  p.Hkv = int(get_int("Hkv", 1));
  p.L = int(get_int("L", 1));
  p.D = int(get_int("D", 128));
  p.N = get_int("N", 0);
  p.T = get_int("T", 0);
  p.group_size = int(get_int("group_size", 64));
  p.k_bits = int(get_int("k_bits", 4));
  p.v_bits = int(get_int("v_bits", 4));
  p.scale = d.contains("scale") ? nb::cast<float>(d["scale"]) : 1.f;
  p.q = tensor("q");
  p.k_packed = tensor("k_packed");
  p.k_scales = tensor("k_scales");
  p.k_biases = tensor("k_biases");
  p.v_packed = tensor("v_packed");
  p.v_scales = tensor("v_scales");
  p.v_biases = tensor("v_biases");
  p.has_tail = d.contains("k_tail");
  p.k_tail = tensor("k_tail");
  p.v_tail = tensor("v_tail");
  const std::string mk = d.contains("mask_kind") ? nb::cast<std::string>(d["mask_kind"]) : "none";
  p.mask_kind = mk == "causal" ? tqm::MaskKind::causal
      : mk == "bool"           ? tqm::MaskKind::boolean
      : mk == "additive"       ? tqm::MaskKind::additive
                               : tqm::MaskKind::none;
  p.mask = tensor("mask");
  p.has_sinks = d.contains("sinks");
  p.sinks = tensor("sinks");
  p.blocks = int(get_int("blocks", 0));
  p.gpu_cores = int(get_int("gpu_cores", 32));
  if (d.contains("max_threads")) {
    for (auto [k, v] : nb::cast<nb::dict>(d["max_threads"])) {
      p.max_threads[nb::cast<std::string>(k)] = nb::cast<int>(v);
    }
  }
  return p;
}

nb::dict plan_to_dict(const tqm::Plan& plan) {
  nb::dict r;
  r["supported"] = plan.supported;
  r["reason"] = plan.reason;
  r["path"] = plan.path == tqm::Path::decode ? "decode" : plan.path == tqm::Path::prefill ? "prefill" : "none";
  r["key_tile"] = plan.key_tile;
  r["two_pass"] = plan.two_pass;
  r["blocks"] = plan.blocks;
  r["block_len"] = plan.block_len;
  r["rows"] = plan.rows;
  r["rows_per_threadgroup"] = plan.rows_per_threadgroup;
  r["row_tiles"] = plan.row_tiles;
  r["simdgroups"] = plan.simdgroups;
  nb::dict scratch;
  for (const auto& s : plan.scratch) scratch[s.name.c_str()] = s.bytes;
  r["scratch"] = scratch;
  nb::list launches;
  static const char* kinds[] = {"input", "output", "scratch", "int32", "int64", "float32"};
  for (const auto& l : plan.launches) {
    nb::dict ld;
    ld["library"] = l.library;
    ld["kernel"] = l.kernel;
    nb::dict fcs;
    for (const auto& f : l.constants) {
      if (f.is_bool) {
        fcs[nb::int_(f.index)] = bool(f.value);
      } else {
        fcs[nb::int_(f.index)] = f.value;
      }
    }
    ld["function_constants"] = fcs;
    nb::list bufs;
    for (const auto& b : l.buffers) {
      nb::dict bd;
      bd["index"] = b.index;
      bd["kind"] = kinds[int(b.kind)];
      bd["name"] = b.name;
      bd["offset"] = b.offset;
      if (b.kind == tqm::Binding::Kind::int32s) bd["value"] = nb::cast(b.i32);
      if (b.kind == tqm::Binding::Kind::int64s) bd["value"] = nb::cast(b.i64);
      if (b.kind == tqm::Binding::Kind::float32) bd["value"] = b.f32;
      bufs.append(bd);
    }
    ld["buffers"] = bufs;
    ld["grid"] = nb::make_tuple(l.grid[0], l.grid[1], l.grid[2]);
    ld["threadgroup"] = nb::make_tuple(l.threadgroup[0], l.threadgroup[1], l.threadgroup[2]);
    launches.append(ld);
  }
  r["launches"] = launches;
  return r;
}

// The CUDA plans (csrc/cuda/dispatch_plan.h) as dicts: the same problem dicts as the
// Metal ones ("offset" = the first element's byte address, only its alignment
// matters; "gpu_cores" = streaming multiprocessors).
nb::dict cuda_plan_to_dict(const tqmetal::cuda::Plan& plan) {
  namespace tc = tqmetal::cuda;
  nb::dict r;
  r["supported"] = plan.supported;
  r["reason"] = plan.reason;
  r["path"] = plan.path == tqm::Path::decode ? "decode" : plan.path == tqm::Path::prefill ? "prefill" : "none";
  r["two_pass"] = plan.two_pass;
  r["blocks"] = plan.blocks;
  r["block_len"] = plan.block_len;
  r["rows"] = plan.rows;
  r["rows_per_cta"] = plan.rows_per_cta;
  r["row_tiles"] = plan.row_tiles;
  r["warps"] = plan.warps;
  r["key_tile"] = plan.key_tile;
  r["lanes_per_token"] = plan.lanes_per_token;
  r["elems_per_lane"] = plan.elems_per_lane;
  r["vector_bytes"] = plan.vector_bytes;
  r["tiles"] = plan.tiles;
  r["prefetch"] = plan.prefetch;
  r["min_ctas"] = plan.min_ctas;
  r["pipeline"] = plan.pipeline;
  r["mma_type"] = plan.mma_type;
  r["fast_prefill"] = plan.fast_prefill;
  r["program"] = plan.program;
  r["entry_source"] = plan.entry_source;
  nb::dict scratch;
  for (const auto& s : plan.scratch) scratch[s.name.c_str()] = s.bytes;
  r["scratch"] = scratch;
  const tc::Args& a = plan.args;
  nb::dict args;
  args["strides"] = nb::cast(std::vector<int64_t>(a.strides.begin(), a.strides.end()));
  args["B"] = a.B;
  args["Hq"] = a.Hq;
  args["Hkv"] = a.Hkv;
  args["L"] = a.L;
  args["G"] = a.G;
  args["R"] = a.R;
  args["N"] = a.N;
  args["T"] = a.T;
  args["blocks"] = a.blocks;
  args["block_len"] = a.block_len;
  args["q_dtype"] = a.q_dtype;
  args["scale_dtype"] = a.scale_dtype;
  args["tail_dtype"] = a.tail_dtype;
  args["mask_dtype"] = a.mask_dtype;
  args["sinks_dtype"] = a.sinks_dtype;
  args["mask_kind"] = a.mask_kind;
  args["qscale"] = a.qscale;
  r["args"] = args;
  nb::list launches;
  for (const auto& l : plan.launches) {
    nb::dict ld;
    ld["kernel"] = l.kernel;
    ld["grid"] = nb::make_tuple(l.grid[0], l.grid[1], l.grid[2]);
    ld["block"] = nb::make_tuple(l.block[0], l.block[1], l.block[2]);
    ld["smem_bytes"] = l.smem_bytes;
    ld["reads"] = nb::cast(l.reads);
    ld["writes"] = nb::cast(l.writes);
    launches.append(ld);
  }
  r["launches"] = launches;
  return r;
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "tqmetal native extension: fused attention on quantized KV caches";

  m.def(
      "sdpa_int4",
      [](const array& q,
         const array& k_packed,
         const array& k_scales,
         const array& k_biases,
         const array& v_packed,
         const array& v_scales,
         const array& v_biases,
         float scale,
         const std::string& mask_mode,
         const std::optional<array>& mask_arr,
         int group_size,
         int k_bits,
         int v_bits,
         const std::optional<array>& sinks,
         const std::optional<array>& k_tail,
         const std::optional<array>& v_tail,
         mlx::core::StreamOrDevice s) {
        return tqmetal::sdpa_int4(
            q,
            {k_packed, k_scales, k_biases},
            {v_packed, v_scales, v_biases},
            scale,
            mask_mode,
            mask_arr,
            group_size,
            k_bits,
            v_bits,
            sinks,
            k_tail,
            v_tail,
            s);
      },
      "q"_a, "k_packed"_a, "k_scales"_a, "k_biases"_a, "v_packed"_a, "v_scales"_a,
      "v_biases"_a, "scale"_a, "mask_mode"_a, "mask_arr"_a.none(), "group_size"_a, "k_bits"_a,
      "v_bits"_a, "sinks"_a.none(), "k_tail"_a.none(), "v_tail"_a.none(),
      "stream"_a.none() = nb::none());

  m.def(
      "quantize",
      [](const array& x, int group_size, int bits, mlx::core::StreamOrDevice s) {
        return tqmetal::quantize(x, group_size, bits, s);
      },
      "x"_a, "group_size"_a = 64, "bits"_a = 4, "stream"_a.none() = nb::none());

  m.def("cpu_isa", &tqmetal::cpu_isa, "The CPU kernel variant in use (avx512amx, avx512vnni, avx512, avx2, generic).");
  m.def("num_threads", &tqmetal::cpu::num_threads, "Threads the CPU kernels use.");
  m.def(
      "plan_sdpa_int4",
      [](const nb::dict& d) { return plan_to_dict(tqm::plan_sdpa_int4(problem_from_dict(d))); },
      "problem"_a,
      "The Metal launch plan eval_gpu runs (decode or prefill; csrc/metal/dispatch_plan.h) as a dict.");
  m.def(
      "has_metal_kernels",
      [] {
#ifdef _METAL_
        return true;
#else
        return false;
#endif
      },
      "Whether this build has the Metal kernels (eval_gpu): macOS with an MLX built with Metal.");
  m.def(
      "gpu_path",
      [] {
        const tqm::GpuPath g = tqm::gpu_path();
        nb::dict r;
        r["path"] = g.path;
        r["reason"] = g.reason;
        r["metallib_dir"] = g.metallib_dir;
        return r;
      },
      "Which GPU path the op has: 'metallib' (prebuilt tqmetal_kernels.metallib), 'runtime' (the "
      "embedded kernel sources, compiled by Metal at first use) or 'none', and why.");
  m.def(
      "metallib_dirs",
      [](const std::string& module_dir, const std::optional<std::string>& env_dir) {
        std::vector<std::string> r;
        for (const auto& d : tqm::metallib_dirs(module_dir, env_dir ? env_dir->c_str() : nullptr)) {
          r.push_back(d.string());
        }
        return r;
      },
      "module_dir"_a, "env_dir"_a.none() = nb::none(),
      "Where eval_gpu looks for tqmetal_kernels.metallib, given the binary's directory and TQMETAL_METALLIB_DIR.");
  m.def(
      "metal_unsupported_reason",
      [](const nb::dict& d) { return tqm::metal_unsupported_reason(problem_from_dict(d)); },
      "problem"_a,
      "Why no Metal kernel covers these shapes (the op then runs on the CPU), or '' (strides ignored).");
  m.def(
      "cuda_plan_sdpa_int4",
      [](const nb::dict& d) { return cuda_plan_to_dict(tqmetal::cuda::plan_sdpa_int4(problem_from_dict(d))); },
      "problem"_a,
      "The CUDA launch plan eval_gpu runs (decode or prefill; csrc/cuda/dispatch_plan.h) as a dict.");
  m.def(
      "cuda_plan_sdpa_int4_decode",
      [](const nb::dict& d) { return cuda_plan_to_dict(tqmetal::cuda::plan_sdpa_int4_decode(problem_from_dict(d))); },
      "problem"_a, "The CUDA decode kernels' launch plan as a dict.");
  m.def(
      "cuda_plan_sdpa_int4_prefill",
      [](const nb::dict& d) { return cuda_plan_to_dict(tqmetal::cuda::plan_sdpa_int4_prefill(problem_from_dict(d))); },
      "problem"_a, "The CUDA prefill kernel's launch plan as a dict.");
  m.def(
      "cuda_unsupported_reason",
      [](const nb::dict& d) { return tqmetal::cuda::cuda_unsupported_reason(problem_from_dict(d)); },
      "problem"_a,
      "Why no CUDA kernel covers these shapes (the op then runs on the CPU), or '' (strides ignored).");
  m.def(
      "gpu_info",
      [] {
        const tqmetal::GpuInfo g = tqmetal::gpu_info();
        nb::dict r;
        r["backend"] = g.backend;
        r["available"] = g.available;
        r["reason"] = g.reason;
        for (const auto& [k, v] : g.details) r[k.c_str()] = v;
        return r;
      },
      "Which GPU path this build has and why: {'backend', 'available', 'reason', ...details}.");
  m.def(
      "plan_sdpa_int4_decode",
      [](const nb::dict& d) { return plan_to_dict(tqm::plan_sdpa_int4_decode(problem_from_dict(d))); },
      "problem"_a, "The Metal decode kernels' launch plan as a dict.");
  m.def(
      "plan_sdpa_int4_prefill",
      [](const nb::dict& d) { return plan_to_dict(tqm::plan_sdpa_int4_prefill(problem_from_dict(d))); },
      "problem"_a, "The Metal prefill kernel's launch plan as a dict.");
}
