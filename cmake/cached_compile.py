#!/usr/bin/env python3
"""Compiler launcher: a content-addressed cache of object files for `pip install .`.

pip builds in an isolated environment whose path is new on every install, and
scikit-build-core then clears CMakeFiles/ (and with it every object file) before
configuring. Without a cache, the README's second command (`pip install ".[test]"`)
compiled everything the first one (`pip install ".[lm]"`) had just compiled.

This launcher keys an object on the compiler (path, size, mtime), the compile
arguments other than output paths, and the preprocessed source without line
markers (so the temporary paths of MLX's and nanobind's headers do not matter,
only their content), and keeps objects and dependency files under CACHE_DIR, which
survives the clearing. CMakeLists.txt uses it when no other launcher (ccache) is set.

Usage: cached_compile.py CACHE_DIR COMPILER ARGS...
"""

import hashlib
import os
import shutil
import subprocess
import sys


def value_of(args, flag):
    for i, a in enumerate(args[:-1]):
        if a == flag:
            return args[i + 1]
    return None


def main():
    cache_dir, cmd = sys.argv[1], sys.argv[2:]
    out, dep = value_of(cmd, "-o"), value_of(cmd, "-MF")
    if out is None or "-c" not in cmd:
        return subprocess.call(cmd)  # not a compile to an object: nothing to cache

    keep = []  # the arguments that decide the object (no output paths, no dependency flags)
    skip = False
    for a in cmd[1:]:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MF", "-MT", "-MQ"):
            skip = True
            continue
        if a in ("-MD", "-MMD", "-c"):
            continue
        keep.append(a)
    pre = subprocess.run([cmd[0], "-E", "-P", *keep], capture_output=True)
    if pre.returncode != 0:
        return subprocess.call(cmd)  # let the real compile report the error
    # The key: code generation flags (include paths and the source's own path only
    # decide which text is compiled, and that text is hashed itself).
    flags, skip = [], False
    for a in keep:
        if skip:
            skip = False
        elif a in ("-isystem", "-iquote", "-I"):
            skip = True
        elif not a.startswith("-I") and not a.endswith((".cpp", ".cc", ".cxx", ".c")):
            flags.append(a)
    st = os.stat(shutil.which(cmd[0]) or cmd[0])
    h = hashlib.sha256()
    h.update(repr((cmd[0], st.st_size, st.st_mtime_ns, flags)).encode())
    h.update(pre.stdout)
    key = os.path.join(cache_dir, h.hexdigest())

    if os.path.exists(key + ".o") and (dep is None or os.path.exists(key + ".d")):
        with open(key + ".o", "rb") as f:
            data = f.read()
        with open(out, "wb") as f:
            f.write(data)
        if dep is not None:
            with open(key + ".d", "rb") as f:
                data = f.read()
            with open(dep, "wb") as f:
                f.write(data)
        return 0

    rc = subprocess.call(cmd)
    if rc == 0:
        os.makedirs(cache_dir, exist_ok=True)
        for src, ext in ((out, ".o"), (dep, ".d")):
            if src is None:
                continue
            tmp = f"{key}{ext}.{os.getpid()}"
            with open(src, "rb") as f, open(tmp, "wb") as g:
                g.write(f.read())
            os.replace(tmp, key + ext)  # atomic: a concurrent build sees all or nothing
    return rc


if __name__ == "__main__":
    sys.exit(main())
