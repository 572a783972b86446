"""Rewrite 3-D `linear` calls on pruned hidden states into 2-D ones.

On an H200 (torch 2.11) the fake implementation of CUDA's 3-D `linear`, given a [b, kept, h]
input whose length is a pruned-length expression, calls `sizes()`, which pins the kept length
to the first prompt's value: one recompilation per prompt length (bench/RESULTS.md). A 2-D
input goes straight to `mm`. This helper rewrites `linear(x, w, b)` into
`linear(x.reshape(-1, h), w, b).reshape(b, kept, -1)` for the given nodes; the token-prune pass
applies it to the nodes after a pruning layer, before re-propagating shapes. With it the
recompile probe (`python bench/recompile_probe.py` on CUDA) no longer shows the pinning guard.
SLIM_FLATTEN_LINEAR=0 turns it off (to reproduce the recompile). Inductor lowers a 3-D linear
to the same `mm` on a view, so the generated code does not change.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from slimcompile.passes.layer_analysis import example_value

ENV = "SLIM_FLATTEN_LINEAR"
LINEAR_TARGETS = (torch._C._nn.linear, F.linear)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


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
        n.replace_all_uses_with(out)
        graph.erase_node(n)
        added += [b, length, flat, out2, out]
    return added
