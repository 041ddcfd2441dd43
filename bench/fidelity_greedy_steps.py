"""Step-by-step look at where a greedy generation leaves the reference's.

    python bench/fidelity_greedy_steps.py [prompt index 0-2] [tokens] [configs]

Takes the prompt ``tqmetal eval`` uses for its greedy comparison (512-token
slices of the shipped text, 3 prompts), generates ``tokens`` greedy tokens with
the reference cache and with each config, and prints per step the reference's
top-2 tokens and margin, each config's top-2 margin and its KL divergence from
the reference's next-token distribution, up to its first divergent token.
Used for bench/results/fidelity_greedy_steps.txt.
"""

import sys

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

from tqmetal import fidelity as F
from tqmetal import generate as G
from tqmetal.patch import patched


def main(argv):
    pi = int(argv[0]) if argv else 0
    n = int(argv[1]) if len(argv) > 1 else 8
    names = argv[2].split(",") if len(argv) > 2 else ["int4-g64-rot-center-abq"]
    model, tok = G.load_model(None)
    F.numpy_matmuls(model)
    ids = list(tok.encode(F.load_text(None), add_special_tokens=True))
    P, prompts = 512, 3
    span = len(ids) - P
    start = int(span * pi / (prompts - 1))
    prompt = ids[start:start + P]

    def gen(cache):
        g = generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=n,
                          prompt_cache=cache, prefill_step_size=F.DEFAULT_CHUNK)
        return [(int(t), np.array(lp.astype(mx.float32))) for t, lp in g]

    with patched():
        ref = gen([F.ReferenceKVCache() for _ in model.layers])
        print(f"prompt {pi} (tokens {start}..{start + P}), reference continuation "
              f"{tok.decode([t for t, _ in ref])!r}")
        for i, (t, lp) in enumerate(ref):
            o = np.argsort(-lp)
            print(f"  ref step {i}: top {o[0]} {lp[o[0]]:.4f} ({tok.decode([int(o[0])])!r}) "
                  f"2nd {o[1]} {lp[o[1]]:.4f} ({tok.decode([int(o[1])])!r}) "
                  f"margin {lp[o[0]] - lp[o[1]]:.4f}")
        for name in names:
            res = gen(F.parse_config(name).make_cache(model))
            d = F.first_divergence([t for t, _ in ref], [t for t, _ in res])
            print(f"{name}: {tok.decode([t for t, _ in res])!r}, first divergence at step {d}")
            for i in range(min(d + 1, n)):
                lp, rl = res[i][1], ref[i][1]
                kl = float(np.sum(np.exp(rl) * (rl - lp)))
                o = np.argsort(-lp)
                print(f"  step {i}: top {o[0]} 2nd {o[1]} margin {lp[o[0]] - lp[o[1]]:.4f}  "
                      f"KL vs ref {kl:.5f}")


if __name__ == "__main__":
    main(sys.argv[1:])
