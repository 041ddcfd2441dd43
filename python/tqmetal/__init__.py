"""tqmetal: attention computed directly on int4/int8-quantized KV caches for MLX."""

from .ops import cpu_isa, gpu_info, num_threads, quantize, sdpa_int4

__version__ = "0.1.0"

__all__ = ["sdpa_int4", "quantize", "cpu_isa", "gpu_info", "num_threads", "__version__"]
