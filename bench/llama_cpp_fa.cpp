#include "llama_cpp_fa.h"

#include <dlfcn.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

namespace tqbench {

namespace {

// The few declarations of ggml.h / ggml-cpu.h this needs; their C ABI has been stable
// across llama.cpp releases of 2025.
struct ggml_context;
struct ggml_tensor;
struct ggml_cgraph;
struct ggml_init_params {
  size_t mem_size;
  void* mem_buffer;
  bool no_alloc;
};
enum ggml_type_id : int { GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q8_0 = 8 };
constexpr int64_t kKqMaskPad = 64;  // GGML_KQ_MASK_PAD (older releases: 32; 64 covers both)

int type_id(const std::string& t) {
  if (t == "q4_0") return GGML_Q4_0;
  if (t == "q8_0") return GGML_Q8_0;
  if (t == "f16") return GGML_F16;
  throw std::invalid_argument("llama.cpp cache type must be q4_0, q8_0 or f16, got " + t);
}

} // namespace

struct LlamaCppFlashAttn::Api {
  std::vector<void*> handles;
  ggml_context* (*init)(ggml_init_params);
  void (*free)(ggml_context*);
  ggml_tensor* (*new_tensor_4d)(ggml_context*, int, int64_t, int64_t, int64_t, int64_t);
  void* (*get_data)(const ggml_tensor*);
  size_t (*row_size)(int, int64_t);
  ggml_tensor* (*flash_attn_ext)(ggml_context*, ggml_tensor*, ggml_tensor*, ggml_tensor*,
                                 ggml_tensor*, float, float, float);
  ggml_cgraph* (*new_graph)(ggml_context*);
  void (*build_forward_expand)(ggml_cgraph*, ggml_tensor*);
  int (*graph_compute_with_ctx)(ggml_context*, ggml_cgraph*, int);
  size_t (*quantize_chunk)(int, const float*, void*, int64_t, int64_t, int64_t, const float*);
  void (*fp32_to_fp16_row)(const float*, uint16_t*, int64_t);
  size_t (*tensor_overhead)();
  size_t (*graph_overhead)();
  void (*cpu_init)();  // absent in older releases

  void* sym(const char* name) const {
    for (void* h : handles) {
      if (void* p = dlsym(h, name)) return p;
    }
    return nullptr;
  }
};

std::unique_ptr<LlamaCppFlashAttn> LlamaCppFlashAttn::load(const std::string& dir,
                                                           std::string* error) {
#ifdef __APPLE__
  const char* ext = ".dylib";
#else
  const char* ext = ".so";
#endif
  auto api = std::make_unique<Api>();
  std::string loaded;
  for (const char* lib : {"libggml-base", "libggml-cpu", "libggml"}) {
    const std::string path = dir + "/" + lib + ext;
    if (void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
      api->handles.push_back(h);
      loaded += (loaded.empty() ? "" : ", ") + std::string(lib) + ext;
    }
  }
  if (api->handles.empty()) {
    *error = "no libggml-base" + std::string(ext) + " / libggml" + ext + " in " + dir;
    return nullptr;
  }
  std::string missing;
  auto bind = [&](auto& fn, const char* name, bool required = true) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(api->sym(name));
    if (!fn && required) missing += std::string(missing.empty() ? "" : ", ") + name;
  };
  bind(api->init, "ggml_init");
  bind(api->free, "ggml_free");
  bind(api->new_tensor_4d, "ggml_new_tensor_4d");
  bind(api->get_data, "ggml_get_data");
  bind(api->row_size, "ggml_row_size");
  bind(api->flash_attn_ext, "ggml_flash_attn_ext");
  bind(api->new_graph, "ggml_new_graph");
  bind(api->build_forward_expand, "ggml_build_forward_expand");
  bind(api->graph_compute_with_ctx, "ggml_graph_compute_with_ctx");
  bind(api->quantize_chunk, "ggml_quantize_chunk");
  bind(api->fp32_to_fp16_row, "ggml_fp32_to_fp16_row");
  bind(api->tensor_overhead, "ggml_tensor_overhead");
  bind(api->graph_overhead, "ggml_graph_overhead");
  bind(api->cpu_init, "ggml_cpu_init", false);
  if (!missing.empty()) {
    *error = "the ggml libraries in " + dir + " lack " + missing;
    return nullptr;
  }
  if (api->cpu_init) api->cpu_init();
  std::unique_ptr<LlamaCppFlashAttn> fa(new LlamaCppFlashAttn());
  const char* (*version)() = reinterpret_cast<const char* (*)()>(api->sym("ggml_version"));
  const char* (*commit)() = reinterpret_cast<const char* (*)()>(api->sym("ggml_commit"));
  fa->description_ = std::string("ggml ") + (version ? version() : "?") + " (" +
                     (commit ? commit() : "?") + ") from " + dir + ": " + loaded;
  fa->api_ = std::move(api);
  return fa;
}

LlamaCppFlashAttn::~LlamaCppFlashAttn() {
  // The libraries stay loaded: ggml registers atexit work of its own.
}

int64_t LlamaCppFlashAttn::layer_bytes(const std::string& type, int64_t hkv, int64_t n,
                                       int64_t d) const {
  return 2 * hkv * n * static_cast<int64_t>(api_->row_size(type_id(type), d));
}

LlamaLayer LlamaCppFlashAttn::make_layer(const std::string& type, const float* k, const float* v,
                                         int64_t hkv, int64_t n, int64_t d) {
  const int t = type_id(type);
  const size_t bytes = layer_bytes(type, hkv, n, d) + 4 * api_->tensor_overhead() + 4096;
  LlamaLayer layer{api_->init({bytes, nullptr, false}), nullptr, nullptr, hkv, n, d};
  if (!layer.ctx) throw std::runtime_error("ggml_init failed for a llama.cpp layer");
  auto* ctx = static_cast<ggml_context*>(layer.ctx);
  for (auto [src, dst] : {std::pair{k, &layer.k}, std::pair{v, &layer.v}}) {
    ggml_tensor* x = api_->new_tensor_4d(ctx, t, d, n, hkv, 1);
    void* data = api_->get_data(x);
    if (t == GGML_F16) {
      api_->fp32_to_fp16_row(src, static_cast<uint16_t*>(data), hkv * n * d);
    } else {
      api_->quantize_chunk(t, src, data, 0, hkv * n, d, nullptr);
    }
    *dst = x;
  }
  return layer;
}

void LlamaCppFlashAttn::free_layer(LlamaLayer& layer) {
  if (layer.ctx) api_->free(static_cast<ggml_context*>(layer.ctx));
  layer = {};
}

double LlamaCppFlashAttn::run(const LlamaLayer& layer, const float* q, int64_t hq, int64_t L,
                              float scale, bool causal, int threads, float* out) {
  const int64_t d = layer.d, n = layer.n;
  const int64_t l_pad = (L + kKqMaskPad - 1) / kKqMaskPad * kKqMaskPad;
  const size_t q_bytes = hq * L * d * 4, out_bytes = q_bytes;
  const size_t mask_bytes = causal ? n * l_pad * 2 : 0;
  // The graph's work buffer is allocated in this context too (a few MB per thread).
  const int nt = threads > 0 ? threads : std::max(1u, std::thread::hardware_concurrency());
  const size_t mem = q_bytes + out_bytes + mask_bytes + 16 * api_->tensor_overhead() +
                     api_->graph_overhead() + size_t(nt) * (64 << 20) / 8 + (16 << 20);
  auto* ctx = api_->init({mem, nullptr, false});
  if (!ctx) throw std::runtime_error("ggml_init failed");
  ggml_tensor* qt = api_->new_tensor_4d(ctx, GGML_F32, d, L, hq, 1);
  std::memcpy(api_->get_data(qt), q, q_bytes);
  ggml_tensor* mask = nullptr;
  if (causal) {
    mask = api_->new_tensor_4d(ctx, GGML_F16, n, l_pad, 1, 1);
    std::vector<float> row(n);
    auto* m = static_cast<uint16_t*>(api_->get_data(mask));
    for (int64_t r = 0; r < l_pad; ++r) {
      for (int64_t c = 0; c < n; ++c) {
        row[c] = (r < L && c <= n - L + r) ? 0.0f : -std::numeric_limits<float>::infinity();
      }
      api_->fp32_to_fp16_row(row.data(), m + r * n, n);
    }
  }
  ggml_tensor* res = api_->flash_attn_ext(ctx, qt, static_cast<ggml_tensor*>(layer.k),
                                          static_cast<ggml_tensor*>(layer.v), mask, scale, 0.0f,
                                          0.0f);
  ggml_cgraph* graph = api_->new_graph(ctx);
  api_->build_forward_expand(graph, res);
  const auto t0 = std::chrono::steady_clock::now();
  const int status = api_->graph_compute_with_ctx(ctx, graph, nt);
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (status != 0) {
    api_->free(ctx);
    throw std::runtime_error("ggml_graph_compute_with_ctx failed with status " +
                             std::to_string(status));
  }
  if (out) {
    // The result is [D, H_q, L] (permuted): out[h][l][:] = res[l][h][:].
    const auto* r = static_cast<const float*>(api_->get_data(res));
    for (int64_t h = 0; h < hq; ++h) {
      for (int64_t l = 0; l < L; ++l) {
        std::memcpy(out + (h * L + l) * d, r + (l * hq + h) * d, d * 4);
      }
    }
  }
  api_->free(ctx);
  return dt;
}

} // namespace tqbench
