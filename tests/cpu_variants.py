"""Run case specs (tests/fuzz_cases.py) on every CPU kernel variant this machine supports.

TQMETAL_CPU_ISA is read once per process, so each variant gets one long-lived worker
subprocess (tests/fuzz_worker.py), restarted when a case kills it (a crash is reported as
that case's failure, with the signal).  The session fixture `cpu_workers` (tests/conftest.py)
starts them once for the fuzz suite and the edge grid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tqmetal

HERE = os.path.dirname(os.path.abspath(__file__))
LEVELS = ["generic", "avx2", "avx512", "avx512vnni", "avx512amx"]


def supported_variants() -> list:
    """Every variant up to the best this CPU runs (TQMETAL_CPU_ISA lowers the choice only)."""
    best = tqmetal.cpu_isa()
    return LEVELS[: LEVELS.index(best) + 1] if best in LEVELS else [best]


class Worker:
    def __init__(self, isa: str):
        self.isa = isa
        self.proc = None

    def start(self):
        env = dict(os.environ, TQMETAL_CPU_ISA=self.isa)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "fuzz_worker.py")], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1,
        )
        hello = json.loads(self.proc.stdout.readline())
        assert hello["isa"] == self.isa, hello

    def run(self, spec: dict) -> dict:
        """{"ok", "msg", "err", "isa"} for one spec."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            err = self.proc.stderr.read()[-2000:]
            self.proc = None
            sig = f", signal {-rc}" if rc < 0 else ""
            return {"ok": False, "msg": f"worker died (exit {rc}{sig}): {err}", "isa": self.isa, "crash": True}
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
