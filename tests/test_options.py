"""Every bad option gives a ValueError naming the key, the value and what is allowed."""

import pytest

from slimcompile.options import DEFAULTS, SlimOptionError, parse_options


@pytest.mark.parametrize(
    "opts, needles",
    [
        ({"keep_ration": 0.5}, ["keep_ration", "valid keys", "keep_ratio"]),
        ({"keep_ratio": 1.5}, ["keep_ratio", "1.5", "(0, 1]"]),
        ({"keep_ratio": 0.0}, ["keep_ratio", "(0, 1]"]),
        ({"keep_ratio": [0.5, 0.5], "prune_layers": [3]}, ["keep_ratio", "one per pruning layer"]),
        ({"keep_ratio": 0.5, "keep_tokens": 4096}, ["keep_ratio", "keep_tokens", "exactly one"]),
        ({"keep_ratio": None}, ["neither keep_ratio nor keep_tokens"]),
        ({"prune_layers": [2, 4], "keep_tokens": [1024, 2048]}, ["keep_tokens", "must not grow"]),
        ({"block_size": 0}, ["block_size", "positive int"]),
        ({"window": -4}, ["window", "positive int"]),
        ({"sink": -1}, ["sink", ">= 0"]),
        ({"scoring": "random"}, ["scoring", "attention", "tokenunit"]),
        ({"pooling": "sum"}, ["pooling", "max", "mean"]),
        ({"prune_layers": [-1]}, ["prune_layers", ">= 0"]),
        ({"prune_layers": [1.5]}, ["prune_layers", "0 < f < 1"]),
        ({"enabled": "yes"}, ["enabled", "True or False"]),
        ({"scoring": "tokenunit", "block_size": 12, "unit_size": 8}, ["unit_size", "divide"]),
        ({"keep_tokens": 16, "sink": 8, "window": 8, "block_size": 8}, ["keep_tokens", ">= sink + window + block_size"]),
        ({"min_prune_len": 8}, ["min_prune_len", "one prunable block"]),
    ],
)
def test_bad_options_raise_clear_errors(opts, needles):
    with pytest.raises(SlimOptionError) as e:
        parse_options(opts)
    assert isinstance(e.value, ValueError)
    for needle in needles:
        assert needle in str(e.value)


def test_layer_beyond_depth_is_rejected_when_resolved():
    o = parse_options({"prune_layers": [2, 40], "keep_ratio": 0.5})
    with pytest.raises(SlimOptionError, match=r"prune_layers.*0\.\.29.*31 layers"):
        o.resolve(31)
    with pytest.raises(SlimOptionError, match="strictly increasing"):
        parse_options({"prune_layers": [4, 2], "keep_ratio": 0.5}).resolve(8)


def test_depth_fractions_map_to_layers():
    o = parse_options({"prune_layers": [0.25, 0.5], "keep_ratio": 0.5})
    assert o.resolve(32).layers == (8, 16)
    assert o.resolve(30).layers == (7, 15)


def test_defaults_are_valid_and_disabled_needs_no_keep():
    o = parse_options()
    assert o.pruning and o.keep_ratio == (DEFAULTS["keep_ratio"],) * len(DEFAULTS["prune_layers"])
    assert not parse_options({"enabled": False, "keep_ratio": None}).pruning
    assert parse_options({"keep_tokens": 4096}).keep_ratio is None  # keep_tokens replaces the default ratio


def test_documented_default_schedule_is_the_code_default():
    """docs/accuracy.md and the README options table state the default the sweep chose; they must match DEFAULTS."""
    import json
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "accuracy.md").read_text()
    m = re.search(r"\*\*Current default \(`DEFAULTS` in slimcompile/options.py\): `([^`]*)`\*\*", doc)
    assert m, "docs/accuracy.md lost its 'Current default' line"
    documented = json.loads("{" + m.group(1) + "}")
    assert documented == {k: DEFAULTS[k] for k in documented}
    readme = (root / "README.md").read_text()
    for key in ("prune_layers", "keep_ratio"):
        row = re.search(rf"^\| `{key}` \| `([^`]*)` \|", readme, re.M)
        assert row and json.loads(row.group(1)) == DEFAULTS[key], key
