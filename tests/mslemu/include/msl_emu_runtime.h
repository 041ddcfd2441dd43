// msl_emu_runtime.h -- fiber runtime of the MSL emulator (included by msl_emu.h).
//
//  * one fiber per GPU thread (a ~10 ns hand-written x86-64 context switch; ucontext elsewhere and in sanitizer
//    builds, ~0.5 us because of its sigprocmask syscall); a threadgroup runs on one OS thread, threadgroups
//    one after another;
//  * scheduling orders (forward / reverse / shuffle / runahead / interleave), see run_group();
//  * threadgroup_barrier releases when every live thread waits at the same call site;
//    SIMD collectives resolve when every live lane of the simdgroup is blocked;
//  * instrumentation (MSL_EMU_INSTRUMENT, set by mslemu.compile): the kernel TU is compiled (-c) with
//    -fsanitize=thread, so the compiler emits a call to __tsan_{read,write}{1,2,4,8,16} (and _range,
//    memcpy/memset/memmove) before every memory access that may touch shared memory; reads and writes are
//    reported separately, also for read-modify-write.  The TSan runtime is NOT linked: msl_emu_api.inc
//    defines those entry points and routes them to on_access() below, which
//      - counts bytes read/written per bound device/constant buffer (exact per-byte read counts),
//      - checks accesses against the bound buffers (a fatal error for an access that overlaps the
//        guard window just before/after a buffer) and against threadgroup variables (redzones),
//      - runs the threadgroup-memory race detector (shadow memory per arena byte, see tg_access()).
#pragma once
#include <dlfcn.h>
#include <link.h>

namespace msl_emu {

enum ArgKind : int {
  ARG_NONE = 0, ARG_BUFFER, ARG_THREADGROUP_MEM,
  ARG_THREAD_POSITION_IN_GRID, ARG_THREAD_POSITION_IN_THREADGROUP, ARG_THREAD_INDEX_IN_THREADGROUP,
  ARG_THREADGROUP_POSITION_IN_GRID, ARG_THREADS_PER_GRID, ARG_THREADS_PER_THREADGROUP,
  ARG_THREADGROUPS_PER_GRID, ARG_THREAD_INDEX_IN_SIMDGROUP, ARG_SIMDGROUP_INDEX_IN_THREADGROUP,
  ARG_SIMDGROUPS_PER_THREADGROUP, ARG_THREADS_PER_SIMDGROUP, ARG_DISPATCH_THREADS_PER_THREADGROUP,
  ARG_QUADGROUP_INDEX_IN_THREADGROUP, ARG_THREAD_INDEX_IN_QUADGROUP, ARG_GRID_ORIGIN,
};
struct ArgSpec { int kind; int index; int gated; };  // gated: [[function_constant(x)]] on the parameter

// Runtime code is excluded from instrumentation (it would otherwise count its own bookkeeping).
#if defined(MSL_EMU_INSTRUMENT)
#define MSL_NOSAN __attribute__((no_sanitize("thread")))
#define MSL_NOINSTR MSL_NOSAN __attribute__((noinline))
#else
#define MSL_NOSAN
#define MSL_NOINSTR
#endif

// ---------------------------------------------------------------- context switch
#if defined(__x86_64__) && !defined(MSL_EMU_UCONTEXT)
#define MSL_EMU_FAST_SWITCH 1
// msl_emu_ctx_switch(&save_sp, new_sp): push the callee-saved registers + MXCSR / x87 control word on the
// current stack, store the stack pointer in *save_sp, switch to new_sp and pop the same frame from there.
extern "C" void msl_emu_ctx_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl msl_emu_ctx_switch
  .hidden msl_emu_ctx_switch
  .type msl_emu_ctx_switch, @function
msl_emu_ctx_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size msl_emu_ctx_switch, .-msl_emu_ctx_switch
)");
#endif

constexpr int kSimdWidth = 32;
constexpr size_t kSlotBytes = 256;
constexpr size_t kTgLimit = 32768;             // Metal's threadgroup memory limit (Apple GPUs)
constexpr size_t kTgArenaBytes = 64 * 1024;    // payload (<= 32 KiB) + redzones
constexpr size_t kTgRedzone = 32;              // guard bytes before/after every threadgroup variable
constexpr unsigned char kTgPoison = 0xff;      // uninitialised threadgroup memory: NaN / -1
constexpr unsigned char kTgCanary = 0xcb;      // redzone fill
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDevGuard = 256;              // device guard window before/after each bound buffer
constexpr uintptr_t kNullPage = 65536;         // accesses below this address: null-pointer dereference
constexpr int kMaxReports = 8;

enum Order : int { ORDER_FORWARD = 0, ORDER_REVERSE = 1, ORDER_SHUFFLE = 2, ORDER_RUNAHEAD = 3, ORDER_INTERLEAVE = 4 };
enum RaceMode : int { RACE_OFF = 0, RACE_ON = 1, RACE_STRICT = 2, RACE_LOCKSTEP = 3 };
constexpr int kMemDevice = 1, kMemThreadgroup = 2;  // metal::mem_flags bits

struct Site { const char* file = nullptr; uint32_t line = 0, col = 0;
  bool operator==(const Site& o) const { return line == o.line && col == o.col && (file == o.file || (file && o.file && !strcmp(file, o.file))); }
  std::string str() const { return std::string(file ? file : "?") + ":" + std::to_string(line) + ":" + std::to_string(col); } };
inline Site mk_site(const std::source_location& l) { return Site{l.file_name(), l.line(), l.column()}; }

enum FState : int { RUNNABLE, AT_BARRIER, AT_COLLECTIVE, DONE };
enum CollKind : int { COLL_VALUE = 0, COLL_SIMD_BARRIER = 1 };

struct Fiber {
#if MSL_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  FState st = RUNNABLE;
  uint32_t linear = 0, simd_gid = 0, simd_lid = 0;
  uint32_t pos[3] = {0, 0, 0};
  Site site;
  int coll_kind = COLL_VALUE, flags = 0;
  int rt_depth = 0;  // > 0 while this fiber executes emulator runtime code: the hooks ignore its accesses
  char* stack = nullptr;
  alignas(16) unsigned char slot[kSlotBytes];
};

struct SimdGroupState {
  alignas(16) unsigned char gathered[kSimdWidth][kSlotBytes];
  uint32_t mask = 0;
};

struct Stats { uint64_t barriers = 0, collectives = 0, partial_collectives = 0, exited_before_barrier = 0,
               switches = 0, threadgroups = 0, tg_bytes_max = 0, races = 0, tg_uninit_read_bytes = 0,
               tg_accesses = 0; };
constexpr int kNumStats = 10;
struct BufStat { uint64_t bytes_read = 0, bytes_written = 0, loads = 0, stores = 0; };
constexpr int kNumBufStats = 7;  // + unique_bytes_read, unique_bytes_written, max_reads_per_byte

// per-dispatch info
struct Launch {
  void** buffers; const uint64_t* sizes; int nbuf;
  const uint32_t* tg_mem_sizes; int ntgmem;
  uint32_t grid_tgs[3];      // threadgroups per grid
  uint32_t tptg[3];          // threads per threadgroup (nominal)
  uint32_t threads_per_grid[3];
  BufStat* bstats = nullptr;
  uint8_t** rshadow = nullptr;  // per buffer, per byte: bit 7 = written, bits 0..6 = reads (saturating)
};

// shadow record of one access: barrier epoch, simdgroup-barrier epoch of the accessor's simdgroup, thread, pc
struct Acc { uint32_t e = 0, s = 0; uint16_t tid = 0, _pad = 0; uint32_t pc = 0; };
struct TgShadow { Acc w, r0, r1; };  // last write, up to two concurrent readers (distinct threads)

struct TgVar { const void* key; size_t off, size, elem; const char* name; const char* type; };

struct Group {
  std::vector<Fiber> fibers;
  Fiber* fib = nullptr;               // fibers.data() (raw pointers: the hooks must not call instrumented code)
  std::vector<char*> stacks;
  std::vector<SimdGroupState> sgs;
#if MSL_EMU_FAST_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  int cur = -1;
  uint32_t tg_size[3] = {1, 1, 1}, tg_pos[3] = {0, 0, 0};
  uint32_t nthreads = 0;
  alignas(64) unsigned char arena[kTgArenaBytes];
  uint16_t owner[kTgArenaBytes];  // per arena byte: 1 + index of the threadgroup variable, 0 = redzone / free
  size_t arena_used = 0, metal_used = 0;
  std::vector<TgVar> tg_vars;
  void (*body)(Group&, Fiber&) = nullptr;
  const Launch* launch = nullptr;
  std::exception_ptr err;
  std::string fatal;                  // set by the instrumentation hooks (out-of-bounds access)
  Stats* stats = nullptr;
  bool strict_barrier = true;
  int race = RACE_OFF;
  bool yield_tg = false;              // interleave order: switch lanes at every threadgroup-memory access
  bool instrumented = false;
  uint32_t epoch = 0, epoch0 = 0;     // current barrier epoch, first epoch of this threadgroup
  std::vector<uint32_t> sg_epoch;     // per simdgroup: simdgroup_barrier count
  uint32_t* sg_ep = nullptr;          // sg_epoch.data()
  std::vector<std::string> reports;   // race reports of this threadgroup (deduplicated)
  std::vector<std::array<uint32_t, 3>> report_keys;
};
// One dispatch at a time per library (msl_emu_dispatch holds a mutex), so a plain global is enough.
inline Group* g_group = nullptr;
inline uint32_t g_epoch_ctr = 0;
inline TgShadow* g_tg_shadow = nullptr;  // kTgArenaBytes entries, reused (epochs are globally unique)
inline uintptr_t g_so_lo = 0, g_so_hi = 0;

[[noreturn]] inline void emu_fail(const std::string& m) { throw std::runtime_error("msl_emu: " + m); }

// Runtime functions entered from kernel code (fiber context) hold an RtGuard: g++/clang do not inline
// instrumented library code (std::vector, std::string, ...) into MSL_NOSAN functions, so such calls still
// reach the hooks; the guard makes the hooks ignore them.
struct RtGuard {
  Fiber* f = nullptr;
  MSL_NOSAN __attribute__((always_inline)) RtGuard() {
    Group* g = g_group;
    if (g && g->cur >= 0) { f = g->fib + g->cur; f->rt_depth++; }
  }
  MSL_NOSAN __attribute__((always_inline)) ~RtGuard() { if (f) f->rt_depth--; }
  RtGuard(const RtGuard&) = delete;
  RtGuard& operator=(const RtGuard&) = delete;
};

MSL_NOINSTR inline Fiber& cur_fiber() {
  if (!g_group || g_group->cur < 0) emu_fail("MSL builtin called outside a kernel dispatch");
  return g_group->fib[g_group->cur];
}
MSL_NOINSTR inline uint32_t cur_lane() { RtGuard rg; return cur_fiber().simd_lid; }
MSL_NOINSTR inline void yield_to_scheduler() {
  Group& g = *g_group;
  Fiber& f = g.fib[g.cur];
  g.stats->switches++;
#if MSL_EMU_FAST_SWITCH
  msl_emu_ctx_switch(&f.sp, g.sched_sp);
#else
  swapcontext(&f.ctx, &g.sched_ctx);
#endif
}

inline std::string hex(uint64_t v) { char b[32]; snprintf(b, sizeof b, "0x%llx", (unsigned long long)v); return b; }
// "<pc:0x...>" markers are symbolised (file:line) by mslemu/__init__.py with addr2line
inline std::string pc_str(uint32_t pc) { return "<pc:" + hex(pc) + ">"; }
MSL_NOINSTR inline std::string thread_str(const Group& g, uint32_t t) {
  std::string s = "thread " + std::to_string(t) + " (simdgroup " + std::to_string(t / kSimdWidth) + ", lane " +
                  std::to_string(t % kSimdWidth);
  if (g.tg_size[1] * g.tg_size[2] > 1 && t < g.fibers.size())
    s += ", position (" + std::to_string(g.fibers[t].pos[0]) + "," + std::to_string(g.fibers[t].pos[1]) + "," +
         std::to_string(g.fibers[t].pos[2]) + ")";
  return s + ")";
}
// human-readable location of an arena offset
MSL_NOINSTR inline std::string tg_where(const Group& g, size_t off) {
  const TgVar* best = nullptr;
  for (auto& v : g.tg_vars) {
    if (off >= v.off && off < v.off + v.size) {
      size_t o = off - v.off;
      std::string s = "threadgroup `" + std::string(v.name) + "` (" + v.type + ", " + std::to_string(v.size) +
                      " B) at byte offset " + std::to_string(o);
      if (v.elem > 1) s += " (element " + std::to_string(o / v.elem) + ")";
      return s;
    }
    if (v.off + v.size <= off && (!best || v.off > best->off)) best = &v;
  }
  if (best) return "threadgroup memory " + std::to_string(off - best->off - best->size) + " B past the end of `" +
                   best->name + "` (" + best->type + ", " + std::to_string(best->size) + " B)";
  if (!g.tg_vars.empty()) return "threadgroup memory " + std::to_string(g.tg_vars[0].off - off) + " B before `" +
                                 g.tg_vars[0].name + "`";
  return "threadgroup memory (no variable allocated) at arena offset " + std::to_string(off);
}

// ---------------------------------------------------------------- threadgroup storage + guard zones
MSL_NOINSTR inline void* tg_alloc(Group& g, const void* key, size_t size, size_t align, size_t elem, const char* name,
                                  const char* type) {
  RtGuard rg;
  for (auto& v : g.tg_vars) if (v.key == key) return g.arena + v.off;
  if (align < 16) align = 16;
  size_t off = (g.arena_used + kTgRedzone + align - 1) / align * align;
  g.metal_used = (g.metal_used + align - 1) / align * align + size;
  if (g.metal_used > kTgLimit)
    emu_fail("threadgroup memory " + std::to_string(g.metal_used) + " B (after `" + name + "`) exceeds the 32 KiB Metal limit");
  if (off + size + kTgRedzone > kTgArenaBytes) emu_fail("threadgroup arena overflow (too many threadgroup variables)");
  // redzone before the variable (from the end of the previous one) and after it
  std::memset(g.arena + g.arena_used, kTgCanary, off - g.arena_used);
  std::memset(g.arena + off + size, kTgCanary, kTgRedzone);
  g.tg_vars.push_back({key, off, size, elem, name, type});
  const uint16_t id = (uint16_t)g.tg_vars.size();
  for (size_t i = 0; i < size; ++i) g.owner[off + i] = id;
  g.arena_used = off + size;
  if (g.metal_used > g.stats->tg_bytes_max) g.stats->tg_bytes_max = g.metal_used;
  return g.arena + off;
}
// threadgroup storage for `threadgroup T x[...]` declared inside kernels (rewritten by rewrite.py)
template <class A> A& tg_var(const void* key, const char* name, const char* type) {
  return *reinterpret_cast<A*>(tg_alloc(*g_group, key, sizeof(A), alignof(A), sizeof(std::remove_all_extents_t<A>), name, type));
}
MSL_NOINSTR inline void* tg_var_dyn(Group& g, int index, size_t bytes) {
  RtGuard rg;
  static char keys[32];
  static const char* names[32] = {};
  static std::string storage[32];
  if (index < 0 || index >= 32) emu_fail("threadgroup(N): N out of range");
  if (!names[index]) { storage[index] = "[[threadgroup(" + std::to_string(index) + ")]]"; names[index] = storage[index].c_str(); }
  return tg_alloc(g, &keys[index], bytes, 16, 1, names[index], "dynamic threadgroup memory");
}
// redzone canaries (catch out-of-bounds threadgroup stores also in non-instrumented builds)
MSL_NOINSTR inline std::string check_redzones(const Group& g) {
  size_t prev_end = 0;
  const TgVar* prev = nullptr;
  for (auto& v : g.tg_vars) {
    for (size_t i = prev_end; i < v.off; ++i)
      if (g.arena[i] != kTgCanary)
        return "threadgroup memory corrupted: the redzone " + (prev ? "after `" + std::string(prev->name) + "`" : std::string("before the first variable")) +
               " was overwritten (out-of-bounds threadgroup store, byte " + std::to_string(i - prev_end) + " past the end)";
    prev_end = v.off + v.size;
    prev = &v;
  }
  if (prev)
    for (size_t i = prev_end; i < prev_end + kTgRedzone; ++i)
      if (g.arena[i] != kTgCanary)
        return "threadgroup memory corrupted: the redzone after `" + std::string(prev->name) +
               "` was overwritten (out-of-bounds threadgroup store, byte " + std::to_string(i - prev_end) + " past the end)";
  return {};
}

// ---------------------------------------------------------------- instrumentation hooks
// Abort the current fiber before it performs an invalid access: it is never resumed.
[[noreturn]] MSL_NOINSTR inline void abort_fiber(std::string msg) {
  Group& g = *g_group;
  if (g.fatal.empty()) g.fatal = std::move(msg);
  Fiber& f = g.fib[g.cur];
  f.st = DONE;
#if MSL_EMU_FAST_SWITCH
  msl_emu_ctx_switch(&f.sp, g.sched_sp);
#else
  swapcontext(&f.ctx, &g.sched_ctx);
#endif
  __builtin_trap();
}

MSL_NOSAN inline void add_report(Group& g, int kind, uint32_t pc_a, uint32_t pc_b, std::string (*make)(Group&, const void*), const void* ctx) {
  std::array<uint32_t, 3> key{(uint32_t)kind, pc_a, pc_b};
  for (auto& k : g.report_keys) if (k == key) return;
  if ((int)g.reports.size() >= kMaxReports) return;
  g.report_keys.push_back(key);
  g.reports.push_back(make(g, ctx));
}

struct RaceCtx { int kind; size_t off; const Acc* prev; uint32_t tid, pc; };
MSL_NOINSTR inline std::string race_msg(Group& g, const void* p) {
  const RaceCtx& c = *static_cast<const RaceCtx*>(p);
  static const char* kinds[] = {"write-write", "read-then-write", "write-then-read"};
  static const char* prev_op[] = {"wrote", "read", "wrote"};
  static const char* cur_op[] = {"writes", "writes", "reads"};
  return std::string(kinds[c.kind]) + " race on " + tg_where(g, c.off) + ": " + thread_str(g, c.prev->tid) + " " +
         prev_op[c.kind] + " it at " + pc_str(c.prev->pc) + ", then " + thread_str(g, c.tid) + " " + cur_op[c.kind] +
         " it at " + pc_str(c.pc) + " with no barrier in between";
}

// Threadgroup-memory access by the current fiber: guard-zone check, then the race detector.
//
// Happens-before model (documented in tests/mslemu/README.md): two accesses to the same byte by different
// threads, at least one a write, race unless
//   * a threadgroup_barrier was released between them (barrier epoch `e` differs), or
//   * both threads are in the same simdgroup and a simdgroup_barrier of that simdgroup separates them (`s` differs).
// RACE_STRICT: only barriers whose mem_flags include mem_threadgroup order threadgroup memory.
// RACE_LOCKSTEP: accesses by lanes of the same simdgroup never race (hardware lockstep assumption).
// SIMD collectives (simd_sum, simd_shuffle, ...) exchange registers and do not order memory.
MSL_NOSAN inline void tg_access(Group& g, size_t off, size_t n, bool write, uint32_t pc) {
  g.stats->tg_accesses++;
  if (g.yield_tg) yield_to_scheduler();  // interleave order: other lanes run before this access happens
  if (n == 0) return;
  if (off + n > kTgArenaBytes) n = kTgArenaBytes - off;
  const uint16_t v = g.owner[off];
  if (v == 0 || g.owner[off + n - 1] != v) {
    size_t bad = off;
    while (bad < off + n && g.owner[bad] == v && v) ++bad;
    abort_fiber("out-of-bounds threadgroup " + std::string(write ? "write" : "read") + " (" + std::to_string(n) +
                " B) touching " + tg_where(g, bad) + "; by " + thread_str(g, g.cur) + " at " + pc_str(pc));
  }
  if (g.race == RACE_OFF) return;
  const uint32_t tid = (uint32_t)g.cur, sg = tid / kSimdWidth;
  const Acc me{g.epoch, g.sg_ep[sg], (uint16_t)tid, 0, pc};
  const bool lockstep = g.race == RACE_LOCKSTEP;
  auto conflict = [&](const Acc& a) {
    if (a.e != me.e || a.tid == tid) return false;
    if (a.tid / kSimdWidth == sg && (lockstep || a.s != me.s)) return false;
    return true;
  };
  bool raced = false, uninit = false;
  TgShadow* sh = g_tg_shadow + off;
  for (size_t i = 0; i < n; ++i) {
    TgShadow& s = sh[i];
    if (write) {
      if (!raced) {
        const Acc* p = conflict(s.w) ? &s.w : conflict(s.r0) ? &s.r0 : conflict(s.r1) ? &s.r1 : nullptr;
        if (p) {
          raced = true;
          RaceCtx c{p == &s.w ? 0 : 1, off + i, p, tid, pc};
          add_report(g, c.kind, p->pc, pc, race_msg, &c);
        }
      }
      s.w = me;
      s.r0.e = s.r1.e = 0;
    } else {
      if (s.w.e < g.epoch0) uninit = true;
      if (!raced && conflict(s.w)) {
        raced = true;
        RaceCtx c{2, off + i, &s.w, tid, pc};
        add_report(g, 2, s.w.pc, pc, race_msg, &c);
      }
      if (s.r0.e != me.e || s.r0.tid == tid) s.r0 = me;
      else if (s.r1.e != me.e || s.r1.tid == tid) s.r1 = me;
    }
  }
  if (raced) g.stats->races++;
  if (uninit) {
    for (size_t i = 0; i < n; ++i) if (sh[i].w.e < g.epoch0) g.stats->tg_uninit_read_bytes++;
  }
}

MSL_NOSAN inline void dev_access(Group& g, int bi, size_t o, size_t n, bool write, uint32_t pc) {
  const Launch& L = *g.launch;
  if (o + n > L.sizes[bi])
    abort_fiber("out-of-bounds device " + std::string(write ? "write" : "read") + " (" + std::to_string(n) +
                " B) at byte offset " + std::to_string(o) + " of buffer(" + std::to_string(bi) + ") (size " +
                std::to_string(L.sizes[bi]) + " B) runs past its end; by " + thread_str(g, g.cur) + " at " + pc_str(pc));
  BufStat& st = L.bstats[bi];
  uint8_t* sh = L.rshadow[bi] + o;
  if (write) {
    st.bytes_written += n; st.stores++;
    for (size_t i = 0; i < n; ++i) sh[i] |= 0x80;
  } else {
    st.bytes_read += n; st.loads++;
    for (size_t i = 0; i < n; ++i) if ((sh[i] & 0x7f) != 0x7f) sh[i]++;
  }
}

struct DepthScope {
  Fiber* f;
  MSL_NOSAN __attribute__((always_inline)) explicit DepthScope(Fiber* x) : f(x) { f->rt_depth++; }
  MSL_NOSAN __attribute__((always_inline)) ~DepthScope() { f->rt_depth--; }
};

MSL_NOSAN inline void on_access(uintptr_t a, size_t n, bool write, uintptr_t ret, bool force = false) {
  Group* g = g_group;
  if (!g || g->cur < 0) return;  // scheduler / API code
  Fiber* f = g->fib + g->cur;
  if (f->rt_depth && !force) return;  // emulator runtime code running on the fiber
  const uintptr_t ar = (uintptr_t)g->arena;
  if (a - (uintptr_t)f->stack < kStackBytes) return;  // thread-private memory
  DepthScope ds(f);  // no re-entry from whatever the checks below call
  const uint32_t pc = (uint32_t)(ret - 1 - g_so_lo);
  if (a < kNullPage)  // would crash the host process
    abort_fiber("null-pointer " + std::string(write ? "write" : "read") + " (" + std::to_string(n) + " B at address " +
                hex(a) + ": an unbound [[buffer]]?) by " + thread_str(*g, g->cur) + " at " + pc_str(pc));
  if (a - ar < kTgArenaBytes) { tg_access(*g, a - ar, n, write, pc); return; }
  const Launch& L = *g->launch;
  for (int i = 0; i < L.nbuf; ++i) {
    const uintptr_t b = (uintptr_t)L.buffers[i];
    if (b && a - b < L.sizes[i]) { dev_access(*g, i, a - b, n, write, pc); return; }
  }
  if (a - g_so_lo < g_so_hi - g_so_lo) return;  // the library's own globals (function constants, tables)
  // emulator runtime memory (never attributed to a kernel access, even if it sits next to a buffer)
  if (a - (uintptr_t)g < sizeof(Group) || a - (uintptr_t)g->fib < g->nthreads * sizeof(Fiber)) return;
  for (int i = 0; i < L.nbuf; ++i) {
    const uintptr_t b = (uintptr_t)L.buffers[i];
    if (!b) continue;
    const uintptr_t e = b + L.sizes[i];
    if ((a >= e && a < e + kDevGuard) || (a < b && a + n > b - kDevGuard))
      abort_fiber("out-of-bounds device " + std::string(write ? "write" : "read") + " (" + std::to_string(n) + " B) " +
                  (a >= e ? "starting " + std::to_string(a - e) + " B past the end" : "starting " + std::to_string(b - a) + " B before the start") +
                  " of buffer(" + std::to_string(i) + ") (size " + std::to_string(L.sizes[i]) + " B); by " +
                  thread_str(*g, g->cur) + " at " + pc_str(pc));
  }
}

inline int find_so_range(struct dl_phdr_info* info, size_t, void* data) {
  auto* want = static_cast<uintptr_t*>(data);
  if (info->dlpi_addr != want[0]) return 0;
  uintptr_t hi = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_LOAD) hi = std::max<uintptr_t>(hi, info->dlpi_addr + info->dlpi_phdr[i].p_vaddr + info->dlpi_phdr[i].p_memsz);
  want[1] = hi;
  return 1;
}
inline void init_so_range() {
  if (g_so_lo) return;
  Dl_info di{};
  if (dladdr((void*)&init_so_range, &di) && di.dli_fbase) {
    uintptr_t r[2] = {(uintptr_t)di.dli_fbase, 0};
    dl_iterate_phdr(find_so_range, r);
    g_so_lo = r[0]; g_so_hi = r[1] ? r[1] : r[0];
  }
}

// ---------------------------------------------------------------- collectives and barriers
// every participating lane deposits a value, blocks, and reads all lanes' values
template <class T> struct Gathered { T v[kSimdWidth]; uint32_t mask; };
template <class T> MSL_NOINSTR Gathered<T> simd_allgather(const T& x, const std::source_location& loc,
                                                          int kind = COLL_VALUE, int flags = 0) {
  static_assert(sizeof(T) <= kSlotBytes, "collective payload too large");
  static_assert(std::is_trivially_copyable_v<T>);
  RtGuard rg;
  Fiber& f = cur_fiber();
  std::memcpy(f.slot, &x, sizeof(T));
  f.site = mk_site(loc);
  f.coll_kind = kind; f.flags = flags;
  f.st = AT_COLLECTIVE;
  yield_to_scheduler();
  SimdGroupState& s = g_group->sgs[f.simd_gid];
  Gathered<T> r;
  r.mask = s.mask;
  for (int l = 0; l < kSimdWidth; ++l) {
    if (s.mask & (1u << l)) std::memcpy(&r.v[l], s.gathered[l], sizeof(T));
    else std::memset(&r.v[l], 0xff, sizeof(T));  // inactive lane: poison
  }
  return r;
}

MSL_NOINSTR inline void barrier_wait(const std::source_location& loc, int flags) {
  RtGuard rg;
  Fiber& f = cur_fiber();
  f.site = mk_site(loc);
  f.flags = flags;
  f.st = AT_BARRIER;
  yield_to_scheduler();
}

MSL_NOINSTR inline void fiber_entry() {
  Group& g = *g_group;
  Fiber& f = g.fib[g.cur];
  try { g.body(g, f); } catch (...) { RtGuard rg; if (!g.err) g.err = std::current_exception(); }
  f.st = DONE;
#if MSL_EMU_FAST_SWITCH
  msl_emu_ctx_switch(&f.sp, g.sched_sp);  // never resumed
  __builtin_trap();
#endif
  // ucontext: returning resumes uc_link (the scheduler)
}

MSL_NOINSTR inline void fiber_init(Group& g, Fiber& f, char* stack) {
#if MSL_EMU_FAST_SWITCH
  (void)g;
  // initial frame popped by msl_emu_ctx_switch: [mxcsr|fpucw] r15 r14 r13 r12 rbx rbp -> ret to fiber_entry
  uintptr_t top = ((uintptr_t)stack + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                  // fake return address of fiber_entry (keeps the ABI alignment)
  *--sp = (uint64_t)(uintptr_t)&fiber_entry;  // `ret` target
  for (int i = 0; i < 6; ++i) *--sp = 0;      // rbp rbx r12 r13 r14 r15
  *--sp = 0x1F80ull | (0x037Full << 32);      // default MXCSR, x87 control word
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack; f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &g.sched_ctx;
  makecontext(&f.ctx, (void (*)())fiber_entry, 0);
#endif
}

// ---------------------------------------------------------------- scheduler
struct Rng {
  uint64_t s;
  uint32_t next() { s = s * 6364136223846793005ull + 1442695040888963407ull; return uint32_t(s >> 33); }
  template <class V> void shuffle(V& v) { for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next() % i]); }
};

struct GroupScope {  // restores g_group on exit (including exceptions)
  Group* saved;
  explicit GroupScope(Group* g) : saved(g_group) { g_group = g; }
  ~GroupScope() { g_group = saved; }
};

MSL_NOINSTR inline void run_fiber(Group& g, uint32_t i) {
  Fiber* f = g.fib + i;  // computed before g.cur is set: from then on the hooks attribute accesses to fiber i
  g.cur = (int)i;
#if MSL_EMU_FAST_SWITCH
  msl_emu_ctx_switch(&g.sched_sp, f->sp);
#else
  swapcontext(&g.sched_ctx, &f->ctx);
#endif
  g.cur = -1;
  if (g.err) std::rethrow_exception(g.err);
  if (!g.fatal.empty()) emu_fail(g.fatal);
}

// One scheduling step of simdgroup s: run every runnable lane (in `lanes` order) until it blocks or yields;
// if no lane was runnable, resolve one pending SIMD collective.  Returns false when the simdgroup is stuck
// (all lanes at a threadgroup barrier or done).
MSL_NOINSTR inline bool step_sg(Group& g, uint32_t s, const std::vector<uint32_t>& lanes) {
  bool ran = false;
  for (uint32_t i : lanes) {
    if (g.fibers[i].st != RUNNABLE) continue;
    run_fiber(g, i);
    ran = true;
  }
  if (ran) return true;
  const uint32_t lo = s * kSimdWidth, hi = std::min(g.nthreads, lo + kSimdWidth);
  int first = -1;
  for (uint32_t i = lo; i < hi; ++i) if (g.fibers[i].st == AT_COLLECTIVE) { first = (int)i; break; }
  if (first < 0) return false;
  const Site site = g.fibers[first].site;
  uint32_t mask = 0, live = 0;
  for (uint32_t i = lo; i < hi; ++i) {
    if (g.fibers[i].st != DONE) live |= 1u << (i - lo);
    if (g.fibers[i].st == AT_COLLECTIVE && g.fibers[i].site == site) mask |= 1u << (i - lo);
  }
  if (mask != live) g.stats->partial_collectives++;
  SimdGroupState& sg = g.sgs[s];
  sg.mask = mask;
  for (uint32_t i = lo; i < hi; ++i)
    if (mask & (1u << (i - lo))) { std::memcpy(sg.gathered[i - lo], g.fibers[i].slot, kSlotBytes); g.fibers[i].st = RUNNABLE; }
  const Fiber& f0 = g.fibers[first];
  if (f0.coll_kind == COLL_SIMD_BARRIER && (g.race != RACE_STRICT || (f0.flags & kMemThreadgroup))) g.sg_epoch[s]++;
  g.stats->collectives++;
  return true;
}

// Run one threadgroup to completion.  Scheduling orders (re-drawn at every threadgroup barrier, "phase"):
//   forward    simdgroups in ascending order, each runs ahead to the next threadgroup barrier before the next
//              one starts; lanes ascending, each lane runs until it blocks (barrier / collective)
//   reverse    the same with simdgroups and lanes descending
//   shuffle    the same with a seeded random simdgroup order and random lane order per simdgroup
//   runahead   one seeded-random simdgroup runs ahead to the barrier, then the others advance interleaved
//   interleave simdgroups advance round-robin one step (collective) at a time; in instrumented builds lanes
//              also switch at every threadgroup-memory access (closest to lockstep SIMD execution)
MSL_NOINSTR inline void run_group(Group& g, int order, uint32_t seed) {
  const uint32_t n = g.nthreads;
  const uint32_t nsg = (n + kSimdWidth - 1) / kSimdWidth;
  if (g.stacks.size() < n) {
    for (size_t i = g.stacks.size(); i < n; ++i) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) emu_fail("mmap stack failed");
      g.stacks.push_back((char*)p);
    }
  }
  g.fibers.assign(n, Fiber{});
  g.fib = g.fibers.data();
  g.sgs.resize(nsg);
  std::memset(g.owner, 0, std::min(kTgArenaBytes, g.arena_used + kTgRedzone) * sizeof(uint16_t));
  g.arena_used = 0; g.metal_used = 0; g.tg_vars.clear();
  std::memset(g.arena, kTgPoison, sizeof(g.arena));  // poison: NaN for floats, -1 for ints
  g.err = nullptr;
  g.fatal.clear();
  g.reports.clear(); g.report_keys.clear();
  g.epoch = g.epoch0 = ++g_epoch_ctr;
  g.sg_epoch.assign(nsg, 1);
  g.sg_ep = g.sg_epoch.data();
  g.yield_tg = (order == ORDER_INTERLEAVE) && g.instrumented;
  for (uint32_t i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    f.linear = i; f.simd_gid = i / kSimdWidth; f.simd_lid = i % kSimdWidth;
    f.pos[0] = i % g.tg_size[0]; f.pos[1] = (i / g.tg_size[0]) % g.tg_size[1]; f.pos[2] = i / (g.tg_size[0] * g.tg_size[1]);
    f.stack = g.stacks[i];
    fiber_init(g, f, g.stacks[i]);
  }
  Rng rng{seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull};
  std::vector<uint32_t> sgorder(nsg);
  std::vector<std::vector<uint32_t>> lanes(nsg);
  GroupScope scope(&g);
  for (;;) {
    // ---- orders for this phase
    for (uint32_t s = 0; s < nsg; ++s) {
      sgorder[s] = order == ORDER_REVERSE ? nsg - 1 - s : s;
      const uint32_t lo = s * kSimdWidth, hi = std::min(n, lo + kSimdWidth);
      lanes[s].clear();
      for (uint32_t i = lo; i < hi; ++i) lanes[s].push_back(order == ORDER_REVERSE ? hi - 1 - (i - lo) : i);
      if (order == ORDER_SHUFFLE || order == ORDER_RUNAHEAD) rng.shuffle(lanes[s]);
    }
    if (order == ORDER_SHUFFLE || order == ORDER_RUNAHEAD) rng.shuffle(sgorder);
    // ---- run until every thread waits at a threadgroup barrier or is done
    if (order == ORDER_INTERLEAVE || order == ORDER_RUNAHEAD) {
      if (order == ORDER_RUNAHEAD) { const uint32_t s = sgorder[0]; while (step_sg(g, s, lanes[s])) {} }
      bool any = true;
      while (any) {
        any = false;
        for (uint32_t s : sgorder) any |= step_sg(g, s, lanes[s]);
      }
    } else {
      for (uint32_t s : sgorder) while (step_sg(g, s, lanes[s])) {}
    }
    // ---- threadgroup barrier: all live fibers must be waiting at the same barrier
    std::string rz = check_redzones(g);
    if (!rz.empty()) emu_fail(rz);
    int first = -1; uint32_t waiting = 0, done = 0;
    for (uint32_t i = 0; i < n; ++i) {
      if (g.fibers[i].st == AT_BARRIER) { waiting++; if (first < 0) first = (int)i; }
      else if (g.fibers[i].st == DONE) done++;
    }
    if (waiting == 0) break;  // all done
    const Site site = g.fibers[first].site;
    for (uint32_t i = 0; i < n; ++i)
      if (g.fibers[i].st == AT_BARRIER && !(g.fibers[i].site == site))
        emu_fail("divergent threadgroup_barrier: thread " + std::to_string(first) + " waits at " + site.str() +
                 " but thread " + std::to_string(i) + " waits at " + g.fibers[i].site.str());
    if (done) {
      g.stats->exited_before_barrier++;
      if (g.strict_barrier)
        emu_fail(std::to_string(done) + " thread(s) returned before threadgroup_barrier at " + site.str() + " (undefined behaviour in Metal)");
    }
    if (g.race != RACE_STRICT || (g.fibers[first].flags & kMemThreadgroup)) g.epoch = ++g_epoch_ctr;
    for (uint32_t i = 0; i < n; ++i) if (g.fibers[i].st == AT_BARRIER) g.fibers[i].st = RUNNABLE;
    g.stats->barriers++;
  }
}

// ---------------------------------------------------------------- argument binding
template <class P> P make_builtin(const uint32_t v[3]) {
  using D = std::remove_cv_t<std::remove_reference_t<P>>;
  if constexpr (is_vec<D>::value) {
    D r{}; for (int i = 0; i < D::size && i < 3; ++i) r[i] = typename D::value_type(v[i]); return r;
  } else return D(v[0]);
}

template <class P> MSL_NOINSTR P bind_arg(const ArgSpec& s, Group& g, Fiber& f) {
  RtGuard rg;
  const Launch& L = *g.launch;
  using D = std::remove_reference_t<P>;
  uint32_t v[3] = {0, 0, 0};
  switch (s.kind) {
    case ARG_BUFFER: {
      void* p = (s.index < L.nbuf) ? L.buffers[s.index] : nullptr;
      if constexpr (std::is_pointer_v<D>) return reinterpret_cast<D>(p);
      else if constexpr (std::is_reference_v<P>) {
        // unbound (e.g. gated by a false function_constant): bind to poison bytes, as reading it is UB on Metal
        alignas(64) static unsigned char poison[4096];
        static bool init = (std::memset(poison, 0xff, sizeof(poison)), true); (void)init;
        static_assert(sizeof(D) <= sizeof(poison));
        if (!p) p = poison;
        return static_cast<P>(*reinterpret_cast<D*>(p));
      } else {
        if (!p) emu_fail("buffer(" + std::to_string(s.index) + ") not set");
#if defined(MSL_EMU_INSTRUMENT)
        on_access((uintptr_t)p, sizeof(D), false, (uintptr_t)__builtin_return_address(0), true);  // by-value copy is a load
#endif
        return D(*reinterpret_cast<D*>(p));
      }
    }
    case ARG_THREADGROUP_MEM: {
      if constexpr (std::is_pointer_v<D>) {
        if (s.index >= L.ntgmem) emu_fail("threadgroup(" + std::to_string(s.index) + ") length not set");
        return reinterpret_cast<D>(tg_var_dyn(g, s.index, L.tg_mem_sizes[s.index]));
      } else emu_fail("threadgroup(N) parameter must be a pointer");
    }
    case ARG_THREAD_POSITION_IN_GRID: for (int i = 0; i < 3; ++i) v[i] = g.tg_pos[i] * L.tptg[i] + f.pos[i]; break;
    case ARG_THREAD_POSITION_IN_THREADGROUP: for (int i = 0; i < 3; ++i) v[i] = f.pos[i]; break;
    case ARG_THREAD_INDEX_IN_THREADGROUP: v[0] = f.linear; break;
    case ARG_THREADGROUP_POSITION_IN_GRID: for (int i = 0; i < 3; ++i) v[i] = g.tg_pos[i]; break;
    case ARG_THREADS_PER_GRID: for (int i = 0; i < 3; ++i) v[i] = L.threads_per_grid[i]; break;
    case ARG_THREADS_PER_THREADGROUP: for (int i = 0; i < 3; ++i) v[i] = g.tg_size[i]; break;
    case ARG_DISPATCH_THREADS_PER_THREADGROUP: for (int i = 0; i < 3; ++i) v[i] = L.tptg[i]; break;
    case ARG_THREADGROUPS_PER_GRID: for (int i = 0; i < 3; ++i) v[i] = L.grid_tgs[i]; break;
    case ARG_THREAD_INDEX_IN_SIMDGROUP: v[0] = f.simd_lid; break;
    case ARG_SIMDGROUP_INDEX_IN_THREADGROUP: v[0] = f.simd_gid; break;
    case ARG_SIMDGROUPS_PER_THREADGROUP: v[0] = (g.nthreads + kSimdWidth - 1) / kSimdWidth; break;
    case ARG_THREADS_PER_SIMDGROUP: v[0] = kSimdWidth; break;
    case ARG_QUADGROUP_INDEX_IN_THREADGROUP: v[0] = f.linear / 4; break;
    case ARG_THREAD_INDEX_IN_QUADGROUP: v[0] = f.linear % 4; break;
    case ARG_GRID_ORIGIN: break;  // always (0, 0, 0) for compute dispatches
    default: emu_fail("kernel parameter without a supported [[attribute]]");
  }
  if constexpr (std::is_pointer_v<D> || std::is_reference_v<P>) { emu_fail("builtin bound to pointer/reference"); }
  else return make_builtin<P>(v);
}

}  // namespace msl_emu
