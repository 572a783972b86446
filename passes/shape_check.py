"""Shape check: re-propagate the example values a rewrite left stale, under Dynamo's fake mode.

New nodes (no `example_value`) and every node reading them are re-run (passes/shape_prop.py).
A failure means a rewrite broke the graph: `UnsupportedGraph`, so the backend falls back
instead of handing Inductor a broken graph. Last in the pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx as fx

from slimcompile.passes.base import Findings, SlimPass
from slimcompile.passes.layer_analysis import UnsupportedGraph
from slimcompile.passes.shape_prop import refresh_example_values


@dataclasses.dataclass(frozen=True)
class ShapeCheckFindings(Findings):
    repropagated: int = 0


class ShapeCheck(SlimPass):
    name = "shape_prop"  # the record name tools and dumps know

    def __call__(self, gm: fx.GraphModule, inputs: Any, findings: Any) -> ShapeCheckFindings:
        try:
            n = refresh_example_values(gm, inputs.fake_mode)
        except Exception as e:  # a broken rewrite must not reach Inductor
            raise UnsupportedGraph(f"rewritten graph fails shape propagation: {type(e).__name__}: {e}") from e
        return ShapeCheckFindings(False, f"example values consistent ({n} stale node(s) re-propagated)", repropagated=n)
