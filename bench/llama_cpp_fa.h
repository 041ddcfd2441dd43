// Optional comparison with llama.cpp's CPU flash attention (ggml_flash_attn_ext) on
// q4_0 / q8_0 / f16 caches. The ggml libraries of a llama.cpp build are loaded at run
// time (dlopen), so the binary neither needs nor links llama.cpp; see bench/README.md
// for building them from llama-cpp-python's source distribution.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace tqbench {

// One layer's K and V in ggml's own layout and type, in a ggml context that owns them.
struct LlamaLayer {
  void* ctx = nullptr;
  void* k = nullptr;
  void* v = nullptr;
  int64_t hkv = 0, n = 0, d = 0;
};

class LlamaCppFlashAttn {
 public:
  // Loads libggml-base + libggml-cpu (or a single libggml) from `dir`; nullptr and a
  // reason in *error when they are not there or lack a symbol.
  static std::unique_ptr<LlamaCppFlashAttn> load(const std::string& dir, std::string* error);
  ~LlamaCppFlashAttn();

  std::string description() const { return description_; }
  // Bytes of one layer's K+V cache of `type` ("q4_0", "q8_0", "f16"), [H_kv, N, D] each.
  int64_t layer_bytes(const std::string& type, int64_t hkv, int64_t n, int64_t d) const;
  // k, v: float32 [H_kv, N, D] row-major, quantized with ggml's own quantizer.
  LlamaLayer make_layer(const std::string& type, const float* k, const float* v, int64_t hkv,
                        int64_t n, int64_t d);
  void free_layer(LlamaLayer& layer);
  // One attention call of q (float32 [H_q, L, D]) over the layer; `causal` masks
  // bottom-right aligned. Returns the seconds of the graph computation alone; writes
  // the output as [H_q, L, D] to `out` when it is not null.
  double run(const LlamaLayer& layer, const float* q, int64_t hq, int64_t L, float scale,
             bool causal, int threads, float* out);

  struct Api;

 private:
  LlamaCppFlashAttn() = default;
  std::unique_ptr<Api> api_;
  std::string description_;
};

} // namespace tqbench
