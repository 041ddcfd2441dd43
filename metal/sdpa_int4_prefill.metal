// tqmetal's Metal prefill kernel: instantiation file. The body lives in
// sdpa_int4_prefill.h; host names are what csrc/metal/dispatch_plan.cpp asks for:
//   sdpa_int4_prefill_<type>_<D>   (K and V bits are function constants 50/51)
#include <metal_stdlib>
#include "mlx/backend/metal/kernels/utils.h"
#include "sdpa_int4_prefill.h"
using namespace metal;

// Prefill: BQ = 32 query rows (4 simdgroups) x BK = 16 keys per step.
#define tq_instantiate_prefill(type, d) \
  instantiate_kernel("sdpa_int4_prefill_" #type "_" #d, sdpa_int4_prefill, type, d, 32, 16)

#define tq_instantiate_prefill_dims(type) \
  tq_instantiate_prefill(type, 64)        \
  tq_instantiate_prefill(type, 80)        \
  tq_instantiate_prefill(type, 96)        \
  tq_instantiate_prefill(type, 128)       \
  tq_instantiate_prefill(type, 256)

tq_instantiate_prefill_dims(float)
tq_instantiate_prefill_dims(float16_t)
tq_instantiate_prefill_dims(bfloat16_t)
