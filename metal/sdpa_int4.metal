// tqmetal's Metal decode kernels: instantiation file (the prefill kernel's is
// sdpa_int4_prefill.metal; both go into one metallib). Kernel bodies live in the headers;
// host names are what csrc/metal/dispatch_plan.cpp asks for:
//   sdpa_int4_decode_1pass_<type>_<D>_k<bits>v<bits>   K and V bits 4 or 8
//   sdpa_int4_decode_2pass_1_<type>_<D>_k<bits>v<bits>
//   sdpa_int4_decode_1pass_<type>_<D>_stream           any other pair of widths
//   sdpa_int4_decode_2pass_1_<type>_<D>_stream
//   sdpa_int4_decode_2pass_2_<type>_<D>
// BN = 16 simdgroups per threadgroup; ROWS = 8 query rows per threadgroup (4 at D = 256,
// to bound registers). The four k<4|8>v<4|8> pairs are compiled in (byte-aligned codes,
// MLX's qdot form); every pair with a 2-, 3-, 5- or 6-bit side goes to ONE bit-stream
// instance per type and D, whose K and V widths are function constants 50/51 (so the
// pipeline specialization folds them): 30 width pairs, one instance each, would be
// 8x the library for kernels that differ only in a shift amount.
#include <metal_stdlib>
#include "mlx/backend/metal/kernels/utils.h"
#include "sdpa_int4_decode.h"
using namespace metal;

#define tq_instantiate_decode_bits(type, d, kb, vb, rows)                                       \
  instantiate_kernel("sdpa_int4_decode_1pass_" #type "_" #d "_k" #kb "v" #vb,                   \
                     sdpa_int4_decode_1pass, type, d, kb, vb, 16, rows)                         \
  instantiate_kernel("sdpa_int4_decode_2pass_1_" #type "_" #d "_k" #kb "v" #vb,                 \
                     sdpa_int4_decode_2pass_1, type, d, kb, vb, 16, rows)

#define tq_instantiate_decode(type, d, rows)                                                    \
  tq_instantiate_decode_bits(type, d, 4, 4, rows)                                               \
  tq_instantiate_decode_bits(type, d, 8, 4, rows)                                               \
  tq_instantiate_decode_bits(type, d, 8, 8, rows)                                               \
  tq_instantiate_decode_bits(type, d, 4, 8, rows)                                               \
  instantiate_kernel("sdpa_int4_decode_1pass_" #type "_" #d "_stream",                          \
                     sdpa_int4_decode_1pass, type, d, tq::kStream, tq::kStream, 16, rows)       \
  instantiate_kernel("sdpa_int4_decode_2pass_1_" #type "_" #d "_stream",                        \
                     sdpa_int4_decode_2pass_1, type, d, tq::kStream, tq::kStream, 16, rows)     \
  instantiate_kernel("sdpa_int4_decode_2pass_2_" #type "_" #d, sdpa_int4_decode_2pass_2, type, d)

tq_instantiate_decode(float, 64, 8)
tq_instantiate_decode(float, 128, 8)
tq_instantiate_decode(float, 256, 4)
tq_instantiate_decode(float16_t, 64, 8)
tq_instantiate_decode(float16_t, 128, 8)
tq_instantiate_decode(float16_t, 256, 4)
tq_instantiate_decode(bfloat16_t, 64, 8)
tq_instantiate_decode(bfloat16_t, 128, 8)
tq_instantiate_decode(bfloat16_t, 256, 4)

