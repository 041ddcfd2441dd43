#!/usr/bin/env bash
# Run the MSL emulator tests and the project's Metal kernel tests under it in every mode
# (see tests/mslemu/README.md):
#   1. default       g++, instrumented (race detector, load counters, guards), 2 scheduling orders
#   2. full          MSLEMU_FULL=1: all scheduling orders + several seeds, heavy variants (ASan subprocess test)
#   3. clang         MSLEMU_CXX=clang++-N (newest clang >= 15 found), full
#   4. ubsan         MSLEMU_SANITIZE=undefined: UBSan on top of the instrumented build, halt on first error
#   5. asan+ubsan    MSLEMU_SANITIZE=address,undefined with the g++ runtimes preloaded (not instrumented:
#                    race/counter/guard-hook tests skip; the redzone canaries still run)
# Usage: tests/mslemu/run_full.sh [extra pytest args]     (PYTHON=/path/to/python to pick the interpreter)
# Exit status: non-zero if any mode failed.
set -u
cd "$(dirname "$0")/../.." || exit 2
PY=${PYTHON:-python3}
TESTS=(tests/test_mslemu_*.py tests/test_metal_decode.py tests/test_metal_prefill.py)
status=0
summary=()

run_mode() {
  local name=$1; shift
  echo
  echo "=================================================================== $name"
  local t0=$SECONDS
  if env "$@" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "${EXTRA[@]}"; then
    summary+=("PASS  $name ($((SECONDS - t0)) s)")
  else
    summary+=("FAIL  $name ($((SECONDS - t0)) s)")
    status=1
  fi
}

EXTRA=("$@")

run_mode "default (g++)" MSLEMU_CXX=g++
run_mode "full (g++, all orders)" MSLEMU_CXX=g++ MSLEMU_FULL=1

CLANG=""
for c in clang++-21 clang++-20 clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++; do
  if command -v "$c" >/dev/null 2>&1; then
    major=$("$c" --version | sed -n 's/.*version \([0-9]*\).*/\1/p' | head -1)
    if [ "${major:-0}" -ge 15 ]; then CLANG=$c; break; fi
  fi
done
if [ -n "$CLANG" ]; then
  run_mode "full ($CLANG)" MSLEMU_CXX="$CLANG" MSLEMU_FULL=1
else
  summary+=("SKIP  clang (no clang++ >= 15 installed)")
fi

run_mode "ubsan (g++, instrumented)" MSLEMU_CXX=g++ MSLEMU_SANITIZE=undefined \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

ASAN_RT=$(g++ -print-file-name=libasan.so)
UBSAN_RT=$(g++ -print-file-name=libubsan.so)
if [ -f "$ASAN_RT" ] && [ -f "$UBSAN_RT" ]; then
  run_mode "asan+ubsan (g++)" MSLEMU_CXX=g++ MSLEMU_SANITIZE=address,undefined \
    LD_PRELOAD="$ASAN_RT $UBSAN_RT" ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
else
  summary+=("SKIP  asan+ubsan (g++ sanitizer runtimes not installed)")
fi

echo
echo "=================================================================== summary"
printf '%s\n' "${summary[@]}"
exit $status
