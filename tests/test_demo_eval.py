"""CLI tests for demo / eval / calibrate: tiny model, short prompts, no Inductor (CPU, fast)."""

from __future__ import annotations

import csv
import re
import json

import pytest

from slimcompile.cli import main
from slimcompile.options import parse_options

TINY = ["--model", "tiny-llama"]
SHORT = ["--set", "min_prune_len=128", "--set", "window=16", "--set", "sink=16", "--set", "block_size=16"]


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def test_demo_short_prompt(capsys):
    rc = main(["demo", *TINY, "--length", "400", "--no-inductor", "--max-new-tokens", "8", "--repeats", "2", *SHORT])
    out = capsys.readouterr().out
    assert rc == 0
    assert "plain model (eager)" in out and "slim (rewritten graph, no Inductor)" in out
    assert "TTFT speedup" in out and "KV cache (on cpu)" in out and "gpu" not in out
    # medians with their spread, compile counted in the first calls, none inside the timed runs
    assert "n=2)" in out and "graph(s) compiled" in out
    assert "compilation(s) inside the timed runs" not in out
    # pruning happened: the slim column's per-layer form ("395x3, 219": tokens x layers) keeps fewer
    # tokens after the pruning layer than before it; the plain column keeps every token everywhere
    row = next(line for line in out.splitlines() if "tokens kept per layer" in line)
    cells = [c.strip() for c in re.split(r"[│|]", row) if re.search(r"\d", c)]
    counts = [[int(item.split("x")[0]) for item in cell.split(",")] for cell in cells]
    assert len(counts) == 2 and len(counts[0]) == 1 and len(counts[1]) >= 2, row
    assert counts[1][0] == counts[0][0] > counts[1][-1], row


def test_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", *TINY, "--tasks", "passkey", "--lengths", "400", "--samples", "1", *SHORT,
               "--schedule", '{"prune_layers":[1],"keep_ratio":0.5}', "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "per cell:" in text  # the precision note
    res = json.loads(out.read_text())
    assert {"cells", "samples", "config"} <= set(res)
    names = {c["variant"] for c in res["cells"]}
    assert "full" in names and any(n.startswith("slim(") for n in names)
    for c in res["cells"]:
        for key in ("task", "length", "n", "accuracy", "ci95", "flop_fraction", "kv_fraction",
                    "full_right_variant_wrong", "variant_right_full_wrong"):
            assert key in c
    slim = next(c for c in res["cells"] if c["kind"] == "slim")
    assert slim["flop_fraction"] < 1.0
    rows = list(csv.DictReader(open(tmp_path / "res.csv")))
    assert len(rows) == len(res["cells"]) and "accuracy" in rows[0]


def test_eval_merge_of_seed_shards_equals_one_run(tmp_path, capsys):
    common = ["eval", *TINY, "--engine", "reference", "--tasks", "passkey", "--lengths", "300", *SHORT,
              "--schedule", '{"prune_layers":[1],"keep_ratio":0.3}', "--quiet"]
    assert main([*common, "--samples", "2", "--out", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--samples", "1", "--seed", "2", "--out", str(tmp_path / "b.json")]) == 0
    assert main(["eval", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m.json")]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    shards = [json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json")]
    for c in merged["cells"]:
        parts = [x for r in shards for x in r["cells"] if x["variant"] == c["variant"]]
        assert c["n"] == 3 == sum(x["n"] for x in parts)
        assert c["accuracy"] == pytest.approx(sum(x["accuracy"] * x["n"] for x in parts) / 3)
        assert c["full_right_variant_wrong"] == sum(x["full_right_variant_wrong"] for x in parts)
        assert c["flop_fraction"] == parts[0]["flop_fraction"]
    assert sorted(s["seed"] for s in merged["samples"] if s["variant"] == "full") == [0, 1, 2]
    capsys.readouterr()
    assert main(["eval", "--merge", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 2
    assert "more than one file" in capsys.readouterr().err
    other = json.loads((tmp_path / "b.json").read_text())
    other["config"]["variants"][1]["options"] = {"prune_layers": [1], "keep_ratio": 0.9}
    (tmp_path / "c.json").write_text(json.dumps(other))
    assert main(["eval", "--merge", str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 2
    assert "different variants" in capsys.readouterr().err


def test_eval_force_drop(tmp_path):
    out = tmp_path / "drop.json"
    rc = main(["eval", *TINY, "--tasks", "needle", "--lengths", "300", "--samples", "1", "--no-slim",
               "--force-drop", "1", "--out", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert {c["variant"] for c in res["cells"]} == {"full", "force-drop@L1"}
    assert res["config"]["engine"] == "reference"


def test_force_drop_matches_unpruned_when_nothing_dropped():
    import torch

    from slimcompile import evaluate as E
    from slimcompile import reference
    from slimcompile.models import load

    model, _ = load("tiny-llama")
    ids = torch.randint(0, 200, (1, 64), generator=torch.Generator().manual_seed(0))
    a = E.force_drop_generate(model, ids, 1, [], 4, None)
    b = reference.generate(model, ids, None, 4)[0, 64:].tolist()
    assert a == b
    trace = E.trace_full(model, ids, keep_layers=[1])
    st = E.resume_prefill(model, trace, drop=(1, [10, 11, 12]))
    assert st.keys[1].shape[2] == 64 and st.keys[2].shape[2] == 61


def test_calibrate_writes_options(tmp_path, capsys):
    out = tmp_path / "opts.json"
    rc = main(["calibrate", *TINY, "--lengths", "300", "--tasks", "passkey", "--samples", "1",
               "--probe-samples", "1", "--top-layers", "1", "--keep-ratios", "0.5", *SHORT,
               "--out", str(out), "--quiet"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"options", "evidence"} <= set(data)
    opts = parse_options({"options_file": str(out)})
    assert opts.pruning and len(opts.prune_layers) == 1
    assert len(data["evidence"]["needle_mass_per_layer"]) == 4


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["demo", "--length", "abc"], "bad length"),
        (["demo", "--set", "keep_ratio=7"], "keep_ratio"),
        (["demo", "--set", "nonsense"], "KEY=VALUE"),
        (["eval", "--tasks", "bogus"], "unknown task"),
        (["eval", "--schedule", "[1,2]"], "JSON object"),
        (["calibrate", "--keep-ratios", "2"], "keep-ratios"),
        (["eval", "--model", "/no/such/folder", "--lengths", "300"], "not a model folder"),
    ],
)
def test_bad_flags_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unknown_flag_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--no-such-flag"])
    assert e.value.code == 2


def test_greedy_from_checks_eos_in_batches_without_changing_tokens():
    import torch

    from slimcompile.evaluate import greedy_from, resume_prefill, trace_full
    from slimcompile.models import load

    model, _ = load("tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    state = resume_prefill(model, trace_full(model, ids))
    free = greedy_from(model, state, 10, None)
    assert len(free) == 10
    eos = free[2]
    expect = free[: free.index(eos) + 1]
    for every in (1, 4, 16):
        assert greedy_from(model, state, 10, eos, check_every=every) == expect


def test_eval_table_prints_the_wilson_interval():
    """2/2 right is `1.00 (0.34-1.00)`, the interval the JSON holds, not a `±0.00` normal half-width."""
    import io

    from rich.console import Console

    from slimcompile.evaluate import cell_stats, render_table

    full = cell_stats("passkey", 1024, "full", "full", [1.0, 1.0], [1.0, 1.0], 1.0, 1.0, 1024)
    slim = cell_stats("passkey", 1024, "slim(x)", "slim", [1.0, 0.0], [1.0, 1.0], 0.6, 0.6, 1024)
    assert (round(full["wilson_lo"], 3), full["wilson_hi"]) == (0.342, 1.0)
    buf = io.StringIO()
    render_table({"cells": [full, slim]}, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "1.00 (0.34-1.00)" in text and "0.50 (0.09-0.91)" in text
    assert "±" not in text and "Wilson 95% interval" in text


def test_eval_progress_reports_prompts_and_running_accuracy():
    from slimcompile.evaluate import build_variants, evaluate
    from slimcompile.models import load

    model, tok = load("tiny-llama")

    class Tracker:
        def __init__(self):
            self.total, self.done, self.acc = None, 0, None

        def start(self, total, what=""):
            self.total = total

        def advance(self, n, acc):
            self.done += n
            self.acc = acc

    t = Tracker()
    variants = build_variants({"min_prune_len": 128, "window": 16, "sink": 16, "block_size": 16}, None, [], 4)
    evaluate(model, tok, ["passkey"], [300], 2, variants, engine="reference", tracker=t)
    assert t.total == t.done == 2 * len(variants)
    assert set(t.acc) == {v.name for v in variants} and all(0 <= a <= 1 for a in t.acc.values())


def test_demo_flags_a_speedup_the_load_made():
    from slimcompile.demo import timing_caveat

    assert timing_caveat(1.15, 1.05, 1.25, 1.20) is None
    assert "far above the ideal" in timing_caveat(4.48, 3.9, 5.0, 1.20)
    assert "extremes give 0.60-1.80x" in timing_caveat(1.1, 0.6, 1.8, 1.20)
