"""Decode with per-layer KV lengths: check and report what each layer attends to.

After pruning, layers hold different numbers of prompt tokens, so in a decode graph each
layer's past KV is its own symbolic length. transformers sizes its one mask from layer 0;
`slimcompile.hf_attention` narrows that mask to each layer's keys before SDPA. This pass
checks, for a graph that extends a cache, that every SDPA call's mask (if any is left)
spans exactly that layer's keys, and records the per-layer KV lengths for inspection.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from slimcompile.passes.layer_analysis import UnsupportedGraph, example_value
from slimcompile.passes.manager import PassResult


def decode_kv_pass(gm: fx.GraphModule, ctx: Any) -> PassResult:
    lm = ctx.layer_map
    if lm.static_kv:
        keys = {str(example_value(layer.sdpa.args[1]).shape[-2]) for layer in lm.layers}
        return PassResult(
            False,
            f"KV in preallocated buffers written in place (StaticCache-like): every layer reads {sorted(keys)} keys",
            {"static_kv_lengths": sorted(keys)},
        )
    if not lm.has_past:
        return PassResult(False, "prefill graph: every layer starts from an empty cache")
    lengths = []
    for layer in lm.layers:
        past = example_value(layer.past_kv[0]).shape[-2]
        keys = example_value(layer.kv_outputs[0]).shape[-2]
        mask = layer.sdpa.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node) and example_value(mask).shape[-1] != keys:
            raise UnsupportedGraph(
                f"layer {layer.index}: mask spans {example_value(mask).shape[-1]} keys but the layer holds {keys}"
            )
        lengths.append(str(past))
    distinct = sorted(set(lengths), key=lengths.index)
    return PassResult(
        False,
        f"decode over per-layer caches: {len(distinct)} distinct past length(s) {distinct}",
        {"past_lengths": lengths},
    )
