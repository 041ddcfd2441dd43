#!/usr/bin/env python3
"""macOS static checks of tqmetal that run on Linux, with no Apple toolchain.

No Mac runs in CI, and g++ accepts code that AppleClang rejects; a Mac build also links
against libmlx.dylib, which exports only what MLX marks MLX_API. These checks compile the
macOS side of the project with clang against the real macOS wheels (the versions pinned in
pyproject.toml, fetched with `pip download --platform macosx_14_0_arm64`, cached):

  host      every host translation unit (csrc/, bench/) with -D_METAL_ (as MLX's Metal build
            defines it), against the mlx-metal wheel's headers and metal-cpp, with libstdc++
            and libc++ (-fsyntax-only; the few Apple system headers metal-cpp needs are the
            minimal stand-ins in apple-stubs/)
  exports   every mlx:: symbol the Metal host object (csrc/metal/sdpa_int4_metal.cpp) leaves
            undefined is exported by the wheel's libmlx.dylib (llvm-nm)
  lint      constructs C++14 allows and the Metal Shading Language forbids, in metal/
  std       each Metal translation unit, as a Mac compiles it at run time (the embedded
            source: csrc/metal/embed_sources.py, MLX headers expanded), through the MSL
            emulator's rewrite (tests/mslemu) as C++14 and C++17 (MSL 3.x is C++14-based):
            any warning or error located in metal/ fails (-Wall -Wextra, as MLX's metallib)
  as        the same with the Metal address spaces (device, constant, threadgroup) as clang
            address spaces: passing one where another is expected fails, as with Metal
  tgmem     threadgroup memory of every kernel instance <= 32 KiB (Apple GPUs' limit)

What they cannot see: Apple's Metal compiler itself (its register allocation, its own
diagnostics), and anything that runs on a GPU. That is the macOS workflow's job.

    python tests/macos_checks/checks.py            # all checks, ~1 min on 2 cores
    python tests/macos_checks/checks.py --plant as # the same with a planted defect: must fail

Planted defects (--plant, and tests/test_macos_checks.py, which runs each of them):
  alias   csrc/bindings.cpp with `namespace tm` again (defect 2 of issue 11): host fails
  copy    sdpa_int4_metal.cpp calling mlx::core::contiguous_copy_gpu (defect 1): exports fails
  as      a device pointer where the decode kernel takes threadgroup memory: as fails
  tgmem   the decode kernel's tg_out doubled (over 32 KiB at D = 256): tgmem fails
  cxx17   a C++17 `if constexpr` in metal/sdpa_int4_decode.h: std (C++14) fails
  lambda  a lambda in metal/sdpa_int4_decode.h: lint fails

Needs clang++ (17 or newer; 19 in CI), llvm-nm, libc++ (optional: libc++-19-dev) and pip
with access to PyPI. Environment: CLANGXX, LLVM_NM (tools), TQMETAL_MACOS_CHECKS_CACHE (cache
directory; default ~/.cache/tqmetal-macos-checks).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
STUBS = HERE / "apple-stubs"
PRELUDE = HERE / "cxx_compat_prelude.h"
TG_LIMIT = 32768

sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "csrc" / "metal"))
import embed_sources  # noqa: E402
import mslemu  # noqa: E402
from mslemu.rewrite import mask  # noqa: E402


class Unavailable(RuntimeError):
    """A tool or wheel the checks need is missing."""


# ----------------------------------------------------------------------------------------- inputs
def cache_dir() -> Path:
    d = os.environ.get("TQMETAL_MACOS_CHECKS_CACHE")
    if d:
        p = Path(d)
    elif Path.home() != Path("/") and os.access(Path.home(), os.W_OK):
        p = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tqmetal-macos-checks"
    else:
        p = Path(tempfile.gettempdir()) / f"tqmetal-macos-checks-{os.getuid()}"
    p.mkdir(parents=True, exist_ok=True)
    return p


def pins() -> dict:
    """The exact versions pyproject.toml pins for mlx and nanobind."""
    text = (ROOT / "pyproject.toml").read_text()
    out = {}
    for name in ("mlx", "nanobind"):
        m = re.search(rf'"{name}==([0-9][0-9a-z.]*)"', text)
        if not m:
            raise Unavailable(f"pyproject.toml pins no {name}==<version>")
        out[name] = m.group(1)
    return out


def _wheel(name: str, version: str, platform: str | None) -> Path:
    """Download (once) and unpack a wheel into the cache; returns the unpacked directory."""
    dest = cache_dir() / f"{name}-{version}-{platform or 'any'}"
    if (dest / ".complete").exists():
        return dest
    dl = cache_dir() / "downloads"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dl),
           f"{name}=={version}"]
    if platform:
        cmd += ["--platform", platform]
    p = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dl.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if platform:
        wheels = [w for w in wheels if "macosx" in w.name]
    if p.returncode != 0 or not wheels:
        raise Unavailable(f"pip download {name}=={version} failed:\n{p.stderr[-2000:]}")
    shutil.rmtree(dest, ignore_errors=True)
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(dest)
    (dest / ".complete").write_text(wheels[0].name)
    return dest


def _find(env, names, version_min=None):
    cands = [os.environ[env]] if os.environ.get(env) else names
    for c in cands:
        path = shutil.which(c)
        if not path:
            continue
        if version_min:
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            m = re.search(r"version (\d+)", out)
            if not m or int(m.group(1)) < version_min:
                continue
        return path
    raise Unavailable(f"none of {cands} found (set {env}; CI: apt-get install clang-19 llvm-19)")


@dataclasses.dataclass(frozen=True)
class Tools:
    cxx: str
    nm: str
    libcxx: bool  # clang can use -stdlib=libc++
    mlx: Path  # the macOS wheel's mlx/ (include/, lib/libmlx.dylib, share/cmake/MLX)
    nanobind: Path  # nanobind/ of the wheel
    python_include: str

    @property
    def mlx_include(self) -> Path:
        return self.mlx / "include"


@functools.lru_cache(maxsize=None)
def tools() -> Tools:
    cxx = _find("CLANGXX", ["clang++-19", "clang++-18", "clang++-17", "clang++"], version_min=17)
    nm = _find("LLVM_NM", ["llvm-nm-19", "llvm-nm-18", "llvm-nm-17", "llvm-nm"])
    v = pins()
    mlx = _wheel("mlx-metal", v["mlx"], "macosx_14_0_arm64") / "mlx"
    nb = _wheel("nanobind", v["nanobind"], None) / "nanobind"
    for need in (mlx / "include" / "metal_cpp", mlx / "lib" / "libmlx.dylib", nb / "include"):
        if not need.exists():
            raise Unavailable(f"{need} missing from the unpacked wheel")
    libcxx = subprocess.run([cxx, "-stdlib=libc++", "-x", "c++", "-std=c++20", "-fsyntax-only", "-"],
                            input="#include <string>\nint main(){}\n", capture_output=True, text=True).returncode == 0
    import sysconfig
    return Tools(cxx, nm, libcxx, mlx, nb, sysconfig.get_paths()["include"])


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


@dataclasses.dataclass
class Result:
    name: str
    ok: bool
    detail: str = ""

    def __str__(self):
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}" + (f"\n{self.detail}" if self.detail else "")


# ----------------------------------------------------------------------------------------- host code
HOST_DIRS = ("csrc", "bench")


def host_units() -> list[Path]:
    """Every C++ translation unit of the extension, its core library and the benchmark."""
    return sorted(p for d in HOST_DIRS for p in (ROOT / d).rglob("*.cpp"))


@functools.lru_cache(maxsize=None)
def generated_dir() -> Path:
    """csrc/metal/embed_sources.py's header, as CMake generates it for a macOS build."""
    units = {s.stem: embed_sources.expand([s], [tools().mlx_include], ROOT) for s in metal_units()}
    return _content_dir("generated", {"tqmetal_kernel_sources.h": embed_sources.header(units)})


def _content_dir(kind: str, files: dict) -> Path:
    """A cache directory holding `files` ({name: text}), named by their content (race-free)."""
    h = hashlib.sha256("\0".join(f"{k}\0{v}" for k, v in sorted(files.items())).encode()).hexdigest()[:16]
    d = cache_dir() / f"{kind}-{h}"
    if not (d / ".complete").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=cache_dir()))
        for name, text in files.items():
            (tmp / name).write_text(text)
        (tmp / ".complete").write_text("")
        try:
            tmp.rename(d)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return d


def host_flags(t: Tools) -> list:
    """What the macOS build passes (MLXConfig.cmake: -D_METAL_ -DACCELERATE_NEW_LAPACK), the
    generic CPU kernel variant (arm64 builds only that one), Apple system headers stubbed."""
    return ["-std=c++20", "-fblocks", "-D_METAL_", "-DACCELERATE_NEW_LAPACK", "-DTQMETAL_ISA=generic",
            "-Wno-psabi", "-isystem", STUBS, "-isystem", t.mlx_include / "metal_cpp", "-isystem", t.mlx_include,
            "-isystem", t.nanobind / "include", "-isystem", t.nanobind / "ext" / "robin_map" / "include",
            "-isystem", t.python_include, "-I", ROOT / "csrc", "-I", generated_dir()]


def stdlibs(t: Tools) -> list:
    return [None, "libc++"] if t.libcxx else [None]


def check_host_unit(unit: Path, stdlib=None, source: str | None = None) -> Result:
    """clang -fsyntax-only -D_METAL_ of one translation unit (`source`: its text instead of the file's)."""
    t = tools()
    name = f"host {unit.relative_to(ROOT) if unit.is_relative_to(ROOT) else unit} ({stdlib or 'libstdc++'})"
    cmd = [t.cxx, "-fsyntax-only", *host_flags(t)] + ([f"-stdlib={stdlib}"] if stdlib else [])
    if source is None:
        p = _run(cmd + [unit])
    else:  # compiled from stdin, quoted includes resolved beside the real file
        p = _run(cmd + ["-iquote", unit.parent, "-x", "c++", "-"], input=source)
    errors = [ln for ln in p.stderr.splitlines() if ": error:" in ln]
    return Result(name, p.returncode == 0, "\n".join(errors[:8]) or p.stderr[-2000:] if p.returncode else "")


def check_host(jobs=None) -> list[Result]:
    t = tools()
    todo = [(u, s) for u in host_units() for s in stdlibs(t)]
    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
        return list(pool.map(lambda a: check_host_unit(*a), todo))


def _demangled_split(sig: str):
    """'ns::f(int, std::string)' -> ('ns::f', 2): qualified name and parameter count. libc++ and
    libstdc++ (and long / long long) spell parameter types differently, so types are not compared."""
    depth = 0
    for i, c in enumerate(sig):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0:
            body, d, n = sig[i + 1:], 0, 1
            for ch in body:
                if ch in "<(":
                    d += 1
                elif ch in ">)":
                    if d == 0:
                        break
                    d -= 1
                elif ch == "," and d == 0:
                    n += 1
            empty = body.startswith(")") or body.startswith("void)")
            return sig[:i], 0 if empty else n
    return sig, None


@functools.lru_cache(maxsize=None)
def dylib_exports() -> dict:
    t = tools()
    out = _run([t.nm, "-C", "-g", "--defined-only", t.mlx / "lib" / "libmlx.dylib"])
    if out.returncode:
        raise Unavailable(f"llvm-nm cannot read libmlx.dylib: {out.stderr[-500:]}")
    exported = collections.defaultdict(set)
    for line in out.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            q, n = _demangled_split(parts[2])
            exported[q].add(n)
    return exported


METAL_HOST = ROOT / "csrc" / "metal" / "sdpa_int4_metal.cpp"


def check_exports(source: str | None = None) -> Result:
    """The Metal host object's undefined mlx:: symbols against libmlx.dylib's exports."""
    t = tools()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as d:
        obj = Path(d) / "metal_host.o"
        cmd = [t.cxx, "-c", "-O1", *host_flags(t), "-o", obj]
        p = _run(cmd + [METAL_HOST]) if source is None else _run(
            cmd + ["-iquote", METAL_HOST.parent, "-x", "c++", "-"], input=source)
        if p.returncode:
            return Result("exports (compiling the Metal host object)", False, p.stderr[-2000:])
        undefined = _run([t.nm, "-C", "-u", obj]).stdout.splitlines()
    exported = dylib_exports()
    missing = []
    for sym in (s.strip().removeprefix("U ") for s in undefined):
        if sym.startswith("mlx::"):
            q, n = _demangled_split(sym)
            if n not in exported.get(q, ()):
                missing.append(f"not exported by libmlx.dylib: {sym}")
    return Result("exports: mlx:: symbols of sdpa_int4_metal.o vs libmlx.dylib", not missing, "\n".join(missing))


# ----------------------------------------------------------------------------------------- Metal
def metal_units() -> list[Path]:
    return sorted((ROOT / "metal").glob("*.metal"))


def unit_source(unit: Path) -> str:
    """A Metal translation unit as a Mac compiles it at run time (the embedded, expanded source)."""
    return embed_sources.expand([unit], [tools().mlx_include], ROOT)


LINT_RULES = [
    (r"\[[^\[\]]*\]\s*(\([^()]*\))?\s*(mutable\s*)?(->[^{;]*)?\{", "lambda expression"),
    (r"\bnew\b|\bdelete\b", "dynamic allocation (new/delete)"),
    (r"\bvirtual\b", "virtual function"),
    (r"\bgoto\b", "goto"),
    (r"\btry\b|\bthrow\b|\bcatch\b", "exception handling"),
    (r"\btypeid\b|\bdynamic_cast\b", "RTTI"),
    (r"\bthread_local\b|\bregister\b", "thread_local/register storage"),
    (r"\(\s*\*\s*\w+\s*\)\s*\(", "function pointer"),
    (r"\bstd::", "C++ standard library (std::)"),
]


def lint_findings(name: str, text: str) -> list[str]:
    """MSL's restrictions on C++14 (the MSL specification, 'Metal and C++14'): a heuristic over
    the text with comments and literals blanked; direct recursion included."""
    text = mask(text)
    lines = text.splitlines()
    found = []
    for pat, what in LINT_RULES:
        for m in re.finditer(pat, text):
            ln = text.count("\n", 0, m.start()) + 1
            if what == "lambda expression" and "[[" in lines[ln - 1]:
                continue  # [[attributes]]
            found.append(f"{name}:{ln}: {what}: {lines[ln - 1].strip()[:100]}")
    for m in re.finditer(r"\b([A-Za-z_]\w*)\s*\([^;{}]*\)\s*(const\s*)?(thread|device|constant|threadgroup)?\s*\{", text):
        fn = m.group(1)
        if fn in ("if", "for", "while", "switch", "return"):
            continue
        i, depth = m.end(), 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if re.search(r"(?<![.:>\w])" + re.escape(fn) + r"\s*(<[^;{}()]*>)?\s*\(", text[m.end():i]):
            found.append(f"{name}:{text.count(chr(10), 0, m.start()) + 1}: recursion: {fn} calls itself")
    return found


def check_lint(overrides: dict | None = None) -> Result:
    files = sorted((ROOT / "metal").glob("*.metal")) + sorted((ROOT / "metal").glob("*.h"))
    found = []
    for f in files:
        text = (overrides or {}).get(f.name, f.read_text())
        found += lint_findings(f"metal/{f.name}", text)
    return Result(f"lint: MSL-forbidden constructs in {len(files)} files of metal/", not found, "\n".join(found))


EMU_WARNINGS = ["-Wno-attributes", "-Wno-unknown-pragmas", "-Wno-ignored-attributes", "-Wno-unknown-attributes",
                "-Wno-c++11-narrowing"]
SHIM_TG_OLD = """#define MSL_TG_VAR(name, ...)          \\
  static char __msl_tgkey_##name;      \\
  auto& name = ::msl_emu::tg_var<__VA_ARGS__>(&__msl_tgkey_##name, #name, #__VA_ARGS__)"""


@functools.lru_cache(maxsize=None)
def shim(mode: str) -> Path:
    """The emulator's shim (tests/mslemu/include) as is (mode 'emu') or derived:
    'as'     Metal address spaces become clang address spaces (device 1, constant 2, threadgroup 3;
             thread = the default), bfloat the builtin __bf16, and a kernel-scope `threadgroup T x[N]`
             a static local in address space 3, so clang rejects every implicit conversion between
             address spaces as Metal does (the emulator itself erases them);
    'tgsize' kernel-scope threadgroup variables become static locals, so that the object file lists
             each with its size (llvm-nm -S), per kernel instance."""
    if mode == "emu":
        return mslemu.SHIM
    files = {f.name: f.read_text() for f in mslemu.SHIM.iterdir() if f.is_file()}
    s = files["msl_emu.h"]

    def sub(old, new):
        nonlocal s
        if old not in s:
            raise Unavailable(f"the emulator shim changed; update checks.shim(): cannot find {old[:60]!r}")
        s = s.replace(old, new, 1)

    if mode == "as":
        sub("#define device\n", "#define device __attribute__((address_space(1)))\n")
        sub("#define constant\n", "#define constant __attribute__((address_space(2)))\n")
        sub("#define threadgroup\n", "#define threadgroup __attribute__((address_space(3)))\n")
        i = s.index("namespace msl_emu {\n// bfloat: storage")
        j = s.index("typedef msl_emu::bfloat bfloat;")
        s = s[:i] + "namespace msl_emu {\ntypedef __bf16 bfloat;  // a builtin scalar, as in MSL\n}  // namespace msl_emu\n" + s[j:]
        sub("static constexpr bfloat mk(uint16_t b) { bfloat r{}; r.bits = b; return r; }",
            "static constexpr bfloat mk(uint16_t b) { return __builtin_bit_cast(bfloat, b); }")
        sub(SHIM_TG_OLD, "#define MSL_TG_VAR(name, ...) using __msl_tgtype_##name = __VA_ARGS__; "
                         "static threadgroup __msl_tgtype_##name name")
    elif mode == "tgsize":
        sub(SHIM_TG_OLD, "#define MSL_TG_VAR(name, ...) using __msl_tgtype_##name = __VA_ARGS__; "
                         "static __msl_tgtype_##name name")
    else:
        raise ValueError(mode)
    files["msl_emu.h"] = s
    return _content_dir(f"shim-{mode}", files)


def _emulated_tu(stem: str, text: str, work: Path) -> Path:
    """Write the emulator's rewrite of `text` under work/src; returns the TU to compile. MLX's
    instantiate_kernel becomes a plain explicit instantiation (what the Metal compiler sees)."""
    src = work / "src"
    src.mkdir(parents=True)
    main = work / f"{stem}.metal"
    main.write_text(text)
    plan = mslemu.plan(main, include_dirs=[], cxx=tools().cxx, instrument=False, racecheck=False, cache=work)
    for rel, body in plan.files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(body)
    tu = src / "tu.cpp"
    tu.write_text('#include "msl_emu.h"\n#undef MSL_INSTANTIATE\n'
                  "#define MSL_INSTANTIATE(h, fn, ...) template decltype(__VA_ARGS__) __VA_ARGS__;\n"
                  f'#include "main/{main.name}"\n')
    return tu


METAL_DIAG = re.compile(r"^(metal/[^:]+):(\d+):\d+: (error|warning)")


def check_std(stem: str, text: str, std: str) -> Result:
    """The unit as C++14/C++17 through the emulator's rewrite: no diagnostic located in metal/."""
    t = tools()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as d:
        tu = _emulated_tu(stem, text, Path(d))
        p = _run([t.cxx, "-fsyntax-only", "-ferror-limit=0", f"-std={std}", "-include", PRELUDE, "-Wall", "-Wextra",
                  *EMU_WARNINGS, "-I", shim("emu"), "-I", tu.parent, tu], cwd=d)
    hits = sorted({ln for ln in p.stderr.splitlines() if METAL_DIAG.match(ln)})
    return Result(f"std {stem}.metal as {std}", not hits, "\n".join(hits[:20]))


def check_address_spaces(stem: str, text: str) -> Result:
    t = tools()
    # clang's C++ rejects address-space-qualified array parameters; MLX's utils.h has two.
    text = re.sub(r"constant const int64_t strides\[(\d)\]", "constant const int64_t* strides", text)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as d:
        tu = _emulated_tu(stem, text, Path(d))
        p = _run([t.cxx, "-fsyntax-only", "-ferror-limit=0", "-std=c++17", "-include", PRELUDE, *EMU_WARNINGS,
                  "-I", shim("as"), "-I", tu.parent, tu], cwd=d)
    errors = collections.Counter(ln for ln in p.stderr.splitlines() if ": error:" in ln)
    detail = "\n".join(f"{n}x {ln}" for ln, n in errors.most_common(10)) or p.stderr[-2000:]
    return Result(f"as {stem}.metal with Metal address spaces", p.returncode == 0, detail if p.returncode else "")


def threadgroup_bytes(stem: str, text: str) -> dict:
    """{kernel instance: bytes of its kernel-scope threadgroup variables (16-byte rounded)}."""
    t = tools()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as d:
        tu = _emulated_tu(stem, text, Path(d))
        obj = Path(d) / "tg.o"
        p = _run([t.cxx, "-c", "-O0", "-w", "-std=c++20", "-I", shim("tgsize"), "-I", tu.parent, tu, "-o", obj], cwd=d)
        if p.returncode:
            raise RuntimeError(f"compiling {stem}.metal for the threadgroup budget failed:\n{p.stderr[-2000:]}")
        nm = _run([t.nm, "-S", "-C", obj]).stdout
    total = collections.defaultdict(int)
    for line in nm.splitlines():
        m = re.match(r"^[0-9a-f]+ ([0-9a-f]+) [VvDdBb] (.*)::(\w+)$", line)
        if not m or "(" not in m.group(2) or re.sub(r"^void ", "", m.group(2)).startswith(("msl_emu::", "guard variable")):
            continue  # only kernel-scope variables of kernel functions
        fn = m.group(2)
        fn = re.sub(r"\(.*", "", fn.split(" ", 1)[1] if fn.startswith("void ") else fn)
        total[fn] += (int(m.group(1), 16) + 15) // 16 * 16  # Metal rounds allocations to 16 bytes
    return dict(total)


def check_tgmem(stem: str, text: str, limit: int = TG_LIMIT) -> Result:
    sizes = threadgroup_bytes(stem, text)
    over = {k: v for k, v in sizes.items() if v > limit}
    top = max(sizes.items(), key=lambda kv: kv[1]) if sizes else ("-", 0)
    detail = "\n".join(f"over {limit} B: {v} B {k}" for k, v in over.items())
    return Result(f"tgmem {stem}.metal: {len(sizes)} kernel instances, largest {top[1]} B ({top[0]})",
                  not over, detail)


def check_metal_unit(unit: Path, text: str | None = None) -> list[Result]:
    text = unit_source(unit) if text is None else text
    stem = unit.stem
    return [check_std(stem, text, "c++14"), check_std(stem, text, "c++17"), check_address_spaces(stem, text),
            check_tgmem(stem, text)]


# ----------------------------------------------------------------------------------------- planted defects
DECODE_H = ROOT / "metal" / "sdpa_int4_decode.h"


def _replace(text: str, old: str, new: str) -> str:
    if old not in text:
        raise RuntimeError(f"cannot plant: {old!r} is no longer in the source; update checks.py")
    return text.replace(old, new, 1)


def planted(name: str):
    """(the check it targets, a callable running that check on the planted source) -> Result list."""
    decode = ROOT / "metal" / "sdpa_int4.metal"
    if name == "alias":
        src = (ROOT / "csrc" / "bindings.cpp").read_text()
        src = _replace(src, "namespace tqm = tqmetal::metal;", "namespace tm = tqmetal::metal;")
        src = re.sub(r"\btqm::", "tm::", src)
        return lambda: [check_host_unit(ROOT / "csrc" / "bindings.cpp", None, src)]
    if name == "copy":
        src = METAL_HOST.read_text() + (
            '\n#include "mlx/backend/gpu/copy.h"\n'
            "mlx::core::array tqmetal_planted_copy(const mlx::core::array& a, const mlx::core::Stream& s) {\n"
            "  return mlx::core::contiguous_copy_gpu(a, s);\n}\n")
        return lambda: [check_exports(src)]
    if name == "as":
        text = _replace(unit_source(decode), "    threadgroup float* tg_q,", "    device float* tg_q,")
        return lambda: [check_address_spaces("sdpa_int4", text)]
    if name == "tgmem":
        text = _replace(unit_source(decode), "threadgroup float tg_out[BN * D];", "threadgroup float tg_out[2 * BN * D];")
        return lambda: [check_tgmem("sdpa_int4", text)]
    if name == "cxx17":
        text = _replace(unit_source(decode), "  constexpr int PT = D / 32; // elements per lane",
                        "  constexpr int PT = D / 32; // elements per lane\n  if constexpr (PT > 64) { return; }")
        return lambda: [check_std("sdpa_int4", text, "c++14")]
    if name == "lambda":
        text = _replace(DECODE_H.read_text(), "  constexpr int PT = D / 32; // elements per lane",
                        "  constexpr int PT = D / 32; // elements per lane\n  auto twice = [](int x) { return 2 * x; };")
        return lambda: [check_lint({DECODE_H.name: text})]
    raise ValueError(f"unknown planted defect {name!r}")


PLANTS = ("alias", "copy", "as", "tgmem", "cxx17", "lambda")


def run_all(jobs=None) -> list[Result]:
    results = [check_lint()]
    results += check_host(jobs)
    results.append(check_exports())
    units = metal_units()
    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
        for rs in pool.map(check_metal_unit, units):
            results += rs
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="macOS static checks of tqmetal (on Linux)")
    ap.add_argument("--plant", choices=PLANTS, help="run only the check a planted defect targets: it must fail")
    ap.add_argument("-j", "--jobs", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        t = tools()
    except Unavailable as e:
        print(f"macos_checks: {e}", file=sys.stderr)
        return 2
    print(f"clang: {t.cxx}; libc++: {t.libcxx}; wheels: {t.mlx.parent.name}, {t.nanobind.parent.name}")
    results = planted(a.plant)() if a.plant else run_all(a.jobs)
    for r in results:
        print(r)
    bad = [r for r in results if not r.ok]
    if a.plant:
        print(f"planted defect {a.plant!r}: {'caught' if bad else 'NOT caught'}")
        return 0 if bad else 1
    print(f"{len(results) - len(bad)}/{len(results)} checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
