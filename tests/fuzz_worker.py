"""A fuzz-suite worker: runs case specs (JSON lines on stdin) through tqmetal.sdpa_int4
with the CPU kernel variant its environment selects (TQMETAL_CPU_ISA), answers one JSON
line per spec on stdout: {"ok": bool, "msg": str, "err": row NMSE, "isa": variant}.

Started by tests/test_fuzz.py, one process per variant (the variant is chosen once per
process).  Run by hand: echo '{"B":1,"Hq":2,"Hkv":1,"N":40,"D":64}' | python tests/fuzz_worker.py
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fuzz_cases  # noqa: E402
import tqmetal  # noqa: E402


def main() -> None:
    isa = tqmetal.cpu_isa()
    print(json.dumps({"ready": True, "isa": isa}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        try:
            ok, msg, err = fuzz_cases.run_and_check(spec, tqmetal.sdpa_int4)
        except Exception as e:  # noqa: BLE001  (reported, the test fails on it)
            ok, msg, err = False, f"{type(e).__name__}: {e}", None
        print(json.dumps({"ok": ok, "msg": msg[:4000], "err": err, "isa": isa}), flush=True)


if __name__ == "__main__":
    main()
