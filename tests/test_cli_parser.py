"""The command line as a new user meets it (issue 16): one `--set` syntax for every subcommand,
flags parsed before torch is imported, the light parser's copies of constants in step.

Timing of `slimcompile --help` is a benchmark (bench/test_cli_start.py), not a test; here the
subprocess checks only that torch stays out of `sys.modules`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimcompile import cli

COMMANDS = ("demo", "eval", "calibrate", "inspect")


@pytest.mark.parametrize("command", COMMANDS)
def test_set_takes_several_pairs_and_repeats_in_every_subcommand(command):
    args = cli.build_parser().parse_args(
        [command, "--set", "keep_ratio=0.3", "prune_layers=[14,20]", "--set", "keep_tokens=none", "scoring=attention"]
    )
    assert cli.parse_sets(args.sets) == {
        "keep_ratio": 0.3, "prune_layers": [14, 20], "keep_tokens": None, "scoring": "attention",
    }


@pytest.mark.parametrize(
    "text, value",
    [("0.5", 0.5), ("[8,16]", [8, 16]), ("null", None), ("none", None), ("None", None), ("NULL", None),
     ("true", True), ("True", True), ("false", False), ("FALSE", False), ('"none"', "none"), ("attention", "attention"),
     ("opts.json", "opts.json"), ("/tmp/a b.json", "/tmp/a b.json")],
)
def test_one_value_syntax(text, value):
    assert cli.parse_value(text) == value


def test_every_module_uses_the_one_parser():
    from slimcompile import calibrate, demo, evaluate, inspection, tasks

    assert inspection.parse_sets is cli.parse_sets and evaluate.parse_sets is cli.parse_sets
    assert cli.TASKS == tasks.TASKS and cli.INSPECT_DEFAULT_SEQ == inspection.DEFAULT_SEQ
    assert cli.DEFAULT_MODEL == inspection.DEFAULT_MODEL
    import argparse

    for name, mod in (("demo", demo), ("eval", evaluate), ("calibrate", calibrate), ("inspect", inspection)):
        a, b = argparse.ArgumentParser(), argparse.ArgumentParser()
        mod.add_arguments(a)
        cli.ARGUMENTS[name](b)
        assert [x.option_strings for x in a._actions] == [x.option_strings for x in b._actions]


def test_set_syntax_error_names_the_item(capsys):
    assert cli.main(["demo", "--set", "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "slimcompile demo: error: --set expects KEY=VALUE (e.g. keep_ratio=0.3), got 'nonsense'"


# A process started as the console script is (argv[0] named `slimcompile`): what did it import?
_PROBE = """
import json, sys
sys.argv = ['slimcompile', *json.loads(sys.argv[1])]
from slimcompile.cli import main
try:
    rc = main()
except SystemExit as e:
    rc = e.code
print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules}),
      file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv, rc",
    [
        (["--help"], 0),
        (["demo", "--help"], 0),
        (["eval", "--help"], 0),
        (["inspect", "--help"], 0),
        (["demo", "--no-such-flag"], 2),
        (["eval", "--lengths", "abc"], 2),
        (["demo", "--length", "-5K"], 2),
        (["eval", "--tasks", "bogus"], 2),
        (["calibrate", "--dtype", "int8"], 2),
        (["inspect", "--set", "keep_ratio"], 2),
        (["eval", "--out", "/no/such/folder/x.json"], 2),
    ],
)
def test_help_and_argument_errors_do_not_import_torch(argv, rc):
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result == {"rc": rc, "torch": False, "transformers": False}, proc.stderr


def test_console_script_answers_help():
    script = shutil.which("slimcompile", path=str(Path(sys.executable).parent)) or shutil.which("slimcompile")
    if script is None:
        pytest.skip("the slimcompile console script is not installed in this environment")
    proc = subprocess.run([script, "eval", "--help"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="100"))
    assert proc.returncode == 0 and "--set KEY=VALUE [KEY=VALUE ...]" in proc.stdout


def test_library_import_still_loads_everything():
    """`import slimcompile` in a program (not the command) registers the backend's pieces at once."""
    code = "import sys, slimcompile; print('slimcompile.backend' in sys.modules, 'compile' in vars(slimcompile))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.split()
    assert out == ["True", "True"]
