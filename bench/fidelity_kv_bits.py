"""Which bit widths should the cache's keys and values have? (docs/fidelity.md: SmolLM2 on code.)

    python bench/fidelity_kv_bits.py --text-kind code --tokens 8192 --stride 4 --gen-prompts 0 \
        --configs int4-g64-rot-center-abq,k5v3-g64-rot-center-abq,k5v4-g64-rot-center-abq,\
k4v3-g64-rot-center-abq,k6v3-g64-rot-center-abq --json bench/results/fidelity_smollm2_8k_code_bits.json

``tqmetal eval`` (same arguments) with extra formats ``k5v3``, ``k5v4``, ``k6v3``,
``k4v3``, ``k6v4``: keys and values in mx.quantize's 3/5/6-bit layouts, everything
else as Int4KVCache does it (rotation, centering, window, sinks, attend before
quantizing). The fused op has no such formats, so this measures fidelity only: the
cache's Python fallback dequantizes and attends in float32 numpy, the way the
reference cache does. An exploration for a future format, not a product path.
"""

import sys
import mlx.core as mx
import tqmetal.cache as C
import tqmetal.cache_storage as S
import tqmetal.fidelity as F

F._FORMATS.update({"k5v3": ("tq", 5, 3), "k5v4": ("tq", 5, 4), "k6v3": ("tq", 6, 3),
                   "k4v3": ("tq", 4, 3), "k6v4": ("tq", 6, 4)})
_orig_init = C.Int4KVCache.__init__
def init(self, *a, **kw):
    kb, vb = kw.get("k_bits"), kw.get("v_bits")
    if kb in (4, 8) and vb in (4, 8):
        return _orig_init(self, *a, **kw)
    kw["k_bits"], kw["v_bits"] = 4, 4
    _orig_init(self, *a, **kw)
    self.k_bits, self.v_bits = kb, vb
C.Int4KVCache.__init__ = init

_orig_q = C.quantize
def quantize(x, group_size=64, bits=4, **kw):
    if bits in (4, 8):
        return _orig_q(x, group_size, bits, **kw)
    return tuple(mx.quantize(x, group_size, bits))
C.quantize = quantize

_orig_dq = S.dequantize
def dequantize(p, s, b, group_size, bits):
    if bits in (4, 8):
        return _orig_dq(p, s, b, group_size, bits)
    return mx.dequantize(p, s.astype(mx.float16), b.astype(mx.float16), group_size, bits).astype(s.dtype)
S.dequantize = dequantize
C.dequantize = dequantize

_orig_fa = C.Int4KVCache.fused_attention
def fa(self, queries, keys, values, *, scale, mask=None, sinks=None):
    if self.k_bits in (4, 8) and self.v_bits in (4, 8):
        return _orig_fa(self, queries, keys, values, scale=scale, mask=mask, sinks=sinks)
    if sinks is not None or (isinstance(mask, str) and mask != "causal"):
        return None
    if isinstance(mask, mx.array):
        return F.numpy_attention(queries, keys, values, scale, False, mask=mask)
    return F.numpy_attention(queries, keys, values, scale, causal=mask == "causal")
C.Int4KVCache.fused_attention = fa
sys.exit(F.main(sys.argv[1:]))
