#!/usr/bin/env bash
# Build tqmetal with AddressSanitizer + UndefinedBehaviorSanitizer and run the native
# op tests against that build. Any ASan/UBSan report fails the run.
#
#   PYTHON=/path/to/venv/bin/python tests/run_sanitizers.sh [extra pytest args]
#
# Environment:
#   PYTHON            interpreter whose environment has mlx, nanobind, scikit-build-core,
#                     pytest, hypothesis, numpy (default: python3). Nothing is installed
#                     into it: the sanitized build goes to a throwaway --target dir.
#   SANITIZE_QUICK=1  skip the long-context cases (pytest -m "not slow").
#   SANITIZE_DIR      work dir (default: build/asan; reused between runs, so a rerun only
#                     recompiles what changed). Holds src/ (the snapshot that was built:
#                     report line numbers refer to it), build/ (CMake) and site/ (the
#                     installed package), and pytest.log.
#   SANITIZE_MLX_CACHE=1  keep MLX's CPU buffer cache (default: disabled, see below).
#
# Needs: g++ with libasan/libubsan (Debian: libgcc-12-dev, pulled in by g++), cmake,
# ninja or make, git (optional: lists the files to snapshot). CPU only.
#
# The tree is copied (mtimes kept) to $SANITIZE_DIR/src first, so edits made while
# the build runs cannot mix two versions of csrc/ in one build.
#
# The kernel variants compile at -O1 in this build (CMakeLists.txt): ASan+UBSan at -O3
# takes ~4-5x longer to compile and checks the same accesses.
#
# Why the MLX buffer cache is disabled: MLX's CPU allocator (backend/no_gpu/allocator.cpp)
# mallocs every buffer as malloc(nbytes + 8) (an 8-byte size header, then the data), so
# ASan's redzone starts right after an array's last byte - but it recycles freed buffers
# through a BufferCache (32 MiB by default) that hands a request for n bytes any cached
# buffer of up to min(2n, n + 8 KiB) bytes. A read past the end of an array living in a
# recycled buffer lands in valid memory and ASan stays silent. mx.set_cache_limit(0)
# (from a sitecustomize.py on the test path, so the tests' subprocesses get it too) makes
# every array a fresh, exactly sized malloc. Not visible either way: reads past the end
# of a view (a slice of a bigger array: they land in the parent's buffer) and reads of
# up to 8 bytes before an array's data (the allocator's size header).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
# The tests run from the snapshot's directory: a relative interpreter path must not
# change meaning there (made absolute without resolving a venv's symlink).
if [[ "$PY" == */* && "$PY" != /* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi
WORK="${SANITIZE_DIR:-$ROOT/build/asan}"
case "$WORK" in /*) ;; *) WORK="$ROOT/$WORK" ;; esac
SRC="$WORK/src"
BUILD_DIR="$WORK/build"
SITE="$WORK/site"
LOG="$WORK/pytest.log"

CXX="${CXX:-g++}"
LIBASAN="$("$CXX" -print-file-name=libasan.so)"
LIBUBSAN="$("$CXX" -print-file-name=libubsan.so)"
for lib in "$LIBASAN" "$LIBUBSAN"; do
  if [[ "$lib" != /* || ! -e "$lib" ]]; then
    echo "run_sanitizers: $CXX has no sanitizer runtime ($lib); install libasan/libubsan" >&2
    exit 2
  fi
done

t0=$SECONDS
# ---- snapshot the sources the build reads ---------------------------------------------
mkdir -p "$WORK"
rm -rf "$SRC.new"
mkdir -p "$SRC.new"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  # Tracked and untracked-but-not-ignored files (under 1 MB).
  (cd "$ROOT" && git ls-files -co --exclude-standard -z |
    while IFS= read -r -d '' f; do if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi; done |
    xargs -0 -r cp -p --parents -t "$SRC.new")
else
  (cd "$ROOT" && tar -c --exclude=./build --exclude=./.git --exclude=./venv --exclude=./.venv . |
    tar -x -p -C "$SRC.new")
fi
rm -rf "$SRC"
mv "$SRC.new" "$SRC"

# ---- build and install into $SITE (not into PYTHON's environment) ---------------------
echo "== building sanitized tqmetal (snapshot $SRC, build dir $BUILD_DIR)"
rm -rf "$SITE"
# RelWithDebInfo: -g for line numbers in reports.
"$PY" -m pip install --no-build-isolation --no-deps --quiet --target "$SITE" \
  -Cbuild-dir="$BUILD_DIR" \
  -Ccmake.build-type=RelWithDebInfo \
  -Ccmake.define.TQMETAL_SANITIZE=ON \
  "$SRC"
echo "== build+install: $((SECONDS - t0)) s"

EXT="$(ls "$SITE"/tqmetal/_ext*.so)"
if ! grep -q 'libasan' <<<"$(readelf -d "$EXT")"; then
  echo "run_sanitizers: $EXT is not linked against libasan (TQMETAL_SANITIZE ignored?)" >&2
  exit 1
fi

# Every Python process on this path (pytest and the tests' subprocesses) turns MLX's
# buffer cache off, so each array is its own malloc with an ASan redzone behind it.
if [[ "${SANITIZE_MLX_CACHE:-0}" != 1 ]]; then
  cat > "$SITE/sitecustomize.py" <<'EOF'
import mlx.core as _mx

_mx.set_cache_limit(0)
del _mx
EOF
fi

# pytest plugin: refuse to run unless tqmetal resolves to the sanitized build.
cat > "$SITE/_tqmetal_sanitize_plugin.py" <<EOF
import os

_SITE = os.path.realpath(${SITE@Q})


def _ext_file():
    import tqmetal._ext as ext

    return os.path.realpath(ext.__file__)


def pytest_configure(config):
    f = _ext_file()
    if not f.startswith(_SITE + os.sep):
        raise RuntimeError(f"tqmetal._ext imported from {f}, not the sanitized build in {_SITE}")


def pytest_report_header(config):
    import mlx.core as mx
    import tqmetal

    return [
        f"tqmetal._ext (sanitized): {_ext_file()}",
        f"tqmetal.cpu_isa(): {tqmetal.cpu_isa()}, mlx cache limit: "
        + ("default" if os.environ.get("SANITIZE_MLX_CACHE") == "1" else "0 (disabled)"),
    ]
EOF

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$LIBASAN:$LIBUBSAN${LD_PRELOAD:+:$LD_PRELOAD}"
# Python leaks by design. GCC's UBSan ignores log_path when ASan is loaded, so reports go
# to stderr: pytest runs with --capture=sys (fd 2 is not captured and lost when the
# process dies), its output is logged and searched for reports afterwards (reports from
# the tests' own subprocesses arrive there through the failing test's message).
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

echo "== import check"
"$PY" - "$SITE" <<'EOF'
import os
import sys

import tqmetal
import tqmetal._ext as ext

site = os.path.realpath(sys.argv[1])
f = os.path.realpath(ext.__file__)
print("tqmetal._ext:", f, "| cpu_isa:", tqmetal.cpu_isa())
assert f.startswith(site + os.sep), f"tqmetal._ext imported from {f}, not from {site}"
EOF

# Canary: ASan must be live in this environment and MLX arrays must sit right before a
# redzone. Copy one byte past an array's end (memmove is intercepted): must be reported.
echo "== canary: a read 1 byte past an MLX array must be reported"
if "$PY" - >"$WORK/canary.log" 2>&1 <<'EOF'; then
import ctypes

import mlx.core as mx
import numpy as np

a = mx.arange(1000, dtype=mx.float32)
mx.eval(a)
p = np.frombuffer(memoryview(a), dtype=np.uint8).ctypes.data
dst = ctypes.create_string_buffer(a.nbytes + 1)
ctypes.memmove(dst, p, a.nbytes + 1)
EOF
  echo "run_sanitizers: canary not reported: ASan is not active (see $WORK/canary.log)" >&2
  exit 1
fi
if ! grep -q 'AddressSanitizer: heap-buffer-overflow' "$WORK/canary.log"; then
  echo "run_sanitizers: canary failed without an ASan report:" >&2
  cat "$WORK/canary.log" >&2
  exit 1
fi
echo "canary reported (ok)"

PYTEST_ARGS=(-p no:cacheprovider -p _tqmetal_sanitize_plugin --capture=sys -q -ra)
if [[ "${SANITIZE_QUICK:-0}" == 1 ]]; then
  PYTEST_ARGS+=(-m "not slow")
fi

t1=$SECONDS
set +e
# The snapshot's tests, so that test, source and report line numbers all match.
(cd "$SRC" && "$PY" -m pytest "${PYTEST_ARGS[@]}" \
  tests/test_sdpa_int4.py tests/test_bad_input.py tests/test_compile_vjp.py "$@") 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
echo "== tests: $((SECONDS - t1)) s (pytest exit $status); total $((SECONDS - t0)) s"

PATTERN='ERROR: AddressSanitizer|runtime error: |SUMMARY: (Address|UndefinedBehavior)Sanitizer|ERROR: LeakSanitizer'
if grep -qE "$PATTERN" "$LOG"; then
  echo "== SANITIZER REPORT(S) found (full log: $LOG):" >&2
  grep -nE "$PATTERN" "$LOG" | head -20 >&2
  [[ $status == 0 ]] && status=1
elif [[ $status != 0 ]]; then
  echo "== pytest failed (exit $status) without a sanitizer report; log: $LOG" >&2
else
  echo "== no sanitizer reports"
fi
exit "$status"
