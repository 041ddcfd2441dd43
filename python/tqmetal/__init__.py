"""tqmetal: attention computed directly on int4/int8-quantized KV caches for MLX.

    import tqmetal
    tqmetal.patch_mlx_lm()                          # mlx-lm's attention -> tqmetal.sdpa_int4
    cache = tqmetal.make_prompt_cache(model)        # int4 KV cache for an mlx-lm model

``patch_mlx_lm`` and ``make_prompt_cache`` need mlx-lm and are imported on first
use, so ``import tqmetal`` (the op and the quantizer) does not.
"""

from .ops import cpu_isa, gpu_path, num_threads, quantize, sdpa_int4

__version__ = "0.1.0"

# Top-level names that live in modules importing mlx-lm: name -> module.
_LAZY = {"patch_mlx_lm": "patch", "make_prompt_cache": "cache"}

__all__ = ["sdpa_int4", "quantize", "cpu_isa", "gpu_path", "num_threads", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
