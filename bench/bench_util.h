// Small helpers of the C++ benchmark binary: machine description, memory-bandwidth
// measurement, statistics, formatting and a minimal JSON writer. No MLX here.
#pragma once

#include <cstdint>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace tqbench {

struct Machine {
  std::string os;
  std::string cpu_model;
  int logical_cpus = 0;
  int64_t llc_bytes = 0;           // last-level cache (L3, or L2 where there is no L3)
  int64_t mem_total_bytes = 0;
};

Machine describe_machine();

// Memory the process may still allocate without swapping (MemAvailable on Linux;
// free + inactive + purgeable pages on macOS). 0 when unknown.
int64_t available_memory_bytes();

struct Bandwidth {
  double gbps = 0;          // best of the thread counts tried
  double gbps_1t = 0;
  double gbps_nt = 0;
  int threads = 0;
  int64_t array_bytes = 0;
  int repeats = 0;
};

// Read bandwidth: sum of a >= bytes array of 64-bit words, by 1 thread and by every
// core, best of `repeats`. The same measurement bench_sdpa.py makes with numpy.
Bandwidth measure_read_bandwidth(int64_t bytes, int repeats = 4);

struct Stats {
  int n = 0;
  double median = 0, min = 0, max = 0, mean = 0, q1 = 0, q3 = 0;
};
Stats summarize(std::vector<double> samples);

std::string fmt_time(double seconds);
std::string fmt_bytes(double bytes);
// "64K" -> 65536, "1M" -> 1048576, "4096" -> 4096 (binary units).
int64_t parse_count(const std::string& text);
std::vector<std::string> split(const std::string& text, char sep);

// Minimal JSON writer: values are appended in order; the caller keeps it well formed.
class Json {
 public:
  Json& begin_object();
  Json& end_object();
  Json& begin_array();
  Json& end_array();
  Json& key(const std::string& k);
  Json& value(const std::string& s);
  Json& value(const char* s) { return value(std::string(s)); }
  Json& value(double x);
  Json& value(int64_t x);
  Json& value(int x) { return value(static_cast<int64_t>(x)); }
  Json& value(bool b);
  Json& null();
  std::string str() const { return out_.str(); }

 private:
  void comma();
  std::ostringstream out_;
  std::vector<bool> first_;  // per open container: no element written yet
  bool after_key_ = false;
};

std::string json_escape(const std::string& s);

} // namespace tqbench
