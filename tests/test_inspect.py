"""`slimcompile inspect` and SLIM_DEBUG dumps, on the tiny models (each test traces at most once)."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
import torch

from slimcompile import backend
from slimcompile.cli import main
from slimcompile.inspection import SCHEMA, render_text

from slimtest import PASS_BACKEND, SMALL, ids, tiny

# The keys docs/inspect.md promises in the JSON object (and in summary.json of --dump).
DOCUMENTED_KEYS = {
    "schema", "model", "traced", "seq", "traced_seq", "seq_symbol", "options", "schedule_layers", "variant",
    "fallback", "compilations", "passes", "layer_map", "layers", "mask", "prune", "guards", "shape_env_guards",
    "per_layer_tokens", "flops", "ideal_speedup", "kv_bytes", "kept_positions", "inductor_code", "notes", "dump",
    "answer_positions",
}
PASSES = ["layer_analysis", "causal_mask", "decode_kv", "flatten_linear", "token_prune", "shape_prop"]
# tiny-llama (slimcompile.models.tiny_config): 4 layers, hidden 64, intermediate 128, 4 heads, 2 KV heads, head_dim 16.
SEQ = 1000
ARGS = ["--model", "tiny-llama", "--seq", str(SEQ), "--set", "prune_layers=[1]", "keep_ratio=0.5"]


def _run(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def json_run(tmp_path_factory):
    dump = tmp_path_factory.mktemp("inspect") / "dump"
    rc, out = _run(["inspect", *ARGS, "--format", "json", "--dump", str(dump)])
    assert rc == 0
    return json.loads(out), dump


def test_text_output_names_passes_and_kept_length(capsys):
    assert main(["inspect", *ARGS]) == 0
    out = capsys.readouterr().out
    for name in PASSES:
        assert name in out
    assert "kept length:" in out and f"= 552 at S={SEQ}" in out
    assert "Layer map" in out and "q_embed" in out and "k_embed" in out
    assert "min_prune_len" in out  # the shape guard
    assert "block_scores" in out and "select_tokens" in out  # inserted nodes with their ops
    assert "ideal speedup" in out
    assert "fallback: none" in out


def test_json_keys_and_flops_by_hand(json_run):
    report, _ = json_run
    assert set(report) == DOCUMENTED_KEYS
    assert report["schema"] == SCHEMA
    assert report["variant"] == "slim" and report["fallback"] is None
    assert [p["name"] for p in report["passes"]] == PASSES
    assert {"name", "changed", "summary", "seconds", "nodes_added", "nodes_removed"} <= set(report["passes"][0])
    assert report["seq"] == report["traced_seq"] == SEQ
    assert len(report["layers"]) == 4 and report["layers"][1]["prunes_after"]
    assert {"residual_in", "residual_out", "q", "k", "sdpa", "kv_outputs"} <= set(report["layers"][0])
    assert any("min_prune_len" in g for g in report["guards"])

    # By hand: blocks n = (1000 - sink 32 - window 32) // 32 = 29, keep ceil(29 * 0.5) = 15,
    # kept length 1000 - (29 - 15) * 32 = 552 after layer 1.
    tokens = [1000, 1000, 552, 552]
    assert report["per_layer_tokens"] == tokens
    (prune,) = report["prune"]
    assert prune["layer"] == 1 and prune["kept_length_at_seq"] == 552 and prune["kept_length_expr_at_seq"] == 552
    assert report["seq_symbol"] in prune["kept_length"]
    assert "slim.block_scores.default" in prune["inserted_ops"]

    # Per layer over t tokens: 2t * (q,o: 2*64*64 + k,v: 2*64*32 + mlp: 3*64*128) + attention 2 * 4 heads * 16 * t^2.
    def flops(t):
        return 2 * t * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 2 * 4 * 16 * t * t

    assert report["flops"]["per_layer"] == [flops(t) for t in tokens]
    assert report["flops"]["total"] == sum(flops(t) for t in tokens)
    assert report["flops"]["total_unpruned"] == 4 * flops(1000)
    assert report["ideal_speedup"] == pytest.approx(4 * flops(1000) / sum(flops(t) for t in tokens))
    # KV in bf16: keys and values, 2 KV heads x head_dim 16 x 2 bytes per token.
    assert report["kv_bytes"]["per_layer"] == [2 * t * 2 * 16 * 2 for t in tokens]
    assert report["kv_bytes"]["fraction"] == pytest.approx(sum(tokens) / 4000)


def test_dump_folder(json_run):
    report, dump = json_run
    for i, name in enumerate(PASSES):
        for suffix in ("before.py", "after.py", "diff"):
            assert (dump / f"{i:02d}_{name}.{suffix}").is_file()
    diff = {name: (dump / f"{i:02d}_{name}.diff").read_text() for i, name in enumerate(PASSES)}
    causal = next(p for p in report["passes"] if p["name"] == "causal_mask")
    if causal["summary"] == "no attention mask in the graph":  # transformers 5.2x builds none for SDPA
        assert diff["causal_mask"] == ""
    else:  # 5.17 materialises it; the pass removes it
        assert diff["causal_mask"].startswith("---") and "-    attention_mask" in diff["causal_mask"]
    assert "block_scores" in diff["token_prune"]
    assert diff["layer_analysis"] == "" and diff["decode_kv"] == ""
    assert "block_scores" in (dump / "graph.py").read_text()
    assert json.loads((dump / "summary.json").read_text()) == report
    assert not (dump / "inductor.txt").exists()  # Inductor did not run


def test_plain_text_without_rich(json_run, monkeypatch):
    report, _ = json_run
    monkeypatch.setitem(sys.modules, "rich.console", None)  # `import rich.console` now fails
    buf = io.StringIO()
    render_text(report, buf)
    out = buf.getvalue()
    assert "Pass pipeline" in out and "token_prune" in out and "q_embed_1" in out
    assert "= 552 at S=1000" in out and "ideal speedup" in out
    assert "\u2500" not in out  # no rich box drawing


def test_slim_debug_dumps_user_compilations(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIM_DEBUG", str(tmp_path))
    model = tiny()
    fast = torch.compile(model, backend=PASS_BACKEND, options={**SMALL, "prune_layers": [1], "keep_ratio": 0.5}, dynamic=True)
    with torch.no_grad():
        fast(ids(45), use_cache=True, logits_to_keep=1)
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("compile_")]
    assert (folder / "00_layer_analysis.before.py").is_file()
    assert (folder / "04_token_prune.diff").read_text() != ""
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["variant"] == "slim" and summary["fallback"] is None
    assert [p["name"] for p in summary["passes"]] == PASSES
    assert summary["prune"][0]["layer"] == 1 and summary["layers"][0]["sdpa"]
    assert backend.COMPILATIONS[-1].variant == "slim"
    assert summary["prune"][0]["kept_length"] == backend.COMPILATIONS[-1].context.prune[0]["kept_length"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "no-such-model"], "unknown model name 'no-such-model'"),
        (["--model", "./no/such/folder"], "does not exist"),
        (["--model", "tiny-llama", "--set", "bogus=1"], "unknown slim option(s) ['bogus']"),
        (["--model", "tiny-llama", "--set", "keep_ratio=1.5"], "keep_ratio"),
        (["--model", "tiny-llama", "--set", "keep_ratio"], "--set expects KEY=VALUE"),
        (["--model", "tiny-llama", "--set", "prune_layers=[9]"], "the model has 4 layers"),
        (["--model", "tiny-llama", "--prompt-file", "/no/such/file.txt"], "prompt file"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(["inspect", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert err.strip().startswith("slimcompile inspect: error:")


def test_not_a_model_folder(tmp_path, capsys):
    assert main(["inspect", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "tokens.png"
    rc, _ = _run(["inspect", *ARGS, "--plot", str(png)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompt_file_kept_positions(tmp_path):
    pytest.importorskip("matplotlib")
    from slimcompile import models

    if not (models.cache_dir("smollm2-135m") / "tokenizer.json").is_file():
        pytest.skip("needs the cached SmolLM2 tokenizer (slimcompile.models.ensure_smollm2_cache)")
    from pydoc_data.topics import topics

    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(list(topics.values())[:3])[:2500] + "\nQuestion: what is this about?")
    png = tmp_path / "map.png"
    rc, out = _run(
        ["inspect", "--model", "tiny-llama", "--prompt-file", str(prompt), "--plot", str(png), "--format", "json",
         "--set", "prune_layers=[1]", "keep_ratio=0.5", "min_prune_len=128", "block_size=16", "sink=16", "window=16"]
    )
    assert rc == 0
    report = json.loads(out)
    assert report["traced"]["real_weights"] and report["variant"] == "slim"
    kept = report["kept_positions"]["1"]
    assert kept["count"] == report["per_layer_tokens"][2] < report["seq"]
    assert kept["ranges"][0][0] == 0 and kept["ranges"][-1][1] == report["seq"] - 1  # sink and window kept
    assert png.read_bytes()[:4] == b"\x89PNG"
