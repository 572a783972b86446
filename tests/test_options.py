"""Every bad option gives a ValueError naming the key, the value and what is allowed."""

import json

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


# ---------------------------------------------------------------- the shape of `options` and options files


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "options, needles",
    [
        ("file.json", ["must be a dict", "str 'file.json'", "{'options_file': 'file.json'}"]),
        ([("keep_ratio", 0.5)], ["must be a dict", "list"]),
        (["keep_ratio"], ["must be a dict", "list"]),
        (0.5, ["must be a dict", "float 0.5"]),
        ({"options_file": None}, ["options_file", "None", "path"]),
        ({"options_file": 3}, ["options_file", "3", "path"]),
        ({"options_file": ["a.json"]}, ["options_file", "['a.json']", "path"]),
        ({"options_file": "/no/such/options.json"}, ["options_file", "/no/such/options.json", "no such file"]),
        ({"options_file": "/"}, ["options_file", "not a file"]),
        ({1: 2}, ["unknown slim option(s) [1]"]),
    ],
)
def test_bad_options_shapes_raise_option_errors(options, needles):
    with pytest.raises(SlimOptionError) as e:
        parse_options(options)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


@pytest.mark.parametrize(
    "text, needles",
    [
        ("[1, 2]", ["top level is a JSON array", "JSON object"]),
        ('"keep_ratio"', ["top level is a JSON string"]),
        ("null", ["top level is a JSON null"]),
        ("0.5", ["top level is a JSON number"]),
        ("", ["not valid JSON", "line 1 column 1"]),
        ('{"keep_ratio": 0.5,\n "sink": }', ["not valid JSON", "line 2 column 10"]),
        ("{'keep_ratio': 0.5}", ["not valid JSON", "line 1 column 2"]),
        ('{"options": null}', ['"options" entry', "JSON null"]),
        ('{"options": [1]}', ['"options" entry', "JSON array"]),
        ('{"options": "x"}', ['"options" entry', "JSON string"]),
        ('{"options": {"keep_ratio": 0.3}, "sink": 4}', ["top-level option key(s) ['sink']"]),
        ('{"options_file": "other.json"}', ["do not nest", "other.json"]),
        ('{"options": {"options_file": "other.json"}}', ["do not nest", "other.json"]),
        ('{"keep_ratio": 3}', ["keep_ratio", "3", "(0, 1]", "options read from options_file"]),
        ('{"keep_ration": 0.3}', ["unknown slim option(s) ['keep_ration']", "options_file"]),
    ],
)
def test_bad_options_files_name_the_file(tmp_path, text, needles):
    path = _write(tmp_path, "opts.json", text)
    with pytest.raises(SlimOptionError) as e:
        parse_options({"options_file": path})
    msg = str(e.value)
    assert "opts.json" in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_nested_options_file_message_is_not_self_contradictory(tmp_path):
    inner = _write(tmp_path, "inner.json", '{"keep_ratio": 0.3}')
    outer = _write(tmp_path, "outer.json", '{"options_file": "%s"}' % inner)
    with pytest.raises(SlimOptionError) as e:
        parse_options({"options_file": outer})
    assert "do not nest" in str(e.value) and "unknown" not in str(e.value)


def test_non_utf8_options_file(tmp_path):
    path = tmp_path / "opts.json"
    path.write_bytes(b'{"keep_ratio": "\xff"}')
    with pytest.raises(SlimOptionError, match="opts.json.*UTF-8"):
        parse_options({"options_file": str(path)})


def test_good_options_files(tmp_path):
    import pathlib

    calib = _write(tmp_path, "calib.json", '{"options": {"keep_ratio": 0.3, "prune_layers": [2]}, "evidence": {"x": 1}}')
    flat = _write(tmp_path, "flat.json", '{"keep_ratio": 0.25}')
    assert parse_options({"options_file": calib}).keep_ratio == (0.3,)
    assert parse_options({"options_file": pathlib.Path(flat)}).keep_ratio == (0.25,) * len(DEFAULTS["prune_layers"])
    # keys beside the file override it, keyword arguments override both
    assert parse_options({"options_file": calib, "keep_ratio": 0.5}).keep_ratio == (0.5,)
    assert parse_options(options_file=calib, keep_ratio=0.2).keep_ratio == (0.2,)
    assert parse_options(None) == parse_options({}) == parse_options()
    import types

    assert parse_options(types.MappingProxyType({"keep_ratio": 0.4})).keep_ratio == (0.4,) * len(DEFAULTS["prune_layers"])
    o = parse_options({"keep_ratio": 0.4})
    assert parse_options(o) is o


# ---------------------------------------------------------------- a tiny keep ratio keeps one block


def test_tiny_keep_ratio_keeps_one_block():
    from fractions import Fraction

    from slimcompile import schedule as sched
    from slimcompile.options import keep_fraction

    for ratio in (1e-6, 1e-300, 5e-324):
        assert keep_fraction(ratio) == Fraction(1, 65536)
        assert [sched.ratio_blocks(n, ratio) for n in (1, 2, 100, 65536)] == [1, 1, 1, 1]
    assert keep_fraction(0.5) == Fraction(1, 2) and keep_fraction(1.0) == 1
    assert [sched.ratio_blocks(n, 1.0) for n in (0, 1, 7)] == [0, 1, 7]
    s = parse_options({"prune_layers": [1], "keep_ratio": 1e-6, "block_size": 16, "window": 8, "sink": 4, "min_prune_len": 64}).resolve(4)
    for length in (64, 1000, 100_000):
        n, k, kept = sched.kept_length(s, 0, length)
        assert n >= 1 and k == 1 and kept == length - (n - 1) * 16


def test_tiny_keep_ratio_backend_matches_reference():
    import torch

    from slimcompile import reference
    from slimtest import PASS_BACKEND, SMALL, ids, tiny

    model = tiny("llama", 2)
    options = {**SMALL, "prune_layers": [1], "keep_ratio": 1e-6}
    schedule = parse_options(options).resolve(4)
    fast = torch.compile(model, backend=PASS_BACKEND, options=options, dynamic=True)
    for length in (41, 58):
        x = ids(length)
        with torch.no_grad():
            out = fast(x, use_cache=True, logits_to_keep=1)
        ref = reference.prefill(model, x, schedule)
        n = (length - SMALL["sink"] - SMALL["window"]) // SMALL["block_size"]
        kept = length - (n - 1) * SMALL["block_size"]  # sink + one block + tail
        assert ref.kept_indices[1].shape[1] == kept
        assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [length, length, kept, kept]
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        for layer, rk in zip(out.past_key_values.layers, ref.keys):
            torch.testing.assert_close(layer.keys, rk, rtol=1e-5, atol=1e-5)


def test_calibrate_counts_blocks_like_the_backend():
    """calibrate's probe asks the same function as the backend how many blocks a ratio keeps."""
    import inspect

    from slimcompile import calibrate

    src = inspect.getsource(calibrate.layer_needle_mass)
    assert "ratio_blocks(n, r)" in src and "ceil" not in src


# ---------------------------------------------------------------- plain torch.compile: what a bad option gives


def test_plain_torch_compile_reports_bad_options_at_the_first_call():
    """Documented in the README: torch.compile hands `options` to the backend only when Dynamo
    compiles the first call; that call (and every later one) raises the SlimOptionError itself,
    so `except ValueError` catches it (not Dynamo's BackendCompilerFailed wrapper)."""
    import torch

    from slimtest import ids, tiny

    fast = torch.compile(tiny("llama", 2), backend="slim", options={"keep_ratio": 2.0})  # no error yet
    for _ in range(2):
        with pytest.raises(SlimOptionError) as e, torch.no_grad():
            fast(ids(20))
        assert isinstance(e.value, ValueError)
        assert "keep_ratio" in str(e.value) and "(0, 1]" in str(e.value)
    with pytest.raises(SlimOptionError):  # the way to check them before any work
        parse_options({"keep_ratio": 2.0})


# ---------------------------------------------------------------- one source: the fields, the README, the environment


def test_readme_options_table_is_generated_from_the_fields():
    """Every field is a README row with its default and help, and there are no other rows (only options_file)."""
    import pathlib

    from slimcompile.options import options_table

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = options_table()
    assert table in readme, "README's options table is stale: run python -m slimcompile.options"
    start = readme.index("| key | default | meaning |")
    assert readme[start:start + len(table)] == table and not readme[start + len(table):].startswith("|")


def test_defaults_and_help_are_derived_from_the_fields():
    import dataclasses

    from slimcompile.options import HELP, SlimOptions

    fields = dataclasses.fields(SlimOptions)
    assert list(DEFAULTS) == list(HELP) == [f.name for f in fields]
    assert all(HELP[k] for k in HELP)
    assert parse_options().as_dict()["scoring_impl"] == DEFAULTS["scoring_impl"] == "auto"


def test_env_module_documents_every_environment_default():
    """env.py's docstring lists exactly the fields' environment defaults (generated: env_table())."""
    import slimcompile.env as env
    from slimcompile.options import ENV_VARS, env_table

    assert env_table() in env.__doc__, "env.py's table is stale: run python -m slimcompile.options"
    for key, var in ENV_VARS.items():
        assert f"| `{var}` | `{key}` |" in env.__doc__, var
    assert env.__doc__.count("| `SLIM_") == len(ENV_VARS)


ENV_CASES = [
    ("SLIM_SCORING_IMPL", "Torch", "scoring_impl", "torch", "triton"),
    ("SLIM_FLATTEN_LINEAR", "0", "flatten_linear", False, True),
    ("SLIM_DECODE_ATTN", "matmul", "decode_attention", "matmul", "sdpa"),
    ("SLIM_DECODE_COMPILE", "1", "decode_compile", True, "auto"),
    ("SLIM_DECODE_FUSE", "0", "decode_fuse", False, True),
    ("SLIM_COPY_PROGRAMS", "8", "copy_programs", 8, 0),
    ("SLIM_OFFLOAD_SELECT", "current", "offload_select", "current", "lagged"),
]


@pytest.mark.parametrize("var, text, key, value, explicit", ENV_CASES)
def test_environment_variables_only_provide_defaults(monkeypatch, tmp_path, var, text, key, value, explicit):
    monkeypatch.setenv(var, text)
    assert getattr(parse_options(), key) == value
    assert getattr(parse_options({key: explicit}), key) == explicit  # an explicit option wins
    assert getattr(parse_options(**{key: explicit}), key) == explicit
    path = _write(tmp_path, "o.json", json.dumps({key: explicit}))
    assert getattr(parse_options({"options_file": path}), key) == explicit  # so does an options file
    monkeypatch.setenv(var, "")  # empty: unset
    assert getattr(parse_options(), key) == DEFAULTS[key]


@pytest.mark.parametrize("var, text", [("SLIM_SCORING_IMPL", "cuda"), ("SLIM_FLATTEN_LINEAR", "maybe"),
                                       ("SLIM_DECODE_ATTN", "flash"), ("SLIM_DECODE_COMPILE", "2"),
                                       ("SLIM_DECODE_FUSE", "yes please"), ("SLIM_COPY_PROGRAMS", "-1"),
                                       ("SLIM_OFFLOAD_SELECT", "early")])
def test_bad_environment_value_names_the_variable(monkeypatch, var, text):
    monkeypatch.setenv(var, text)
    with pytest.raises(SlimOptionError) as e:
        parse_options()
    assert var in str(e.value) and repr(text) in str(e.value)


@pytest.mark.parametrize("opts, needles", [
    ({"scoring_impl": "cuda"}, ["scoring_impl", "auto", "triton", "torch"]),
    ({"flatten_linear": 0}, ["flatten_linear", "True or False"]),
    ({"decode_attention": "flash"}, ["decode_attention", "sdpa", "matmul"]),
    ({"decode_compile": "on"}, ["decode_compile", "'auto', True or False"]),
    ({"decode_fuse": 1}, ["decode_fuse", "'auto', True or False"]),
    ({"copy_programs": -1}, ["copy_programs", ">= 0"]),
    ({"copy_programs": True}, ["copy_programs", ">= 0"]),
    ({"offload_select": "early"}, ["offload_select", "lagged", "current"]),
])
def test_bad_switch_options(opts, needles):
    with pytest.raises(SlimOptionError) as e:
        parse_options(opts)
    for needle in needles:
        assert needle in str(e.value)
