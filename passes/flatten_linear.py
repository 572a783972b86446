"""Rewrite 3-D `linear` calls on pruned hidden states into 2-D ones.

On an H200 (torch 2.11) the fake implementation of CUDA's 3-D `linear`, given a [b, kept, h]
input whose length is a pruned-length expression, calls `sizes()`, which pins the kept length
to the first prompt's value: one recompilation per prompt length (bench/RESULTS.md). A 2-D
input goes straight to `mm`. This pass rewrites `linear(x, w, b)` into
`linear(x.reshape(-1, h), w, b).reshape(b, kept, -1)` for every 3-D linear after the first
pruning layer's output, before token_prune runs (whose shape refresh would otherwise meet the
3-D linears on pruned lengths); token_prune's refresh computes their example values. With
it the recompile probe (`python bench/recompile_probe.py` on CUDA) no longer shows the pinning
guard. The `flatten_linear` option (SLIM_FLATTEN_LINEAR=0) turns it off, to reproduce the
recompile. Inductor lowers a 3-D linear to the same `mm` on a view, so the generated code does
not change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from slimcompile.passes.base import Findings, SlimPass, copy_provenance
from slimcompile.passes.layer_analysis import example_value

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)


def flatten_linears(graph: fx.Graph, nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """Rewrite every 3-D `linear` among `nodes`; returns the nodes added (their values are stale)."""
    added: list[fx.Node] = []
    for n in list(nodes):
        if n.op != "call_function" or n.target not in LINEAR_TARGETS:
            continue
        x = n.args[0]
        val = example_value(x) if isinstance(x, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dim() != 3 or isinstance(val.shape[2], torch.SymInt):
            continue
        with graph.inserting_before(n):
            b = graph.call_method("size", (x, 0))
            length = graph.call_method("size", (x, 1))
            flat = graph.call_method("reshape", (x, -1, int(val.shape[2])))
            out2 = graph.call_function(n.target, (flat, *n.args[1:]), dict(n.kwargs))
        with graph.inserting_after(out2):
            out = graph.call_method("reshape", (out2, b, length, -1))
        copy_provenance(n, (b, length, flat, out2, out))
        n.replace_all_uses_with(out)
        graph.erase_node(n)
        added += [b, length, flat, out2, out]
    return added


@dataclasses.dataclass(frozen=True)
class FlattenLinearFindings(Findings):
    converted: int = 0  # 3-D linears rewritten into 2-D ones


class FlattenLinear(SlimPass):
    """Runs BEFORE token_prune: token_prune re-propagates fake values after each cut, and a 3-D
    CUDA linear met there would already have pinned the kept length (a guard Dynamo installs)."""

    name = "flatten_linear"
    requires = ("layer_analysis",)

    def __call__(self, gm: fx.GraphModule, inputs: Any, findings: Any) -> FlattenLinearFindings:
        lm = findings["layer_analysis"].layer_map
        schedule = inputs.schedule
        if schedule is None or not inputs.options.pruning or lm.has_past or not schedule.layers:
            return FlattenLinearFindings(False, "no pruning in this graph: linears unchanged")
        if not getattr(inputs.options, "flatten_linear", True):
            return FlattenLinearFindings(False, "off (flatten_linear=False): 3-D linears after the cut kept")
        if schedule.layers[0] >= len(lm.layers):
            return FlattenLinearFindings(False, "the schedule does not fit this graph: linears unchanged")
        cut = lm.layers[schedule.layers[0]].residual_out
        nodes = list(gm.graph.nodes)
        later = nodes[nodes.index(cut) + 1:]
        added = flatten_linears(gm.graph, later)
        count = len(added) // 5
        return FlattenLinearFindings(bool(added), f"{count} 3-D linear(s) after layer cut {cut.name} now 2-D", converted=count)
