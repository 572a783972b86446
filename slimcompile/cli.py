"""The `slimcompile` command: dispatches to inspect / demo / eval / calibrate.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `--help` is fast. A `ValueError`
(bad flag value, bad option, unknown model, unreadable path; `SlimOptionError` is one) prints one
line, `slimcompile CMD: error: --flag: ...`, and exits 2, without a traceback; subcommands check
every flag, and options against the model's config, before they load weights.
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


def _attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--length -5K` -> `--length=-5K` for the flags of `parser` that take one value.

    argparse takes a value that starts with '-' and is not a plain negative number ('-5K',
    '-1K,2K') for an option and reports a misleading "expected one argument"; attached with '='
    it reaches the flag's own validation, which says what is allowed. A following token that
    is itself one of the parser's options is left alone.
    """
    single = {
        opt: action
        for action in parser._actions
        if action.option_strings and action.nargs is None
        for opt in action.option_strings
    }
    longs = [o for o in parser._option_string_actions if o.startswith("--")]

    def is_option(token: str) -> bool:
        name = token.split("=", 1)[0]
        return name in parser._option_string_actions or (
            name.startswith("--") and any(o.startswith(name) for o in longs)
        )

    def single_value_flag(token: str) -> bool:
        if token in single:
            return True
        matches = {o for o in longs if o.startswith(token)} if token.startswith("--") and parser.allow_abbrev else set()
        return len(matches) == 1 and next(iter(matches)) in single

    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (nxt is not None and len(nxt) > 1 and nxt.startswith("-") and nxt != "--" and "=" not in token
                and single_value_flag(token) and not is_option(nxt)):
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


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
    if chosen in COMMANDS:
        argv = _attach_dash_values(sub.choices[chosen], argv)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"slimcompile {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
