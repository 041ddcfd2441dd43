"""The CPU sources cross-compile for aarch64 with the NEON kernel path (tests/check_cross_arm64.sh).

Compile-only (nothing runs on arm64). Skipped when the cross compiler is absent:
Debian/Ubuntu ``apt-get install g++-aarch64-linux-gnu``, or point CXX_AARCH64 at another
one (arguments allowed, e.g. ``CXX_AARCH64="clang++-19 --target=aarch64-linux-gnu"``).
"""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "check_cross_arm64.sh")
CXX = os.environ.get("CXX_AARCH64", "aarch64-linux-gnu-g++")


@pytest.mark.skipif(
    shutil.which(shlex.split(CXX)[0]) is None,
    reason=f"aarch64 cross compiler {CXX!r} not found (apt-get install g++-aarch64-linux-gnu)",
)
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_cross_compile_arm64():
    env = dict(os.environ, PYTHON=sys.executable, CXX_AARCH64=CXX)
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode == 77:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, f"check_cross_arm64.sh failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
