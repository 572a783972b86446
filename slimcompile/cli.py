"""The `slimcompile` command: dispatches to inspect / demo / eval / calibrate.

Every subcommand's flags are defined here, in this light module, and parsed before anything
heavy is imported: `--help`, an unknown flag and the flag values checked here (`--set` syntax,
lengths, dtypes, tasks, output folders) answer without importing torch (bench/test_cli_start.py
times it; tests/test_cli_start.py checks that torch stays out). Only then is the subcommand's
module (`run(args) -> int`) imported. A `ValueError` (bad flag value, bad option, unknown model,
unreadable path; `SlimOptionError` is one) prints one line, `slimcompile CMD: error: --flag: ...`,
and exits 2, without a traceback; subcommands check every flag, and options against the model's
config, before they load weights.

`--set` is one flag with one syntax in every subcommand (`parse_sets`): `--set KEY=VALUE
[KEY=VALUE ...]`, repeatable; a value is JSON if it parses (`0.5`, `[14,20]`, `"x"`, `null`,
`true`), else `none`/`null`, `true`/`false` in any case, else the text as a string.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from typing import Any, Sequence

COMMANDS = {
    "demo": ("slimcompile.demo", "long-context retrieval demo: plain model vs backend='slim'"),
    "inspect": ("slimcompile.inspection", "show what every pass did: layer map, guards, tokens and FLOPs per layer"),
    "eval": ("slimcompile.evaluate", "RULER-style accuracy evaluation: full model vs slim"),
    "calibrate": ("slimcompile.calibrate", "measure a model's retrieval layers and choose a schedule"),
}

TASKS = ("passkey", "needle", "multikey", "multivalue", "vartrack")  # = slimcompile.tasks.TASKS (tested)
DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "bfloat16", "float16")
MIN_LENGTH = 64
MAX_LENGTH = 1 << 24  # 16M tokens: far beyond any supported context; guards against "1e9K"

SET_HELP = ("slim option(s), e.g. --set prune_layers=[14,20] keep_ratio=0.3; repeatable; a value is JSON if it parses, "
            "else none/null/true/false (any case), else a string")

# ---------------------------------------------------------------- value parsing (shared by every subcommand)

_WORDS = {"none": None, "null": None, "true": True, "false": False}


def parse_value(text: str) -> Any:
    """A `--set` value: JSON if it parses, else none/null/true/false in any case, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return _WORDS.get(text.strip().lower(), text)


def parse_sets(items: Sequence[str | Sequence[str]] | None) -> dict[str, Any]:
    """`["k=v", ...]` (or nested lists, as argparse's append gives them) -> options dict."""
    flat: list[str] = []
    for it in items or ():
        flat.extend([it] if isinstance(it, str) else list(it))
    out: dict[str, Any] = {}
    for item in flat:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (e.g. keep_ratio=0.3), got {item!r}")
        out[key] = parse_value(raw.strip())
    return out


def parse_length(text: str, flag: str | None = None) -> int:
    """'2048', '2K' (=2048), '1.5k' -> tokens; a ValueError naming `flag`, the value and what is allowed."""
    t = str(text).strip().lower()
    where = f"{flag}: " if flag else ""
    allowed = f"use a whole number of tokens from {MIN_LENGTH} to {MAX_LENGTH}, like 2048 or 2K"
    try:
        number = float(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError:
        raise ValueError(f"{where}bad length {text!r}: {allowed}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}bad length {text!r}: {allowed}")
    value = int(round(number))
    if value < MIN_LENGTH:
        raise ValueError(f"{where}length {text!r} is too short: {allowed}")
    if value > MAX_LENGTH:
        raise ValueError(f"{where}length {text!r} is too long: {allowed}")
    return value


def parse_lengths(text: str, flag: str | None = None) -> list[int]:
    """'1K,2K' -> [1024, 2048]; at least one length."""
    out = [parse_length(x, flag) for x in str(text).split(",") if x.strip()]
    if not out:
        raise ValueError(f"{flag + ': ' if flag else ''}give at least one length, e.g. 1K,2K (got {text!r})")
    return out


def parse_dtype(text: str | None, flag: str = "--dtype") -> str | None:
    if text is not None and text not in DTYPES:
        raise ValueError(f"{flag}: unknown dtype {text!r}; allowed: {', '.join(DTYPES)}")
    return text


def parse_csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_tasks(text: str, allowed: Sequence[str] = TASKS, flag: str = "--tasks") -> list[str]:
    tasks = parse_csv_list(text)
    bad = [t for t in tasks if t not in allowed]
    if bad or not tasks:
        raise ValueError(f"{flag}: unknown task(s) {bad}; choose from {','.join(allowed)}")
    return tasks


def check_out_path(path: str | None, flag: str = "--out") -> None:
    """Fail before any work when the output file's folder does not exist."""
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"{flag}: folder {folder!r} of {path!r} does not exist")


# ---------------------------------------------------------------- flags of each subcommand


def add_set_argument(p: argparse.ArgumentParser, help_text: str = SET_HELP) -> None:
    p.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help=help_text)


def _model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"'{DEFAULT_MODEL}', 'tiny-llama', 'tiny-qwen2' or a local Hugging Face model folder (default %(default)s)")


def demo_arguments(p: argparse.ArgumentParser) -> None:
    _model_argument(p)
    p.add_argument("--length", default="2K",
                   help="prompt length in tokens, e.g. 2K or 2048 (default 2K: SmolLM2-135M fails retrieval beyond ~2-4K even unpruned)")
    p.add_argument("--task", default="needle", choices=("passkey", "needle", "multikey"), help="retrieval task (default needle)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    p.add_argument("--depth", type=float, default=0.5, help="where the answer sits, 0..1 of the text (default 0.5)")
    add_set_argument(p)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per side after the warm-up; the table shows their median and min-max (default 3)")
    p.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=None,
                   help="lower the rewritten graph through Inductor (default: on CUDA yes; on CPU no, since Inductor's "
                   "C++ compile of a 30-layer model takes minutes on a small CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: enough for the task's answer (16)")


def eval_arguments(p: argparse.ArgumentParser) -> None:
    _model_argument(p)
    p.add_argument("--tasks", default="passkey,needle,multikey", help=f"comma list from {','.join(TASKS)} (default passkey,needle,multikey)")
    p.add_argument("--lengths", default="1K,2K,4K,7K", help="comma list of prompt lengths, e.g. 1K,2K or 1024,2048 (default 1K,2K,4K,7K)")
    p.add_argument("--samples", type=int, default=64, help="samples per (task, length) cell (default 64: +/-5 points at one standard error "
                   "for accuracy near 0.8; ~250 for +/-5 at 95%%; hours on a CPU: use fewer for a quick look)")
    add_set_argument(p, SET_HELP + "; applies to every schedule")
    p.add_argument("--schedule", action="append", metavar="JSON", help='a slim schedule as a JSON object of options, e.g. \'{"prune_layers":[14],"keep_ratio":0.2}\'; repeatable to compare schedules')
    p.add_argument("--force-drop", action="append", type=int, default=[], metavar="L", help="diagnostic: drop exactly the needle's tokens after layer L (repeatable)")
    p.add_argument("--no-slim", action="store_true", help="only the full model (and --force-drop variants)")
    p.add_argument("--engine", choices=("compiled", "reference"), default="compiled", help="compiled: HF generate + slimcompile.compile (default); reference: plain-PyTorch layer loop sharing one full prefill per prompt (fast sweeps)")
    p.add_argument("--inductor", action="store_true", help="lower the slim graph through Inductor (default: run the rewritten graph without Inductor)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--seed", type=int, default=0, help="first sample seed (default 0)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write results as JSON and the table as FILE.csv")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--merge", nargs="+", metavar="FILE.json", help="run nothing: merge the JSON files of eval runs over disjoint prompts "
                   "(e.g. parallel shards by --seed, task or length) of the same variants, recompute every cell, print it and write --out")


def calibrate_arguments(p: argparse.ArgumentParser) -> None:
    _model_argument(p)
    p.add_argument("--lengths", default="1024,2048", help="calibration prompt lengths (default 1024,2048: where small models still retrieve)")
    p.add_argument("--tasks", default="passkey,needle,multikey", help="retrieval tasks with a planted answer (default passkey,needle,multikey)")
    p.add_argument("--samples", type=int, default=10, help="accuracy samples per (task, length) for the grid (default 10)")
    p.add_argument("--probe-samples", type=int, default=3, help="prompts per (task, length) for the attention probe (default 3)")
    p.add_argument("--top-layers", type=int, default=2, help="how many top retrieval layers to try as pruning layers (default 2)")
    p.add_argument("--keep-ratios", default="0.2,0.3,0.5", help="candidate keep ratios (default 0.2,0.3,0.5)")
    add_set_argument(p, SET_HELP + "; other options kept fixed (e.g. scoring, block_size)")
    p.add_argument("--max-task-drop", type=float, default=3.0, help="allowed accuracy drop per task, points (default 3)")
    p.add_argument("--max-mean-drop", type=float, default=1.0, help="allowed drop of the task average, points (default 1)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--seed", type=int, default=0, help="first sample seed (default 0)")
    p.add_argument("--out", default="options.json", help="where to write the chosen options (default options.json)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


INSPECT_DEFAULT_SEQ = 4096  # = slimcompile.inspection.DEFAULT_SEQ (tested)


def inspect_arguments(p: argparse.ArgumentParser) -> None:
    _model_argument(p)
    p.add_argument("--seq", type=int, default=None,
                   help=f"prompt length S for the trace, tokens per layer, FLOPs and KV bytes (default: {INSPECT_DEFAULT_SEQ}; "
                   "with --prompt-file or --task: the prompt's length, or its last S tokens)")
    add_set_argument(p)
    p.add_argument("--dump", metavar="DIR", help="write per-pass code, diffs and summary.json to DIR")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: %(default)s)")
    p.add_argument("--plot", metavar="FILE.png", help="PNG of tokens kept per layer (needs matplotlib)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt-file", metavar="F",
                     help="real text: trace the real model on it and show which positions each pruning layer kept")
    src.add_argument("--task", choices=TASKS,
                     help="like --prompt-file, with a task prompt built here (the demo's and eval's prompts; see --length, --seed, --depth)")
    p.add_argument("--length", default="2K", help="with --task: prompt length in tokens (default 2K)")
    p.add_argument("--seed", type=int, default=0, help="with --task: sample seed (default 0)")
    p.add_argument("--depth", type=float, default=0.5, help="with --task: where the answer sits, 0..1 of the text (default 0.5)")
    p.add_argument("--lower", action="store_true", help="also run Inductor on the rewritten graph (slow on CPU; minutes for 30 layers)")


ARGUMENTS = {"demo": demo_arguments, "eval": eval_arguments, "calibrate": calibrate_arguments, "inspect": inspect_arguments}


def precheck(command: str, args: argparse.Namespace) -> None:
    """The flag values that need nothing heavy, checked before the subcommand's module is imported."""
    parse_sets(getattr(args, "sets", None))
    for flag in ("length", "lengths"):
        value = getattr(args, flag, None)
        if value is not None and not (command == "inspect" and args.task is None):
            (parse_length if flag == "length" else parse_lengths)(value, f"--{flag}")
    parse_dtype(getattr(args, "dtype", None))
    if command in ("eval", "calibrate"):
        parse_tasks(args.tasks)
    if command in ("eval", "calibrate") or getattr(args, "out", None):
        check_out_path(getattr(args, "out", None))
    depth = getattr(args, "depth", None)
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"--depth: must be in [0, 1], got {depth}")


# ---------------------------------------------------------------- dispatch


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimcompile", description="SlimInfer token pruning as a torch.compile backend")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        ARGUMENTS[name](sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if chosen in COMMANDS:
        argv = _attach_dash_values(sub.choices[chosen], argv)
    args = parser.parse_args(argv)
    try:
        precheck(args.command, args)
        try:
            mod = importlib.import_module(COMMANDS[args.command][0])
        except ModuleNotFoundError as e:
            print(f"slimcompile {args.command}: not available ({e})", file=sys.stderr)
            return 2
        return int(mod.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"slimcompile {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
