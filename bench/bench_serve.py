"""Load benchmark: mlx-lm's server (fp16, batched; --kv-bits 4, unbatched) against
`tqmetal serve --kv int4` (batched), on the bundled SmolLM2-135M.

    python bench/bench_serve.py                 # 1, 4, 16 clients, 2K-token prompts (about 80 min on 2 cores)
    python bench/bench_serve.py --quick         # smoke run: 256-token prompts, 1 and 4 clients

One run starts each server in turn (never two at once) on a loopback port,
waits for /health, and for each concurrency c sends c requests at once from c
client threads (real HTTP, streaming completions, greedy, distinct prompts of
the same length so the prompt cache cannot help), then stops the server.

Servers (all ``mlx_lm.server`` code; GGUF loading swapped in, since
mlx_lm.server cannot read the bundled GGUF file):

* ``mlx-lm fp16``: ``tqmetal serve --kv fp16`` = mlx_lm.server with mlx-lm's own
  ``KVCache`` (in the model's dtype) and mlx-lm's attention, continuous batching;
* ``mlx-lm --kv-bits 4``: the same with ``--kv-bits 4 --quantized-kv-start 0``
  (mlx-lm's ``QuantizedKVCache`` from the first token, its quantized attention;
  mlx_lm.server serves these requests one at a time);
* ``tqmetal int4``: ``tqmetal serve --kv int4`` (Int4KVCache g64, window 128,
  sinks 4; fused attention; continuous batching).

Per server and concurrency: aggregate generation tokens/s (all completion
tokens / wall time from the first request sent to the last answer), median
and max time to first token, the server's peak resident memory (VmHWM, the
process so far), and the KV bytes of c requests of prompt + generated tokens
(the bytes of the caches' ``state``, i.e. what they hold, built with the server's
cache classes and options from values of the right shape: bytes depend only on
shapes).
Writes ``<out>/bench_serve[_quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

SERVERS = {
    "mlx-lm fp16": ["--kv", "fp16"],
    "mlx-lm --kv-bits 4": ["--kv", "fp16", "--kv-bits", "4", "--quantized-kv-start", "0"],
    "tqmetal int4": ["--kv", "int4"],
}
START_TIMEOUT_S = 300


def _proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Server:
    def __init__(self, flags, log_path, max_tokens):
        from tqmetal.serve import start_server

        self.log = open(log_path, "w")
        self.proc, self.port = start_server(
            ["--prompt-cache-size", "0", "--max-tokens", str(max_tokens), *flags], self.log,
            timeout=START_TIMEOUT_S)
        self.cmd = self.proc.args

    def peak_rss(self):
        return _proc_status(self.proc.pid, "VmHWM")

    def stop(self):
        from tqmetal.serve import stop_server

        stop_server(self.proc)
        self.log.close()


def _one_request(port, prompt, max_tokens, timeout):
    """Stream one completion; (ttft_s, completion_tokens, end_time)."""
    from tqmetal.serve import sse_payloads

    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=body,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    ttft, tokens, chunks = None, None, 0
    for msg in sse_payloads(r):
        if msg.get("usage"):
            tokens = msg["usage"]["completion_tokens"]
        for ch in msg.get("choices", []):
            if ch.get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    c.close()
    return ttft, tokens if tokens is not None else chunks, time.perf_counter()


def run_level(port, prompts, max_tokens, timeout):
    results, errors = [None] * len(prompts), []

    def client(i):
        try:
            results[i] = _one_request(port, prompts[i], max_tokens, timeout)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise RuntimeError("; ".join(errors))
    wall = max(r[2] for r in results) - t0
    ttfts = [r[0] for r in results if r[0] is not None]
    tokens = sum(r[1] for r in results)
    return {"clients": len(prompts), "wall_s": wall, "gen_tokens": tokens,
            "agg_gen_tok_s": tokens / wall, "ttft_median_s": statistics.median(ttfts),
            "ttft_max_s": max(ttfts)}


def make_prompts(tokenizer, n_tokens, count, offset=0):
    """``count`` distinct texts of about ``n_tokens`` tokens each (the bundled prose)."""
    from tqmetal.corpus import load_text, tokenize_text

    ids, _ = tokenize_text(tokenizer, load_text(), n_tokens * (count + offset) + 64)
    out = []
    for i in range(offset, offset + count):
        out.append(tokenizer.decode(ids[i * n_tokens : (i + 1) * n_tokens]))
    return out


def kv_bytes(model, server_flags, clients, tokens):
    """nbytes of the caches of ``clients`` requests of ``tokens`` tokens each, built with
    the server's classes and options from values of the right shape."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tqmetal.cache import make_prompt_cache
    from tqmetal.patch import patched

    kv = server_flags[server_flags.index("--kv") + 1]
    kv_bits = "--kv-bits" in server_flags
    total, dtype = 0, None
    with patched():
        for _ in range(clients):
            caches = make_prompt_cache(model, kv=kv)
            for layer, c in zip(model.layers, caches):
                attn = layer.self_attn
                H, D = attn.n_kv_heads, attn.head_dim
                dtype = layer.self_attn.k_proj.scales.dtype if hasattr(
                    attn.k_proj, "scales") else attn.k_proj.weight.dtype
                k = mx.random.normal((1, H, tokens, D)).astype(dtype)
                c.update_and_fetch(k, k)
            if kv_bits:  # mlx_lm.server: maybe_quantize_kv_cache(kv_bits=4, group 64)
                caches = [c.to_quantized(group_size=64, bits=4) for c in caches]
            mx.eval([c.state for c in caches])
            # bytes held, counted the same way for every cache kind: the arrays of
            # `state` (mlx-lm's nbytes counts its buffers' spare capacity too)
            total += sum(a.nbytes for c in caches for _, a in tree_flatten(c.state)
                         if isinstance(a, mx.array))
    return total, str(dtype).rsplit(".", 1)[-1]


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 256-token prompts, 1 and 4 clients, 8 tokens each")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 2048 (quick: 256)")
    p.add_argument("--max-tokens", type=int, default=None, help="per request; default 64 (quick: 8)")
    p.add_argument("--clients", default=None, help="comma-separated; default 1,4,16 (quick: 1,4)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated subset of: {', '.join(SERVERS)}")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--timeout", type=float, default=3600, help="per request, seconds")
    args = p.parse_args(argv)
    P = args.prompt_tokens or (256 if args.quick else 2048)
    G = args.max_tokens or (8 if args.quick else 64)
    levels = [int(x) for x in (args.clients or ("1,4" if args.quick else "1,4,16")).split(",")]
    names = [s.strip() for s in args.servers.split(",")]
    for n in names:
        if n not in SERVERS:
            p.error(f"--servers: unknown {n!r}; expected some of {list(SERVERS)}")

    from tqmetal.gguf import default_model_path, load_gguf

    model, tokenizer = load_gguf(default_model_path())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_serve_quick" if args.quick else "bench_serve"
    report = {"machine": machine(), "prompt_tokens": P, "max_tokens": G, "clients": levels,
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "servers": {}}
    offset = 0
    for name in names:
        flags = SERVERS[name]
        log = out_dir / f"{stem}_{name.replace(' ', '_').replace('-', '')}.log"
        print(f"== {name}: starting", flush=True)
        srv = Server(flags, log, G)
        rows = []
        try:
            # warm-up (weights paged in, kernels built): not timed
            run_level(srv.port, make_prompts(tokenizer, 64, 1, offset=10_000 // 64),
                      4, args.timeout)
            for c in levels:
                # distinct prompts everywhere: no server can reuse a cached prefix
                prompts = make_prompts(tokenizer, P, c, offset=offset)
                offset += c
                row = run_level(srv.port, prompts, G, args.timeout)
                row["peak_rss_bytes"] = srv.peak_rss()
                row["kv_bytes"], row["kv_dtype"] = kv_bytes(model, flags, c, P + G)
                rows.append(row)
                print(f"   {c:>3} clients: {row['agg_gen_tok_s']:.2f} gen tok/s, TTFT median "
                      f"{row['ttft_median_s']:.2f} s, peak RSS {row['peak_rss_bytes'] / 2**20:.0f} "
                      f"MiB, KV {row['kv_bytes'] / 2**20:.1f} MiB", flush=True)
        finally:
            srv.stop()
        report["servers"][name] = {"command": " ".join(srv.cmd[1:]), "levels": rows}

    # ratios at the largest concurrency
    top = levels[-1]

    def at(name, key):
        for r in report["servers"].get(name, {}).get("levels", []):
            if r["clients"] == top:
                return r[key]
        return None

    ratios = {}
    if at("tqmetal int4", "agg_gen_tok_s") and at("mlx-lm --kv-bits 4", "agg_gen_tok_s"):
        ratios["tok_s_vs_kv_bits_4"] = at("tqmetal int4", "agg_gen_tok_s") / at(
            "mlx-lm --kv-bits 4", "agg_gen_tok_s")
    if at("tqmetal int4", "kv_bytes") and at("mlx-lm fp16", "kv_bytes"):
        ratios["kv_bytes_vs_fp16_server"] = at("tqmetal int4", "kv_bytes") / at(
            "mlx-lm fp16", "kv_bytes")
        # the fp16 server's cache is in the model's dtype (float32 on the CPU): also
        # against 2 bytes per element, what it holds with a float16 model (GPU)
        fp = at("mlx-lm fp16", "kv_bytes")
        if at("mlx-lm fp16", "kv_dtype") == "float32":
            ratios["kv_bytes_vs_fp16_server_at_2_bytes"] = at("tqmetal int4", "kv_bytes") / (fp / 2)
    report["ratios_at_max_clients"] = ratios

    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Serving load benchmark ({'quick' if args.quick else 'full'})", "",
             f"{report['date']}; {report['machine']['cpu']}, {report['machine']['cores']} cores; "
             f"prompts {P} tokens, {G} generated per request, greedy, streaming.", "",
             "| server | clients | agg gen tok/s | TTFT median s | TTFT max s | peak RSS MiB | "
             "KV MiB (dtype) |", "|---|---|---|---|---|---|---|"]
    for name, s in report["servers"].items():
        for r in s["levels"]:
            lines.append(f"| {name} | {r['clients']} | {r['agg_gen_tok_s']:.2f} | "
                         f"{r['ttft_median_s']:.2f} | {r['ttft_max_s']:.2f} | "
                         f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['kv_bytes'] / 2**20:.1f} "
                         f"({r['kv_dtype']}) |")
    lines += ["", f"At {top} clients: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()),
              "", "Commands:", ""]
    lines += [f"- {n}: `{s['command']}`" for n, s in report["servers"].items()]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
