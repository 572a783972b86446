"""A small pass manager: runs FX passes in order and records what each one did.

Each pass is a function `(gm, ctx) -> PassResult`. The manager records per pass its
name, wall time, nodes added and removed and the graph code after it, so the inspection
CLI and `SLIM_DEBUG` dumps can show the pipeline.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch.fx as fx


@dataclasses.dataclass
class PassResult:
    """What a pass reports: whether it changed the graph, a one-line summary, details for tools."""

    changed: bool
    summary: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassRecord:
    name: str
    changed: bool
    summary: str
    seconds: float
    nodes_added: int
    nodes_removed: int
    code_before: str
    code_after: str
    details: dict[str, Any]

    def as_dict(self, with_code: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not with_code:
            d.pop("code_before")
            d.pop("code_after")
        return d


Pass = Callable[[fx.GraphModule, Any], PassResult]


def graph_code(gm: fx.GraphModule) -> str:
    return gm.code if hasattr(gm, "code") else str(gm.graph)


class PassManager:
    """Runs `passes` in order over one GraphModule, keeping a `PassRecord` for each."""

    def __init__(self, passes: list[tuple[str, Pass]]):
        self.passes = passes
        self.records: list[PassRecord] = []

    def run(self, gm: fx.GraphModule, ctx: Any) -> fx.GraphModule:
        for name, fn in self.passes:
            before_nodes = set(gm.graph.nodes)
            before_code = graph_code(gm)
            t0 = time.perf_counter()
            result = fn(gm, ctx)
            if result.changed:
                gm.graph.lint()
                gm.recompile()
            seconds = time.perf_counter() - t0
            after_nodes = set(gm.graph.nodes)
            self.records.append(
                PassRecord(
                    name=name,
                    changed=result.changed,
                    summary=result.summary,
                    seconds=seconds,
                    nodes_added=len(after_nodes - before_nodes),
                    nodes_removed=len(before_nodes - after_nodes),
                    code_before=before_code,
                    code_after=graph_code(gm),
                    details=result.details,
                )
            )
        return gm
