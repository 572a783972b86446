"""Re-propagate fake-tensor metadata (`example_value`) after a rewrite, and validate shapes.

Inductor's pre-grad passes and later pruning layers read `example_value`; after a pass
changes sequence lengths those values are stale. Only nodes downstream of a rewritten node
are re-run (under the fake mode of Dynamo's example values): re-running untouched nodes such
as Dynamo's `.item()` on lifted floats would add float-specialisation guards and force a
recompile. A shape error here means the rewrite broke the graph; the caller falls back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


class _FakeProp(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, dirty: set[fx.Node]):
        super().__init__(gm)
        self.dirty = dirty

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "output" or (n not in self.dirty and "example_value" in n.meta):
            return n.meta.get("example_value") if n.op != "output" else super().run_node(n)
        out = super().run_node(n)
        n.meta["example_value"] = out
        return out


def stale_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes without example values (new ones) and everything that reads them, transitively."""
    dirty: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        if "example_value" not in n.meta and n.op != "placeholder" or any(a in dirty for a in n.all_input_nodes):
            dirty.add(n)
    return dirty


def refresh_example_values(gm: fx.GraphModule, fake_mode: Any, changed: set[fx.Node] = frozenset()) -> int:
    """Recompute example values of new nodes, of `changed` nodes and of their users; returns the count."""
    for n in changed:
        n.meta.pop("example_value", None)
    dirty = stale_nodes(gm)
    with fake_mode, torch.no_grad():
        _FakeProp(gm, dirty).run()
    return len(dirty)
