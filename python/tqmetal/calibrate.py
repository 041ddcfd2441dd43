"""Key channel scales calibrated on the queries and keys a model computes."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models import cache as _mlc

from .key_transforms import normalized_scales
from .patch import patched

__all__ = ["calibrate_channel_scales"]


def calibrate_channel_scales(model, tokens, alpha: float = 0.5, chunk: int = 128) -> list:
    """Per layer, key channel scales ``[1, H_kv, 1, D]`` (float16) from the
    queries and keys the model computes on ``tokens`` (a calibration text):
    ``s_c = (rms_k_c / rms_q_c) ** alpha`` with the keys centred and the queries
    of the KV head's group, normalised like :func:`tqmetal.key_transforms.channel_scales`.
    With rotation, the key's quantization error after the transform is spread
    evenly over the channels, so the logit error goes as |q * s| |k / s|,
    smallest for alpha 0.5; keys-only factors miss that queries are often large
    in the same channels. None for layers whose attention did not run.
    """
    n = len(model.layers)
    stats = [None] * n

    class _Probe(_mlc.KVCache):
        def fused_attention(self, queries, keys, values, *, scale, mask=None, sinks=None):
            L = queries.shape[2]
            k = keys[..., -L:, :].astype(mx.float32)
            B, Hq, _, D = queries.shape
            Hk = k.shape[1]
            q = queries.astype(mx.float32).reshape(B, Hk, Hq // Hk, L, D)
            new = (B * L, mx.sum(k, axis=(0, 2)), mx.sum(k * k, axis=(0, 2)),
                   mx.sum(q * q, axis=(0, 2, 3)) / (Hq // Hk))
            old = stats[self.layer]
            stats[self.layer] = new if old is None else tuple(a + b for a, b in zip(old, new))
            mx.eval(stats[self.layer][1:])
            return None

    caches = []
    for i in range(n):
        caches.append(_Probe())
        caches[-1].layer = i
    toks = mx.array(list(tokens), dtype=mx.int32)[None]
    with patched():
        for start in range(0, toks.shape[1], chunk):
            mx.eval(model(toks[:, start:start + chunk], cache=caches))
    out = []
    for st in stats:
        if st is None:
            out.append(None)
            continue
        cnt, sk, sk2, sq2 = st
        var_k = mx.maximum(sk2 / cnt - (sk / cnt) ** 2, 0.0)
        r = mx.sqrt(var_k) / mx.maximum(mx.sqrt(sq2 / cnt), 1e-12)  # [Hk, D]
        out.append(normalized_scales(r, alpha)[None, :, None, :])
    return out
