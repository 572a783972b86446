"""The slim pipeline: which passes run, in what order, and the manager that records them.

    layer_analysis -> causal_mask -> decode_kv -> flatten_linear -> token_prune -> shape_prop

`run_passes` copies the Dynamo graph, fixes the `PassInputs` once (the schedule is resolved
from the layer count the graph names, before any pass runs) and runs the pipeline. The
`PassManager` checks each pass's `requires`, keeps its findings (the one reporting channel)
and records per pass its wall time, nodes added/removed and the code before/after, which the
inspection CLI and `SLIM_DEBUG` dumps show.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Sequence

import torch
import torch.fx as fx

from slimcompile.passes.base import Findings, FindingsView, PassInputs, SlimPass
from slimcompile.passes.causal_mask import CausalMask
from slimcompile.passes.decode_kv import DecodeKV
from slimcompile.passes.flatten_linear import FlattenLinear
from slimcompile.passes.layer_analysis import LayerAnalysis, count_layers, example_value
from slimcompile.passes.shape_check import ShapeCheck
from slimcompile.passes.token_prune import TokenPrune


def default_passes() -> list[SlimPass]:
    return [LayerAnalysis(), CausalMask(), DecodeKV(), FlattenLinear(), TokenPrune(), ShapeCheck()]


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
    details: dict[str, Any]  # `findings.details()`: the JSON-friendly view of the findings
    findings: Findings | None = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self, with_code: bool = False) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "findings"}
        if not with_code:
            d.pop("code_before")
            d.pop("code_after")
        return d


def graph_code(gm: fx.GraphModule) -> str:
    return gm.code if hasattr(gm, "code") else str(gm.graph)


class PassManager:
    """Runs `passes` in order over one GraphModule; `records` and `findings` say what each did."""

    def __init__(self, passes: Sequence[SlimPass] | None = None):
        self.passes = list(default_passes() if passes is None else passes)
        self.records: list[PassRecord] = []
        self.findings: dict[str, Findings] = {}

    def uuid(self) -> str:
        """Identifies the pipeline (each pass's code, in order), for cache keys."""
        return hashlib.sha256("".join(p.uuid() for p in self.passes).encode()).hexdigest()

    def run(self, gm: fx.GraphModule, inputs: PassInputs) -> fx.GraphModule:
        for p in self.passes:
            missing = [r for r in p.requires if r not in self.findings]
            if missing:
                raise RuntimeError(f"pass {p.name!r} requires the findings of {missing}, which no earlier pass provided")
            before_nodes = set(gm.graph.nodes)
            before_code = graph_code(gm)
            t0 = time.perf_counter()
            result = p(gm, inputs, FindingsView(self.findings, p.requires, p.name))
            if result.changed:
                gm.graph.lint()
                gm.recompile()
            seconds = time.perf_counter() - t0
            after_nodes = set(gm.graph.nodes)
            self.findings[p.name] = result
            self.records.append(
                PassRecord(
                    name=p.name,
                    changed=result.changed,
                    summary=result.summary,
                    seconds=seconds,
                    nodes_added=len(after_nodes - before_nodes),
                    nodes_removed=len(before_nodes - after_nodes),
                    code_before=before_code,
                    code_after=graph_code(gm),
                    details=result.details(),
                    findings=result,
                )
            )
        return gm


class CompileContext:
    """Read-only view of one compilation's inputs and findings, under the names tools and tests
    read (`layer_map`, `mask_removed`, `prune`, `guards`, ...). Built from the findings; passes
    never see it."""

    def __init__(self, inputs: PassInputs, findings: dict[str, Findings] | None = None):
        self.inputs, self.findings = inputs, dict(findings or {})

    def _get(self, name: str, field: str, default: Any) -> Any:
        f = self.findings.get(name)
        return getattr(f, field, default) if f is not None else default

    options = property(lambda self: self.inputs.options)
    fake_mode = property(lambda self: self.inputs.fake_mode)
    schedule = property(lambda self: self.inputs.schedule)
    padding_inputs = property(lambda self: set(self.inputs.padding_inputs))
    assume_no_padding = property(lambda self: self.inputs.assume_no_padding)
    layer_map = property(lambda self: self._get("layer_analysis", "layer_map", None))
    mask_removed = property(lambda self: self._get("causal_mask", "removed", False))
    mask_kept_reason = property(lambda self: self._get("causal_mask", "kept_reason", None))
    prune = property(lambda self: list(self._get("token_prune", "prune", ())))
    guards = property(lambda self: list(self._get("token_prune", "guards", ())))
    notes = property(lambda self: [])


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def padding_inputs(gm: fx.GraphModule) -> list[tuple[int, fx.Node]]:
    """(position, placeholder) of each 2-D `attention_mask` input: the user's padding mask."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [
        (i, n)
        for i, n in enumerate(phs)
        if "attention_mask" in n.name
        and isinstance(example_value(n), torch.Tensor)
        and example_value(n).dim() == 2
    ]


def make_inputs(gm: fx.GraphModule, options: Any, fake_mode: Any, assume_no_padding: bool) -> PassInputs:
    """The pipeline's inputs for `gm`; the schedule is resolved here, once."""
    schedule = error = None
    if options.pruning:
        n = count_layers(gm)
        try:
            schedule = options.resolve(n) if n else None  # no layers: layer_analysis refuses the graph
        except ValueError as e:  # raised by token_prune, after layer_analysis had its say on the graph
            error = e
    return PassInputs(
        options=options,
        fake_mode=fake_mode,
        schedule=schedule,
        schedule_error=error,
        padding_inputs=frozenset(n for _, n in padding_inputs(gm)),
        assume_no_padding=assume_no_padding,
    )


def run_passes(gm: fx.GraphModule, options: Any, fake_mode: Any, assume_no_padding: bool, passes: Sequence[SlimPass] | None = None):
    """Run the pipeline on a copy of `gm`; returns (graph, manager, context)."""
    gm = copy_graph_module(gm)
    inputs = make_inputs(gm, options, fake_mode, assume_no_padding)
    pm = PassManager(passes)
    pm.run(gm, inputs)
    return gm, pm, CompileContext(inputs, pm.findings)
