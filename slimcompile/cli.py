"""The `slimcompile` command: dispatches to inspect / demo / eval / calibrate.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `--help` is fast. A `ValueError`
(bad option, unknown model, unreadable path) prints one line and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("slimcompile.demo", "long-context retrieval demo: plain model vs backend='slim'"),
    "inspect": ("slimcompile.inspection", "show what every pass did: layer map, guards, tokens and FLOPs per layer"),
    "eval": ("slimcompile.evaluate", "RULER-style accuracy evaluation: full model vs slim"),
    "calibrate": ("slimcompile.calibrate", "measure a model's retrieval layers and choose a schedule"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimcompile", description="SlimInfer token pruning as a torch.compile backend")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                print(f"slimcompile {name}: not available ({e})", file=sys.stderr)
                return 2
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"slimcompile {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
