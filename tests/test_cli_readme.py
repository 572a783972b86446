"""The README's quoted outputs are what the code prints for the quoted commands (issue 16, item 1).

Timing figures cannot be checked; everything else the README quotes from `slimcompile inspect`
and `slimcompile demo` can: node counts, kept-length expressions, guards, tokens / FLOPs / KV per
layer, the ideal FLOP ratio and the KV sizes. The fast tests recompute them from the SmolLM2
config (no weights); the slow one runs the inspect example exactly as quoted, on the real model.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
ELIDED = "[...]"


def _block(first_line_start: str) -> list[str]:
    """Lines of the fenced block whose first line starts with `first_line_start`."""
    for m in re.finditer(r"```[a-z]*\n(.*?)```", README, flags=re.S):
        lines = m.group(1).splitlines()
        if lines and lines[0].startswith(first_line_start):
            return lines
    raise AssertionError(f"no README block starts with {first_line_start!r}")


def _command(lines: list[str]) -> tuple[list[str], list[str]]:
    """(argv after `slimcompile`, output lines) of a block `$ slimcompile ... [\\ continued]`."""
    cmd, i = "", 0
    while True:
        line = lines[i].lstrip("$ ").split("#")[0]
        cmd += " " + line.rstrip().rstrip("\\")
        i += 1
        if not lines[i - 1].rstrip().endswith("\\"):
            break
    argv = shlex.split(cmd)
    assert argv[0] == "slimcompile"
    return argv[1:], lines[i:]


def _norm(line: str) -> str:
    # Dynamo numbers its size symbols in tracing order, which differs between transformers
    # releases (s50 on 5.17, s81 on 5.25): compare the expressions up to that name.
    return re.sub(r"\bs\d+\b", "sN", " ".join(line.split()))


def _smollm2_or_skip():
    from slimcompile.inspection import real_config

    try:
        return real_config("smollm2-135m")[0]
    except ValueError as e:
        pytest.skip(f"the default model is not installed here: {e}")


def _without(argv: list[str], flag: str, nargs: int = 1) -> list[str]:
    if flag not in argv:
        return argv
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + nargs :]


INSPECT_ARGV, INSPECT_OUT = _command(_block("$ slimcompile inspect"))


def _structural(line: str) -> bool:
    """Quoted inspect lines that depend on the config and S only (not on the weights)."""
    return bool(
        "node(s) inserted" in line or "kept length:" in line or line.startswith(("total:", "KV cache")) or " >= " in line
        or re.fullmatch(r"\s*\d+(-\d+)?\s+\d+\s+[\d.]+\s+\d+\s+[\d.]+\s*", line)
    )


def test_inspect_example_structure_matches_the_code(capsys):
    """The quoted command at the quoted S, traced on SmolLM2's config (a structural copy, no weights)."""
    from slimcompile.cli import main

    _smollm2_or_skip()
    seq = re.search(r"at S=(\d+)", "\n".join(INSPECT_OUT)).group(1)
    argv = _without(_without(_without(INSPECT_ARGV, "--plot"), "--task"), "--length")
    assert main([*argv, "--seq", seq]) == 0
    printed = {re.sub(r"\bs\d+\b", "S", _norm(l)) for l in capsys.readouterr().out.splitlines()}
    quoted = [l for l in INSPECT_OUT if _structural(l)]
    assert len(quoted) >= 8, quoted
    for line in quoted:
        assert re.sub(r"\bs\d+\b", "S", _norm(line)) in printed, line


@pytest.mark.slow
def test_inspect_example_as_quoted(capsys):
    """The quoted command itself (real weights, a real needle prompt; no --plot): every quoted line."""
    from slimcompile.cli import main

    _smollm2_or_skip()
    assert main(_without(INSPECT_ARGV, "--plot")) == 0
    printed = {_norm(l) for l in capsys.readouterr().out.splitlines()}
    for line in INSPECT_OUT:
        if line.strip() and line.strip() != ELIDED:
            assert _norm(line) in printed, line


DEMO_ARGV, DEMO_OUT = _command(_block("$ slimcompile demo"))
DEMO_TEXT = _norm("\n".join(DEMO_OUT))  # rich wraps long lines at 80 columns


def test_demo_figures_that_do_not_depend_on_timing():
    """Tokens per layer, KV sizes and the ideal FLOP ratio of the quoted demo run, from the code."""
    from slimcompile import schedule as sched
    from slimcompile.demo import _fmt_bytes
    from slimcompile.options import parse_options

    cfg = _smollm2_or_skip()
    assert DEMO_ARGV == ["demo"]  # the defaults: prune_layers, keep_ratio, task and length below
    n = int(re.search(r"(\d+)-token prompt", DEMO_TEXT).group(1))
    new = int(re.search(r"generate (\d+) tok", DEMO_TEXT).group(1))
    layers = cfg.num_hidden_layers
    resolved = parse_options({}).resolve(layers)
    tokens = sched.tokens_per_layer(resolved, n, layers)
    ideal = sched.schedule_cost(resolved, n, sched.ModelDims.from_config(cfg)).ideal_speedup
    assert f"ideal FLOP ratio {ideal:.2f}x" in DEMO_TEXT
    assert _norm(sched.describe(tokens)) in DEMO_TEXT and _norm(sched.describe([n] * layers)) in DEMO_TEXT
    # KV: float32 k and v of every held token: the prompt's per layer plus the generated tokens but the last
    row = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    plain = sum(n + new - 1 for _ in range(layers)) * row
    slim = sum(t + new - 1 for t in tokens) * row
    assert f"({_fmt_bytes(plain)} -> {_fmt_bytes(slim)})" in DEMO_TEXT
