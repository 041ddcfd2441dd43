// The CPU kernel's view of one sdpa_int4 call: raw pointers and element strides
// taken from MLX arrays in place (sliced cache views are never copied), plus the
// work decomposition shared by the host dispatch and every ISA variant.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tqmetal::cpu {

// IEEE half as a C++ arithmetic type: GCC gained _Float16 for C++ on aarch64 only
// in version 13, while __fp16 converts with one fcvt there.
#if defined(__aarch64__)
using half_t = __fp16;
#else
using half_t = _Float16;
#endif

enum class DType : uint8_t { f32, f16, bf16, boolean };
enum class MaskKind : uint8_t { none, causal, boolean, additive };

// A 4-D tensor read through element strides (stride 0 = broadcast, negative allowed).
struct View4 {
  const void* ptr = nullptr;
  int64_t st[4] = {0, 0, 0, 0};
  DType dt = DType::f32;
};

// One quantized tensor [B, H_kv, N, D]; packed rows must be contiguous words
// (the host copies the rare view whose last axis is strided).
struct QuantView {
  const uint32_t* packed = nullptr;
  int64_t p_st[3] = {0, 0, 0}; // b, h, n (words)
  View4 scales;
  View4 biases;
  int bits = 4;
};

struct Problem {
  int B = 0, Hq = 0, Hkv = 0, L = 0, D = 0;
  int64_t N = 0; // quantized tokens
  int64_t T = 0; // unquantized tail tokens
  int group_size = 64;
  float scale = 1.f;
  View4 q;
  QuantView k, v;
  View4 k_tail, v_tail;
  MaskKind mask_kind = MaskKind::none;
  View4 mask;
  const float* sinks = nullptr; // [Hq] in float, or null
  void* out = nullptr; // contiguous [B, Hq, L, D] in out_dt
  DType out_dt = DType::f32;

  int64_t n_total() const {
    return N + T;
  }
  int group() const {
    return Hq / Hkv;
  }
  int rows() const {
    return group() * L; // query rows sharing one KV head
  }
};

// A work unit: rows [row0, row0 + nrows) of KV head (b, hkv) against tokens
// [n0, n1). Row r means query position r / G of query head hkv * G + r % G, so
// every packed K/V byte a unit reads is shared by all its rows (GQA).
struct Unit {
  int b, hkv, row0, nrows;
  int64_t n0, n1;
};

// Query rows per prefill unit: the rows-as-lanes kernel's tile, two 16-lane vectors.
constexpr int kPrefillRows = 32;

struct Plan {
  int row_tile = 16; // rows per unit (the kernel's register tile)
  int splits = 1; // token splits per (b, hkv, row tile)
  int64_t split_len = 0;
  int row_tiles = 0;
  int64_t units() const {
    return int64_t(row_tiles) * splits;
  }
};

// Per-row partial softmax state of one split: running max m (log2 domain),
// sum l and unnormalized output o[D] (biases folded in).
struct Partial {
  float* m;
  float* l;
  float* o; // [D]
};

// Host-side pieces the kernels call (sdpa_int4_cpu.cpp).
void finalize_row(const Problem& p, int b, int hkv, int row, float m, float l, const float* o);

// Kernel entry of one ISA variant: process one unit. When `partials` is null the
// unit covers the whole context and writes final rows; otherwise it stores its
// rows' state at partials + row * (D + 2) as [m, l, o[D]].
using UnitFn = void (*)(const Problem&, const Plan&, const Unit&, float* partials);

UnitFn unit_fn_generic(const Problem&, const Plan&);
UnitFn unit_fn_avx2(const Problem&, const Plan&);
UnitFn unit_fn_avx512(const Problem&, const Plan&);
// The integer decode kernels (VNNI, AMX); null where none applies.
UnitFn unit_fn_avx512int(const Problem&, const Plan&);

float to_float(const void* base, int64_t idx, DType dt);

// Token n of a quantized tensor dequantized element by element (scale * code +
// bias, in float), in natural order: the kernels' exact path for blocks whose
// scales, biases or queries are not all finite, where the factored forms
// (scale * sum(q * code) + bias * sum(q)) would give a different NaN/inf pattern
// than MLX on the dequantized cache.
void dequant_row(const Problem& p, const QuantView& q, int b, int h, int64_t n, float* out);
// Token j of the keys or values as floats in natural order: a quantized token
// (j < N) through dequant_row, a tail token (j >= N) converted from its dtype.
// The exact paths' one way to read a token (kernels and finalize_row alike).
void token_row(const Problem& p, const QuantView& q, const View4& tail, int b, int h, int64_t j,
               float* out);

// Whether decode may use the AVX512-VNNI integer path (the CPU has it and
// TQMETAL_CPU_ISA does not ask for plain avx512 or lower).
bool cpu_use_vnni();
// Whether the VNNI decode may expand bit-stream rows with AVX512-VBMI (the CPU
// has it and may use the VNNI path).
bool cpu_use_vbmi();
// Whether decode may use AMX tiles for the K scores (the CPU has AMX-INT8, the
// kernel granted this process the tile state, TQMETAL_CPU_ISA allows it).
bool cpu_use_amx();

// Per-thread scratch of at least n floats, 64-byte aligned. It lives in the host
// file, built for the baseline ISA: a std::vector instantiated inside an ISA
// variant would be a weak symbol the linker may pick for every variant.
float* thread_scratch(size_t n);

} // namespace tqmetal::cpu
