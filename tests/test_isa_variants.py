"""Every CPU kernel variant (portable, AVX2, AVX-512, AVX-512 with VNNI, with AMX) against the reference.

The machine runs the best variant it supports; TQMETAL_CPU_ISA lowers the choice, so
the others are exercised here too, in subprocesses (the choice is made once per process).
"""

import os
import subprocess
import sys
import textwrap

import pytest

import tqmetal

_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import reference as R
    import tqmetal
    assert tqmetal.cpu_isa() == {isa!r}, tqmetal.cpu_isa()
    cases = [
        # decode: row kernel, split-K, strided views, sinks, bool mask
        R.make_case(B=1, Hq=4, Hkv=1, L=1, N=3001, D=128, dtype="float32", group_size=64,
                    mask="bool_few", sinks=True, strided=True, seed=1),
        # K8V4, tail, causal, float16
        R.make_case(B=2, Hq=6, Hkv=3, L=3, N=301, T=7, D=64, dtype="float16", group_size=32,
                    k_bits=8, mask="causal", seed=2),
        # prefill kernel (32+ rows per KV head), additive mask, bfloat16
        R.make_case(B=1, Hq=4, Hkv=2, L=40, N=257, D=128, dtype="bfloat16", group_size=128,
                    mask="add_inf", seed=3),
        # group 16 (head dim 80) through the 8-lane chunks
        R.make_case(B=1, Hq=2, Hkv=1, L=2, N=99, T=3, D=80, dtype="float32", group_size=16,
                    seed=4),
        # prefill with K4V8 and a tail
        R.make_case(B=1, Hq=8, Hkv=2, L=33, N=150, T=20, D=64, dtype="float32", group_size=64,
                    v_bits=8, mask="causal", seed=5),
        # decode, group 32 (two groups per 32-byte segment in the VNNI path), odd
        # block ends, 8 rows per KV head, head dim 256
        R.make_case(B=1, Hq=8, Hkv=1, L=1, N=1037, T=5, D=256, dtype="float32", group_size=32,
                    seed=6),
        R.make_case(B=1, Hq=16, Hkv=2, L=1, N=515, D=128, dtype="float32", group_size=64,
                    k_bits=8, v_bits=8, mask="causal", sinks=True, seed=7),
        # head dim 128, 4-bit K: AMX tiles for the K scores where the CPU has them
        # (8 rows x 2 groups: two score tiles; 4 rows x 4 groups; one group; a
        # partial last block; two sequences)
        R.make_case(B=2, Hq=8, Hkv=1, L=1, N=1000, T=3, D=128, dtype="float32", group_size=64,
                    v_bits=8, mask="causal", seed=8),
        R.make_case(B=1, Hq=8, Hkv=2, L=1, N=777, D=128, dtype="float16", group_size=32,
                    mask="bool_few", seed=9),
        R.make_case(B=1, Hq=2, Hkv=1, L=2, N=531, D=128, dtype="bfloat16", group_size=128,
                    mask="add_inf", strided=True, seed=10),
        # bit-stream widths (codes straddle words): the float kernels' run-time unpack,
        # and with VNNI rows expanded to bytes by AVX512-VBMI where the CPU has it
        R.make_case(B=1, Hq=8, Hkv=2, L=1, N=1500, T=4, D=128, dtype="float16", group_size=64,
                    k_bits=5, v_bits=3, mask="causal", seed=11),
        R.make_case(B=1, Hq=4, Hkv=1, L=2, N=333, D=256, dtype="float32", group_size=32,
                    k_bits=3, v_bits=6, mask="bool_few", sinks=True, strided=True, seed=12),
        R.make_case(B=1, Hq=4, Hkv=2, L=40, N=200, T=9, D=64, dtype="bfloat16", group_size=32,
                    k_bits=6, v_bits=2, mask="causal", seed=13),
        R.make_case(B=2, Hq=3, Hkv=3, L=1, N=700, D=64, dtype="float32", group_size=64,
                    k_bits=2, v_bits=5, seed=14),
    ]
    for c in cases:
        out = tqmetal.sdpa_int4(c.q, c.k, c.v, **c.kwargs())
        R.check_close(out, c.reference(), c.tol(), context="isa={isa} " + repr(c))
    print("ok")
    """
)

_LEVELS = ["generic", "avx2", "avx512", "avx512vnni", "avx512amx"]


@pytest.mark.parametrize("isa", _LEVELS)
def test_kernel_variant(isa):
    best = tqmetal.cpu_isa()
    if _LEVELS.index(isa) > _LEVELS.index(best):
        pytest.skip(f"this CPU runs {best}; {isa} is not available")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TQMETAL_CPU_ISA=isa)
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(tests=here, isa=isa)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("isa", _LEVELS)
def test_full_op_grid(isa):
    """The whole op grid of tests/test_sdpa_int4.py (but its long-context cases) once per lower
    variant; the best variant runs it in the main session."""
    best = tqmetal.cpu_isa()
    if _LEVELS.index(isa) > _LEVELS.index(best):
        pytest.skip(f"this CPU runs {best}; {isa} is not available")
    if isa == best:
        pytest.skip(f"{isa} runs the grid in this session")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TQMETAL_CPU_ISA=isa)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
         os.path.join(here, "test_sdpa_int4.py")],
        env=env, capture_output=True, text=True, timeout=1800, cwd=os.path.dirname(here),
    )
    assert r.returncode == 0, f"TQMETAL_CPU_ISA={isa}:\n" + r.stdout[-6000:] + r.stderr[-3000:]
