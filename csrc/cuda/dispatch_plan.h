// Host plan of the CUDA kernels (cuda/sdpa_int4_decode.cuh, cuda/sdpa_int4_prefill.cuh):
// which path (decode 1-pass, decode split-K + merge, prefill), which specialization
// (the NVRTC program and its entry points), grid, block, shared memory, scratch
// buffers and the kernels' argument block. Pure C++ (no CUDA or MLX headers): eval_gpu
// executes exactly this plan on an NVIDIA GPU, and the CPU tests check it through
// tqmetal._ext.cuda_plan_sdpa_int4 on machines without one.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "metal/dispatch_plan.h"

namespace tqmetal::cuda {

// The problem as eval_gpu sees the primitive's inputs: the same description as the
// Metal planner's, with two differences in meaning: TensorRef::offset is the byte
// address of the first element (only its alignment matters here), and gpu_cores is
// the GPU's number of streaming multiprocessors.
using Problem = tqmetal::metal::Problem;
using tqmetal::metal::DType;
using tqmetal::metal::MaskKind;
using tqmetal::metal::Path;
using tqmetal::metal::TensorRef;

// The kernels' argument block without pointers (eval_gpu adds them): mirrors
// TqParams in cuda/sdpa_int4_params.h.
struct Args {
  std::array<int64_t, 32> strides{};
  int B = 0, Hq = 0, Hkv = 0, L = 0, G = 0, R = 0, N = 0, T = 0, blocks = 1, block_len = 0;
  int q_dtype = 0, scale_dtype = 0, tail_dtype = 0, mask_dtype = 0, sinks_dtype = 0, mask_kind = 0;
  float qscale = 0.f;
};

struct Launch {
  std::string kernel; // extern "C" entry point in the plan's program
  std::array<int, 3> grid; // CTAs
  std::array<int, 3> block; // threads per CTA
  int smem_bytes = 0; // dynamic shared memory
  std::vector<std::string> reads; // inputs / scratch it reads (dependency tracking)
  std::vector<std::string> writes; // scratch / "out" it writes
};

struct Scratch {
  std::string name;
  int64_t bytes;
};

struct Plan {
  bool supported = false;
  std::string reason; // why not, when !supported (the op then runs on the CPU)
  Path path = Path::none;
  bool two_pass = false;
  int blocks = 1;
  int64_t block_len = 0;
  int rows = 0; // query rows per KV head (G * L)
  int rows_per_cta = 0; // decode: ROWS; prefill: BQ
  int row_tiles = 0;
  int warps = 0;
  int key_tile = 0; // prefill: BK
  int lanes_per_token = 0; // decode: LPR
  int elems_per_lane = 0; // decode: EPL
  int vector_bytes = 0; // decode: widest code load the addresses allow (16, 8 or 4)
  int tiles = 0; // decode: 16-token tiles per warp step
  int prefetch = 0; // decode: L2 prefetch distance in warp steps (0: none)
  int min_ctas = 0; // decode: CTAs per SM in the kernel's launch bounds
  bool pipeline = false; // decode: next step's loads issued before this step computes
  bool fast_prefill = false; // prefill: prefill_fast_impl (else prefill_impl)
  int mma_type = -1; // prefill: 0 float16 (float16 and bfloat16 q), 2 float32 split into float16 hi + lo
  std::string program; // cache key of the NVRTC program = its specialization
  std::string entry_source; // the extern "C" entry points appended to the kernel source
  Args args;
  std::vector<Scratch> scratch;
  std::vector<Launch> launches; // in order
};

inline constexpr int kDecodeWarps = 4; // cuda/sdpa_int4_decode.cuh: kDecodeWarps
inline constexpr int kDecodeRows = 8; // cuda/sdpa_int4_decode.cuh: kDecodeRows (the mma's N)
inline constexpr int kDecodeTiles = 1; // 16-token tiles per warp step
inline constexpr int kDecodePrefetch = 0; // L2 prefetch distance, warp steps (0: none; it cost more than it gave on an H100)
inline constexpr bool kDecodePipeline = false; // register software pipeline of the loads
inline constexpr int kDecodeMinCtas = 4; // launch bounds: CTAs per SM (fewer for big fragments)
inline constexpr int kMaxDecodeRowTiles = 4; // more rows: prefill
inline constexpr int64_t kMinBlockLen = 256; // tokens per split-K block, at least

struct DecodeTuning {
  int tiles, prefetch, min_ctas, ctas_per_sm;
  bool pipeline;
};
// The decode's tuning: the defaults above, or TQMETAL_CUDA_DECODE="TL,PF,MINB,CTAS,PIPE".
DecodeTuning decode_tuning(int D, int groups, bool qsplit, bool bit_stream);
inline constexpr int kPrefillRows = 64; // BQ
inline constexpr int kPrefillWarps = 4;
inline constexpr int kPrefillFastWarps = 8; // fast prefill: 16 query rows per warp

struct PrefillChoice {
  bool fast = false; // prefill_fast_impl covers the problem (and is not overridden)
  int warps = kPrefillWarps;
};
// The prefill kernel for a problem (TQMETAL_CUDA_PREFILL="generic"|"fast4"|"fast8" overrides).
PrefillChoice prefill_choice(const Problem& p);

Plan plan_sdpa_int4_decode(const Problem& p);
Plan plan_sdpa_int4_prefill(const Problem& p);
// What eval_gpu runs: decode when it covers the problem, else prefill; unsupported
// (reason set) when neither does.
Plan plan_sdpa_int4(const Problem& p);

// The op's fallback decision at graph-build time (strides and addresses unknown):
// why no CUDA kernel covers these shapes, dtypes, bits and group size, or "".
std::string cuda_unsupported_reason(const Problem& p);

} // namespace tqmetal::cuda
