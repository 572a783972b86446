"""Decode with per-layer KV lengths: give each layer's SDPA a mask as wide as its own keys.

After pruning, layers hold different numbers of prompt tokens, so in a graph that extends a
cache each layer's past KV is its own symbolic length, while transformers builds one mask
sized from layer 0's cache and hands it to every layer. For a causal mask the last m columns
of that bottom-right-aligned mask are exactly the causal mask of a layer holding m keys (its
kept prompt tokens, then the new ones), so this pass rewrites, per layer whose mask is wider
than its keys, `attn_mask` into `attn_mask[..., -keys:]` (one slice per such layer, carrying
the SDPA call's provenance). A mask narrower than the keys cannot be explained: refused.

Where the narrowing happens: Dynamo runs SDPA on fake tensors while it traces, and a mask
wider than the keys fails there, before any backend sees the graph. transformers 5.2x builds
no mask for a pure causal SDPA step, so its decode graphs reach this pass without one. 5.17
materialises the mask under tracing; there `slimcompile.hf_attention.length_aware_sdpa()`
(a scoped override, entered by `slimcompile.compile`'s forward) slices it in the traced code
and this pass finds every mask already as wide as its layer's keys.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from slimcompile.passes.base import Findings, SlimPass, copy_provenance
from slimcompile.passes.layer_analysis import UnsupportedGraph, example_value, sdpa_mask


@dataclasses.dataclass(frozen=True)
class DecodeKVFindings(Findings):
    kind: str = "prefill"  # "prefill", "decode" (extends a DynamicCache) or "static" (in-place KV buffers)
    past_lengths: tuple[str, ...] = ()  # per layer (decode), or the distinct key lengths (static)
    narrowed_layers: tuple[int, ...] = ()  # layers whose mask was sliced to their key length


def _same(a: Any, b: Any) -> bool:
    """Provably equal sizes, without adding a guard."""
    return a is b or statically_known_true(a == b)


def narrow_mask(graph: fx.Graph, sdpa: fx.Node, mask: fx.Node) -> fx.Node:
    """Insert `mask[..., -keys:]` (keys: the length of SDPA's key argument) before `sdpa` and make
    `sdpa` read it; returns the slice. Its example value is left to the shape check."""
    with graph.inserting_before(sdpa):
        keys = graph.call_method("size", (sdpa.args[1], -2))
        neg = graph.call_function(operator.neg, (keys,))
        narrowed = graph.call_function(operator.getitem, (mask, (Ellipsis, slice(neg, None, None))))
    sdpa.replace_input_with(mask, narrowed)
    copy_provenance(sdpa, (keys, neg, narrowed))
    return narrowed


class DecodeKV(SlimPass):
    name = "decode_kv"
    requires = ("layer_analysis",)

    def __call__(self, gm: fx.GraphModule, inputs: Any, findings: Any) -> DecodeKVFindings:
        lm = findings["layer_analysis"].layer_map
        if lm.static_kv:
            keys = tuple(sorted({str(example_value(layer.sdpa.args[1]).shape[-2]) for layer in lm.layers}))
            return DecodeKVFindings(
                False,
                f"KV in preallocated buffers written in place (StaticCache-like): every layer reads {list(keys)} keys",
                kind="static", past_lengths=keys,
            )
        if not lm.has_past:
            return DecodeKVFindings(False, "prefill graph: every layer starts from an empty cache")
        lengths, narrowed = [], []
        for layer in lm.layers:
            past = example_value(layer.past_kv[0]).shape[-2]
            keys = example_value(layer.kv_outputs[0]).shape[-2]
            mask = sdpa_mask(layer.sdpa)
            if mask is not None:
                width = example_value(mask).shape[-1]
                if not _same(width, keys):
                    if isinstance(width, int) and isinstance(keys, int) and width < keys:
                        raise UnsupportedGraph(f"layer {layer.index}: mask spans {width} keys but the layer holds {keys}")
                    # (a symbolic width narrower than the keys fails the shape check after the pipeline)
                    narrow_mask(gm.graph, layer.sdpa, mask)
                    narrowed.append(layer.index)
            lengths.append(str(past))
        distinct = sorted(set(lengths), key=lengths.index)
        summary = f"decode over per-layer caches: {len(distinct)} distinct past length(s) {distinct}"
        if narrowed:
            summary += f"; mask narrowed to each layer's keys in {len(narrowed)} layer(s)"
        return DecodeKVFindings(bool(narrowed), summary, kind="decode", past_lengths=tuple(lengths), narrowed_layers=tuple(narrowed))

