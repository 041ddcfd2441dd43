// Shared by the CUDA decode and prefill kernels of tqmetal.sdpa_int4.
//
// These files are compiled at run time by NVRTC (csrc/cuda/runtime.cpp), with no
// include path: they use no header at all, not even cuda_fp16.h (the CUDA wheels MLX
// depends on need not ship it), so float16/bfloat16 are handled as raw 16-bit codes
// converted with PTX `cvt`. csrc/cuda/kernel_source.cpp embeds them in the extension
// in the order common, decode, prefill; csrc/cuda/dispatch_plan.cpp appends the
// `extern "C"` entry points of one specialization.
//
// The argument of every kernel is one TqParams, filled by csrc/cuda/sdpa_int4_cuda.cpp
// from the plan (csrc/cuda/dispatch_plan.h): pointers already include MLX's array
// offsets, strides are in elements (uint32 words for the packed codes), the mask's
// four strides are right-aligned on [B, Hq, L, N + T] with 0 on broadcast axes.
#pragma once

// Needs cuda/sdpa_int4_params.h first (the embedded source puts it there).

namespace tqc {

#define kInf __int_as_float(0x7f800000)
static constexpr float kLog2e = 1.4426950408889634f;
static constexpr float kMasked = -3.402823466e38f;  // MLX: lowest finite for masked keys

__device__ __forceinline__ float f16_to_f32(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ float bf16_to_f32(u16 h) {
  return __uint_as_float(u32(h) << 16);
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ u16 f32_to_bf16(float f) {
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// Element i of a float16/bfloat16/float32 array whose dtype is a run-time code.
__device__ __forceinline__ float load_f(const void* p, i64 i, int dt) {
  if (dt == DT_F16) return f16_to_f32(static_cast<const u16*>(p)[i]);
  if (dt == DT_BF16) return bf16_to_f32(static_cast<const u16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_f(void* p, i64 i, int dt, float v) {
  if (dt == DT_F16) {
    static_cast<u16*>(p)[i] = f32_to_f16(v);
  } else if (dt == DT_BF16) {
    static_cast<u16*>(p)[i] = f32_to_bf16(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// 2^x, x in the log2 domain (ex2.approx: what Metal's fast::exp2 is); 2^-inf = 0.
__device__ __forceinline__ float exp2a(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The code at element position p of a 16-bit half of a packed word, kept shifted
// left by BITS * p (exact as a float: at most 255 * 256 or 15 * 4096 < 2^23):
// (bits & mask) | 0x4B000000 is the float 2^23 + code * 2^(BITS * p).
template <int BITS>
__device__ __forceinline__ float shifted_code(u32 half_word, int p) {
  const u32 m = ((1u << BITS) - 1u) << (BITS * p);
  return __uint_as_float((half_word & m) | 0x4B000000u) - 8388608.0f;
}

// 1 / 2^(BITS * p): the factor that undoes shifted_code's shift.
template <int BITS>
__device__ __forceinline__ constexpr float code_inv(int p) {
  return 1.0f / float(1u << (BITS * p));
}

// The softmax end: sinks join with no value; a row whose every key weighs 0 is NaN.
__device__ __forceinline__ float finish_row(float acc, float M, float lsum, const TqParams& p, int hq) {
  if (p.sinks) {
    const float sk = load_f(p.sinks, hq * p.st[ST_SINKS], p.sinks_dtype) * kLog2e;
    const float Mn = fmaxf(M, sk);
    const float a = M == -kInf ? 0.0f : exp2a(M - Mn);
    acc *= a;
    lsum = lsum * a + exp2a(sk - Mn);
  }
  return lsum == 0.0f ? __int_as_float(0x7fffffff) : acc / lsum;
}

// Mask contribution of key t for query row (hq, qpos): applied to a log2-domain score.
__device__ __forceinline__ float apply_mask(float s, const TqParams& p, int b, int hq, int qpos, int t) {
  if (p.mask_kind == MK_CAUSAL) {
    return t <= qpos + (p.N + p.T) - p.L ? s : kMasked;
  }
  if (p.mask_kind == MK_BOOL || p.mask_kind == MK_ADDITIVE) {
    const i64 mo = b * p.st[ST_MASK] + hq * p.st[ST_MASK + 1] + qpos * p.st[ST_MASK + 2] +
        i64(t) * p.st[ST_MASK + 3];
    if (p.mask_kind == MK_BOOL) {
      return static_cast<const unsigned char*>(p.mask)[mo] ? s : kMasked;
    }
    return s + load_f(p.mask, mo, p.mask_dtype) * kLog2e;
  }
  return s;
}

}  // namespace tqc

// Gathers a strided 4-D array into a row-contiguous copy (grid-stride loop).
extern "C" __global__ void tq_copy_strided(TqCopyParams c) {
  for (i64 i = blockIdx.x * i64(blockDim.x) + threadIdx.x; i < c.count; i += i64(gridDim.x) * blockDim.x) {
    i64 rest = i, src = 0;
    for (int a = 3; a >= 0; --a) {
      const i64 x = rest % c.shape[a];
      rest /= c.shape[a];
      src += x * c.strides[a];
    }
    if (c.elem_bytes == 4) {
      static_cast<u32*>(c.dst)[i] = static_cast<const u32*>(c.src)[src];
    } else if (c.elem_bytes == 2) {
      static_cast<u16*>(c.dst)[i] = static_cast<const u16*>(c.src)[src];
    } else {
      static_cast<unsigned char*>(c.dst)[i] = static_cast<const unsigned char*>(c.src)[src];
    }
  }
}
