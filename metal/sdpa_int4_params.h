// Layout of the small argument arrays of the int4 decode and prefill kernels, shared
// by the Metal source (metal/sdpa_int4_decode.h, metal/sdpa_int4_prefill.h; the
// prefill kernel binds the 1-pass decode kernel's buffers) and the host planner
// (csrc/metal/dispatch_plan.cpp). Plain C++ with no Metal or standard headers, so
// both compilers read the same definition.
#pragma once

namespace tqmetal_decode {

// Function-constant indices (40+ to stay clear of MLX's 20-26 should both ever
// share a library).
enum FunctionConstant : int {
  FC_HAS_MASK = 40, // an array mask is bound (buffer MASK)
  FC_BOOL_MASK = 41, // the mask is boolean (else additive)
  FC_DO_CAUSAL = 42, // bottom-right aligned causal mask
  FC_HAS_TAIL = 43, // unquantized k_tail / v_tail are bound
  FC_HAS_SINKS = 44, // sinks are bound
  FC_GROUP_SIZE = 45, // quantization group size (int)
  FC_SCALE_DTYPE = 46, // DType of scales/biases (int)
  FC_TAIL_DTYPE = 47, // DType of k_tail/v_tail (int)
  FC_MASK_DTYPE = 48, // DType of an additive mask (int)
  FC_SINKS_DTYPE = 49, // DType of sinks (int)
  FC_K_BITS = 50, // bits of the K codes (int: 2, 3, 4, 5, 6 or 8): prefill, decode "_stream"
  FC_V_BITS = 51, // bits of the V codes (int: 2, 3, 4, 5, 6 or 8): prefill, decode "_stream"
};

// Runtime dtype codes used by the function constants above.
enum DTypeCode : int { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

// Buffer indices of the 1-pass kernel and of pass 1 of the 2-pass kernel.
enum DecodeBuffer : int {
  BUF_Q = 0,
  BUF_K_PACKED = 1,
  BUF_K_SCALES = 2,
  BUF_K_BIASES = 3,
  BUF_V_PACKED = 4,
  BUF_V_SCALES = 5,
  BUF_V_BIASES = 6,
  BUF_OUT = 7, // 1-pass: output [B, Hq, L, D]; pass 1: partial outputs (float32)
  BUF_PART_MAX = 8, // pass 1 only: per-block running max (log2 domain, float32)
  BUF_PART_SUM = 9, // pass 1 only: per-block softmax denominators (float32)
  BUF_K_TAIL = 10,
  BUF_V_TAIL = 11,
  BUF_MASK = 12,
  BUF_SINKS = 13,
  BUF_IPARAMS = 14, // int32[IP_COUNT]
  BUF_STRIDES = 15, // int64[ST_COUNT], element strides of each input
  BUF_SCALE = 16, // float: softmax scale * log2(e)
};

// Buffer indices of pass 2 (merge).
enum MergeBuffer : int {
  MBUF_PART_OUT = 0,
  MBUF_PART_MAX = 1,
  MBUF_PART_SUM = 2,
  MBUF_OUT = 3,
  MBUF_SINKS = 4,
  MBUF_IPARAMS = 5,
  MBUF_STRIDES = 6,
};

// int32 parameters.
enum IParam : int {
  IP_B = 0,
  IP_HQ = 1,
  IP_HKV = 2,
  IP_L = 3,
  IP_G = 4, // Hq / Hkv
  IP_ROWS = 5, // query rows per KV head = G * L (row r: position r / G, head hkv * G + r % G)
  IP_N = 6, // quantized tokens
  IP_T = 7, // tail tokens
  IP_BLOCKS = 8, // token blocks (1 = single pass)
  IP_BLOCK_LEN = 9, // tokens per block
  IP_COUNT = 10,
};

// int64 element strides (b, h, n) of each input; last axis contiguous. The mask
// has four (b, h, l, n), already right-aligned on [B, Hq, L, N + T], 0 = broadcast.
enum Stride : int {
  ST_Q = 0, // q: b, h, l
  ST_K_PACKED = 3, // uint32 words
  ST_K_SCALES = 6,
  ST_K_BIASES = 9,
  ST_V_PACKED = 12,
  ST_V_SCALES = 15,
  ST_V_BIASES = 18,
  ST_K_TAIL = 21,
  ST_V_TAIL = 24,
  ST_MASK = 27, // b, h, l, n
  ST_SINKS = 31, // h
  ST_COUNT = 32,
};

} // namespace tqmetal_decode
