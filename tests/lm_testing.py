"""Shared pieces of the mlx-lm integration tests (test_cache.py, test_patch.py)."""

import mlx.core as mx
from mlx_lm.models import llama

from tqmetal import cache as tqcache
from tqmetal import patch as tqpatch


def tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=64, vocab=256, inter=256):
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5, vocab_size=vocab, head_dim=head_dim, rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def tiny_gemma3(layers=4, hidden=64, heads=2, kv_heads=1, head_dim=64, vocab=256, inter=128,
                sliding_window=16, pattern=2):
    """A random mlx-lm gemma3_text model: ``pattern - 1`` sliding-window layers
    (RotatingKVCache(sliding_window)) for each full-attention one."""
    from mlx_lm.models import gemma3_text

    mx.random.seed(0)
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=1e-6, vocab_size=vocab, rope_theta=1e6,
        rope_local_base_freq=1e4, query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window, sliding_window_pattern=pattern,
        max_position_embeddings=4096,
    )
    model = gemma3_text.Model(args)
    model.sanitize({})  # ties lm_head to the embedding, as the released models do
    mx.eval(model.parameters())
    return model


def run(model, cache, tokens, chunks):
    """Logits of every position, feeding tokens in the given chunk sizes."""
    outs, i = [], 0
    for n in chunks:
        outs.append(model(tokens[:, i : i + n], cache=cache))
        mx.eval(outs[-1])
        i += n
    return mx.concatenate(outs, axis=1)


def rel_err(a, b):
    return float(mx.abs(a - b).max() / mx.abs(b).max())
