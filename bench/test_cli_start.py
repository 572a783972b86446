"""How long `slimcompile --help` and an argument error take (issue 16: 9.5-14 s when the command
imported torch before parsing; now it parses first). A pytest-benchmark: in the suite it runs
once (`--benchmark-disable`); `python3 -m pytest bench/test_cli_start.py --benchmark-enable`
times it. Each round starts a fresh interpreter, as a user's shell does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _command() -> list[str]:
    script = shutil.which("slimcompile", path=str(Path(sys.executable).parent)) or shutil.which("slimcompile")
    if script is None:
        pytest.skip("the slimcompile console script is not installed in this environment")
    return [script]


@pytest.mark.parametrize("argv, rc", [(["--help"], 0), (["eval", "--lengths", "abc"], 2)], ids=["help", "bad-length"])
def test_cli_start(benchmark, argv, rc):
    cmd = _command() + argv

    def start():
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode

    assert benchmark(start) == rc
