// nanobind bindings: thin, the Python package (tqmetal/ops.py) shapes the API.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>

#include "cpu/thread_pool.h"
#include "tqmetal.h"

namespace nb = nanobind;
using namespace nb::literals;
using mlx::core::array;

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

  m.def("cpu_isa", &tqmetal::cpu_isa, "The CPU kernel variant in use (avx512, avx2, generic).");
  m.def("num_threads", &tqmetal::cpu::num_threads, "Threads the CPU kernels use.");
}
