"""The `tqmetal` console script: one subcommand per module, imported on demand."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Each module has main(argv) -> int.
COMMANDS = {
    "generate": ("tqmetal.generate", "generate text with an int4 KV cache (mlx-lm model or GGUF)"),
    "serve": ("tqmetal.serve", "mlx_lm.server with int4 caches, fused attention, continuous batching"),
    "eval": ("tqmetal.fidelity", "fidelity report: int4/int8 cache against fp16 on a real model"),
    "passkey": ("tqmetal.passkey", "long-context retrieval grid: a number hidden in filler, per cache"),
    "plan": ("tqmetal.plan", "memory planner: which context fits in how much memory"),
    "bench": ("tqmetal.bench", "benchmarks: the op grid with plots, and `bench e2e` (mlx-lm tokens/s)"),
}


def _usage() -> str:
    lines = ["usage: tqmetal <command> [options]", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    lines.append("")
    lines.append("Run `tqmetal <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tqmetal: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
