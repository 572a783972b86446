"""The end-to-end benchmark scripts run on a tiny CPU model and write their rows (checks, not timings)."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TINY = ["--device", "cpu", "--layers", "2", "--hidden", "128", "--intermediate", "256", "--heads", "4",
        "--kv-heads", "2", "--vocab", "512"]


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_e2e_script_runs_and_reports_kv_bytes(tmp_path):
    import e2e

    env_before = dict(os.environ)
    e2e.main(TINY + ["--lengths", "600", "--new", "3", "--out", str(tmp_path), "--variants", "hf-eager,slim-resident,slim-offload,slim-resident-matmul,slim-offload-p2",
                     "--slim-options", json.dumps({"prune_layers": [0], "decode_budget": 64})])
    rows = {r["variant"]: r for r in _rows(tmp_path / "e2e.jsonl")}
    assert set(rows) == {"hf-eager", "slim-resident", "slim-offload", "slim-resident-matmul", "slim-offload-p2"}, rows
    assert not any(k.startswith("SLIM_") for k in os.environ if k not in env_before)  # variants are options
    assert all("error" not in r and r["e2e_ms"] > 0 and r["new"] == 3 for r in rows.values())
    unpruned = rows["hf-eager"]["host_kv"]  # on the CPU every buffer is "host"
    assert rows["slim-resident"]["gpu_prompt_kv"] < unpruned  # pruned after layer 0
    assert rows["slim-offload"]["host_kv"] > 0 and rows["slim-offload"]["gpu_prompt_kv"] < rows["slim-resident"]["gpu_prompt_kv"]
    # 3 new tokens = the prefill's + 2 decode steps; no CUDA graphs on the CPU
    assert (rows["slim-resident"]["decode_steps"], rows["slim-resident"]["graph_captures"], rows["slim-resident"]["graph_replays"]) == (2, 0, 0)
    # The warm-up compiled the slim prefill; the timed generation after it compiled nothing.
    slim = rows["slim-resident"]
    assert slim["warmup_dynamo_graphs"] >= 1 and slim["dynamo_graphs"] == 0 and slim["inductor_cache_misses"] == 0
    assert slim["step_ms_median"] > 0 and slim["step_ms_max"] >= slim["step_ms_median"]


def test_e2e_variants_switch_by_options_not_the_environment(monkeypatch):
    """Each comparison variant is a `slimcompile.compile` option (validated, visible in `model.slim.options`)."""
    import e2e

    from slimcompile.options import parse_options

    base = '{"prune_layers": [0]}'
    assert e2e.variant_options("slim-resident-matmul", base) == {"kv": "resident", "prune_layers": [0], "decode_attention": "matmul"}
    assert e2e.variant_options("slim-resident-nofuse", base)["decode_fuse"] is False
    assert e2e.variant_options("slim-offload-p2", base) == {"kv": "offload", "prune_layers": [0], "copy_programs": 2}
    assert e2e.variant_options("slim-resident", base) == {"kv": "resident", "prune_layers": [0]}
    monkeypatch.setenv("SLIM_DECODE_ATTN", "sdpa")  # an environment default never overrides the variant
    assert parse_options(e2e.variant_options("slim-resident-matmul", base)).decode_attention == "matmul"


def test_token_clock_finds_slow_steps():
    import e2e

    clock = e2e.TokenClock()
    clock.stamps = [0.0, 0.010, 0.020, 0.080, 0.090, 0.100]  # gaps 10, 10, 60, 10, 10 ms
    s = clock.summary()
    assert s["step_ms_median"] == pytest.approx(10.0) and s["slow_steps"] == 1 and s["slow_step_index"] == [2]
    assert s["slow_excess_ms"] == pytest.approx(50.0)


def test_ttft_script_runs(tmp_path):
    import ttft

    ttft.main(TINY + ["--lengths", "600", "--reps", "1", "--out", str(tmp_path), "--variants", "eager"])
    (row,) = _rows(tmp_path / "ttft.jsonl")
    assert row["variant"] == "eager" and row["length"] == 600 and row["ms"] > 0


@pytest.mark.slow
def test_offload_churn_script_reports_swaps(capsys):
    import offload_churn

    offload_churn.main(["--length", "400", "--budget", "64", "--new", "4", "--samples", "1", "--device", "cpu"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["layer_steps"] > 0  # some layers hold more blocks than the budget
    assert 0.0 <= row["swap_fraction"] <= 1.0 and 0.0 <= row["copied_fraction_of_active"] <= 1.0


def test_kernel_profile_splits_time_by_category(tmp_path):
    import kernel_profile

    ev = lambda name, ts, dur, stream=7: {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}  # noqa: E731
    trace = {"traceEvents": [
        ev("nvjet_tst_gemm", 0, 100), ev("pytorch_flash::flash_fwd_kernel", 100, 50), ev("_stats_kernel", 160, 10),
        ev("void at::native::sbtopk::gatherTopK", 170, 5), ev("triton_poi_fused_mul_0", 175, 5), ev("_decode_combine_kernel", 180, 1),
        ev("nvjet_tst_gemm", 150, 20, stream=9),  # overlaps the flash kernel on another stream
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},
    ]}
    path = tmp_path / "trace.json"
    path.write_text(__import__("json").dumps(trace))
    b = kernel_profile.breakdown(str(path))
    assert b["category_us"] == {"slim scoring": 10, "selection + gather": 5, "attention": 51, "gemm": 120, "other": 5}
    assert b["kernels"] == 7 and b["kernel_us"] == 191 and b["wall_us"] == 181 and b["busy_us"] == 181
    assert b["top_kernels_us"][0] == ["nvjet_tst_gemm", 120, 2]


def test_eval_shard_plan_round_robin():
    import eval_shards

    plan = eval_shards.shard_plan(["a", "b"], eval_shards.parse_cells("1K:5,2K:2"), shard_size=2)
    assert plan[:4] == [("a", 1024, 0, 2), ("b", 1024, 0, 2), ("a", 2048, 0, 2), ("b", 2048, 0, 2)]
    assert sorted((t, L, s, n) for t, L, s, n in plan if L == 1024 and t == "a") == [("a", 1024, 0, 2), ("a", 1024, 2, 2), ("a", 1024, 4, 1)]
    with pytest.raises(ValueError, match="sample count"):
        eval_shards.parse_cells("1K")


@pytest.mark.slow
def test_eval_shards_merge_into_one_cell(tmp_path):
    import eval_shards

    rc = eval_shards.main(["--tasks", "passkey", "--lengths", "300:2", "--shard-size", "1", "--procs", "2", "--out", str(tmp_path),
                           "--", "--model", "tiny-llama", "--device", "cpu", "--set", "min_prune_len=128", "--set", "window=16",
                           "--set", "sink=16", "--set", "block_size=16", "--schedule", '{"prune_layers":[1],"keep_ratio":0.5}'])
    assert rc == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert {c["n"] for c in merged["cells"]} == {2} and len(merged["cells"]) == 2
    assert sorted({s["seed"] for s in merged["samples"]}) == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs and the Triton kernel)")
def test_cuda_decode_attention_sweep_checks_every_config_against_the_oracle(tmp_path):
    import decode_attn_sweep

    decode_attn_sweep.main(["--capacities", "1000", "--chunks", "128,256", "--block-n", "64", "--warps", "4",
                            "--stages", "2", "--reps", "3", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "decode_attn_sweep.jsonl")
    assert len(rows) == 3 and sum(r["default"] for r in rows) == 1
    assert all(r["ms"] > 0 and r["max_abs_err"] < 2e-2 for r in rows)
