"""Planted bugs as real edits of the Metal kernels (metal/*.h), run through the MSL emulator.

Each mutant is a list of exact text replacements (each must match exactly once, so a
mutant cannot silently stop applying when the kernels change).  `mutated_tree(name)`
copies metal/ into a temporary folder and applies one mutant there; the tests build the
emulator library from that copy and run the Metal grids on it: every mutant must fail at
least one case of every grid it applies to (tests/test_metal_mutants.py).

Run by hand (about a minute per mutant and path on two cores):

    python tests/mutants/metal_mutants.py            # every mutant, report per grid
    python tests/mutants/metal_mutants.py sinks_by_kv_head
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

METAL_DIR = pathlib.Path(__file__).resolve().parents[2] / "metal"

# name -> {file: [(old, new), ...]}; the same four bugs as reference.PLANTED_BUGS
MUTANTS = {
    "drop_last_key": {
        "sdpa_int4_decode.h": [("const int t1 = min(NT, t0 + block_len);",
                                "const int t1 = min(NT - 1, t0 + block_len);")],
        "sdpa_int4_prefill.h": [("if (t >= NT) {", "if (t >= NT - 1) {")],
    },
    "sinks_by_kv_head": {
        "sdpa_int4_decode.h": [
            ("const float sk = load_f(sinks, hq * st[ST_SINKS], tq_sinks_dtype) * kLog2e;",
             "const float sk = load_f(sinks, hkv * st[ST_SINKS], tq_sinks_dtype) * kLog2e;"),
            ("const float sk = tq::load_f(sinks, hq * st[ST_SINKS], tq_sinks_dtype) * tq::kLog2e;",
             "const float sk = tq::load_f(sinks, hkv * st[ST_SINKS], tq_sinks_dtype) * tq::kLog2e;"),
        ],
        "sdpa_int4_prefill.h": [
            ("const float sk = tq::load_f(sinks, my_hq * st[ST_SINKS], tq_sinks_dtype) * tq::kLog2e;",
             "const float sk = tq::load_f(sinks, hkv * st[ST_SINKS], tq_sinks_dtype) * tq::kLog2e;"),
        ],
    },
    "causal_off_by_one": {
        "sdpa_int4_decode.h": [("s[r] = t <= qpos + NT - L ? s[r] : tq::kMasked;",
                                "s[r] = t < qpos + NT - L ? s[r] : tq::kMasked;")],
        "sdpa_int4_prefill.h": [("s = t <= my_qpos + NT - L ? s : tq::kMasked;",
                                 "s = t < my_qpos + NT - L ? s : tq::kMasked;")],
    },
    # the split-K merge of the 2-pass decode averages the blocks' normalized outputs instead
    # of weighting them by their log-sum-exp (the prefill kernel does not split the keys)
    "average_split_merge": {
        "sdpa_int4_decode.h": [(
            "    lsum += w * part_sum[i];\n    acc += w * part_out[i * D];",
            "    lsum += w * 0.0f + 1.0f;\n    acc += part_out[i * D] / part_sum[i];",
        )],
    },
}

# Unpacking bugs of mx.quantize's bit-stream widths (2, 3, 5, 6 bits), which the float64
# reference cannot plant (it has no unpacker to break): run on the same grids, whose
# bit-stream cases (STREAM_CASES of tests/test_metal_decode.py and test_metal_prefill.py,
# and the edge cases with those widths) must catch them.
UNPACK_MUTANTS = {
    # a code that straddles two words loses its bits from the second word
    "stream_straddle_dropped": {
        "sdpa_int4_decode.h": [("    const uint hi = word(a, b, w0 + 1, two);",
                                "    const uint hi = 0u * word(a, b, w0 + 1, two);")],
        "sdpa_int4_prefill.h": [("          buf |= ulong(src[next++]) << have;",
                                 "          buf = ulong(src[next++]);")],
    },
}

ALL_MUTANTS = {**MUTANTS, **UNPACK_MUTANTS}

PATHS = {"decode": "sdpa_int4.metal", "prefill": "sdpa_int4_prefill.metal"}


def applies_to(name: str, path: str) -> bool:
    header = "sdpa_int4_decode.h" if path == "decode" else "sdpa_int4_prefill.h"
    return header in ALL_MUTANTS[name]


def mutated_tree(name: str, dest: pathlib.Path | None = None) -> pathlib.Path:
    """A copy of metal/ with mutant `name` applied; returns the folder."""
    if dest is None:
        # a fixed folder: the emulator caches libraries by source text and path
        dest = pathlib.Path(tempfile.gettempdir()) / f"tqmetal-mutant-{name}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
    dest = pathlib.Path(dest)
    for f in METAL_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, dest / f.name)
    for fname, edits in ALL_MUTANTS[name].items():
        text = (dest / fname).read_text()
        for old, new in edits:
            n = text.count(old)
            if n != 1:
                raise RuntimeError(f"mutant {name}: {fname} has {n} copies of {old!r} (expected 1): update the mutant")
            text = text.replace(old, new)
        (dest / fname).write_text(text)
    return dest


def main(argv) -> int:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import test_metal_mutants as TM

    names = argv or list(ALL_MUTANTS)
    status = 0
    for name in names:
        for path in PATHS:
            if not applies_to(name, path):
                continue
            failed, total, first = TM.run_grid_on_mutant(name, path)
            ok = failed > 0
            status |= not ok
            print(f"{name:22s} {path:8s} {'CAUGHT' if ok else 'MISSED'}: {failed}/{total} cases fail"
                  + (f"; first: {first[:200]}" if first else ""), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
