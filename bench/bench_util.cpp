#include "bench_util.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <limits>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <thread>

#include <sys/utsname.h>
#include <unistd.h>

#ifdef __APPLE__
#include <mach/mach.h>
#include <sys/sysctl.h>
#endif

namespace tqbench {

namespace {

std::string read_line(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  std::getline(f, s);
  return s;
}

#ifdef __APPLE__
int64_t sysctl_int(const char* name) {
  int64_t v = 0;
  size_t len = sizeof(v);
  if (sysctlbyname(name, &v, &len, nullptr, 0) != 0) return 0;
  return v;
}
std::string sysctl_str(const char* name) {
  char buf[256] = {0};
  size_t len = sizeof(buf) - 1;
  if (sysctlbyname(name, buf, &len, nullptr, 0) != 0) return "";
  return buf;
}
#endif

int64_t meminfo_kb(const std::string& field) {
  std::ifstream f("/proc/meminfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      return std::stoll(line.substr(field.size() + 1));
    }
  }
  return 0;
}

} // namespace

Machine describe_machine() {
  Machine m;
  utsname u{};
  if (uname(&u) == 0) m.os = std::string(u.sysname) + " " + u.release + " " + u.machine;
  m.logical_cpus = static_cast<int>(std::thread::hardware_concurrency());
#ifdef __APPLE__
  m.cpu_model = sysctl_str("machdep.cpu.brand_string");
  m.llc_bytes = sysctl_int("hw.l3cachesize");
  if (m.llc_bytes == 0) m.llc_bytes = sysctl_int("hw.l2cachesize");
  m.mem_total_bytes = sysctl_int("hw.memsize");
#else
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      m.cpu_model = line.substr(line.find(':') + 2);
      break;
    }
  }
  // The highest cache level cpu0 reports.
  int best_level = 0;
  for (int idx = 0; idx < 8; ++idx) {
    const std::string base = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(idx);
    const std::string level = read_line(base + "/level");
    if (level.empty()) break;
    const std::string size = read_line(base + "/size");
    if (size.empty()) continue;
    if (std::stoi(level) >= best_level) {
      best_level = std::stoi(level);
      m.llc_bytes = parse_count(size);
    }
  }
  m.mem_total_bytes = meminfo_kb("MemTotal") * 1024;
#endif
  return m;
}

int64_t available_memory_bytes() {
#ifdef __APPLE__
  vm_statistics64_data_t vm{};
  mach_msg_type_number_t count = HOST_VM_INFO64_COUNT;
  if (host_statistics64(mach_host_self(), HOST_VM_INFO64, reinterpret_cast<host_info64_t>(&vm),
                        &count) != KERN_SUCCESS) {
    return 0;
  }
  const int64_t page = sysconf(_SC_PAGESIZE);
  return page * (static_cast<int64_t>(vm.free_count) + vm.inactive_count + vm.purgeable_count);
#else
  return meminfo_kb("MemAvailable") * 1024;
#endif
}

Bandwidth measure_read_bandwidth(int64_t bytes, int repeats) {
  Bandwidth bw;
  const size_t n = static_cast<size_t>(bytes / 8);
  std::unique_ptr<uint64_t[]> data(new uint64_t[n]);
  // Touch every page (and give the words distinct values so nothing folds away).
  for (size_t i = 0; i < n; ++i) data[i] = i;
  bw.array_bytes = static_cast<int64_t>(n * 8);
  bw.repeats = repeats;
  const int max_threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  bw.threads = max_threads;
  std::atomic<uint64_t> sink{0};
  auto run = [&](int nt) {
    double best = std::numeric_limits<double>::infinity();
    for (int r = 0; r < repeats; ++r) {
      std::vector<std::thread> threads;
      auto t0 = std::chrono::steady_clock::now();
      for (int t = 0; t < nt; ++t) {
        threads.emplace_back([&, t] {
          const size_t lo = n * t / nt, hi = n * (t + 1) / nt;
          // Four independent accumulators so the adds are not the bottleneck.
          uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
          size_t i = lo;
          for (; i + 4 <= hi; i += 4) {
            a0 += data[i];
            a1 += data[i + 1];
            a2 += data[i + 2];
            a3 += data[i + 3];
          }
          for (; i < hi; ++i) a0 += data[i];
          sink += a0 + a1 + a2 + a3;
        });
      }
      for (auto& th : threads) th.join();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                                .count());
    }
    return static_cast<double>(bw.array_bytes) / best / 1e9;
  };
  bw.gbps_1t = run(1);
  bw.gbps_nt = max_threads > 1 ? run(max_threads) : bw.gbps_1t;
  bw.gbps = std::max(bw.gbps_1t, bw.gbps_nt);
  if (sink.load() == 42) std::fputs("", stderr);  // keep the sums observable
  return bw;
}

Stats summarize(std::vector<double> s) {
  Stats st;
  if (s.empty()) return st;
  std::sort(s.begin(), s.end());
  st.n = static_cast<int>(s.size());
  auto quantile = [&](double p) {
    const double pos = p * (st.n - 1);
    const int lo = static_cast<int>(std::floor(pos));
    const int hi = std::min(lo + 1, st.n - 1);
    return s[lo] + (pos - lo) * (s[hi] - s[lo]);
  };
  st.median = quantile(0.5);
  st.q1 = quantile(0.25);
  st.q3 = quantile(0.75);
  st.min = s.front();
  st.max = s.back();
  st.mean = std::accumulate(s.begin(), s.end(), 0.0) / st.n;
  return st;
}

std::string fmt_time(double s) {
  char buf[32];
  if (s < 1e-3) {
    std::snprintf(buf, sizeof buf, "%.0f us", s * 1e6);
  } else if (s < 0.1) {
    std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  } else if (s < 1.0) {
    std::snprintf(buf, sizeof buf, "%.1f ms", s * 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f s", s);
  }
  return buf;
}

std::string fmt_bytes(double n) {
  char buf[32];
  const double a = std::fabs(n);
  if (a >= 1e9) {
    std::snprintf(buf, sizeof buf, "%.2f GB", n / 1e9);
  } else if (a >= 1e6) {
    std::snprintf(buf, sizeof buf, "%.1f MB", n / 1e6);
  } else if (a >= 1e3) {
    std::snprintf(buf, sizeof buf, "%.1f kB", n / 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%.0f B", n);
  }
  return buf;
}

int64_t parse_count(const std::string& text) {
  std::string t;
  for (char c : text) {
    if (!std::isspace(static_cast<unsigned char>(c))) t += static_cast<char>(std::toupper(c));
  }
  if (!t.empty() && t.back() == 'B') t.pop_back();
  if (!t.empty() && t.back() == 'I') t.pop_back();
  int64_t mult = 1;
  if (!t.empty()) {
    switch (t.back()) {
      case 'K': mult = int64_t(1) << 10; break;
      case 'M': mult = int64_t(1) << 20; break;
      case 'G': mult = int64_t(1) << 30; break;
      default: break;
    }
    if (mult != 1) t.pop_back();
  }
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(t, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (t.empty() || used != t.size() || v < 0) {
    throw std::invalid_argument("not a count: '" + text + "'");
  }
  return static_cast<int64_t>(v * static_cast<double>(mult));
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(text);
  while (std::getline(in, cur, sep)) {
    if (!cur.empty()) out.push_back(cur);
  }
  return out;
}

std::string json_escape(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': o += "\\\""; break;
      case '\\': o += "\\\\"; break;
      case '\n': o += "\\n"; break;
      case '\t': o += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          o += buf;
        } else {
          o += static_cast<char>(c);
        }
    }
  }
  return o + "\"";
}

void Json::comma() {
  if (after_key_) {
    after_key_ = false;
    return;
  }
  if (!first_.empty()) {
    if (!first_.back()) out_ << ",";
    first_.back() = false;
  }
}
Json& Json::begin_object() {
  comma();
  out_ << "{";
  first_.push_back(true);
  return *this;
}
Json& Json::end_object() {
  first_.pop_back();
  out_ << "}";
  return *this;
}
Json& Json::begin_array() {
  comma();
  out_ << "[";
  first_.push_back(true);
  return *this;
}
Json& Json::end_array() {
  first_.pop_back();
  out_ << "]";
  return *this;
}
Json& Json::key(const std::string& k) {
  comma();
  out_ << json_escape(k) << ":";
  after_key_ = true;
  return *this;
}
Json& Json::value(const std::string& s) {
  comma();
  out_ << json_escape(s);
  return *this;
}
Json& Json::value(double x) {
  comma();
  if (std::isfinite(x)) {
    out_ << std::setprecision(9) << x;
  } else {
    out_ << "null";  // JSON has no NaN/inf
  }
  return *this;
}
Json& Json::value(int64_t x) {
  comma();
  out_ << x;
  return *this;
}
Json& Json::value(bool b) {
  comma();
  out_ << (b ? "true" : "false");
  return *this;
}
Json& Json::null() {
  comma();
  out_ << "null";
  return *this;
}

} // namespace tqbench
