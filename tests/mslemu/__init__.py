"""mslemu: run Metal compute kernels (.metal sources) on Linux CPUs for testing.

    lib = mslemu.compile("tests/emu_kernels/reduce.metal", include_dirs=[...], racecheck=True)
    st = lib.dispatch("reduce_sum_float_256", buffers={0: x, 1: out, 2: np.uint32(n)},
                      threadgroups=(g, 1, 1), threads_per_threadgroup=(256, 1, 1), order="shuffle", seed=3)
    st.barriers, st.buffers[0].bytes_read, st.buffers[0].max_reads_per_byte

See tests/mslemu/README.md for what is emulated, the race detector, the load counters and the modes.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from .rewrite import rewrite, RewriteError  # noqa: F401

HERE = Path(__file__).resolve().parent
SHIM = HERE / "include"
INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)

ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2, "runahead": 3, "interleave": 4}
RACE_MODES = {"off": 0, "on": 1, "strict": 2, "lockstep": 3}


class KernelError(RuntimeError):
    """A kernel failed at run time (emulator diagnostics, divergent barrier, exception, ...)."""


class RaceError(KernelError):
    """The threadgroup-memory race detector found conflicting accesses with no barrier between them."""


class OutOfBoundsError(KernelError):
    """An access outside a threadgroup variable or a bound device buffer (guard zones), or through a null pointer."""


class CompileError(KernelError):
    """The C++ compiler rejected the rewritten kernel source."""


# ----------------------------------------------------------------------------------------------- config
def _env_flag(name, default=""):
    return os.environ.get(name, default).strip()


def parse_racecheck(value) -> int:
    """True/'1'/'on' -> on; 'strict'; 'lockstep'; False/'0'/''/'off' -> off."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return 1 if value else 0
    if isinstance(value, int):
        return value
    v = str(value).strip().lower()
    if v in ("", "0", "off", "false", "no"):
        return 0
    if v in ("1", "on", "true", "yes"):
        return 1
    if v in RACE_MODES:
        return RACE_MODES[v]
    raise ValueError(f"racecheck must be on/off/strict/lockstep, got {value!r}")


def cache_dir() -> Path:
    """$MSLEMU_CACHE, else $XDG_CACHE_HOME/tqmetal-mslemu (~/.cache/...), else <tmp>/tqmetal-mslemu-<uid>."""
    env = os.environ.get("MSLEMU_CACHE")
    cands = [Path(env)] if env else []
    xdg = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache" if Path.home() != Path("/") else None)
    if xdg:
        cands.append(Path(xdg) / "tqmetal-mslemu")
    cands.append(Path(tempfile.gettempdir()) / f"tqmetal-mslemu-{os.getuid()}")
    for c in cands:
        try:
            c.mkdir(parents=True, exist_ok=True)
            if os.access(c, os.W_OK):
                return c
        except OSError:
            continue
    raise KernelError(f"no writable cache directory among {cands}")


@functools.lru_cache(maxsize=None)
def compiler_id(cxx: str) -> str:
    """Resolved path + `--version` first line: part of the cache key."""
    path = shutil.which(cxx)
    if path is None:
        raise CompileError(f"C++ compiler {cxx!r} not found")
    try:
        ver = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        ver = "?"
    return f"{os.path.realpath(path)} | {ver}"


def is_clang(cxx: str) -> bool:
    return "clang" in compiler_id(cxx).lower()


@functools.lru_cache(maxsize=None)
def _supports(cxx: str, *flags: str) -> bool:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.cpp"
        src.write_text("int f(int* p) { return *p; }\n")
        p = subprocess.run([cxx, "-c", *flags, str(src), "-o", str(Path(d) / "t.o")], capture_output=True, text=True)
        return p.returncode == 0 and "unknown" not in p.stderr.lower()


def instrument_flags(cxx: str):
    """Compile flags that make the compiler call our __tsan_* hooks before every load/store.

    -fsanitize=thread is used for its instrumentation only (reads and writes are reported separately,
    read-modify-write included; ASan-style checks merge them).  The object is linked without the TSan
    runtime: tests/mslemu/include/msl_emu_api.inc defines the hooks."""
    if is_clang(cxx):
        f = ["-fsanitize=thread"]
        for o in ("-tsan-instrument-func-entry-exit=0", "-tsan-instrument-read-before-write=1",
                  "-tsan-instrument-atomics=0", "-tsan-handle-cxx-exceptions=0", "-tsan-distinguish-volatile=0"):
            if _supports(cxx, "-fsanitize=thread", "-mllvm", o):
                f += ["-mllvm", o]
    else:
        f = ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0", "--param", "tsan-distinguish-volatile=0"]
    return f + ["-DMSL_EMU_INSTRUMENT=1"]


# ----------------------------------------------------------------------------------------------- compile
def _collect(main: Path, include_dirs):
    """Rewrite main and every project header it reaches (quoted includes) into a mirror tree."""
    files = {}  # mirror-relative path -> rewritten text
    kernels, fcs = [], []
    todo = [(main.resolve(), f"main/{main.name}")]
    seen = set()
    while todo:
        path, rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        src = path.read_text()
        r = rewrite(src, known_fcs=[f[0] for f in fcs])
        files[rel] = f'#line 1 "{path}"\n' + r.text
        kernels += r.kernels
        fcs += r.function_constants
        for inc in INCLUDE_RE.findall(src):
            cand = path.parent / inc
            if cand.exists():
                todo.append((cand.resolve(), str(Path(rel).parent / inc)))
                continue
            for k, d in enumerate(include_dirs):
                cand = Path(d) / inc
                if cand.exists():
                    todo.append((cand.resolve(), f"inc{k}/{inc}"))
                    break
            else:
                raise FileNotFoundError(f"{path}: cannot resolve #include \"{inc}\"")
    return files, kernels, fcs


_compile_lock = threading.Lock()


@dataclasses.dataclass
class BuildPlan:
    """What compile() would build: the cached library path (key = sources + shim + compiler + flags)."""
    so: Path
    files: dict
    tu: str
    cxx: str
    flags: list
    link_flags: list
    ninc: int
    racecheck: int
    instrument: bool

    @property
    def cached(self) -> bool:
        return self.so.exists()


def plan(main, include_dirs=(), cxx=None, opt="-O1", defines=(), extra_flags=(), sanitize=None,
         instrument=None, racecheck=None, cache=None) -> BuildPlan:
    """Rewrite the sources and compute the cache key / library path without compiling (see compile())."""
    main = Path(main)
    include_dirs = [Path(d) for d in include_dirs]
    files, kernels, fcs = _collect(main, include_dirs)
    plain = [k.name for k in kernels if not k.is_template]
    tu = ['#include "msl_emu.h"', f'#include "main/{main.name}"']
    tu += [f"MSL_REGISTER_PLAIN({n})" for n in dict.fromkeys(plain)]
    tu += ['#include "msl_emu_api.inc"', ""]
    tu = "\n".join(tu)
    cxx = cxx or _env_flag("MSLEMU_CXX") or "g++"
    sanitize = _env_flag("MSLEMU_SANITIZE") if sanitize is None else sanitize
    asan = "address" in (sanitize or "").split(",")
    if instrument is None:
        # -fsanitize=address and -fsanitize=thread (which provides our hooks) are exclusive
        instrument = _env_flag("MSLEMU_INSTRUMENT", "1") not in ("0", "off", "false") and not asan
    if instrument and asan:
        raise ValueError("instrument=True cannot be combined with -fsanitize=address (both use sanitizer instrumentation)")
    racecheck = parse_racecheck(_env_flag("MSLEMU_RACECHECK") if racecheck is None else racecheck)
    if racecheck and not instrument:
        racecheck = 0  # documented: the race detector needs the instrumented build
    flags = ["-std=c++20", opt, "-g1", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
             "-Wno-attributes", "-Wno-unknown-pragmas", "-Wno-ignored-attributes"]
    if is_clang(cxx):
        flags += ["-Wno-unknown-attributes", "-Wno-c++11-narrowing"]
    else:
        flags.append("-fno-gnu-unique")
    link_flags = []
    if sanitize:
        flags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
        link_flags += [f"-fsanitize={sanitize}"]
        if asan:
            flags.append("-DMSL_EMU_UCONTEXT=1")  # ASan understands swapcontext, not our stack switch
    if instrument:
        flags += instrument_flags(cxx)
    flags += [f"-D{d}" for d in defines] + list(extra_flags)
    h = hashlib.sha256()
    for k in sorted(files):
        h.update(k.encode() + b"\0" + files[k].encode() + b"\0")
    for f in sorted(SHIM.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(tu.encode() + b"\0" + compiler_id(cxx).encode() + b"\0" + "\0".join(flags + ["|"] + link_flags).encode())
    key = h.hexdigest()[:20]
    root = Path(cache) if cache else cache_dir()
    return BuildPlan(root / f"{main.stem}-{key}.so", files, tu, cxx, flags, link_flags, len(include_dirs),
                     racecheck, bool(instrument))


_build_locks: dict = {}
_dispatch_locks: dict = {}


def compile(main, include_dirs=(), cxx=None, opt="-O1", defines=(), extra_flags=(), sanitize=None,
            instrument=None, racecheck=None, cache=None) -> "Library":
    """Rewrite + compile a .metal file (and the project headers it includes) into a cached shared library.

    cxx:        C++ compiler (default $MSLEMU_CXX or g++; clang++ >= 15 works too).
    sanitize:   e.g. "address,undefined" (default $MSLEMU_SANITIZE); ASan needs the sanitizer runtimes in
                LD_PRELOAD (see README).  ASan excludes instrumentation.
    instrument: compile with the load/store hooks (race detector, load counters, guard zones).  Default:
                on unless ASan is requested or $MSLEMU_INSTRUMENT=0.
    racecheck:  default race-detector mode of the returned Library: True/"on", "strict", "lockstep", False.
                Default $MSLEMU_RACECHECK (off when unset).  A run-time switch: not part of the cache key.
    cache:      directory for compiled libraries (default: cache_dir(), outside the repository).
    Thread-safe; different libraries build in parallel (the compiler runs as a subprocess)."""
    p = plan(main, include_dirs, cxx, opt, defines, extra_flags, sanitize, instrument, racecheck, cache)
    if not p.so.exists():
        with _compile_lock:
            lock = _build_locks.setdefault(str(p.so), threading.Lock())
        with lock:
            if not p.so.exists():
                _build(p.so.parent, p.so, p.files, p.tu, p.cxx, p.flags, p.link_flags, p.ninc)
    return Library(p.so, racecheck=p.racecheck)


def _build(root, so, files, tu, cxx, flags, link_flags, ninc):
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=so.stem + ".", dir=root))
    try:
        for rel, text in files.items():
            p = work / "src" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        (work / "src" / "tu.cpp").write_text(tu)
        incs = ["-I", str(SHIM), "-I", str(work / "src")] + sum(
            (["-I", str(work / "src" / f"inc{k}")] for k in range(ninc)), [])
        out, obj = work / "kernels.so", work / "tu.o"
        # compile and link separately: the instrumented object must not pull in the TSan runtime
        cmds = [[cxx, *flags, *incs, "-c", str(work / "src" / "tu.cpp"), "-o", str(obj)],
                [cxx, "-shared", "-fPIC", *link_flags, str(obj), "-o", str(out)]]
        for cmd in cmds:
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise CompileError(f"C++ compilation failed ({' '.join(cmd)}):\n{p.stderr[-20000:]}")
        os.replace(out, so)  # atomic: concurrent builders of the same key produce identical files
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- run
@dataclasses.dataclass
class BufferStats:
    """Device-memory traffic of one bound buffer in one dispatch (instrumented builds).

    bytes_read / bytes_written: sum over every executed load/store of its size (a byte read by 4 threads
    counts 4 times); loads / stores: number of executed accesses; unique_bytes_read / unique_bytes_written:
    distinct bytes touched; max_reads_per_byte: the most any single byte was read (saturates at 127)."""
    bytes_read: int = 0
    bytes_written: int = 0
    loads: int = 0
    stores: int = 0
    unique_bytes_read: int = 0
    unique_bytes_written: int = 0
    max_reads_per_byte: int = 0


@dataclasses.dataclass
class DispatchStats:
    barriers: int = 0
    collectives: int = 0
    partial_collectives: int = 0
    exited_before_barrier: int = 0
    switches: int = 0
    threadgroups: int = 0
    threadgroup_bytes: int = 0      # largest threadgroup-memory footprint (Metal accounting, no redzones)
    races: int = 0                  # racy threadgroup accesses (only when the dispatch did not raise)
    tg_uninit_read_bytes: int = 0   # bytes read from threadgroup memory never written in that threadgroup
    tg_accesses: int = 0            # threadgroup-memory accesses seen by the hooks
    order: str = "forward"
    seed: int = 0
    racecheck: int = 0
    instrumented: bool = False
    buffers: dict = dataclasses.field(default_factory=dict)  # buffer index -> BufferStats

    def __getitem__(self, k):  # dict-style access, as in the prototype (st["barriers"])
        return getattr(self, k)

    def bytes_read(self, index) -> int:
        return self.buffers[index].bytes_read

    @property
    def total_bytes_read(self) -> int:
        return sum(b.bytes_read for b in self.buffers.values())


_STAT_KEYS = ["barriers", "collectives", "partial_collectives", "exited_before_barrier", "switches", "threadgroups",
              "threadgroup_bytes", "races", "tg_uninit_read_bytes", "tg_accesses"]
_BUF_KEYS = [f.name for f in dataclasses.fields(BufferStats)]
_FC_FMT = {"b": "?", "f": "f", "e": "e", "i": "i", "I": "I", "h": "h", "H": "H", "c": "b", "B": "B", "q": "q", "Q": "Q"}
_PC_RE = re.compile(r"<pc:(0x[0-9a-f]+)>")


def _short_func(name: str) -> str:
    """'void foo<float, 4>(float const*, int)' -> 'foo<float, 4>'."""
    depth, cut = 0, len(name)
    for i, c in enumerate(name):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0:
            cut = i
            break
    head, depth, start = name[:cut], 0, 0
    for i, c in enumerate(head):  # drop the return type: last top-level space
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == " " and depth == 0:
            start = i + 1
    return head[start:] or name


def _format_frames(lines) -> str:
    """addr2line -f -i output (function, file:line pairs, innermost first) -> 'file:line (func)' of the
    innermost frame, followed by the kernel-source frames it was inlined into (emulator shim frames dropped)."""
    frames = [(_short_func(lines[i]), re.sub(r" \(discriminator \d+\)", "", lines[i + 1]))
              for i in range(0, len(lines) - 1, 2)]
    if not frames:
        return "?"
    shim = str(SHIM)
    out = [frames[0]] + [f for f in frames[1:] if not f[1].startswith(shim)][:2]
    return " <- ".join(f"{loc} ({func})" for func, loc in out)


def parse_order(order, seed=0):
    """'shuffle' / 'shuffle:7' / ('shuffle', 7) -> (name, seed)."""
    if isinstance(order, tuple):
        order, seed = order
    if isinstance(order, str) and ":" in order:
        order, s = order.split(":", 1)
        seed = int(s)
    if order not in ORDERS:
        raise KernelError(f"unknown order {order!r}; have {list(ORDERS)}")
    return order, int(seed)


class Library:
    def __init__(self, so_path, racecheck=0):
        self.path = Path(so_path)
        self.racecheck = parse_racecheck(racecheck)
        self._lib = lib = ctypes.CDLL(str(so_path), mode=os.RTLD_LOCAL | os.RTLD_NOW)
        lib.msl_emu_kernel_name.restype = ctypes.c_char_p
        P = ctypes.POINTER
        u32p, u64p = P(ctypes.c_uint32), P(ctypes.c_uint64)
        lib.msl_emu_dispatch.argtypes = [ctypes.c_char_p, u32p, u32p, u32p, P(ctypes.c_void_p), u64p, ctypes.c_int,
                                         u32p, ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.c_int, ctypes.c_int,
                                         u64p, u64p, ctypes.c_char_p, ctypes.c_int]
        self.instrumented = bool(lib.msl_emu_instrumented())
        self.kernels = [lib.msl_emu_kernel_name(i).decode() for i in range(lib.msl_emu_kernel_count())]
        self.required_buffers = {}
        for i, kname in enumerate(self.kernels):
            a, b, c = (ctypes.c_int * 64)(), (ctypes.c_int * 64)(), (ctypes.c_int * 64)()
            n = lib.msl_emu_kernel_spec(i, a, b, c, 64)
            self.required_buffers[kname] = sorted(b[j] for j in range(n) if a[j] == 1 and not c[j])  # 1 = ARG_BUFFER
        self.function_constants = {}
        for i in range(lib.msl_emu_fc_count()):
            idx, size, tag, name = ctypes.c_int(), ctypes.c_int(), ctypes.c_char(), ctypes.c_char_p()
            lib.msl_emu_fc_info(i, ctypes.byref(idx), ctypes.byref(size), ctypes.byref(tag), ctypes.byref(name))
            self.function_constants[idx.value] = (name.value.decode(), tag.value.decode(), size.value)
        with _compile_lock:  # function constants are per-library globals: one lock per loaded library file
            self._lock = _dispatch_locks.setdefault(str(self.path.resolve()), threading.Lock())

    def symbolize(self, text: str) -> str:
        """Replace <pc:0x..> markers by source locations (addr2line on the -g library)."""
        pcs = sorted(set(_PC_RE.findall(text)))
        if not pcs or not shutil.which("addr2line"):
            return text
        try:
            out = subprocess.run(["addr2line", "-e", str(self.path), "-i", "-C", "-f", "-a", *pcs],
                                 capture_output=True, text=True, timeout=60).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return text
        names, cur, frames = {}, None, []
        for line in out + [None]:  # -a prints the address before each group of frames
            if line is None or re.fullmatch(r"0x[0-9a-f]+", line):
                if cur is not None:
                    names[cur] = _format_frames(frames)
                if line is not None:
                    cur, frames = hex(int(line, 16)), []
            else:
                frames.append(line)
        return _PC_RE.sub(lambda m: names.get(hex(int(m.group(1), 16)), m.group(0)), text)

    def dispatch(self, name, *, buffers, threads_per_threadgroup, threadgroups=None, threads=None,
                 function_constants=None, threadgroup_memory=None, order="forward", seed=0, strict_barrier=True,
                 racecheck=None) -> DispatchStats:
        """Run kernel `name` over the grid; returns DispatchStats (per-buffer traffic in .buffers).

        buffers: {index: numpy array or numpy scalar}; arrays must be C-contiguous; written in place.
        order:   forward | reverse | shuffle | runahead | interleave (or "shuffle:SEED"), see README.
        racecheck: None -> the Library default (compile(racecheck=...) / $MSLEMU_RACECHECK)."""
        if name not in self.kernels:
            raise KernelError(f"no kernel {name!r}; have {self.kernels}")
        order, seed = parse_order(order, seed)
        race = self.racecheck if racecheck is None else parse_racecheck(racecheck)
        if race and not self.instrumented:
            raise KernelError("racecheck requires an instrumented build (compile(instrument=True), no ASan)")
        lib = self._lib
        missing = [i for i in self.required_buffers[name] if i not in buffers]
        if missing:
            raise KernelError(f"{name}: buffer(s) {missing} not bound")
        keep = []
        nbuf = (max(buffers) + 1) if buffers else 0
        ptrs = (ctypes.c_void_p * max(nbuf, 1))()
        sizes = (ctypes.c_uint64 * max(nbuf, 1))()
        for idx, arr in buffers.items():
            if not isinstance(arr, np.ndarray):
                arr = np.array(arr)  # numpy scalar -> 0-d array (constant T& parameter)
            if not arr.flags.c_contiguous:
                raise KernelError(f"buffer {idx} must be C-contiguous")
            keep.append(arr)
            ptrs[idx] = arr.ctypes.data if arr.nbytes else None
            sizes[idx] = arr.nbytes
        tgm = threadgroup_memory or {}
        ntg = (max(tgm) + 1) if tgm else 0
        tgsz = (ctypes.c_uint32 * max(ntg, 1))(*[tgm.get(i, 0) for i in range(ntg)])
        u3 = lambda t: (ctypes.c_uint32 * 3)(*(list(t) + [1] * (3 - len(t))))
        tptg = u3(threads_per_threadgroup)
        tgs = u3(threadgroups) if threadgroups is not None else None
        thr = u3(threads) if threads is not None else None
        if (tgs is None) == (thr is None):
            raise KernelError("give exactly one of threadgroups= or threads=")
        stats = (ctypes.c_uint64 * len(_STAT_KEYS))()
        bstats = (ctypes.c_uint64 * (max(nbuf, 1) * len(_BUF_KEYS)))()
        err = ctypes.create_string_buffer(1 << 16)
        with self._lock:  # function constants are library-global state
            lib.msl_emu_fc_reset()
            for idx, val in (function_constants or {}).items():
                if idx not in self.function_constants:
                    raise KernelError(f"unknown function constant index {idx}")
                _, tag, size = self.function_constants[idx]
                data = struct.pack(_FC_FMT[tag], val)
                if lib.msl_emu_fc_set(idx, data, len(data)) != 0:
                    raise KernelError(f"could not set function constant {idx}")
            rc = lib.msl_emu_dispatch(name.encode(), tgs, tptg, thr, ptrs, sizes, nbuf, tgsz, ntg, ORDERS[order], seed,
                                      int(strict_barrier), race, stats, bstats, err, len(err))
        if rc != 0:
            msg = self.symbolize(err.value.decode(errors="replace"))
            msg += f"  [order={order}, seed={seed}, racecheck={race}]"
            if rc == 3:
                raise RaceError(msg)
            if "out-of-bounds" in msg or "redzone" in msg or "null-pointer" in msg:
                raise OutOfBoundsError(msg)
            raise KernelError(msg)
        st = DispatchStats(**dict(zip(_STAT_KEYS, list(stats))), order=order, seed=seed, racecheck=race,
                           instrumented=self.instrumented)
        if self.instrumented:
            for idx in buffers:
                v = bstats[idx * len(_BUF_KEYS):(idx + 1) * len(_BUF_KEYS)]
                st.buffers[idx] = BufferStats(*[int(x) for x in v])
        return st
