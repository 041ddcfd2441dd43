// The op: validate every argument against the affine-quantized cache layout and
// build one ScaledDotProductAttentionInt4 node. Nothing is copied here: masks are
// broadcast as views, the cache arrays are passed as they are.
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <variant>

#include "cpu/sdpa_int4_cpu.h"
#include "cuda/dispatch_plan.h"
#include "metal/dispatch_plan.h"
#include "mlx/ops.h"
#include "primitive.h"
#include "tqmetal.h"

namespace tqmetal {

using namespace mlx::core;

namespace {

[[noreturn]] void fail(const std::string& arg, const std::string& msg) {
  throw std::invalid_argument("[tqmetal.sdpa_int4] " + arg + ": " + msg);
}

std::string shape_str(const Shape& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

bool is_float(Dtype t) {
  return t == float16 || t == bfloat16 || t == float32;
}

// mx.quantize's affine widths. 4 and 8 bits pack whole codes per byte; the others
// are one little-endian bit stream in which a code may straddle two words, so a
// group (and a kernel's chunk) starts on a word only for groups of 32 or more.
void check_bits(const std::string& arg, int bits, int group_size) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8) {
    fail(arg, "expected 2, 3, 4, 5, 6 or 8 (as mx.quantize), got " + std::to_string(bits));
  }
  if (bits != 4 && bits != 8 && group_size < 32) {
    fail(
        "group_size",
        "group_size=" + std::to_string(group_size) + " supports 4 and 8 bits only; " + arg + "=" +
            std::to_string(bits) + " needs group_size 32, 64 or 128");
  }
}

// Returns N after checking one (packed, scales, biases) triple.
int check_quantized(
    const std::string& arg,
    const QuantizedTensor& t,
    int B,
    int Hkv,
    int D,
    int group_size,
    int bits) {
  const array& p = t.packed;
  if (p.ndim() != 4) {
    fail(arg, "packed must be 4-D [B, H_kv, N, D*bits/32], got shape " + shape_str(p.shape()));
  }
  if (p.dtype() != uint32) {
    fail(arg, "packed must be uint32 (as mx.quantize returns), got another dtype");
  }
  const int N = p.shape(2);
  const int words = D * bits / 32;
  if (p.shape(0) != B || p.shape(1) != Hkv || p.shape(3) != words) {
    fail(
        arg,
        "packed must have shape [B, H_kv, N, D*bits/32] = [" + std::to_string(B) + ", " +
            std::to_string(Hkv) + ", N, " + std::to_string(words) + "] for D=" + std::to_string(D) +
            ", bits=" + std::to_string(bits) + ", got " + shape_str(p.shape()));
  }
  const Shape want = {B, Hkv, N, D / group_size};
  for (auto [name, a] : {std::pair{"scales", &t.scales}, std::pair{"biases", &t.biases}}) {
    if (a->shape() != want) {
      fail(
          arg,
          std::string(name) + " must have shape [B, H_kv, N, D/group_size] = " + shape_str(want) +
              " for group_size=" + std::to_string(group_size) + ", got " + shape_str(a->shape()));
    }
    if (!is_float(a->dtype())) {
      fail(arg, std::string(name) + " must be float16, bfloat16 or float32");
    }
  }
  if (t.scales.dtype() != t.biases.dtype()) {
    fail(arg, "scales and biases must have the same dtype");
  }
  return N;
}

} // namespace

array sdpa_int4(
    const array& q,
    const QuantizedTensor& k,
    const QuantizedTensor& v,
    float scale,
    const std::string& mask_mode,
    const std::optional<array>& mask_arr,
    int group_size,
    int k_bits,
    int v_bits,
    const std::optional<array>& sinks,
    const std::optional<array>& k_tail,
    const std::optional<array>& v_tail,
    StreamOrDevice s_) {
  // ---- q and the format ----
  if (q.ndim() != 4) {
    fail("q", "expected a 4-D array [B, H_q, L, D], got shape " + shape_str(q.shape()));
  }
  if (!is_float(q.dtype())) {
    fail("q", "expected float16, bfloat16 or float32");
  }
  if (group_size != 16 && group_size != 32 && group_size != 64 && group_size != 128) {
    fail("group_size", "expected 16, 32, 64 or 128, got " + std::to_string(group_size));
  }
  check_bits("k_bits", k_bits, group_size);
  check_bits("v_bits", v_bits, group_size);
  const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2), D = q.shape(3);
  if (D <= 0 || D % group_size != 0) {
    fail(
        "group_size",
        "head dim D=" + std::to_string(D) + " must be a positive multiple of group_size=" +
            std::to_string(group_size));
  }
  if (!std::isfinite(scale)) fail("scale", "must be a finite float");

  // ---- the cache ----
  if (k.packed.ndim() != 4) {
    fail("k", "packed must be 4-D [B, H_kv, N, D*bits/32], got shape " + shape_str(k.packed.shape()));
  }
  const int Hkv = k.packed.shape(1);
  if (k.packed.shape(0) != B) {
    fail("k", "batch size " + std::to_string(k.packed.shape(0)) + " does not match q's " + std::to_string(B));
  }
  if (Hkv < 1 || Hq % Hkv != 0) {
    fail("q", "H_q=" + std::to_string(Hq) + " must be a multiple of the cache's H_kv=" + std::to_string(Hkv));
  }
  const int N = check_quantized("k", k, B, Hkv, D, group_size, k_bits);
  const int Nv = check_quantized("v", v, B, Hkv, D, group_size, v_bits);
  if (Nv != N) fail("v", "has " + std::to_string(Nv) + " tokens but k has " + std::to_string(N));
  if (k.scales.dtype() != v.scales.dtype()) {
    fail("v", "scales/biases must have the same dtype as k's");
  }

  // ---- the unquantized tail ----
  int T = 0;
  if (k_tail.has_value() != v_tail.has_value()) {
    fail(k_tail ? "v_tail" : "k_tail", "k_tail and v_tail must be given together");
  }
  if (k_tail) {
    for (auto [name, t] : {std::pair{"k_tail", &*k_tail}, std::pair{"v_tail", &*v_tail}}) {
      if (t->ndim() != 4 || t->shape(0) != B || t->shape(1) != Hkv || t->shape(3) != D) {
        fail(
            name,
            "expected shape [B, H_kv, T, D] = [" + std::to_string(B) + ", " + std::to_string(Hkv) +
                ", T, " + std::to_string(D) + "], got " + shape_str(t->shape()));
      }
      if (!is_float(t->dtype())) fail(name, "expected float16, bfloat16 or float32");
    }
    if (k_tail->shape(2) != v_tail->shape(2)) {
      fail("v_tail", "must have as many tokens as k_tail");
    }
    T = k_tail->shape(2);
  }
  const int Ntot = N + T;

  // ---- mask ----
  MaskMode mode = MaskMode::none;
  std::optional<array> mask;
  if (mask_mode == "causal") {
    if (mask_arr) fail("mask", "give either \"causal\" or an array, not both");
    mode = MaskMode::causal;
  } else if (!mask_mode.empty() && mask_mode != "array") {
    fail("mask", "expected None, \"causal\" or an array, got \"" + mask_mode + "\"");
  } else if (mask_arr) {
    const array& m = *mask_arr;
    if (m.dtype() != bool_ && !is_float(m.dtype())) {
      fail("mask", "expected a boolean or a float (additive) array");
    }
    const Shape target = {B, Hq, L, Ntot};
    bool ok = m.ndim() <= 4;
    for (int i = 0; ok && i < int(m.ndim()); ++i) {
      const int d = m.shape(int(m.ndim()) - 1 - i);
      const int t = target[3 - i];
      ok = d == 1 || d == t;
    }
    if (!ok) {
      fail(
          "mask",
          "shape " + shape_str(m.shape()) + " is not broadcastable to [B, H_q, L, N_total] = " +
              shape_str(target));
    }
    mode = MaskMode::array;
    // Passed as is: the kernel broadcasts size-1 axes with stride 0, so no copy is
    // made and a shapeless compiled graph stays valid when L or N changes.
    mask = m;
  }

  // ---- sinks ----
  if (sinks) {
    if (sinks->ndim() != 1 || sinks->shape(0) != Hq) {
      fail("sinks", "expected shape [H_q] = (" + std::to_string(Hq) + ",), got " + shape_str(sinks->shape()));
    }
    if (!is_float(sinks->dtype())) fail("sinks", "expected a float array");
  }

  Stream stream = [&] {
    try {
      return to_stream(s_);
    } catch (const std::exception& e) { // e.g. a GPU stream on a CPU-only MLX
      fail("stream", std::string("not available here (") + e.what() + "); use stream=mx.cpu");
    }
  }();
  if (stream.device == Device::gpu) {
#if defined(_METAL_) || defined(TQMETAL_CUDA)
    // GPU kernels are built in (Metal: csrc/metal/sdpa_int4_metal.cpp; MLX's CUDA
    // backend: csrc/cuda/sdpa_int4_cuda.cpp). Shapes neither the decode nor the prefill
    // kernel covers (e.g. head dims other than 64/80/96/128/256) run on the CPU op
    // instead: an explicit, documented fallback (README, "what runs where").
    tqmetal::metal::Problem shapes;
    shapes.B = B;
    shapes.Hq = Hq;
    shapes.Hkv = Hkv;
    shapes.L = L;
    shapes.D = D;
    shapes.N = N;
    shapes.T = T;
    shapes.group_size = group_size;
    shapes.k_bits = k_bits;
    shapes.v_bits = v_bits;
    auto dt = [](const array& a) {
      return a.dtype() == float16 ? tqmetal::metal::DType::f16
                                 : a.dtype() == bfloat16 ? tqmetal::metal::DType::bf16
                                                         : tqmetal::metal::DType::f32;
    };
    shapes.q.dtype = dt(q);
    for (auto* t : {&shapes.k_scales, &shapes.k_biases, &shapes.v_scales, &shapes.v_biases}) {
      t->dtype = dt(k.scales);
    }
    shapes.has_tail = k_tail.has_value();
    if (k_tail) {
      shapes.k_tail.dtype = dt(*k_tail);
      shapes.v_tail.dtype = dt(*v_tail);
    }
#ifdef _METAL_
    const std::string unsupported = tqmetal::metal::metal_unsupported_reason(shapes);
#else
    const std::string unsupported = tqmetal::cuda::cuda_unsupported_reason(shapes);
#endif
    if (!unsupported.empty()) {
      stream = default_stream(Device::cpu);
    }
#else
    // This build has no GPU kernels (a CPU-only MLX): an unspecified stream on a
    // GPU-default machine runs on the CPU, an explicit GPU stream is refused here
    // rather than failing at eval time.
    if (!std::holds_alternative<std::monostate>(s_)) {
      fail("stream", "this build of tqmetal has no GPU kernels; use stream=mx.cpu");
    }
    stream = default_stream(Device::cpu);
#endif
  }
  // Empty shapes as in mx.fast: no queries give an empty result, no keys give zeros
  // (nothing to weigh). No kernel runs for them.
  if (L == 0 || Ntot == 0) return zeros(q.shape(), q.dtype(), stream);

  std::vector<array> inputs = {q, k.packed, k.scales, k.biases, v.packed, v.scales, v.biases};
  if (k_tail) {
    inputs.push_back(*k_tail);
    inputs.push_back(*v_tail);
  }
  if (mask) inputs.push_back(*mask);
  if (sinks) inputs.push_back(*sinks);
  return array(
      q.shape(),
      q.dtype(),
      std::make_shared<ScaledDotProductAttentionInt4>(
          stream, scale, mode, group_size, k_bits, v_bits, k_tail.has_value(), sinks.has_value()),
      std::move(inputs));
}

std::tuple<array, array, array> quantize(const array& x, int group_size, int bits, StreamOrDevice s) {
  if (group_size != 16 && group_size != 32 && group_size != 64 && group_size != 128) {
    fail("group_size", "expected 16, 32, 64 or 128, got " + std::to_string(group_size));
  }
  check_bits("bits", bits, group_size);
  if (x.ndim() < 1 || x.shape(-1) % group_size != 0) {
    fail("x", "last dimension must be a multiple of group_size=" + std::to_string(group_size));
  }
  if (!is_float(x.dtype())) fail("x", "expected float16, bfloat16 or float32");
  if (group_size >= 32) {
    auto r = mlx::core::quantize(x, group_size, bits, "affine", std::nullopt, s);
    return {r[0], r[1], r[2]};
  }
  // mx.quantize has no group 16: same affine rule (scale = range / levels,
  // bias = group min), written in MLX ops, packed in mx.quantize's bit order.
  const int D = x.shape(-1);
  Shape gshape = x.shape();
  gshape.back() = D / group_size;
  gshape.push_back(group_size);
  array xg = reshape(astype(x, float32, s), gshape, s);
  array lo = min(xg, -1, true, s);
  array hi = max(xg, -1, true, s);
  const float levels = float((1 << bits) - 1);
  array sc = maximum(divide(subtract(hi, lo, s), array(levels), s), array(1e-7f), s);
  array sc_x = astype(sc, x.dtype(), s);
  array lo_x = astype(lo, x.dtype(), s);
  array qv = clip(
      round(divide(subtract(xg, astype(lo_x, float32, s), s), astype(sc_x, float32, s), s), 0, s),
      array(0.f),
      array(levels),
      s);
  Shape wshape = x.shape();
  const int per_word = 32 / bits;
  wshape.back() = D / per_word;
  wshape.push_back(per_word);
  array qi = reshape(astype(qv, uint32, s), wshape, s);
  std::vector<uint32_t> shifts(per_word);
  for (int i = 0; i < per_word; ++i) shifts[i] = uint32_t(i * bits);
  array sh(shifts.begin(), {per_word}, uint32);
  array packed = sum(left_shift(qi, sh, s), -1, false, s);
  Shape sshape = x.shape();
  sshape.back() = D / group_size;
  return {astype(packed, uint32, s), reshape(sc_x, sshape, s), reshape(lo_x, sshape, s)};
}

const char* cpu_isa() {
  return cpu::isa_name();
}

} // namespace tqmetal
