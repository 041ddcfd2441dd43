// tqmetal_bench: the fused int4 attention op against the ways stock MLX attends over a
// KV cache, in one process, on MLX's default device. No Python at run time.
//
//   tqmetal_bench --quick                         # smoke run, seconds
//   tqmetal_bench --model Llama-3.1-70B --contexts 4K,32K,128K --json out.json
//   tqmetal_bench --hq 32 --hkv 8 --d 128 --groups 32,64,128 --warm
//
// The methodology is bench/bench_sdpa.py's (see bench/README.md): decode is timed
// cache-cold, each call reading the next of several per-layer caches that together
// exceed the last-level cache; median and spread over repeated calls; effective GB/s
// against the read bandwidth measured in the same run; extra peak memory per call; a
// correctness check of the op against dequantize-then-attend before it is timed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_util.h"
#include "llama_cpp_fa.h"
#include "metal/gpu_path.h"
#include "mlx/mlx.h"
#include "tqmetal.h"

namespace mx = mlx::core;
using namespace tqbench;

namespace {

// ---------------------------------------------------------------------------
// Head layouts of real models (their config.json values; the same presets as
// python/tqmetal/plan.py).
struct Layout {
  std::string name;
  int hq, hkv, d, num_layers;
};

const std::vector<Layout> kPresets = {
    {"Llama-3.1-8B", 32, 8, 128, 32}, {"Llama-3.1-70B", 64, 8, 128, 80},
    {"Qwen2.5-7B", 28, 4, 128, 28},   {"Qwen2.5-32B", 40, 8, 128, 64},
    {"Gemma-2-9B", 16, 8, 256, 42},   {"SmolLM2-135M", 9, 3, 64, 30},
};

// ---------------------------------------------------------------------------
// Methods. `kind` is the cache a method reads; methods of one kind share one set of
// per-layer caches (and its cold cursor), built once per shape.
enum class Kind { Q4, K8V4, K5V3, F16, F32, Llama };

struct Method {
  std::string key, label;
  Kind kind;
  bool baseline;
  int group = 0, k_bits = 0, v_bits = 0;
  std::string llama_type;  // "q4_0" | "q8_0" | "f16" for llama.cpp methods
};

struct Options {
  std::vector<Layout> layouts;
  std::vector<int64_t> contexts;
  std::vector<int> decode_ls;
  std::vector<int> prefill_ls;
  std::vector<int64_t> prefill_contexts;
  std::vector<int> groups;
  std::set<std::string> only;  // --methods filter (keys or key prefixes)
  bool k8v4 = true;
  bool k5v3 = true;
  bool warm = false;
  bool quick = false;
  std::string json_path;
  std::string llama_dir;
  int llama_threads = 0;
  double cold_bytes = 0;
  double max_call_s = 60;
  double budget_s = 5;
  int max_reps = 50;
  double bw_bytes = 2.15e9;
  std::optional<mx::Device> device;
};

[[noreturn]] void usage_error(const std::string& msg) {
  std::cerr << "tqmetal_bench: " << msg << " (see --help)\n";
  std::exit(2);
}

const char* kHelp = R"(usage: tqmetal_bench [options]

Times tqmetal::sdpa_int4 (attention on an int4/int8 affine-quantized KV cache) against
mx::fast::scaled_dot_product_attention on float16 and float32 K/V, dequantize-then-attend,
and the quantized_matmul path mlx-lm uses, on MLX's default device.

shapes
  --model NAME[,NAME]   head layout presets (default Llama-3.1-8B; 'all' for every one):
                        Llama-3.1-8B, Llama-3.1-70B, Qwen2.5-7B, Qwen2.5-32B, Gemma-2-9B,
                        SmolLM2-135M
  --hq N --hkv N --d N  a head layout given directly (replaces --model)
  --contexts LIST       decode cache lengths (default 1K,4K,16K,64K,128K; quick 1K,4K);
                        lengths that do not fit in available memory are skipped
  --decode-l LIST       query rows per decode call (default 1,4: plain and speculative)
  --prefill-l LIST      prefill rows (default 512,2048; quick 64; 'none' for no prefill)
  --prefill-contexts L  prefill cache lengths incl. the new rows (default 16K; quick 1K)
  --groups LIST         int4 group sizes (default 64; 32, 64, 128)
  --no-k8v4             leave out the K int8 / V int4 method
  --no-k5v3             leave out the K 5-bit / V 3-bit method (int4's bytes)
  --methods LIST        only these methods (keys or prefixes: tq_int4, tq_k8v4, tq_k5v3,
                        sdpa_fp16, sdpa_fp32, deq_fp16, mlxlm_q4, llama)
timing
  --warm                time decode on one layer repeatedly (cache-resident where it fits);
                        the default is cache-cold: each call reads the next layer's cache
  --cold-bytes SIZE     bytes of per-layer caches cycled through (default max(2.2 x LLC, 1G))
  --max-call-s S        skip a method where one call would take longer (default 60; quick 2)
  --budget-s S          time spent on repeats per cell (default 5; quick 0.5)
  --quick               small grid, short budgets: a smoke test
  --device cpu|gpu      MLX device (default: MLX's default device)
output
  --json PATH           also write every sample, the machine and the checks as JSON
comparison
  --llama-cpp DIR       also time llama.cpp's CPU flash attention (ggml_flash_attn_ext) on
                        q4_0, q8_0 and f16 caches; DIR holds libggml*.so (env
                        TQMETAL_LLAMA_CPP works too). See bench/README.md to build it.
  --llama-threads N     threads for llama.cpp (default: every core)
)";

template <typename T>
std::vector<T> parse_list(const std::string& flag, const std::string& text) {
  std::vector<T> out;
  for (const auto& part : split(text, ',')) {
    try {
      out.push_back(static_cast<T>(parse_count(part)));
    } catch (const std::exception&) {
      usage_error(flag + ": '" + part + "' is not a count");
    }
  }
  return out;
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::string models = "Llama-3.1-8B";
  int hq = 0, hkv = 0, d = 0;
  std::string contexts, decode_l = "1,4", prefill_l, prefill_ctx, groups = "64";
  double max_call = -1, budget = -1;
  std::string device;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      return argv[++i];
    };
    auto next_double = [&]() {
      const std::string v = next();
      try {
        return std::stod(v);
      } catch (const std::exception&) {
        usage_error(a + ": '" + v + "' is not a number");
      }
    };
    if (a == "-h" || a == "--help") {
      std::cout << kHelp;
      std::exit(0);
    } else if (a == "--model") {
      models = next();
    } else if (a == "--hq") {
      hq = static_cast<int>(parse_count(next()));
    } else if (a == "--hkv") {
      hkv = static_cast<int>(parse_count(next()));
    } else if (a == "--d") {
      d = static_cast<int>(parse_count(next()));
    } else if (a == "--contexts") {
      contexts = next();
    } else if (a == "--decode-l") {
      decode_l = next();
    } else if (a == "--prefill-l") {
      prefill_l = next();
    } else if (a == "--prefill-contexts") {
      prefill_ctx = next();
    } else if (a == "--groups") {
      groups = next();
    } else if (a == "--no-k8v4") {
      o.k8v4 = false;
    } else if (a == "--no-k5v3") {
      o.k5v3 = false;
    } else if (a == "--methods") {
      for (const auto& m : split(next(), ',')) o.only.insert(m);
    } else if (a == "--warm") {
      o.warm = true;
    } else if (a == "--cold-bytes") {
      o.cold_bytes = static_cast<double>(parse_count(next()));
    } else if (a == "--max-call-s") {
      max_call = next_double();
    } else if (a == "--budget-s") {
      budget = next_double();
    } else if (a == "--quick") {
      o.quick = true;
    } else if (a == "--device") {
      device = next();
    } else if (a == "--json") {
      o.json_path = next();
    } else if (a == "--llama-cpp") {
      o.llama_dir = next();
    } else if (a == "--llama-threads") {
      o.llama_threads = static_cast<int>(parse_count(next()));
    } else {
      usage_error("unknown argument '" + a + "'");
    }
  }
  if (hq || hkv || d) {
    if (hq <= 0 || hkv <= 0 || d <= 0) usage_error("--hq, --hkv and --d go together");
    if (hq % hkv) usage_error("--hq must be a multiple of --hkv");
    o.layouts.push_back({"H_q" + std::to_string(hq) + "/H_kv" + std::to_string(hkv) + "/D" +
                             std::to_string(d),
                         hq, hkv, d, 0});
  } else if (models == "all") {
    o.layouts = kPresets;
  } else {
    for (const auto& name : split(models, ',')) {
      auto it = std::find_if(kPresets.begin(), kPresets.end(), [&](const Layout& l) {
        return l.name == name;
      });
      if (it == kPresets.end()) usage_error("--model: unknown preset '" + name + "'");
      o.layouts.push_back(*it);
    }
  }
  o.contexts = parse_list<int64_t>("--contexts",
                                   contexts.empty() ? (o.quick ? "1K,4K" : "1K,4K,16K,64K,128K")
                                                    : contexts);
  o.decode_ls = parse_list<int>("--decode-l", decode_l == "none" ? "" : decode_l);
  if (prefill_l.empty()) prefill_l = o.quick ? "64" : "512,2048";
  o.prefill_ls = parse_list<int>("--prefill-l", prefill_l == "none" ? "" : prefill_l);
  o.prefill_contexts = parse_list<int64_t>(
      "--prefill-contexts", prefill_ctx.empty() ? (o.quick ? "1K" : "16K") : prefill_ctx);
  o.groups = parse_list<int>("--groups", groups);
  for (int g : o.groups) {
    if (g != 32 && g != 64 && g != 128) usage_error("--groups: group sizes are 32, 64, 128");
  }
  for (const auto& l : o.layouts) {
    for (int g : o.groups) {
      if (l.d % g) usage_error("--groups: " + std::to_string(g) + " does not divide D=" +
                               std::to_string(l.d) + " of " + l.name);
    }
  }
  o.max_call_s = max_call > 0 ? max_call : (o.quick ? 2.0 : 60.0);
  o.budget_s = budget > 0 ? budget : (o.quick ? 0.5 : 5.0);
  o.max_reps = o.quick ? 10 : 50;
  o.bw_bytes = o.quick ? 0.55e9 : 2.15e9;
  if (o.llama_dir.empty()) {
    if (const char* env = std::getenv("TQMETAL_LLAMA_CPP")) o.llama_dir = env;
  }
  if (device == "cpu") {
    o.device = mx::Device::cpu;
  } else if (device == "gpu") {
    o.device = mx::Device::gpu;
  } else if (!device.empty()) {
    usage_error("--device: cpu or gpu");
  }
  return o;
}

// ---------------------------------------------------------------------------
// One shape of the grid.
struct Shape {
  Layout layout;
  std::string phase;  // "decode" | "prefill"
  int L;
  int64_t N;
  bool causal() const { return L > 1; }  // several new rows attend causally
};

// One set of per-layer caches of one kind: cold calls walk through the layers.
struct LayerSet {
  std::vector<std::vector<mx::array>> k, v;  // per layer: {packed, scales, biases} or {kv}
  std::vector<mx::array> qs;                 // a few distinct queries
  std::vector<LlamaLayer> llama;             // llama.cpp's own copies (Kind::Llama)
  std::vector<float> llama_q;
  int64_t layer_bytes = 0;
  int cursor = 0;
  std::string note;
};

struct Record {
  Shape shape;
  std::string method, mode, skipped, note;
  std::vector<double> times;
  Stats st;
  int64_t layer_bytes = 0, extra_bytes = -1, output_bytes = 0;
  int n_layers = 0;
  double eff_gbps = 0;
};

struct Check {
  Shape shape;
  std::string method, against;
  double max_abs_err, ref_max_abs;
  bool ok;
  bool gates = true;  // a failed check of our op fails the run; a comparison's is reported
};

class Bench {
 public:
  explicit Bench(Options opts) : o_(std::move(opts)) {}
  int run(int argc, char** argv);

 private:
  std::vector<Method> methods_for(const Layout& l) const;
  bool selected(const std::string& key) const;
  LayerSet build_set(const Shape& s, const Method& m, int64_t budget_bytes, std::string* why);
  std::function<mx::array(const mx::array&, const std::vector<mx::array>&,
                          const std::vector<mx::array>&)>
  attention_fn(const Method& m, const Shape& s) const;
  void time_method(const Shape& s, const Method& m, LayerSet& set, Record& r);
  void time_llama(const Shape& s, const Method& m, LayerSet& set, Record& r);
  void check(const Shape& s, const Method& m, LayerSet& set);
  void check_llama(const Shape& s, const Method& m, LayerSet& set);
  void run_shape(const Shape& s);
  double estimate(const std::string& key, const Shape& s) const;
  int64_t call_temp_bytes(const Method& m, const Shape& s) const;
  void print_report() const;
  void write_json(int argc, char** argv) const;

  Options o_;
  Machine machine_;
  Bandwidth bw_, bw_end_;
  double cold_bytes_ = 0;
  std::string device_name_;
  std::unique_ptr<LlamaCppFlashAttn> llama_;
  std::string llama_error_;
  std::vector<Record> records_;
  std::vector<Check> checks_;
  std::set<std::string> checked_;  // method/phase pairs already checked
  std::map<std::string, double> per_unit_;  // method key + phase -> seconds per unit of work
  std::map<std::string, mx::array> base_;   // "N" -> float16 K or V of one layer
  double elapsed_s_ = 0;
  std::string date_;
  int shape_index_ = 0, shape_count_ = 0;
  std::vector<Shape> grid() const;
};

void log(const std::string& s) {
  std::cerr << s << std::endl;
}

bool Bench::selected(const std::string& key) const {
  if (o_.only.empty()) return true;
  for (const auto& f : o_.only) {
    if (key.rfind(f, 0) == 0) return true;
  }
  return false;
}

std::vector<Method> Bench::methods_for(const Layout& l) const {
  std::vector<Method> ms;
  auto add = [&](Method m) {
    if (selected(m.key)) ms.push_back(std::move(m));
  };
  (void)l;
  for (int g : o_.groups) {
    const std::string gs = "g" + std::to_string(g);
    add({"tq_int4_" + gs, "tqmetal int4 " + gs, Kind::Q4, false, g, 4, 4});
  }
  if (o_.k8v4) {
    const int g = o_.groups[0];
    const std::string gs = "g" + std::to_string(g);
    add({"tq_k8v4_" + gs, "tqmetal K8V4 " + gs, Kind::K8V4, false, g, 8, 4});
  }
  if (o_.k5v3) {  // the default cache format for models without k_norm: int4's bytes
    const int g = std::max(o_.groups[0], 32);
    const std::string gs = "g" + std::to_string(g);
    add({"tq_k5v3_" + gs, "tqmetal K5V3 " + gs, Kind::K5V3, false, g, 5, 3});
  }
  add({"sdpa_fp16", "mx.fast SDPA fp16", Kind::F16, true});
  add({"sdpa_fp32", "mx.fast SDPA fp32", Kind::F32, true});
  for (int g : o_.groups) {
    const std::string gs = "g" + std::to_string(g);
    add({"deq_fp16_" + gs, "dequant+SDPA fp16 " + gs, Kind::Q4, true, g, 4, 4});
    add({"mlxlm_q4_" + gs, "mlx-lm quant SDPA " + gs, Kind::Q4, true, g, 4, 4});
  }
  if (llama_) {
    for (const char* t : {"q4_0", "q8_0", "f16"}) {
      Method m{std::string("llama_") + t, std::string("llama.cpp FA ") + t, Kind::Llama, true};
      m.llama_type = t;
      m.group = 32;
      add(m);
    }
  }
  return ms;
}

// mlx_lm.models.base.quantized_scaled_dot_product_attention, op for op.
mx::array mlxlm_quantized_sdpa(mx::array q, const std::vector<mx::array>& k,
                               const std::vector<mx::array>& v, float scale, bool causal,
                               int group, int bits) {
  const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2), D = q.shape(3);
  const int Hkv = k[0].shape(-3);
  const int rep = Hq / Hkv;
  q = mx::multiply(q, mx::array(scale, q.dtype()));
  std::vector<mx::array> kk = k, vv = v;
  if (rep > 1) {
    q = mx::reshape(q, {B, Hkv, rep, L, D});
    for (auto& a : kk) a = mx::expand_dims(a, -3);
    for (auto& a : vv) a = mx::expand_dims(a, -3);
  }
  auto scores = mx::quantized_matmul(q, kk[0], kk[1], kk[2], true, group, bits);
  if (causal) {
    const int N = scores.shape(-1);
    auto qi = mx::arange(N - L, N, mx::int32);
    auto ki = mx::arange(0, N, mx::int32);
    auto mask = mx::greater_equal(mx::expand_dims(qi, 1), mx::expand_dims(ki, 0));
    const float lowest = scores.dtype() == mx::float16 ? -65504.0f
                                                       : std::numeric_limits<float>::lowest();
    scores = mx::where(mask, scores, mx::array(lowest, scores.dtype()));
  }
  scores = mx::softmax(scores, -1, /*precise=*/true);
  auto out = mx::quantized_matmul(scores, vv[0], vv[1], vv[2], false, group, bits);
  if (rep > 1) out = mx::reshape(out, {B, Hq, L, D});
  return out;
}

std::function<mx::array(const mx::array&, const std::vector<mx::array>&,
                        const std::vector<mx::array>&)>
Bench::attention_fn(const Method& m, const Shape& s) const {
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.layout.d));
  const std::string mask = s.causal() ? "causal" : "";
  const bool causal = s.causal();
  const int g = m.group, kb = m.k_bits, vb = m.v_bits;
  const std::string key = m.key;
  if (key.rfind("tq_", 0) == 0) {
    return [=](const mx::array& q, const std::vector<mx::array>& k,
               const std::vector<mx::array>& v) {
      return tqmetal::sdpa_int4(q, {k[0], k[1], k[2]}, {v[0], v[1], v[2]}, scale, mask,
                                std::nullopt, g, kb, vb);
    };
  }
  if (key == "sdpa_fp16" || key == "sdpa_fp32") {
    return [=](const mx::array& q, const std::vector<mx::array>& k,
               const std::vector<mx::array>& v) {
      return mx::fast::scaled_dot_product_attention(q, k[0], v[0], scale, mask);
    };
  }
  if (key.rfind("deq_fp16", 0) == 0) {
    return [=](const mx::array& q, const std::vector<mx::array>& k,
               const std::vector<mx::array>& v) {
      auto kd = mx::dequantize(k[0], k[1], k[2], g, 4);
      auto vd = mx::dequantize(v[0], v[1], v[2], g, 4);
      return mx::fast::scaled_dot_product_attention(q, kd, vd, scale, mask);
    };
  }
  if (key.rfind("mlxlm_q4", 0) == 0) {
    return [=](const mx::array& q, const std::vector<mx::array>& k,
               const std::vector<mx::array>& v) {
      return mlxlm_quantized_sdpa(q, k, v, scale, causal, g, 4);
    };
  }
  throw std::logic_error("no MLX function for " + key);
}

// Temporaries one call allocates beyond its cache (for the memory check): the
// dequantized copies, and the score matrix of the unfused paths.
int64_t Bench::call_temp_bytes(const Method& m, const Shape& s) const {
  const int64_t kv_elems = int64_t(2) * s.layout.hkv * s.N * s.layout.d;
  const int64_t scores = int64_t(s.layout.hq) * s.L * s.N * 4;
  if (m.kind == Kind::Llama) return scores;  // an upper bound for its work buffers
  if (m.key.rfind("deq_", 0) == 0) return kv_elems * 2 + 2 * scores;
  if (m.key.rfind("mlxlm_", 0) == 0) return 3 * scores;
  if (m.key.rfind("sdpa_", 0) == 0) return 2 * scores;
  return 0;
}

// A distinct buffer with slightly different contents: xor the low bits (for floats only
// the lowest mantissa bits, so no inf/nan appears). Cheaper than new random data.
mx::array variant_of(const mx::array& a, int i) {
  if (a.dtype() == mx::uint32) {
    return mx::bitwise_xor(a, mx::array(static_cast<uint32_t>(i * 0x9E3779B9u), mx::uint32));
  }
  const mx::Dtype ut = a.dtype().size() == 2 ? mx::uint16 : mx::uint32;
  return mx::view(mx::bitwise_xor(mx::view(a, ut), mx::array(i % 8, ut)), a.dtype());
}

LayerSet Bench::build_set(const Shape& s, const Method& m, int64_t budget_bytes,
                          std::string* why) {
  const auto& l = s.layout;
  const std::string base_key = l.name + "/" + std::to_string(s.N);
  if (!base_.count(base_key + "/k")) {
    base_.clear();
    mx::clear_cache();
    auto k = mx::astype(mx::random::normal({1, l.hkv, static_cast<int>(s.N), l.d}), mx::float16);
    auto v = mx::astype(mx::random::normal({1, l.hkv, static_cast<int>(s.N), l.d}), mx::float16);
    mx::eval(k, v);
    base_.insert({base_key + "/k", k});
    base_.insert({base_key + "/v", v});
  }
  const mx::array k16 = base_.at(base_key + "/k"), v16 = base_.at(base_key + "/v");
  LayerSet set;
  const mx::Dtype qdtype = m.kind == Kind::F32 || m.kind == Kind::Llama ? mx::float32
                                                                          : mx::float16;
  std::vector<mx::array> k0, v0;
  int64_t layer_bytes = 0;
  if (m.kind == Kind::Llama) {
    // llama.cpp gets the same float16 data, converted by its own quantizer.
    layer_bytes = llama_->layer_bytes(m.llama_type, l.hkv, s.N, l.d);
  } else {
    if (m.kind == Kind::F16 || m.kind == Kind::F32) {
      k0 = {mx::astype(k16, qdtype)};
      v0 = {mx::astype(v16, qdtype)};
    } else {
      k0 = mx::quantize(k16, m.group, m.k_bits);
      v0 = mx::quantize(v16, m.group, m.v_bits);
    }
    mx::eval(k0);
    mx::eval(v0);
    for (const auto& a : k0) layer_bytes += a.nbytes();
    for (const auto& a : v0) layer_bytes += a.nbytes();
  }
  set.layer_bytes = layer_bytes;
  int n_layers = o_.warm && s.phase == "decode"
                     ? 1
                     : std::max<int>(2, static_cast<int>(std::ceil(cold_bytes_ / layer_bytes)));
  const int64_t fits = budget_bytes / std::max<int64_t>(layer_bytes, 1);
  if (fits < 1) {
    *why = "one layer's cache (" + fmt_bytes(layer_bytes) + ") plus temporaries does not fit in "
           "available memory (" + fmt_bytes(budget_bytes + layer_bytes) + " free)";
    return set;
  }
  if (fits < n_layers) {
    set.note = "cold set cut to " + std::to_string(fits) + " layers (" +
               fmt_bytes(fits * layer_bytes) + ") by available memory";
    n_layers = static_cast<int>(fits);
  }
  if (m.kind == Kind::Llama) {
    std::vector<float> kf(k16.size()), vf(v16.size());
    auto k32 = mx::astype(k16, mx::float32), v32 = mx::astype(v16, mx::float32);
    mx::eval(k32, v32);
    std::copy(k32.data<float>(), k32.data<float>() + k32.size(), kf.begin());
    std::copy(v32.data<float>(), v32.data<float>() + v32.size(), vf.begin());
    for (int i = 0; i < n_layers; ++i) {
      // Distinct layers: perturb one element per layer so each is a separate buffer
      // with its own contents (it is re-quantized either way).
      kf[i % kf.size()] += 1e-3f;
      set.llama.push_back(llama_->make_layer(m.llama_type, kf.data(), vf.data(), l.hkv, s.N, l.d));
    }
    auto q = mx::random::normal({1, l.hq, s.L, l.d});
    mx::eval(q);
    set.llama_q.assign(q.data<float>(), q.data<float>() + q.size());
  } else {
    set.k.push_back(k0);
    set.v.push_back(v0);
    for (int i = 1; i < n_layers; ++i) {
      std::vector<mx::array> ki, vi;
      for (const auto& a : k0) ki.push_back(variant_of(a, i));
      for (const auto& a : v0) vi.push_back(variant_of(a, i));
      mx::eval(ki);
      mx::eval(vi);
      set.k.push_back(ki);
      set.v.push_back(vi);
    }
    for (int i = 0; i < std::min(n_layers, 16); ++i) {
      set.qs.push_back(mx::astype(mx::random::normal({1, l.hq, s.L, l.d}), qdtype));
    }
    mx::eval(set.qs);
  }
  return set;
}

double Bench::estimate(const std::string& key, const Shape& s) const {
  const double units = double(s.L) * s.N * s.layout.hq * s.layout.d;
  auto it = per_unit_.find(key + "/" + s.phase);
  if (it == per_unit_.end() && s.phase == "prefill") it = per_unit_.find(key + "/decode");
  return it == per_unit_.end() ? -1 : it->second * units;
}

void Bench::time_method(const Shape& s, const Method& m, LayerSet& set, Record& r) {
  auto fn = attention_fn(m, s);
  const int nl = static_cast<int>(set.k.size()), nq = static_cast<int>(set.qs.size());
  const bool cold = !(o_.warm && s.phase == "decode");
  auto call = [&](bool measure_peak) {
    const int i = cold ? set.cursor++ % nl : 0;
    const auto& q = set.qs[i % nq];
    size_t before = 0;
    if (measure_peak) {
      mx::reset_peak_memory();
      before = mx::get_active_memory();
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto out = fn(q, set.k[i], set.v[i]);
    mx::eval(out);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (measure_peak) {
      r.extra_bytes = static_cast<int64_t>(mx::get_peak_memory()) - static_cast<int64_t>(before);
      r.output_bytes = out.nbytes();
    }
    return dt;
  };
  const double single_shot = o_.quick ? 1.0 : 15.0;
  const double first = call(true);
  if (first >= single_shot) {
    r.times = {first};
    r.note = "single call (the first call is the sample)";
  } else {
    if (first < 0.2) {
      call(false);
      call(false);
    }
    const int min_reps = o_.quick ? (first < 0.1 ? 3 : 1) : (first < 0.5 ? 5 : first < 3 ? 3 : 2);
    const int reps = std::max(min_reps, std::min(o_.max_reps, int(o_.budget_s / first)));
    for (int i = 0; i < reps; ++i) r.times.push_back(call(false));
  }
}

void Bench::time_llama(const Shape& s, const Method& m, LayerSet& set, Record& r) {
  (void)m;
  const int nl = static_cast<int>(set.llama.size());
  const bool cold = !(o_.warm && s.phase == "decode");
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.layout.d));
  auto call = [&]() {
    const int i = cold ? set.cursor++ % nl : 0;
    return llama_->run(set.llama[i], set.llama_q.data(), s.layout.hq, s.L, scale, s.causal(),
                       o_.llama_threads, nullptr);
  };
  const double first = call();
  if (first >= (o_.quick ? 1.0 : 15.0)) {
    r.times = {first};
    r.note = "single call (the first call is the sample)";
    return;
  }
  if (first < 0.2) call();
  const int reps = std::max(o_.quick ? 2 : 5, std::min(o_.max_reps, int(o_.budget_s / first)));
  for (int i = 0; i < reps; ++i) r.times.push_back(call());
  r.note = "peak memory not tracked (llama.cpp allocates outside MLX)";
}

// The op against dequantize-then-attend (float32 SDPA on the dequantized cache) on the
// same layer and query, before anything is timed: a broken op cannot report fast numbers.
void Bench::check(const Shape& s, const Method& m, LayerSet& set) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.layout.d));
  const std::string mask = s.causal() ? "causal" : "";
  const auto& q = set.qs[0];
  auto out = attention_fn(m, s)(q, set.k[0], set.v[0]);
  const auto& k = set.k[0];
  const auto& v = set.v[0];
  auto kd = mx::astype(mx::dequantize(k[0], k[1], k[2], m.group, m.k_bits), mx::float32);
  auto vd = mx::astype(mx::dequantize(v[0], v[1], v[2], m.group, m.v_bits), mx::float32);
  auto ref = mx::fast::scaled_dot_product_attention(mx::astype(q, mx::float32), kd, vd, scale,
                                                    mask);
  auto err = mx::max(mx::abs(mx::subtract(mx::astype(out, mx::float32), ref)));
  auto ref_max = mx::max(mx::abs(ref));
  mx::eval(err, ref_max);
  const double e = err.item<float>(), rm = ref_max.item<float>();
  // float16 output: a few ulps of the largest value, plus accumulation-order noise.
  const bool ok = std::isfinite(e) && out.shape() == ref.shape() &&
                  e <= 2e-2 * std::max(rm, 1e-3) + 2e-3;
  checks_.push_back({s, m.key,
                     "dequantize(K" + std::to_string(m.k_bits) + ",V" + std::to_string(m.v_bits) +
                         ") + mx.fast SDPA fp32",
                     e, rm, ok});
  char buf[256];
  std::snprintf(buf, sizeof buf, "  check %s: max|err| %.3g (|ref| max %.3g) %s", m.key.c_str(), e,
                rm, ok ? "ok" : "MISMATCH");
  log(buf);
}

// llama.cpp's output against float32 SDPA on the float16 data it quantized: reported,
// so a misconfigured comparison shows, but it does not fail the run (q4_0 is lossy).
void Bench::check_llama(const Shape& s, const Method& m, LayerSet& set) {
  const auto& l = s.layout;
  const float scale = 1.0f / std::sqrt(static_cast<float>(l.d));
  std::vector<float> out(set.llama_q.size());
  llama_->run(set.llama[0], set.llama_q.data(), l.hq, s.L, scale, s.causal(), o_.llama_threads,
              out.data());
  const std::string base_key = l.name + "/" + std::to_string(s.N);
  auto q = mx::array(set.llama_q.data(), {1, l.hq, s.L, l.d}, mx::float32);
  auto ref = mx::fast::scaled_dot_product_attention(
      q, mx::astype(base_.at(base_key + "/k"), mx::float32),
      mx::astype(base_.at(base_key + "/v"), mx::float32), scale, s.causal() ? "causal" : "");
  auto got = mx::array(out.data(), {1, l.hq, s.L, l.d}, mx::float32);
  auto err = mx::max(mx::abs(mx::subtract(got, ref)));
  auto ref_max = mx::max(mx::abs(ref));
  mx::eval(err, ref_max);
  const double e = err.item<float>(), rm = ref_max.item<float>();
  // Its error against the unquantized data is its quantization error: about 10% of the
  // largest output for q4_0 (int4 with group 32), under 2% for q8_0 and f16.
  const double tol = m.llama_type == "q4_0" ? 0.25 : 0.05;
  const bool ok = std::isfinite(e) && e <= tol * std::max(rm, 1e-3) + 2e-3;
  checks_.push_back({s, m.key, "mx.fast SDPA fp32 on the float16 data", e, rm, ok, false});
  char buf[256];
  std::snprintf(buf, sizeof buf, "  check %s: max|err| %.3g (|ref| max %.3g) %s", m.key.c_str(), e,
                rm, ok ? "ok" : "MISMATCH (comparison only)");
  log(buf);
}

std::string shape_name(const Shape& s) {
  return s.layout.name + " " + s.phase + " L=" + std::to_string(s.L) + " N=" +
         std::to_string(s.N);
}

void Bench::run_shape(const Shape& s) {
  // "== [i/n]": tqmetal bench's progress bar follows these lines.
  log("== [" + std::to_string(++shape_index_) + "/" + std::to_string(shape_count_) + "] " +
      shape_name(s) + (s.causal() ? " causal" : ""));
  const auto methods = methods_for(s.layout);
  // Which baselines to time: those whose estimate is under the limit, plus the fastest
  // and any within 20% of it (up to 4x the limit), so a "vs best baseline" speedup is
  // always measured.
  double best_est = std::numeric_limits<double>::infinity();
  for (const auto& m : methods) {
    const double e = estimate(m.key, s);
    if (m.baseline && e >= 0) best_est = std::min(best_est, e);
  }
  for (Kind kind : {Kind::Q4, Kind::K8V4, Kind::K5V3, Kind::F16, Kind::F32, Kind::Llama}) {
    // Methods of one kind and group share a cache set.
    std::map<std::string, std::vector<const Method*>> by_group;
    for (const auto& m : methods) {
      if (m.kind == kind) by_group[std::to_string(m.group) + m.llama_type].push_back(&m);
    }
    for (auto& [g, group_methods] : by_group) {
      std::vector<const Method*> todo;
      for (const Method* m : group_methods) {
        Record r{s, m->key, o_.warm && s.phase == "decode" ? "warm" : "cold"};
        const double e = estimate(m->key, s);
        const bool near_best = m->baseline && e >= 0 && e <= 1.2 * best_est;
        if (e > o_.max_call_s && !(near_best && e <= 4 * o_.max_call_s)) {
          r.skipped = "estimated " + fmt_time(e) + " per call > --max-call-s " +
                      fmt_time(o_.max_call_s);
          log("  " + m->key + ": skipped, " + r.skipped);
          records_.push_back(r);
          continue;
        }
        todo.push_back(m);
      }
      if (todo.empty()) continue;
      int64_t temp = 0;
      for (const Method* m : todo) temp = std::max(temp, call_temp_bytes(*m, s));
      // Keep 10% of available memory and every call's temporaries free.
      const int64_t avail = available_memory_bytes();
      const int64_t budget = avail > 0 ? static_cast<int64_t>(avail * 0.9) - temp
                                       : std::numeric_limits<int64_t>::max() / 4;
      std::string why;
      const auto t0 = std::chrono::steady_clock::now();
      LayerSet set = build_set(s, *todo[0], budget, &why);
      if (!why.empty()) {
        log("  skipped " + todo[0]->label + " and its kind: " + why);
        for (const Method* m : todo) {
          Record r{s, m->key, "cold"};
          r.skipped = why;
          records_.push_back(r);
        }
        continue;
      }
      const int n_layers = kind == Kind::Llama ? static_cast<int>(set.llama.size())
                                               : static_cast<int>(set.k.size());
      log("  built " + std::to_string(n_layers) + " x " + fmt_bytes(set.layer_bytes) +
          " layer caches in " +
          fmt_time(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()) +
          (set.note.empty() ? "" : " (" + set.note + ")"));
      for (const Method* m : todo) {
        // Check each op once per phase, at the first shape it runs.
        if ((!m->baseline || kind == Kind::Llama) && !checked_.count(m->key + "/" + s.phase)) {
          if (kind == Kind::Llama) {
            check_llama(s, *m, set);
          } else {
            check(s, *m, set);
          }
          checked_.insert(m->key + "/" + s.phase);
        }
        Record r{s, m->key, o_.warm && s.phase == "decode" ? "warm" : "cold"};
        r.layer_bytes = set.layer_bytes;
        r.n_layers = n_layers;
        if (!set.note.empty()) r.note = set.note;
        try {
          if (kind == Kind::Llama) {
            time_llama(s, *m, set, r);
          } else {
            time_method(s, *m, set, r);
          }
        } catch (const std::exception& e) {
          r.skipped = std::string("failed: ") + e.what();
          log("  " + m->key + ": " + r.skipped);
          records_.push_back(r);
          continue;
        }
        r.st = summarize(r.times);
        r.eff_gbps = set.layer_bytes / r.st.median / 1e9;
        per_unit_[m->key + "/" + s.phase] =
            r.st.median / (double(s.L) * s.N * s.layout.hq * s.layout.d);
        log("  " + m->label + ": " + fmt_time(r.st.median) + " median of " +
            std::to_string(r.st.n) + " [" + fmt_time(r.st.min) + " .. " + fmt_time(r.st.max) +
            "]");
        records_.push_back(r);
      }
      for (auto& layer : set.llama) llama_->free_layer(layer);
    }
    mx::clear_cache();
  }
}

} // namespace

namespace {

struct Speedup {
  Shape shape;
  std::string method, best_baseline;
  std::vector<std::pair<std::string, double>> vs;  // baseline -> its median / ours
  double vs_best = 0;
};

bool same_shape(const Shape& a, const Shape& b) {
  return a.layout.name == b.layout.name && a.phase == b.phase && a.L == b.L && a.N == b.N;
}

bool is_tq(const std::string& key) {
  return key.rfind("tq_", 0) == 0;
}

std::vector<Speedup> speedups(const std::vector<Record>& records) {
  std::vector<Speedup> out;
  for (const auto& r : records) {
    if (!is_tq(r.method) || !r.skipped.empty()) continue;
    Speedup sp{r.shape, r.method};
    double best = std::numeric_limits<double>::infinity();
    for (const auto& b : records) {
      if (is_tq(b.method) || !b.skipped.empty() || !same_shape(b.shape, r.shape)) continue;
      sp.vs.push_back({b.method, b.st.median / r.st.median});
      if (b.st.median < best) {
        best = b.st.median;
        sp.best_baseline = b.method;
      }
    }
    if (!sp.best_baseline.empty()) sp.vs_best = best / r.st.median;
    out.push_back(sp);
  }
  return out;
}

} // namespace

// Defined out of the anonymous namespace's class body for readability.
void Bench::print_report() const {
  std::printf("tqmetal_bench: tqmetal::sdpa_int4 against MLX baselines on %s\n",
              device_name_.c_str());
  std::printf("date %s | elapsed %.0f s | %s%s\n", date_.c_str(), elapsed_s_,
              o_.quick ? "QUICK (smoke test, not for the record)" : "full",
              o_.warm ? " | decode WARM: one layer repeatedly (cache-resident where it fits)"
                      : "");
  std::printf("cpu %s | %d logical cpus | LLC %s | RAM %s | %s\n", machine_.cpu_model.c_str(),
              machine_.logical_cpus, fmt_bytes(double(machine_.llc_bytes)).c_str(),
              fmt_bytes(double(machine_.mem_total_bytes)).c_str(), machine_.os.c_str());
  std::printf("mlx %s | tqmetal CPU kernel %s | llama.cpp %s\n", mx::version(),
              tqmetal::cpu_isa(), llama_ ? llama_->description().c_str()
                                         : (llama_error_.empty() ? "not requested"
                                                                 : llama_error_.c_str()));
  std::printf("read bandwidth %.1f GB/s (sum of %s: 1 thread %.1f, %d threads %.1f; at the end "
              "%.1f); %%BW below uses it\n",
              bw_.gbps, fmt_bytes(double(bw_.array_bytes)).c_str(), bw_.gbps_1t, bw_.threads,
              bw_.gbps_nt, bw_end_.gbps);
  if (!o_.warm) {
    std::printf("decode is cache-cold: each call reads the next of >= %s of per-layer caches\n",
                fmt_bytes(cold_bytes_).c_str());
  }
  std::printf("times: median [min .. max] (n); eff GB/s = the method's per-layer K+V bytes / "
              "median; extra = peak memory during a call minus memory before it\n\n");
  const auto sps = speedups(records_);
  std::vector<Shape> shapes;
  for (const auto& r : records_) {
    if (std::none_of(shapes.begin(), shapes.end(),
                     [&](const Shape& s) { return same_shape(s, r.shape); })) {
      shapes.push_back(r.shape);
    }
  }
  for (const auto& s : shapes) {
    std::printf("== %s%s\n", shape_name(s).c_str(), s.causal() ? " causal" : "");
    std::printf("  %-24s %-4s %9s %21s %3s %11s %8s %5s %10s %7s\n", "method", "mode", "median",
                "[min .. max]", "n", "cache/layer", "eff GB/s", "%BW", "extra mem", "x cache");
    std::vector<const Record*> rows;
    for (const auto& r : records_) {
      if (same_shape(r.shape, s)) rows.push_back(&r);
    }
    // In the order methods_for lists them: ours first, then the baselines.
    const auto order = methods_for(s.layout);
    auto rank = [&](const Record* r) {
      return std::find_if(order.begin(), order.end(),
                          [&](const Method& m) { return m.key == r->method; }) -
             order.begin();
    };
    std::stable_sort(rows.begin(), rows.end(),
                     [&](const Record* a, const Record* b) { return rank(a) < rank(b); });
    for (const Record* rp : rows) {
      const Record& r = *rp;
      if (!r.skipped.empty()) {
        std::printf("  %-24s skipped: %s\n", r.method.c_str(), r.skipped.c_str());
        continue;
      }
      const std::string range = "[" + fmt_time(r.st.min) + " .. " + fmt_time(r.st.max) + "]";
      const std::string extra = r.extra_bytes >= 0 ? fmt_bytes(double(r.extra_bytes)) : "-";
      char xc[16] = "-";
      if (r.extra_bytes >= 0) std::snprintf(xc, sizeof xc, "%.2f", double(r.extra_bytes) / r.layer_bytes);
      std::printf("  %-24s %-4s %9s %21s %3d %11s %8.2f %4.0f%% %10s %7s\n", r.method.c_str(),
                  r.mode.c_str(), fmt_time(r.st.median).c_str(), range.c_str(), r.st.n,
                  fmt_bytes(double(r.layer_bytes)).c_str(), r.eff_gbps,
                  100 * r.eff_gbps / bw_.gbps, extra.c_str(), xc);
      if (!r.note.empty()) std::printf("    note: %s\n", r.note.c_str());
    }
    for (const auto& sp : sps) {
      if (!same_shape(sp.shape, s)) continue;
      std::string parts;
      for (const auto& [k, x] : sp.vs) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%s%s %.1fx", parts.empty() ? "" : ", ", k.c_str(), x);
        parts += buf;
      }
      if (sp.best_baseline.empty()) {
        std::printf("  speedup %s: no baseline timed\n", sp.method.c_str());
      } else {
        std::printf("  speedup %s: %s; vs best baseline (%s) %.1fx\n", sp.method.c_str(),
                    parts.c_str(), sp.best_baseline.c_str(), sp.vs_best);
      }
    }
    for (const auto& c : checks_) {
      if (!same_shape(c.shape, s)) continue;
      std::printf("  check %s vs %s: max|err| %.3g (|ref| max %.3g) %s\n", c.method.c_str(),
                  c.against.c_str(), c.max_abs_err, c.ref_max_abs, c.ok ? "ok" : "MISMATCH");
    }
    std::printf("\n");
  }
  const std::string primary = "tq_int4_g" + std::to_string(o_.groups[0]);
  std::printf("summary (%s, median): %s against the fastest baseline\n",
              o_.warm ? "decode warm" : "cold", primary.c_str());
  std::printf("  %-44s %10s %8s %5s %28s %8s\n", "shape", primary.c_str(), "eff GB/s", "%BW",
              "best baseline", "speedup");
  for (const auto& sp : sps) {
    if (sp.method != primary) continue;
    const Record* r = nullptr;
    const Record* b = nullptr;
    for (const auto& x : records_) {
      if (!same_shape(x.shape, sp.shape) || !x.skipped.empty()) continue;
      if (x.method == primary) r = &x;
      if (x.method == sp.best_baseline) b = &x;
    }
    const std::string best = b ? sp.best_baseline + " " + fmt_time(b->st.median) : "-";
    char speed[32] = "-";
    if (b) std::snprintf(speed, sizeof speed, "%.1fx", sp.vs_best);
    std::printf("  %-44s %10s %8.2f %4.0f%% %28s %8s\n", shape_name(sp.shape).c_str(),
                fmt_time(r->st.median).c_str(), r->eff_gbps, 100 * r->eff_gbps / bw_.gbps,
                best.c_str(), speed);
  }
  const auto bad = std::count_if(checks_.begin(), checks_.end(), [](const Check& c) {
    return c.gates && !c.ok;
  });
  if (bad) std::printf("ERROR: %ld correctness check(s) failed: the timings of those methods are void\n", long(bad));
}

void Bench::write_json(int argc, char** argv) const {
  Json j;
  j.begin_object();
  j.key("benchmark").value("tqmetal_bench");
  j.key("schema").value(1);
  j.key("date").value(date_);
  j.key("argv").begin_array();
  for (int i = 1; i < argc; ++i) j.value(argv[i]);
  j.end_array();
  j.key("quick").value(o_.quick);
  j.key("decode_mode").value(o_.warm ? "warm" : "cold");
  j.key("device").value(device_name_);
  j.key("elapsed_s").value(elapsed_s_);
  j.key("machine").begin_object();
  j.key("os").value(machine_.os);
  j.key("cpu_model").value(machine_.cpu_model);
  j.key("logical_cpus").value(machine_.logical_cpus);
  j.key("llc_bytes").value(machine_.llc_bytes);
  j.key("mem_total_bytes").value(machine_.mem_total_bytes);
  j.key("measured_read_bandwidth_gbps").value(bw_.gbps);
  j.end_object();
  j.key("versions").begin_object();
  j.key("mlx").value(mx::version());
  j.key("tqmetal_cpu_isa").value(tqmetal::cpu_isa());
  j.key("tqmetal_gpu_path").value(tqmetal::metal::gpu_path().path);
  j.key("compiler").value(__VERSION__);
  j.key("llama_cpp");
  if (llama_) {
    j.value(llama_->description());
  } else {
    j.null();
  }
  j.end_object();
  j.key("bandwidth").begin_object();
  j.key("gbps").value(bw_.gbps);
  j.key("gbps_1t").value(bw_.gbps_1t);
  j.key("gbps_all_threads").value(bw_.gbps_nt);
  j.key("threads").value(bw_.threads);
  j.key("array_bytes").value(bw_.array_bytes);
  j.key("repeats").value(bw_.repeats);
  j.key("gbps_end").value(bw_end_.gbps);
  j.key("method").value("sum of 64-bit words, array split evenly across threads, best of repeats");
  j.end_object();
  j.key("config").begin_object();
  j.key("cold_bytes").value(cold_bytes_);
  j.key("max_call_s").value(o_.max_call_s);
  j.key("budget_s").value(o_.budget_s);
  j.key("groups").begin_array();
  for (int g : o_.groups) j.value(g);
  j.end_array();
  j.end_object();
  j.key("methods").begin_object();
  for (const auto& l : o_.layouts) {
    for (const auto& m : methods_for(l)) {
      j.key(m.key).begin_object();
      j.key("label").value(m.label);
      j.key("baseline").value(m.baseline);
      j.key("group_size").value(m.group);
      j.key("k_bits").value(m.k_bits);
      j.key("v_bits").value(m.v_bits);
      j.end_object();
    }
    break;  // the same methods for every layout
  }
  j.end_object();
  auto shape_fields = [&](const Shape& s) {
    j.key("model").value(s.layout.name);
    j.key("H_q").value(s.layout.hq);
    j.key("H_kv").value(s.layout.hkv);
    j.key("D").value(s.layout.d);
    j.key("phase").value(s.phase);
    j.key("L").value(s.L);
    j.key("N").value(s.N);
  };
  j.key("results").begin_array();
  for (const auto& r : records_) {
    j.begin_object();
    shape_fields(r.shape);
    j.key("method").value(r.method);
    j.key("mode").value(r.mode);
    if (!r.skipped.empty()) {
      j.key("skipped").value(r.skipped);
      j.end_object();
      continue;
    }
    j.key("n").value(r.st.n);
    j.key("median_s").value(r.st.median);
    j.key("min_s").value(r.st.min);
    j.key("max_s").value(r.st.max);
    j.key("q1_s").value(r.st.q1);
    j.key("q3_s").value(r.st.q3);
    j.key("mean_s").value(r.st.mean);
    j.key("times_s").begin_array();
    for (double t : r.times) j.value(t);
    j.end_array();
    j.key("layer_bytes").value(r.layer_bytes);
    j.key("n_layers").value(r.n_layers);
    j.key("eff_gbps").value(r.eff_gbps);
    j.key("frac_of_measured_bw").value(r.eff_gbps / bw_.gbps);
    j.key("extra_bytes");
    if (r.extra_bytes >= 0) {
      j.value(r.extra_bytes);
      j.key("output_bytes").value(r.output_bytes);
    } else {
      j.null();
    }
    if (!r.note.empty()) j.key("note").value(r.note);
    j.end_object();
  }
  j.end_array();
  j.key("speedups").begin_array();
  for (const auto& sp : speedups(records_)) {
    j.begin_object();
    shape_fields(sp.shape);
    j.key("method").value(sp.method);
    j.key("vs").begin_object();
    for (const auto& [k, x] : sp.vs) j.key(k).value(x);
    j.end_object();
    j.key("best_baseline");
    if (sp.best_baseline.empty()) {
      j.null();
    } else {
      j.value(sp.best_baseline);
      j.key("vs_best").value(sp.vs_best);
    }
    j.end_object();
  }
  j.end_array();
  j.key("checks").begin_array();
  bool all_ok = true;
  for (const auto& c : checks_) {
    j.begin_object();
    shape_fields(c.shape);
    j.key("method").value(c.method);
    j.key("against").value(c.against);
    j.key("max_abs_err").value(c.max_abs_err);
    j.key("ref_max_abs").value(c.ref_max_abs);
    j.key("ok").value(c.ok);
    j.key("gates_run").value(c.gates);
    j.end_object();
    all_ok = all_ok && (c.ok || !c.gates);
  }
  j.end_array();
  j.key("ok").value(all_ok);
  j.end_object();
  std::ofstream f(o_.json_path);
  if (!f) throw std::runtime_error("--json: cannot write " + o_.json_path);
  f << j.str() << "\n";
  log("wrote " + o_.json_path);
}

std::vector<Shape> Bench::grid() const {
  std::vector<Shape> shapes;
  for (const auto& layout : o_.layouts) {
    for (int64_t N : o_.contexts) {
      for (int L : o_.decode_ls) shapes.push_back({layout, "decode", L, N});
    }
    for (int L : o_.prefill_ls) {
      for (int64_t N : o_.prefill_contexts) {
        if (N < L) {
          log("prefill L=" + std::to_string(L) + " N=" + std::to_string(N) +
              ": left out, the context is shorter than the rows");
          continue;
        }
        shapes.push_back({layout, "prefill", L, N});
      }
    }
  }
  return shapes;
}

int Bench::run(int argc, char** argv) {
  const auto t_start = std::chrono::steady_clock::now();
  if (o_.device) mx::set_default_device(*o_.device);
  const auto dev = mx::default_device();
  device_name_ = dev == mx::Device::gpu ? "gpu (MLX default device)" : "cpu";
  if (dev == mx::Device::gpu) {
    // Where the op runs on a GPU stream (csrc/metal/gpu_path.h): the metallib (found beside
    // the extension, one level above this binary in tqmetal/bin/), the run-time compiled
    // sources, or nowhere (a build without Metal: the op runs on the CPU).
    const auto& g = tqmetal::metal::gpu_path();
    device_name_ += g.path == "none" ? "; tqmetal's op on the cpu (" + g.reason + ")"
                                     : "; tqmetal's Metal kernels: " + g.path + " (" + g.reason + ")";
  }
  machine_ = describe_machine();
  cold_bytes_ = o_.cold_bytes > 0 ? o_.cold_bytes
                                  : std::max(2.2 * double(machine_.llc_bytes), double(1 << 30));
  if (!o_.llama_dir.empty()) {
    llama_ = LlamaCppFlashAttn::load(o_.llama_dir, &llama_error_);
    if (!llama_) log("llama.cpp: " + llama_error_);
  }
  mx::random::seed(0);
  log("machine: " + machine_.cpu_model + ", " + std::to_string(machine_.logical_cpus) +
      " cpus, LLC " + fmt_bytes(double(machine_.llc_bytes)) + "; device " + device_name_);
  log("measuring read bandwidth ...");
  bw_ = measure_read_bandwidth(static_cast<int64_t>(o_.bw_bytes));
  log("  " + std::to_string(bw_.gbps) + " GB/s");
  const auto shapes = grid();
  shape_count_ = static_cast<int>(shapes.size());
  for (const auto& s : shapes) {
    if (!base_.empty() && base_.begin()->first.rfind(s.layout.name + "/", 0) != 0) {
      base_.clear();
      mx::clear_cache();
    }
    run_shape(s);
  }
  base_.clear();
  log("measuring read bandwidth again ...");
  bw_end_ = measure_read_bandwidth(static_cast<int64_t>(o_.bw_bytes));
  elapsed_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  date_ = date;
  print_report();
  if (!o_.json_path.empty()) write_json(argc, argv);
  const bool ok = std::all_of(checks_.begin(), checks_.end(),
                              [](const Check& c) { return c.ok || !c.gates; });
  return ok ? 0 : 3;
}

int main(int argc, char** argv) {
  try {
    Bench bench(parse_args(argc, argv));
    return bench.run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "tqmetal_bench: " << e.what() << "\n";
    return 1;
  }
}
