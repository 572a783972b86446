"""Every bad command-line value exits with status 2 and one line naming the flag, the value and
what is allowed: no traceback, and no model weights loaded first (issue 14, item 6).

Most cases call `slimcompile.cli.main` in this process with `models.load` replaced by a function
that fails the test, which proves the error comes before any weights load. A few run the real
command in subprocesses (started together, so the file stays fast).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from slimcompile.cli import main

CFG30 = "cfg30"  # placeholder in argv: a model folder holding only a 30-layer config.json (no weights)
LIST_JSON, NULL_JSON, BAD_JSON, NESTED_JSON, TOKENS_JSON = "@list", "@null", "@bad", "@nested", "@tokens"
FILES = {
    LIST_JSON: "[1, 2]",
    NULL_JSON: '{"options": null}',
    BAD_JSON: '{"keep_ratio": 0.5,\n "sink": }',
    NESTED_JSON: '{"options_file": "other.json"}',
    TOKENS_JSON: '{"keep_tokens": 4096}',
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    paths = {}
    for name, text in FILES.items():
        paths[name] = root / f"{name[1:]}.json"
        paths[name].write_text(text)
    folder = root / "cfg30"
    folder.mkdir()
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=30, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128).save_pretrained(str(folder))
    paths[CFG30] = folder
    return paths


def _argv(argv, files):
    out = []
    for a in argv:
        for key, path in files.items():
            a = a.replace(key, str(path))
        out.append(a)
    return out


@pytest.fixture
def no_weights(monkeypatch):
    from slimcompile import models

    def load(*a, **k):
        raise AssertionError("model weights were loaded before the bad value was reported")

    monkeypatch.setattr(models, "load", load)


def _assert_one_line_error(cmd, err, needles):
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"slimcompile {cmd}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


CASES = [
    # lengths: non-finite, negative (also with a leading '-', which argparse took for an option), zero, junk, huge
    (["eval", "--lengths", "infK"], ["--lengths", "'infK'", "whole number of tokens"]),
    (["eval", "--lengths", "nanK"], ["--lengths", "'nanK'"]),
    (["eval", "--lengths", "-5"], ["--lengths", "'-5'", "too short"]),
    (["eval", "--lengths", "1K,-2K"], ["--lengths", "'-2K'", "too short"]),
    (["eval", "--lengths", "0"], ["--lengths", "'0'"]),
    (["eval", "--lengths", "abc"], ["--lengths", "'abc'"]),
    (["eval", "--lengths", "1e9K"], ["--lengths", "'1e9K'", "too long"]),
    (["eval", "--lengths", ","], ["--lengths", "at least one length"]),
    (["demo", "--length", "-5K"], ["--length", "'-5K'", "too short"]),
    (["demo", "--length", "infK"], ["--length", "'infK'"]),
    (["calibrate", "--lengths", "-1K"], ["--lengths", "'-1K'"]),
    (["calibrate", "--lengths", "inf"], ["--lengths", "'inf'"]),
    # devices and dtypes
    (["demo", "--device", "bogus"], ["--device", "'bogus'", "cpu, cuda or cuda:N"]),
    (["eval", "--device", "cuda:99"], ["--device", "'cuda:99'"]),
    (["calibrate", "--device", "meta"], ["--device", "'meta'", "not supported"]),
    (["demo", "--dtype", "int64"], ["--dtype", "'int64'", "float32"]),
    (["eval", "--dtype", "bogus"], ["--dtype", "'bogus'"]),
    # --set options checked against the model's config before its weights load
    (["demo", "--model", CFG30, "--set", "prune_layers=[40]"], ["--set", "prune_layers", "[40]", "30 layers"]),
    (["eval", "--model", CFG30, "--set", "prune_layers=[29]"], ["--set", "prune_layers", "0..28"]),
    (["eval", "--model", CFG30, "--set", "keep_ratio=2"], ["--set", "keep_ratio", "(0, 1]"]),
    (["eval", "--model", CFG30, "--schedule", '{"prune_layers": [40]}'], ["--schedule", "prune_layers", "30 layers"]),
    (["eval", "--model", CFG30, "--force-drop", "40"], ["--force-drop 40", "0..28"]),
    (["inspect", "--model", "tiny-llama", "--set", f"options_file={LIST_JSON}"], ["--set", "options_file", "JSON array"]),
    (["demo", "--model", CFG30, "--set", f"options_file={NULL_JSON}"], ["--set", "options_file", "JSON null"]),
    (["eval", "--model", CFG30, "--set", f"options_file={BAD_JSON}"], ["--set", "options_file", "line 2 column 10"]),
    (["calibrate", "--model", CFG30, "--set", f"options_file={NESTED_JSON}"], ["--set", "options_file", "do not nest"]),
    (["calibrate", "--model", CFG30, "--set", f"options_file={TOKENS_JSON}"], ["--set", "keep_ratio", "keep_tokens"]),
    (["inspect", "--model", "tiny-llama", "--set", "options_file=null"], ["--set", "options_file", "None"]),
    # other flags
    (["eval", "--out", "/no/such/folder/x.json"], ["--out", "/no/such/folder"]),
    (["calibrate", "--out", "/no/such/folder/x.json"], ["--out", "/no/such/folder"]),
    (["eval", "--samples", "-3"], ["--samples", "-3"]),
    (["demo", "--depth", "nan"], ["--depth", "nan"]),
    (["demo", "--max-new-tokens", "-3"], ["--max-new-tokens", "-3"]),
    (["calibrate", "--max-task-drop", "nan"], ["--max-task-drop", "nan"]),
    (["calibrate", "--top-layers", "0"], ["--top-layers", "0"]),
    (["inspect", "--seq", "-5"], ["--seq", "-5"]),
    (["inspect", "--seq", "999999999999"], ["--seq", "999999999999"]),
]


@pytest.mark.parametrize("argv, needles", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_value_is_one_line_exit_2(argv, needles, files, no_weights, capsys):
    rc = main(_argv(argv, files))
    err = capsys.readouterr().err
    assert rc == 2, err
    _assert_one_line_error(argv[0], err, needles)


def test_default_model_layers_are_checked_against_its_config(no_weights, capsys):
    """`demo --set prune_layers=[40]` on the default model: refused from its config, not after a 44 s load."""
    from slimcompile.inspection import real_config

    try:
        real_config("smollm2-135m")
    except ValueError as e:
        pytest.skip(f"the default model is not installed here: {e}")
    assert main(["demo", "--set", "prune_layers=[40]"]) == 2
    _assert_one_line_error("demo", capsys.readouterr().err, ["--set", "prune_layers", "[40]", "30 layers"])


SUBPROCESS_CASES = [
    (["eval", "--lengths", "infK"], ["--lengths", "'infK'"]),
    (["demo", "--device", "bogus"], ["--device", "'bogus'"]),
    (["inspect", "--model", "tiny-llama", "--set", f"options_file={LIST_JSON}"], ["--set", "options_file", "JSON array"]),
]


def test_cli_subprocesses_exit_2_with_one_line(files):
    """The real command (`python -m slimcompile.cli`); started together to keep the file fast."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen([sys.executable, "-m", "slimcompile.cli", *_argv(argv, files)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv, _ in SUBPROCESS_CASES
    ]
    for (argv, needles), proc in zip(SUBPROCESS_CASES, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (argv, out, err)
        _assert_one_line_error(argv[0], err, needles)


def test_missing_value_is_still_argparse_usage_error(capsys):
    """A flag followed by another flag keeps argparse's own error (the value is missing)."""
    with pytest.raises(SystemExit) as e:
        main(["demo", "--length", "--seed", "3"])
    assert e.value.code == 2
    assert "--length: expected one argument" in capsys.readouterr().err


def test_attached_negative_values_reach_validation():
    from slimcompile.cli import _attach_dash_values
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--length")
    p.add_argument("--lengths-extra")
    p.add_argument("--flag", action="store_true")
    p.add_argument("--set", action="append")
    assert _attach_dash_values(p, ["--length", "-5K", "--flag"]) == ["--length=-5K", "--flag"]
    assert _attach_dash_values(p, ["--set", "-x=1"]) == ["--set=-x=1"]
    assert _attach_dash_values(p, ["--length", "--flag"]) == ["--length", "--flag"]
    assert _attach_dash_values(p, ["--length", "-"]) == ["--length", "-"]
    assert _attach_dash_values(p, ["--lengths-e", "-1K"]) == ["--lengths-e=-1K"]  # unique abbreviation
    assert _attach_dash_values(p, ["--flag", "-1"]) == ["--flag", "-1"]  # --flag takes no value
