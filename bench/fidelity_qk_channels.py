"""Do SmolLM2's queries share its keys' large channels? (README, Fidelity: channel scaling.)

    python bench/fidelity_qk_channels.py [tokens]

One reference pass over the first ``tokens`` (default 2048) of the shipped text;
per layer and KV head, the per-channel RMS of the centred keys (k_c) and of the
queries of the head's group (q_c), after RoPE, as attention sees them. Prints the
correlation of log q_c with log k_c, and the logit error variance predicted by
|q * s|^2 |k / s|^2 (a key's quantization error spread evenly over the channels
by the rotation) for three choices of s, relative to no scaling: keys-only max
(what ``channel_scale`` does, alpha 0.5), keys-only RMS, and the query-aware
sqrt(rms k_c / rms q_c) that ``calibrate_channel_scales`` computes.
Output: bench/results/fidelity_qk_channels.txt.
"""

import sys

import mlx.core as mx
import numpy as np

from tqmetal import fidelity as F
from tqmetal import generate as G
from tqmetal.patch import patched


def main(argv):
    n = int(argv[0]) if argv else 2048
    model, tok = G.load_model(None)
    F.numpy_matmuls(model)
    tokens, _ = F.tokenize_text(tok, F.load_text(None), n)
    store = {}

    class Capture(F._reference_cache_class_cached()):
        def fused_attention(self, queries, keys, values, *, scale, mask=None, sinks=None):
            store[self.layer] = (np.array(queries.astype(mx.float32))[0],
                                 np.array(keys.astype(mx.float32))[0])
            return super().fused_attention(queries, keys, values, scale=scale, mask=mask,
                                           sinks=sinks)

    caches = []
    for i in range(len(model.layers)):
        caches.append(Capture())
        caches[-1].layer = i
    with patched():
        mx.eval(model(mx.array(tokens)[None], cache=caches))

    corr, r_max, r_rms, r_opt = [], [], [], []
    for layer in sorted(store):
        q, k = store[layer]
        Hq, Hk = q.shape[0], k.shape[0]
        qg = q.reshape(Hk, Hq // Hk, *q.shape[1:])
        for h in range(Hk):
            kc = k[h] - k[h].mean(0)
            sk = np.sqrt((kc ** 2).mean(0)) + 1e-8
            mk = np.abs(kc).max(0) + 1e-8
            sq = np.sqrt((qg[h] ** 2).mean((0, 1))) + 1e-8
            corr.append(np.corrcoef(np.log(sq), np.log(sk))[0, 1])

            def ratio(s):
                return (np.sum(sq ** 2 * s ** 2) * np.sum(sk ** 2 / s ** 2)) / (
                    np.sum(sq ** 2) * np.sum(sk ** 2))

            r_max.append(ratio(np.sqrt(mk)))
            r_rms.append(ratio(np.sqrt(sk)))
            r_opt.append(ratio(np.sqrt(sk / sq)))

    def g(x):
        return float(np.exp(np.mean(np.log(x))))

    print(f"{len(tokens)} tokens, {len(store)} layers, {len(corr)} KV heads")
    print(f"corr(log rms q_c, log rms k_c) per KV head: median {np.median(corr):.2f}, "
          f"min {np.min(corr):.2f}, max {np.max(corr):.2f}")
    print("predicted logit error variance against no scaling (geometric mean over heads): "
          f"keys-only max, alpha 0.5 (channel_scale) {g(r_max):.2f}x; keys-only rms "
          f"{g(r_rms):.2f}x; query-aware sqrt(rms k / rms q) (calibrate_channel_scales) "
          f"{g(r_opt):.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
