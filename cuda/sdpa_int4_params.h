// The argument block of the CUDA kernels (cuda/sdpa_int4_*.cuh) and the codes in it.
// Plain C++ with no header, read by both NVRTC (first file of the embedded kernel
// source) and the host (csrc/cuda/sdpa_int4_cuda.cpp fills it), so the two can never
// disagree on its layout.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
typedef unsigned long long u64;

namespace tqc {

// Runtime dtype codes (csrc/cuda/dispatch_plan.h: DT_*).
enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_BOOL = 3 };
// Mask kinds (csrc/cuda/dispatch_plan.h: MK_*).
enum { MK_NONE = 0, MK_CAUSAL = 1, MK_BOOL = 2, MK_ADDITIVE = 3 };
// Element strides, same layout as metal/sdpa_int4_params.h (b, h, n per input).
enum {
  ST_Q = 0, ST_K_PACKED = 3, ST_K_SCALES = 6, ST_K_BIASES = 9, ST_V_PACKED = 12,
  ST_V_SCALES = 15, ST_V_BIASES = 18, ST_K_TAIL = 21, ST_V_TAIL = 24, ST_MASK = 27,
  ST_SINKS = 31, ST_COUNT = 32
};

}  // namespace tqc

// The kernels' only argument (passed by value).
struct TqParams {
  const void* q;
  const u32* k_packed;
  const void* k_scales;
  const void* k_biases;
  const u32* v_packed;
  const void* v_scales;
  const void* v_biases;
  const void* k_tail;
  const void* v_tail;
  const void* mask;
  const void* sinks;
  void* out;        // [B, Hq, L, D] in q's dtype, row contiguous
  float* part_out;  // split-K: [B * Hkv * R, blocks, D]
  float* part_max;  // split-K: [B * Hkv * R, blocks] (log2 domain)
  float* part_sum;  // split-K: [B * Hkv * R, blocks]
  i64 st[tqc::ST_COUNT];
  int B, Hq, Hkv, L, G, R, N, T, blocks, block_len;
  int q_dtype, scale_dtype, tail_dtype, mask_dtype, sinks_dtype, mask_kind;
  float qscale;  // softmax scale * log2(e)
};


// tq_copy_strided's argument: a 4-D strided array (element strides) gathered into a
// row-contiguous one; only for an input whose last axis is not contiguous.
struct TqCopyParams {
  const void* src;
  void* dst;
  i64 count;  // elements
  int elem_bytes;  // 1, 2 or 4
  int shape[4];
  i64 strides[4];
};
