"""A model over several processes (MLX's distributed engine), with tqmetal's caches.

    mlx.launch --backend ring -n 2 --hosts 127.0.0.1 -- python -m tqmetal.generate --kv int4
    mlx.launch --hostfile two-macs.json -- tqmetal generate --model <repo> --kv int4

:func:`shard_model` splits a loaded mlx-lm model over the group that
``mx.distributed.init()`` returns (one process per rank, started by
``mlx.launch``):

* **tensor parallel** (mlx-lm's ``model.shard(group)``): every rank holds
  ``1/N`` of every layer's heads and MLP; its caches hold only its heads;
* **pipeline**: every rank holds a contiguous block of layers (the model's own
  ``model.model.pipeline(group)`` where mlx-lm has one, else
  :func:`pipeline_llama` for the llama family, which the bundled SmolLM2 is;
  its 3 KV heads cannot be split over 2 ranks, so it is pipelined).

Either way each rank's caches come from ``make_prompt_cache(model)`` as usual
(one per local layer, with the local head count) and its attention is the same
fused op on its own heads or layers: nothing in the caches knows about the
split. Every rank ends with the same logits (the last stage's hidden state is
all-gathered), so greedy output equals the single-process run.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask

__all__ = ["shard_model", "pipeline_llama", "is_distributed"]


def is_distributed(group=None) -> bool:
    group = group or mx.distributed.init()
    return group.size() > 1


def _keep_send(cache, h):
    """Make the cache's state depend on the send of ``h``: mlx-lm evaluates only the
    cache state after a prefill chunk, and the next stage waits for this send."""
    if cache is None:
        return
    for owner, name in ((cache, "keys"), (getattr(cache, "fp", None), "keys"),
                        (cache, "_f")):
        if owner is None or getattr(owner, name, None) is None:
            continue
        value = getattr(owner, name)
        if isinstance(value, mx.array):
            setattr(owner, name, mx.depends(value, h))
        elif isinstance(value, tuple):
            setattr(owner, name, (mx.depends(value[0], h), *value[1:]))
        else:
            continue
        return


def _pipelined_call(self, inputs, cache=None, input_embeddings=None):
    h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
    layers = self.pipeline_layers
    if cache is None:
        cache = [None] * len(layers)
    mask = create_attention_mask(h, cache[0])
    rank, size, group = self.pipeline_rank, self.pipeline_size, self.pipeline_group
    if rank < size - 1:  # the stage before this one runs on rank + 1
        h = mx.distributed.recv_like(h, rank + 1, group=group)
    for layer, c in zip(layers, cache):
        h = layer(h, mask, cache=c)
    if rank != 0:
        h = mx.distributed.send(h, rank - 1, group=group)
        _keep_send(cache[-1], h)
    h = mx.distributed.all_gather(h, group=group)[: h.shape[0]]  # rank 0 ran the last layers
    return self.norm(h)


_CLASSES = {}


def _subclass(cls, name, attrs):
    key = (cls, name)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Pipelined{cls.__name__}", (cls,), attrs)
    return _CLASSES[key]


def pipeline_llama(model, group, split: Optional[list] = None):
    """Pipeline an mlx-lm llama-family ``Model`` (``model.model.layers``) over ``group``,
    as mlx-lm's ``PipelineMixin`` does: rank r runs the layers after those of ranks
    r+1 .. N-1 (rank N-1 the first ones, rank 0 the last); the other layers' weights
    are dropped."""
    inner = model.model
    if getattr(inner, "layer_types", None) and any(
            t != "full_attention" for t in inner.layer_types):
        raise ValueError("pipeline_llama: sliding-window layers are not supported")
    n, rank, size = len(inner.layers), group.rank(), group.size()
    if split is None:
        base, extra = divmod(n, size)
        split = [base + (1 if r < extra else 0) for r in range(size)]
    if len(split) != size or any(s <= 0 for s in split) or sum(split) != n:
        raise ValueError(f"split {split} must have {size} positive entries summing to {n}")
    start = sum(split[rank + 1 :])
    end = start + split[rank]
    inner.pipeline_rank, inner.pipeline_size, inner.pipeline_group = rank, size, group
    inner.start_idx, inner.end_idx = start, end
    layers = inner.layers[:end]
    layers[:start] = [None] * start
    inner.layers = layers
    inner.__class__ = _subclass(type(inner), "inner", {
        "__call__": _pipelined_call,
        "pipeline_layers": property(lambda self: self.layers[self.start_idx : self.end_idx]),
    })
    model.__class__ = _subclass(type(model), "outer", {
        "layers": property(lambda self: self.model.pipeline_layers),
    })
    return model


def shard_model(model, group=None, mode: str = "auto"):
    """Split ``model`` over ``group`` (default: ``mx.distributed.init()``); no-op for one
    process. ``mode``: "tensor" (mlx-lm's ``shard``), "pipeline", or "auto" (tensor
    parallel when the model has ``shard`` and its KV heads divide evenly, else pipeline)."""
    group = group or mx.distributed.init()
    if group.size() == 1:
        return model
    if mode not in ("auto", "tensor", "pipeline"):
        raise ValueError(f"mode must be 'auto', 'tensor' or 'pipeline', got {mode!r}")
    n = group.size()
    heads_ok = all(getattr(layer.self_attn, "n_kv_heads", n) % n == 0
                   for layer in model.layers if hasattr(layer, "self_attn"))
    if mode == "tensor" or (mode == "auto" and hasattr(model, "shard") and heads_ok):
        if not hasattr(model, "shard"):
            raise ValueError(f"{type(model).__name__} has no tensor-parallel shard()")
        if not heads_ok:
            raise ValueError(f"the KV heads do not divide over {n} ranks: use mode='pipeline'")
        model.shard(group)
        return model
    if hasattr(model, "model") and hasattr(model.model, "pipeline"):
        model.model.pipeline(group)
        return model
    return pipeline_llama(model, group)
