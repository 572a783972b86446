"""pytest-benchmark: wall time of the slim pass pipeline on a captured tiny-LLaMA Dynamo graph.

The graph is captured once (Dynamo, dynamic shapes); each round copies it and runs the full
pipeline (analysis, causal mask, decode KV, token prune, flatten linear, shape check) under the
capture's fake mode, i.e. the backend's work before Inductor.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimcompile.backend import graph_fake_mode
from slimcompile.passes.pipeline import run_passes
from slimcompile.options import parse_options


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    box = {}

    def grab(gm, example_inputs):
        box["gm"] = gm
        box["fake_mode"] = graph_fake_mode(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab, dynamic=True)(torch.randint(0, 128, (1, 64)), use_cache=True, logits_to_keep=1)
    return box


@pytest.mark.parametrize("pruning", [False, True], ids=["exact", "prune-2-layers"])
def test_pass_pipeline(benchmark, captured, pruning):
    opts = parse_options(
        {"prune_layers": [1, 2], "keep_ratio": 0.5, "block_size": 4, "window": 4, "sink": 2, "min_prune_len": 16, "enabled": pruning}
    )
    gm, pm, ctx = benchmark.pedantic(
        run_passes, args=(captured["gm"], opts, captured["fake_mode"], False), rounds=5, warmup_rounds=1
    )
    assert [r.name for r in pm.records] == ["layer_analysis", "causal_mask", "decode_kv", "flatten_linear", "token_prune", "shape_prop"]
    assert (ctx.mask_removed or not ctx.layer_map.masks()) and len(ctx.prune) == (2 if pruning else 0)
