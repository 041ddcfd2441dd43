// msl_emu.h -- compile Metal Shading Language compute kernels as C++20 on Linux
// and run them with cooperative fibers (one fiber per GPU thread).  Part of tqmetal's test suite
// (tests/mslemu/README.md).  Kernel sources are first passed through tests/mslemu/rewrite.py, which
//  * records each kernel's [[buffer(N)]] / builtin attributes in an ArgSpec table,
//  * turns `threadgroup T x[N];` object declarations into shared per-threadgroup storage,
//  * turns `constant T x [[function_constant(N)]];` into runtime-settable globals,
//  * turns `template [[host_name(..)]] [[kernel]] ...;` instantiations into registrations,
//  * strips remaining MSL attributes.
// The runtime (scheduler, barriers, collectives, instrumentation hooks) is in msl_emu_runtime.h.
#pragma once
#include <algorithm>
#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <ctime>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <source_location>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>
#include <sys/mman.h>

#ifndef __METAL_VERSION__
#define __METAL_VERSION__ 320
#endif
#define __HAVE_BFLOAT__ 1
#define __METAL_MSL_EMU__ 1

// ---------------------------------------------------------------- address spaces / qualifiers
#define device
#define constant
#define thread
#define threadgroup
#define threadgroup_imageblock
#define ray_data
#define object_data
#define kernel
#define METAL_FUNC inline __attribute__((always_inline))
#define METAL_INTERNAL
#define __METAL_FAST_MATH__ 1
#define __METAL_PRECISE_MATH__ 0
#define __METAL_MAYBE_FAST_MATH__ 1

#define M_E_F 2.718281828459045f
#define M_E_H half(2.718281828459045f)
#define M_LOG2E_F 1.4426950408889634f
#define M_LOG2E_H half(1.4426950408889634f)
#define M_LOG10E_F 0.4342944819032518f
#define M_LOG10E_H half(0.4342944819032518f)
#define M_LN2_F 0.6931471805599453f
#define M_LN2_H half(0.6931471805599453f)
#define M_LN10_F 2.302585092994046f
#define M_LN10_H half(2.302585092994046f)
#define M_PI_F 3.141592653589793f
#define M_PI_H half(3.141592653589793f)
#define M_PI_2_F 1.5707963267948966f
#define M_PI_2_H half(1.5707963267948966f)
#define M_PI_4_F 0.7853981633974483f
#define M_PI_4_H half(0.7853981633974483f)
#define M_1_PI_F 0.3183098861837907f
#define M_1_PI_H half(0.3183098861837907f)
#define M_2_PI_F 0.6366197723675814f
#define M_2_PI_H half(0.6366197723675814f)
#define M_2_SQRTPI_F 1.1283791670955126f
#define M_2_SQRTPI_H half(1.1283791670955126f)
#define M_SQRT2_F 1.4142135623730951f
#define M_SQRT2_H half(1.4142135623730951f)
#define M_SQRT1_2_F 0.7071067811865476f
#define M_SQRT1_2_H half(0.7071067811865476f)
#ifndef MAXFLOAT
#define MAXFLOAT 0x1.fffffep+127f
#endif
#define MAXHALF half(65504.0f)

// ---------------------------------------------------------------- scalar types
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;

namespace msl_emu {
// bfloat: storage = upper 16 bits of an IEEE float; round-to-nearest-even on conversion.
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  static constexpr uint16_t from_float(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  template <class S, std::enable_if_t<std::is_arithmetic_v<S>, int> = 0>
  constexpr bfloat(S v) : bits(from_float(float(v))) {}
  constexpr operator float() const { return std::bit_cast<float>(uint32_t(bits) << 16); }
};
}  // namespace msl_emu
typedef msl_emu::bfloat bfloat;

// ---------------------------------------------------------------- vectors
namespace msl_emu {
template <class T, int N> struct vec;
template <class T> struct is_vec : std::false_type {};
template <class T, int N> struct is_vec<vec<T, N>> : std::true_type {};
template <class T> struct vec_size : std::integral_constant<int, 1> {};
template <class T, int N> struct vec_size<vec<T, N>> : std::integral_constant<int, N> {};
template <class T> struct vec_elem { using type = T; };
template <class T, int N> struct vec_elem<vec<T, N>> { using type = T; };
template <class T> constexpr bool is_scalar_v = std::is_arithmetic_v<T> || std::is_same_v<T, bfloat> || std::is_same_v<T, half>;

template <class T, int N> struct vec_storage;
template <class T> struct vec_storage<T, 2> { T x, y; };
template <class T> struct vec_storage<T, 3> { T x, y, z; T _pad; };  // Metal: size/align of 4 elements
template <class T> struct vec_storage<T, 4> { T x, y, z, w; };

template <class T, int N>
struct alignas((N == 3 ? 4 : N) * sizeof(T)) vec : vec_storage<T, N> {
  using value_type = T;
  static constexpr int size = N;
  vec() = default;
  // scalar splat (implicit, as in MSL: float4 v = 1.0f;)
  template <class S, std::enable_if_t<is_scalar_v<S>, int> = 0>
  constexpr vec(S s) { for (int i = 0; i < N; ++i) (*this)[i] = T(s); }
  // elementwise conversion (explicit, as in MSL: float4(int4))
  template <class U, std::enable_if_t<!std::is_same_v<U, T>, int> = 0>
  constexpr explicit vec(const vec<U, N>& o) { for (int i = 0; i < N; ++i) (*this)[i] = T(o[i]); }
  // component-wise construction / concatenation: float4(a,b,c,d), float4(float2, float2), ...
  template <class A, class B, class... R>
  constexpr vec(const A& a, const B& b, const R&... r) {
    static_assert(vec_size<A>::value + vec_size<B>::value + (0 + ... + vec_size<R>::value) == N,
                  "vector constructor: wrong number of components");
    int i = 0;
    put(i, a); put(i, b); (put(i, r), ...);
  }
  constexpr T& operator[](int i) { return (&this->x)[i]; }
  constexpr const T& operator[](int i) const { return (&this->x)[i]; }

 private:
  template <class A> constexpr void put(int& i, const A& a) {
    if constexpr (is_vec<A>::value) { for (int k = 0; k < A::size; ++k) (*this)[i++] = T(a[k]); }
    else (*this)[i++] = T(a);
  }

 public:
#define MSL_VEC_BINOP(op)                                                             \
  friend constexpr vec operator op(const vec& a, const vec& b) {                      \
    vec r; for (int i = 0; i < N; ++i) r[i] = T(a[i] op b[i]); return r; }            \
  constexpr vec& operator op##=(const vec& b) { return *this = *this op b; }
  MSL_VEC_BINOP(+) MSL_VEC_BINOP(-) MSL_VEC_BINOP(*) MSL_VEC_BINOP(/)
#undef MSL_VEC_BINOP
#define MSL_VEC_IBINOP(op)                                                            \
  template <class TT = T, std::enable_if_t<std::is_integral_v<TT>, int> = 0>          \
  friend constexpr vec operator op(const vec& a, const vec& b) {                      \
    vec r; for (int i = 0; i < N; ++i) r[i] = T(a[i] op b[i]); return r; }            \
  template <class TT = T, std::enable_if_t<std::is_integral_v<TT>, int> = 0>          \
  constexpr vec& operator op##=(const vec& b) { return *this = *this op b; }
  MSL_VEC_IBINOP(%) MSL_VEC_IBINOP(&) MSL_VEC_IBINOP(|) MSL_VEC_IBINOP(^) MSL_VEC_IBINOP(<<) MSL_VEC_IBINOP(>>)
#undef MSL_VEC_IBINOP
#define MSL_VEC_CMP(op)                                                               \
  friend constexpr vec<bool, N> operator op(const vec& a, const vec& b) {             \
    vec<bool, N> r; for (int i = 0; i < N; ++i) r[i] = (a[i] op b[i]); return r; }
  MSL_VEC_CMP(==) MSL_VEC_CMP(!=) MSL_VEC_CMP(<) MSL_VEC_CMP(>) MSL_VEC_CMP(<=) MSL_VEC_CMP(>=)
#undef MSL_VEC_CMP
  friend constexpr vec operator-(const vec& a) { vec r; for (int i = 0; i < N; ++i) r[i] = T(-a[i]); return r; }
  friend constexpr vec operator+(const vec& a) { return a; }
};
}  // namespace msl_emu

#define MSL_VEC_TYPEDEFS(T, name)                 \
  typedef msl_emu::vec<T, 2> name##2;             \
  typedef msl_emu::vec<T, 3> name##3;             \
  typedef msl_emu::vec<T, 4> name##4;
MSL_VEC_TYPEDEFS(float, float) MSL_VEC_TYPEDEFS(half, half) MSL_VEC_TYPEDEFS(bfloat, bfloat)
MSL_VEC_TYPEDEFS(int, int) MSL_VEC_TYPEDEFS(uint, uint) MSL_VEC_TYPEDEFS(short, short)
MSL_VEC_TYPEDEFS(ushort, ushort) MSL_VEC_TYPEDEFS(char, char) MSL_VEC_TYPEDEFS(uchar, uchar)
MSL_VEC_TYPEDEFS(bool, bool) MSL_VEC_TYPEDEFS(long, long) MSL_VEC_TYPEDEFS(ulong, ulong)
#undef MSL_VEC_TYPEDEFS

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wliteral-suffix"
#ifdef __clang__
#pragma clang diagnostic ignored "-Wuser-defined-literals"
#endif
constexpr half operator"" h(long double v) { return half(float(v)); }
constexpr half operator"" h(unsigned long long v) { return half(float(v)); }
constexpr bfloat operator"" bf(long double v) { return bfloat(float(v)); }
constexpr bfloat operator"" bf(unsigned long long v) { return bfloat(float(v)); }
#pragma GCC diagnostic pop

// ---------------------------------------------------------------- runtime: fibers, barriers, collectives, hooks
#include "msl_emu_runtime.h"

namespace msl_emu {
struct KernelEntry {
  std::string name;
  void (*body)(Group&, Fiber&);  // calls the kernel with bound args for the current fiber
  const ArgSpec* spec; size_t nspec;
};
inline std::vector<KernelEntry>& registry() { static std::vector<KernelEntry> r; return r; }

template <auto F, const ArgSpec* Spec, size_t NSpec> struct Thunk;
template <class... P, void (*F)(P...), const ArgSpec* Spec, size_t NSpec> struct Thunk<F, Spec, NSpec> {
  static_assert(sizeof...(P) == NSpec, "ArgSpec table does not match kernel parameter count");
  template <size_t... I> static void call(Group& g, Fiber& f, std::index_sequence<I...>) {
    F(bind_arg<P>(Spec[I], g, f)...);
  }
  static void body(Group& g, Fiber& f) { call(g, f, std::index_sequence_for<P...>{}); }
};
struct Registrar {
  Registrar(const char* name, void (*body)(Group&, Fiber&), const ArgSpec* spec, size_t n) { registry().push_back({name, body, spec, n}); }
};

// function constants
struct FCEntry { int index; const char* name; void* ptr; int size; char tag; bool defined; };
inline std::vector<FCEntry>& fc_registry() { static std::vector<FCEntry> r; return r; }
template <class T> constexpr char fc_tag() {
  if constexpr (std::is_same_v<T, bool>) return 'b';
  else if constexpr (std::is_same_v<T, float>) return 'f';
  else if constexpr (std::is_same_v<T, half>) return 'e';
  else if constexpr (std::is_integral_v<T> && std::is_signed_v<T>) return sizeof(T) == 4 ? 'i' : sizeof(T) == 2 ? 'h' : sizeof(T) == 1 ? 'c' : 'q';
  else if constexpr (std::is_integral_v<T>) return sizeof(T) == 4 ? 'I' : sizeof(T) == 2 ? 'H' : sizeof(T) == 1 ? 'B' : 'Q';
  else return '?';
}
struct FCReg {
  template <class T> FCReg(int index, const char* name, T* ptr) {
    fc_registry().push_back({index, name, (void*)ptr, (int)sizeof(T), fc_tag<T>(), false});
  }
};
MSL_NOINSTR inline bool fc_defined(const void* p) {
  RtGuard rg;
  for (auto& e : fc_registry()) if (e.ptr == p) return e.defined;
  return false;
}
}  // namespace msl_emu

#define MSL_CAT_(a, b) a##b
#define MSL_CAT(a, b) MSL_CAT_(a, b)
#define MSL_FUNCTION_CONSTANT(T, name, idx) \
  static T name{};                           \
  static ::msl_emu::FCReg MSL_CAT(__msl_fcreg_, name)(idx, #name, &name);
#define is_function_constant_defined(x) (::msl_emu::fc_defined(&(x)))
#define MSL_TG_VAR(name, ...)          \
  static char __msl_tgkey_##name;      \
  auto& name = ::msl_emu::tg_var<__VA_ARGS__>(&__msl_tgkey_##name, #name, #__VA_ARGS__)
// explicit instantiation + registration: host name, kernel template name, template-id
#define MSL_INSTANTIATE(hostname, fn, ...)                                                               \
  static ::msl_emu::Registrar MSL_CAT(__msl_reg_, __COUNTER__)(                                          \
      hostname, &::msl_emu::Thunk<&__VA_ARGS__, __msl_spec_##fn, sizeof(__msl_spec_##fn) / sizeof(::msl_emu::ArgSpec)>::body, \
      __msl_spec_##fn, sizeof(__msl_spec_##fn) / sizeof(::msl_emu::ArgSpec));
#define MSL_REGISTER_PLAIN(fn)                                                                           \
  static ::msl_emu::Registrar MSL_CAT(__msl_reg_, __COUNTER__)(                                          \
      #fn, &::msl_emu::Thunk<&fn, __msl_spec_##fn, sizeof(__msl_spec_##fn) / sizeof(::msl_emu::ArgSpec)>::body, \
      __msl_spec_##fn, sizeof(__msl_spec_##fn) / sizeof(::msl_emu::ArgSpec));

// ---------------------------------------------------------------- metal:: standard library subset
namespace metal {
using msl_emu::vec;
// metal_type_traits subset
using std::enable_if; using std::enable_if_t; using std::is_same; using std::is_same_v; using std::conditional;
using std::conditional_t; using std::remove_cv; using std::remove_cv_t; using std::integral_constant; using std::true_type;
using std::false_type; using std::is_integral; using std::is_integral_v; using std::is_signed; using std::is_signed_v;
using std::is_unsigned; using std::is_unsigned_v; using std::is_convertible; using std::is_convertible_v; using std::declval;
using std::make_unsigned; using std::make_unsigned_t; using std::make_signed; using std::make_signed_t; using std::is_pointer_v;
using std::remove_reference_t; using std::is_arithmetic; using std::decay_t; using std::bool_constant;
template <class T> struct is_floating_point : std::bool_constant<std::is_floating_point_v<T> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>> {};
template <class T> constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T> struct is_scalar : std::bool_constant<msl_emu::is_scalar_v<T>> {};
template <class T> constexpr bool is_scalar_v = is_scalar<T>::value;
template <class T> struct remove_addrspace { using type = T; };
template <class T> using remove_addrspace_t = T;
template <class T> struct is_arithmetic_ext : std::bool_constant<msl_emu::is_scalar_v<T>> {};
using ::half;
using ::bfloat;

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

inline void threadgroup_barrier(mem_flags f = mem_flags::mem_none, const std::source_location loc = std::source_location::current()) {
  msl_emu::barrier_wait(loc, int(f));
}
// A SIMD-group execution barrier; for the race detector it orders the memory accesses of the lanes of this
// simdgroup (with RACE_STRICT only when `f` includes mem_threadgroup).
inline void simdgroup_barrier(mem_flags f = mem_flags::mem_none, const std::source_location loc = std::source_location::current()) {
  struct Empty { char c; };
  (void)msl_emu::simd_allgather(Empty{0}, loc, msl_emu::COLL_SIMD_BARRIER, int(f));
}

template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr half max() { return half(65504.0f); }
  static constexpr half min() { return half(6.103515625e-05f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0.0009765625f); }
  static constexpr half infinity() { return half(__builtin_huge_valf()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr bfloat mk(uint16_t b) { bfloat r{}; r.bits = b; return r; }
  static constexpr bfloat max() { return mk(0x7f7f); }
  static constexpr bfloat min() { return mk(0x0080); }
  static constexpr bfloat lowest() { return mk(0xff7f); }
  static constexpr bfloat epsilon() { return mk(0x3c00); }
  static constexpr bfloat infinity() { return mk(0x7f80); }
  static constexpr bfloat quiet_NaN() { return mk(0x7fc0); }
};

template <class To, class From> constexpr To as_type(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: size mismatch");
  return std::bit_cast<To>(x);
}

namespace detail {
template <class T, class F> constexpr T map1(const T& x, F f) {
  if constexpr (msl_emu::is_vec<T>::value) { T r; for (int i = 0; i < T::size; ++i) r[i] = typename T::value_type(f(float(x[i]))); return r; }
  else return T(f(float(x)));
}
template <class T, class F> constexpr T map2(const T& a, const T& b, F f) {
  if constexpr (msl_emu::is_vec<T>::value) { T r; for (int i = 0; i < T::size; ++i) r[i] = typename T::value_type(f(a[i], b[i])); return r; }
  else return T(f(a, b));
}
}  // namespace detail

#define MSL_UNARY_F(name, expr) \
  template <class T> inline T name(T x) { return detail::map1(x, [](float v) { return expr; }); }
MSL_UNARY_F(exp, std::exp(v)) MSL_UNARY_F(exp2, std::exp2(v)) MSL_UNARY_F(exp10, std::pow(10.0f, v))
MSL_UNARY_F(log, std::log(v)) MSL_UNARY_F(log2, std::log2(v)) MSL_UNARY_F(log10, std::log10(v))
MSL_UNARY_F(sqrt, std::sqrt(v)) MSL_UNARY_F(rsqrt, 1.0f / std::sqrt(v)) MSL_UNARY_F(fabs, std::fabs(v))
MSL_UNARY_F(sin, std::sin(v)) MSL_UNARY_F(cos, std::cos(v)) MSL_UNARY_F(tan, std::tan(v))
MSL_UNARY_F(asin, std::asin(v)) MSL_UNARY_F(acos, std::acos(v)) MSL_UNARY_F(atan, std::atan(v))
MSL_UNARY_F(sinh, std::sinh(v)) MSL_UNARY_F(cosh, std::cosh(v)) MSL_UNARY_F(tanh, std::tanh(v))
MSL_UNARY_F(asinh, std::asinh(v)) MSL_UNARY_F(acosh, std::acosh(v)) MSL_UNARY_F(atanh, std::atanh(v))
MSL_UNARY_F(floor, std::floor(v)) MSL_UNARY_F(ceil, std::ceil(v)) MSL_UNARY_F(round, std::round(v))
MSL_UNARY_F(trunc, std::trunc(v)) MSL_UNARY_F(rint, std::rint(v)) MSL_UNARY_F(erf, std::erf(v))
MSL_UNARY_F(fract, std::fmin(v - std::floor(v), 0x1.fffffep-1f)) MSL_UNARY_F(saturate, std::fmin(std::fmax(v, 0.0f), 1.0f))
MSL_UNARY_F(sinpi, std::sin(float(M_PI) * v)) MSL_UNARY_F(cospi, std::cos(float(M_PI) * v)) MSL_UNARY_F(tanpi, std::tan(float(M_PI) * v))
#undef MSL_UNARY_F
template <class T> inline T abs(T x) {
  if constexpr (msl_emu::is_vec<T>::value) { T r; for (int i = 0; i < T::size; ++i) r[i] = x[i] < 0 ? -x[i] : x[i]; return r; }
  else return x < T(0) ? T(-x) : x;
}
template <class T> inline T max(T a, T b) { return detail::map2(a, b, [](auto x, auto y) { return x > y ? x : y; }); }
template <class T> inline T min(T a, T b) { return detail::map2(a, b, [](auto x, auto y) { return x < y ? x : y; }); }
template <class T> inline T fmax(T a, T b) { return detail::map2(a, b, [](auto x, auto y) { return decltype(x)(std::fmax(float(x), float(y))); }); }
template <class T> inline T fmin(T a, T b) { return detail::map2(a, b, [](auto x, auto y) { return decltype(x)(std::fmin(float(x), float(y))); }); }
template <class T> inline T pow(T a, T b) { return detail::map2(a, b, [](auto x, auto y) { return decltype(x)(std::pow(float(x), float(y))); }); }
template <class T> inline T powr(T a, T b) { return pow(a, b); }
template <class T> inline T fmod(T a, T b) { return detail::map2(a, b, [](auto x, auto y) { return decltype(x)(std::fmod(float(x), float(y))); }); }
template <class T> inline T atan2(T a, T b) { return detail::map2(a, b, [](auto x, auto y) { return decltype(x)(std::atan2(float(x), float(y))); }); }
template <class T> inline T copysign(T a, T b) { return detail::map2(a, b, [](auto x, auto y) { return decltype(x)(std::copysign(float(x), float(y))); }); }
template <class T> inline T fma(T a, T b, T c) { return a * b + c; }
template <class T, class U> inline T clamp(T x, U lo, U hi) { return min(max(x, T(lo)), T(hi)); }
template <class T, class U> inline T mix(T x, T y, U a) { return x + (y - x) * T(a); }
template <class T> inline T sign(T x) { return detail::map1(x, [](float v) { return v > 0 ? 1.0f : v < 0 ? -1.0f : 0.0f; }); }
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N> inline vec<T, N> select(vec<T, N> a, vec<T, N> b, vec<bool, N> c) { vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i]; return r; }
template <class T> inline bool isnan(T x) { return std::isnan(float(x)); }
template <class T> inline bool isinf(T x) { return std::isinf(float(x)); }
template <class T> inline bool isfinite(T x) { return std::isfinite(float(x)); }
template <class T> inline bool signbit(T x) { return std::signbit(float(x)); }
template <int N> inline bool all(vec<bool, N> v) { for (int i = 0; i < N; ++i) if (!v[i]) return false; return true; }
template <int N> inline bool any(vec<bool, N> v) { for (int i = 0; i < N; ++i) if (v[i]) return true; return false; }
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
template <class T, int N> inline T dot(vec<T, N> a, vec<T, N> b) { T s = 0; for (int i = 0; i < N; ++i) s += a[i] * b[i]; return s; }
template <class T> inline T popcount(T x) { return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x)); }
template <class T> inline T divide(T a, T b) { return a / b; }
template <class T> inline T median3(T a, T b, T c) { return max(min(a, b), min(max(a, b), c)); }
template <class T> inline T max3(T a, T b, T c) { return max(max(a, b), c); }
template <class T> inline T min3(T a, T b, T c) { return min(min(a, b), c); }
template <class T> inline T fmax3(T a, T b, T c) { return fmax(fmax(a, b), c); }
template <class T> inline T fmin3(T a, T b, T c) { return fmin(fmin(a, b), c); }
template <class T> inline T fmedian3(T a, T b, T c) { return median3(a, b, c); }
template <class T> inline T ldexp(T x, int e) { return T(std::ldexp(float(x), e)); }
template <class T> inline T frexp(T x, thread int& e) { return T(std::frexp(float(x), &e)); }
template <class T> inline T nextafter(T a, T b) { return T(std::nextafter(float(a), float(b))); }

// ---- SIMD-group functions (collectives over the active lanes of the simdgroup)
#define MSL_LOC const std::source_location loc = std::source_location::current()
template <class T> inline T simd_sum(T x, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); T s = T(0);
  for (int l = 0; l < msl_emu::kSimdWidth; ++l) if (g.mask >> l & 1) s = s + g.v[l];
  return s;
}
template <class T> inline T simd_product(T x, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); T s = T(1);
  for (int l = 0; l < msl_emu::kSimdWidth; ++l) if (g.mask >> l & 1) s = s * g.v[l];
  return s;
}
template <class T> inline T simd_max(T x, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); bool first = true; T s = x;
  for (int l = 0; l < msl_emu::kSimdWidth; ++l) if (g.mask >> l & 1) { s = first ? g.v[l] : max(s, g.v[l]); first = false; }
  return s;
}
template <class T> inline T simd_min(T x, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); bool first = true; T s = x;
  for (int l = 0; l < msl_emu::kSimdWidth; ++l) if (g.mask >> l & 1) { s = first ? g.v[l] : min(s, g.v[l]); first = false; }
  return s;
}
#define MSL_SIMD_BITOP(name, op)                                                                     \
  template <class T> inline T name(T x, MSL_LOC) {                                                    \
    using B = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, std::conditional_t<sizeof(T) == 2, uint16_t, uint8_t>>>; \
    auto g = msl_emu::simd_allgather(x, loc); bool first = true; B s = 0;                            \
    for (int l = 0; l < msl_emu::kSimdWidth; ++l) if (g.mask >> l & 1) { B v; std::memcpy(&v, &g.v[l], sizeof(B)); s = first ? v : B(s op v); first = false; } \
    T r; std::memcpy(&r, &s, sizeof(T)); return r; }
MSL_SIMD_BITOP(simd_and, &) MSL_SIMD_BITOP(simd_or, |) MSL_SIMD_BITOP(simd_xor, ^)
#undef MSL_SIMD_BITOP
template <class T> inline T simd_prefix_inclusive_sum(T x, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); T s = T(0); int me = msl_emu::cur_lane();
  for (int l = 0; l <= me; ++l) if (g.mask >> l & 1) s = s + g.v[l];
  return s;
}
template <class T> inline T simd_prefix_exclusive_sum(T x, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); T s = T(0); int me = msl_emu::cur_lane();
  for (int l = 0; l < me; ++l) if (g.mask >> l & 1) s = s + g.v[l];
  return s;
}
template <class T> inline T simd_prefix_inclusive_product(T x, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); T s = T(1); int me = msl_emu::cur_lane();
  for (int l = 0; l <= me; ++l) if (g.mask >> l & 1) s = s * g.v[l];
  return s;
}
template <class T> inline T simd_prefix_exclusive_product(T x, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); T s = T(1); int me = msl_emu::cur_lane();
  for (int l = 0; l < me; ++l) if (g.mask >> l & 1) s = s * g.v[l];
  return s;
}
template <class T> inline T simd_shuffle(T x, ushort lane, MSL_LOC) { auto g = msl_emu::simd_allgather(x, loc); return g.v[lane % 32]; }
template <class T> inline T simd_broadcast(T x, ushort lane, MSL_LOC) { auto g = msl_emu::simd_allgather(x, loc); return g.v[lane % 32]; }
template <class T> inline T simd_shuffle_xor(T x, ushort m, MSL_LOC) { auto g = msl_emu::simd_allgather(x, loc); return g.v[(msl_emu::cur_lane() ^ m) % 32]; }
template <class T> inline T simd_shuffle_down(T x, ushort d, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); uint32_t src = msl_emu::cur_lane() + d; return src < 32 ? g.v[src] : x; }
template <class T> inline T simd_shuffle_up(T x, ushort d, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); int src = int(msl_emu::cur_lane()) - int(d); return src >= 0 ? g.v[src] : x; }
template <class T> inline T simd_shuffle_rotate_down(T x, ushort d, MSL_LOC) { auto g = msl_emu::simd_allgather(x, loc); return g.v[(msl_emu::cur_lane() + d) % 32]; }
template <class T> inline T simd_shuffle_rotate_up(T x, ushort d, MSL_LOC) { auto g = msl_emu::simd_allgather(x, loc); return g.v[(msl_emu::cur_lane() + 32 - d % 32) % 32]; }
template <class T> inline T simd_shuffle_and_fill_down(T x, T fill, ushort d, MSL_LOC) {
  struct P { T a, b; }; auto g = msl_emu::simd_allgather(P{x, fill}, loc); uint32_t me = msl_emu::cur_lane(), src = me + d;
  return src < 32 ? g.v[src].a : g.v[src - 32].b; }
template <class T> inline T simd_shuffle_and_fill_up(T x, T fill, ushort d, MSL_LOC) {
  struct P { T a, b; }; auto g = msl_emu::simd_allgather(P{x, fill}, loc); int me = msl_emu::cur_lane(), src = me - int(d);
  return src >= 0 ? g.v[src].a : g.v[src + 32].b; }
template <class T> inline T simd_broadcast_first(T x, MSL_LOC) {
  auto g = msl_emu::simd_allgather(x, loc); for (int l = 0; l < 32; ++l) if (g.mask >> l & 1) return g.v[l]; return x; }
inline bool simd_all(bool b, MSL_LOC) { auto g = msl_emu::simd_allgather(b, loc); for (int l = 0; l < 32; ++l) if ((g.mask >> l & 1) && !g.v[l]) return false; return true; }
inline bool simd_any(bool b, MSL_LOC) { auto g = msl_emu::simd_allgather(b, loc); for (int l = 0; l < 32; ++l) if ((g.mask >> l & 1) && g.v[l]) return true; return false; }
inline bool simd_is_first(MSL_LOC) { auto g = msl_emu::simd_allgather(char(1), loc); return (uint32_t)msl_emu::cur_lane() == (uint32_t)__builtin_ctz(g.mask); }
struct simd_vote { uint64_t v; explicit simd_vote(uint64_t x) : v(x) {} explicit operator uint64_t() const { return v; } };
inline simd_vote simd_ballot(bool b, MSL_LOC) { auto g = msl_emu::simd_allgather(b, loc); uint64_t r = 0; for (int l = 0; l < 32; ++l) if ((g.mask >> l & 1) && g.v[l]) r |= 1ull << l; return simd_vote(r); }
#undef MSL_LOC

// ---- simdgroup_matrix (8x8).  Per-lane fragment layout as used by Apple GPUs / MLX steel:
//      lane l holds row fm and columns fn, fn+1 with qid=l/4, fm=(qid&4)+((l/2)%4), fn=(qid&2)*2+(l%2)*2
inline void sgm_coord(uint32_t lane, int& r, int& c) {
  int qid = lane / 4; r = (qid & 4) + ((lane / 2) % 4); c = (qid & 2) * 2 + (lane % 2) * 2;
}
template <class T, int R, int C> struct simdgroup_matrix {
  static_assert(R == 8 && C == 8, "msl_emu: only 8x8 simdgroup_matrix is supported");
  vec<T, 2> e;
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diag) {  // diagonal matrix
    int r, c; sgm_coord(msl_emu::cur_lane(), r, c);
    e[0] = (r == c) ? diag : T(0); e[1] = (r == c + 1) ? diag : T(0);
  }
  thread vec<T, 2>& thread_elements() { return e; }
  const thread vec<T, 2>& thread_elements() const { return e; }
};
template <class T, int R, int C> inline simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, R, C> m; m.e[0] = v; m.e[1] = v; return m;
}
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, class U, int R, int C>
inline void simdgroup_load(thread simdgroup_matrix<T, R, C>& d, const U* src, size_t elements_per_row = C,
                           vec<ulong, 2> origin = vec<ulong, 2>(0, 0), bool transpose = false) {
  int r, c; sgm_coord(msl_emu::cur_lane(), r, c);
  for (int k = 0; k < 2; ++k) {
    size_t rr = origin[1] + (transpose ? c + k : r), cc = origin[0] + (transpose ? r : c + k);
    d.e[k] = T(src[rr * elements_per_row + cc]);
  }
}
template <class T, class U, int R, int C>
inline void simdgroup_store(const thread simdgroup_matrix<T, R, C>& m, U* dst, size_t elements_per_row = C,
                            vec<ulong, 2> origin = vec<ulong, 2>(0, 0), bool transpose = false) {
  int r, c; sgm_coord(msl_emu::cur_lane(), r, c);
  for (int k = 0; k < 2; ++k) {
    size_t rr = origin[1] + (transpose ? c + k : r), cc = origin[0] + (transpose ? r : c + k);
    dst[rr * elements_per_row + cc] = U(m.e[k]);
  }
}
template <class TD, class TA, class TB, class TC>
inline void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, 8, 8>& d, const thread simdgroup_matrix<TA, 8, 8>& a,
                                          const thread simdgroup_matrix<TB, 8, 8>& b, const thread simdgroup_matrix<TC, 8, 8>& c,
                                          const std::source_location loc = std::source_location::current()) {
  struct P { vec<TA, 2> a; vec<TB, 2> b; vec<TC, 2> c; };
  auto g = msl_emu::simd_allgather(P{a.e, b.e, c.e}, loc);
  if (g.mask != 0xffffffffu) msl_emu::emu_fail("simdgroup_multiply_accumulate executed by a partial simdgroup");
  float A[8][8], B[8][8], Cm[8][8];
  for (uint32_t l = 0; l < 32; ++l) {
    int r, cc; sgm_coord(l, r, cc);
    for (int k = 0; k < 2; ++k) { A[r][cc + k] = float(g.v[l].a[k]); B[r][cc + k] = float(g.v[l].b[k]); Cm[r][cc + k] = float(g.v[l].c[k]); }
  }
  int r, cc; sgm_coord(msl_emu::cur_lane(), r, cc);
  for (int k = 0; k < 2; ++k) {
    float s = Cm[r][cc + k];
    for (int j = 0; j < 8; ++j) s = std::fma(A[r][j], B[j][cc + k], s);
    d.e[k] = TD(s);
  }
}
template <class TD, class TA, class TB>
inline void simdgroup_multiply(thread simdgroup_matrix<TD, 8, 8>& d, const thread simdgroup_matrix<TA, 8, 8>& a,
                               const thread simdgroup_matrix<TB, 8, 8>& b, const std::source_location loc = std::source_location::current()) {
  simdgroup_matrix<TD, 8, 8> z = make_filled_simdgroup_matrix<TD, 8, 8>(TD(0));
  simdgroup_multiply_accumulate(d, a, b, z, loc);
}

namespace fast { using ::metal::exp; using ::metal::exp2; using ::metal::exp10; using ::metal::log; using ::metal::log2; using ::metal::log10; using ::metal::sqrt; using ::metal::rsqrt; using ::metal::fabs; using ::metal::sin; using ::metal::cos; using ::metal::tan; using ::metal::asin; using ::metal::acos; using ::metal::atan; using ::metal::sinh; using ::metal::cosh; using ::metal::tanh; using ::metal::asinh; using ::metal::acosh; using ::metal::atanh; using ::metal::floor; using ::metal::ceil; using ::metal::round; using ::metal::trunc; using ::metal::rint; using ::metal::erf; using ::metal::fract; using ::metal::saturate; using ::metal::sinpi; using ::metal::cospi; using ::metal::tanpi; using ::metal::abs; using ::metal::max; using ::metal::min; using ::metal::fmax; using ::metal::fmin; using ::metal::pow; using ::metal::powr; using ::metal::fmod; using ::metal::atan2; using ::metal::copysign; using ::metal::fma; using ::metal::clamp; using ::metal::mix; using ::metal::sign; using ::metal::select; using ::metal::isnan; using ::metal::isinf; using ::metal::isfinite; using ::metal::signbit; using ::metal::divide; using ::metal::median3; using ::metal::max3; using ::metal::min3; using ::metal::fmax3; using ::metal::fmin3; using ::metal::fmedian3; using ::metal::ldexp; using ::metal::frexp; using ::metal::nextafter; }
namespace precise { using ::metal::exp; using ::metal::exp2; using ::metal::exp10; using ::metal::log; using ::metal::log2; using ::metal::log10; using ::metal::sqrt; using ::metal::rsqrt; using ::metal::fabs; using ::metal::sin; using ::metal::cos; using ::metal::tan; using ::metal::asin; using ::metal::acos; using ::metal::atan; using ::metal::sinh; using ::metal::cosh; using ::metal::tanh; using ::metal::asinh; using ::metal::acosh; using ::metal::atanh; using ::metal::floor; using ::metal::ceil; using ::metal::round; using ::metal::trunc; using ::metal::rint; using ::metal::erf; using ::metal::fract; using ::metal::saturate; using ::metal::sinpi; using ::metal::cospi; using ::metal::tanpi; using ::metal::abs; using ::metal::max; using ::metal::min; using ::metal::fmax; using ::metal::fmin; using ::metal::pow; using ::metal::powr; using ::metal::fmod; using ::metal::atan2; using ::metal::copysign; using ::metal::fma; using ::metal::clamp; using ::metal::mix; using ::metal::sign; using ::metal::select; using ::metal::isnan; using ::metal::isinf; using ::metal::isfinite; using ::metal::signbit; using ::metal::divide; using ::metal::median3; using ::metal::max3; using ::metal::min3; using ::metal::fmax3; using ::metal::fmin3; using ::metal::fmedian3; using ::metal::ldexp; using ::metal::frexp; using ::metal::nextafter; }

// ---- minimal os_log (metal_logging)
struct os_log {
  constexpr os_log(const char*, const char*) {}
  template <class... A> void log_debug(const char*, A...) const {}
  template <class... A> void log_info(const char*, A...) const {}
  template <class... A> void log_error(const char*, A...) const {}
};
}  // namespace metal

// ---- Metal compiler intrinsics used by some headers (e.g. MLX bf16_math.h)
#define MSL_INTRIN1(n) template <class T, class... M> inline T __metal_##n(T x, M...) { return metal::n(x); }
#define MSL_INTRIN2(n) template <class T, class... M> inline T __metal_##n(T x, T y, M...) { return metal::n(x, y); }
#define MSL_INTRIN3(n) template <class T, class... M> inline T __metal_##n(T x, T y, T z, M...) { return metal::n(x, y, z); }
MSL_INTRIN1(acos) MSL_INTRIN1(acosh) MSL_INTRIN1(asin) MSL_INTRIN1(asinh) MSL_INTRIN1(atan) MSL_INTRIN1(atanh)
MSL_INTRIN1(ceil) MSL_INTRIN1(cos) MSL_INTRIN1(cosh) MSL_INTRIN1(cospi) MSL_INTRIN1(exp) MSL_INTRIN1(exp10) MSL_INTRIN1(exp2)
MSL_INTRIN1(fabs) MSL_INTRIN1(floor) MSL_INTRIN1(fract) MSL_INTRIN1(log) MSL_INTRIN1(log10) MSL_INTRIN1(log2)
MSL_INTRIN1(rint) MSL_INTRIN1(round) MSL_INTRIN1(rsqrt) MSL_INTRIN1(sin) MSL_INTRIN1(sinh) MSL_INTRIN1(sinpi)
MSL_INTRIN1(sqrt) MSL_INTRIN1(tan) MSL_INTRIN1(tanh) MSL_INTRIN1(tanpi) MSL_INTRIN1(trunc)
MSL_INTRIN2(atan2) MSL_INTRIN2(divide) MSL_INTRIN2(fmax) MSL_INTRIN2(fmin) MSL_INTRIN2(fmod) MSL_INTRIN2(pow)
MSL_INTRIN2(powr) MSL_INTRIN2(nextafter) MSL_INTRIN3(fma) MSL_INTRIN3(fmax3) MSL_INTRIN3(fmin3) MSL_INTRIN3(fmedian3)
#undef MSL_INTRIN1
#undef MSL_INTRIN2
#undef MSL_INTRIN3
template <class T, class... M> inline T __metal_ldexp(T x, int e, M...) { return metal::ldexp(x, e); }
template <class T, class... M> inline T __metal_frexp(T x, int* e, M...) { return metal::frexp(x, *e); }
inline ushort __metal_get_simdgroup_size(ushort) { return 32; }
#define MSL_SIMDI(n) template <class T, class... A> inline T __metal_##n(T x, A... a) { return metal::n(x, a...); }
MSL_SIMDI(simd_broadcast) MSL_SIMDI(simd_max) MSL_SIMDI(simd_min) MSL_SIMDI(simd_product) MSL_SIMDI(simd_sum)
MSL_SIMDI(simd_prefix_exclusive_product) MSL_SIMDI(simd_prefix_exclusive_sum) MSL_SIMDI(simd_prefix_inclusive_product)
MSL_SIMDI(simd_prefix_inclusive_sum) MSL_SIMDI(simd_shuffle) MSL_SIMDI(simd_shuffle_down) MSL_SIMDI(simd_shuffle_up)
MSL_SIMDI(simd_shuffle_rotate_down) MSL_SIMDI(simd_shuffle_rotate_up) MSL_SIMDI(simd_shuffle_xor) MSL_SIMDI(simd_xor)
#undef MSL_SIMDI
template <class T> inline T __metal_simd_shuffle_and_fill_down(T x, T f, ushort d, ushort) { return metal::simd_shuffle_and_fill_down(x, f, d); }
template <class T> inline T __metal_simd_shuffle_and_fill_up(T x, T f, ushort d, ushort) { return metal::simd_shuffle_and_fill_up(x, f, d); }
