#!/usr/bin/env bash
# Cross-compile the CPU sources for aarch64 (Linux) and check that the kernel's NEON
# path is what gets built. Compile only: nothing is linked or run.
#
#   tests/check_cross_arm64.sh            # exit 0 ok, 1 failure, 77 no cross compiler
#
# Environment:
#   CXX_AARCH64   cross compiler, arguments allowed (default: aarch64-linux-gnu-g++;
#                 Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu). Clang works too,
#                 on the same package's headers: "clang++-19 --target=aarch64-linux-gnu".
#   PYTHON        interpreter with mlx installed, for MLX's C++ headers (default: python3).
#                 The headers are platform-neutral C++, so the x86-64 wheel's copy works.
#   MLX_INCLUDE   MLX include dir (overrides PYTHON's lookup). Without MLX headers only
#                 the MLX-free sources (kernel, thread pool) are compiled.
#   XC_EXTRA_FLAGS  extra compiler flags, e.g. -D_Float16=__fp16 to try a workaround.
#   XC_KERNEL_OPT   optimization level for the kernel (default -O2; -O3 = the real build).
#   XC_OUT        where the objects go (default: a temp dir, removed on exit).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CXX="${CXX_AARCH64:-aarch64-linux-gnu-g++}"
read -ra CXXV <<<"$CXX"                # may carry arguments: "clang++-19 --target=aarch64-linux-gnu"
PY="${PYTHON:-python3}"

if ! command -v "${CXXV[0]}" >/dev/null 2>&1; then
  echo "SKIP: aarch64 cross compiler '${CXXV[0]}' not found (apt-get install g++-aarch64-linux-gnu)"
  exit 77
fi
case "${CXXV[0]}" in
  *-g++) TRIPLE_PREFIX="${CXXV[0]%g++}" ;;  # aarch64-linux-gnu-
  *) TRIPLE_PREFIX=aarch64-linux-gnu- ;;
esac
first_tool() { # the first of the given tools that exists
  local t
  for t in "$@"; do
    if command -v "$t" >/dev/null 2>&1; then echo "$t"; return; fi
  done
  echo "$1"
}
# The host's GNU objdump cannot disassemble aarch64: the cross binutils or LLVM's.
LLVM_V=({20..14})
OBJDUMP="$(first_tool "${TRIPLE_PREFIX}objdump" llvm-objdump "${LLVM_V[@]/#/llvm-objdump-}" objdump)"
READELF="$(first_tool "${TRIPLE_PREFIX}readelf" llvm-readelf "${LLVM_V[@]/#/llvm-readelf-}" readelf)"
NM="$(first_tool "${TRIPLE_PREFIX}nm" llvm-nm "${LLVM_V[@]/#/llvm-nm-}" nm)"

if [[ -n "${XC_OUT:-}" ]]; then
  OUT="$XC_OUT"
  mkdir -p "$OUT"
else
  OUT="$(mktemp -d /tmp/tqmetal-xc-arm64.XXXXXX)"
  trap 'rm -rf "$OUT"' EXIT
fi

MLX_INC="${MLX_INCLUDE:-}"
if [[ -z "$MLX_INC" ]]; then
  MLX_INC="$("$PY" -c 'import os, mlx.core as m; print(os.path.join(os.path.dirname(m.__file__), "include"))' 2>/dev/null || true)"
fi
if [[ -n "$MLX_INC" && ! -f "$MLX_INC/mlx/array.h" ]]; then
  MLX_INC=""
fi

echo "compiler: $("${CXXV[@]}" --version | head -1)"
echo "MLX headers: ${MLX_INC:-<none: host sources skipped>}"

# Off x86 CMake builds one 'generic' kernel variant with -O3 -ffp-contract=fast; -O2 here
# by default (the kernel compiles ~4x faster and the NEON intrinsics are the same).
# shellcheck disable=SC2206
EXTRA=(${XC_EXTRA_FLAGS:-})
BASE=(-std=c++20 -O2 -fPIC -Wall -Wno-psabi -I"$ROOT/csrc" "${EXTRA[@]}")
KERNEL_FLAGS=("${XC_KERNEL_OPT:--O2}" -ffp-contract=fast -DTQMETAL_ISA=generic)

failures=0
float16_hint=0
compile() { # name src flags...
  local name=$1 src=$2
  shift 2
  local obj="$OUT/$name.o" log="$OUT/$name.log"
  local t0=$SECONDS
  if "${CXXV[@]}" "${BASE[@]}" "$@" -c "$ROOT/$src" -o "$obj" >"$log" 2>&1; then
    local machine
    machine="$("$READELF" -h "$obj" | sed -n 's/^ *Machine: *//p')"
    if [[ "$machine" != "AArch64" ]]; then
      echo "FAIL $src: object is for '$machine', not AArch64"
      failures=$((failures + 1))
      return 1
    fi
    echo "ok   $src -> $(basename "$obj") ($machine, $((SECONDS - t0)) s)"
    if grep -q 'warning' "$log"; then
      echo "     warnings:"
      grep -E 'warning' "$log" | sort | uniq -c | sed 's/^/       /' | head -20
    fi
    return 0
  fi
  echo "FAIL $src ($((SECONDS - t0)) s): $CXX ${BASE[*]} $* -c $src"
  grep -E ': (fatal )?error:' "$log" | awk '!seen[$0]++' | head -20 | sed 's/^/       /'
  grep -q "_Float16" "$log" && float16_hint=1
  failures=$((failures + 1))
  return 1
}

# The kernel: needs no MLX. __ARM_NEON is on by default for aarch64; check that the
# NEON branch of widen_bytes is the one compiled (the kernel file's own preprocessed
# lines call vmovl_u8/vmovl_u16) and that the object does its byte widening with
# uxtl/ushll. (uxtl alone proves nothing:
# GCC also auto-vectorizes the scalar fallback loop into uxtl.)
if compile kernel_float csrc/cpu/kernel_float.cpp "${KERNEL_FLAGS[@]}"; then
  obj="$OUT/kernel_float.o"
  syms="$("$NM" -C "$obj")"
  if ! grep -q 'tqmetal::cpu::unit_fn_generic' <<<"$syms"; then
    echo "FAIL kernel: no tqmetal::cpu::unit_fn_generic in the object"
    failures=$((failures + 1))
  fi
  # Preprocessed lines that come from the kernels' shared header (not from arm_neon.h).
  pre="$("${CXXV[@]}" "${BASE[@]}" "${KERNEL_FLAGS[@]}" -E "$ROOT/csrc/cpu/kernel_float.cpp" |
    awk '/^# [0-9]+ "/ { f = $3; next } f ~ /kernel_common\.h"$/')"
  calls=$(grep -cE '\bvmovl(_high)?_u(8|16) *\(' <<<"$pre")
  dis="$("$OBJDUMP" -d --no-show-raw-insn "$obj")"
  widen=$(grep -cE $'\t(uxtl2?|ushll2?)\t' <<<"$dis")
  fmla=$(grep -cE $'\tfmla\t' <<<"$dis")
  echo "     NEON: $calls vmovl_u8/u16 call(s) in widen_bytes; object: $widen uxtl/ushll, $fmla fmla"
  if ((calls == 0)); then
    echo "FAIL kernel: widen_bytes' NEON branch (vmovl_u8) is not compiled (__ARM_NEON off?)"
    failures=$((failures + 1))
  fi
  if ((widen == 0)); then
    echo "FAIL kernel: no uxtl/ushll in the object: no NEON byte widening"
    failures=$((failures + 1))
  fi
fi

compile thread_pool csrc/cpu/thread_pool.cpp || true

# Host side and the op: MLX's headers (no bindings.cpp: it needs the target's Python.h).
if [[ -n "$MLX_INC" ]]; then
  for src in csrc/cpu/sdpa_int4_cpu.cpp csrc/sdpa_int4.cpp csrc/primitive.cpp; do
    name="$(basename "$src" .cpp)"
    compile "$name" "$src" -I"$MLX_INC" || true
  done
fi

if ((float16_hint)); then
  cat <<'EOF'
note: _Float16 is not a C++ type in GCC < 13 on aarch64 (GCC 13 added it to C++;
  x86-64 GCC 12 already has it). aarch64 has __fp16 (IEEE binary16, storage-only:
  arithmetic promotes to float, float<->half are single fcvt instructions), which is
  all the f16 loads/stores need, e.g.
    #if defined(__aarch64__)
    using half_t = __fp16;
    #else
    using half_t = _Float16;
    #endif
  (__FLT16_MAX__ is defined even where C++ lacks _Float16: no feature test.)
  Try it without editing: XC_EXTRA_FLAGS=-D_Float16=__fp16 tests/check_cross_arm64.sh
EOF
fi
if ((failures)); then
  echo "check_cross_arm64: $failures failure(s)"
  exit 1
fi
echo "check_cross_arm64: all ok"
