"""Static literal-length rewrite: in a graph traced with static shapes, the prompt length is a
literal (`view(1, 45, 4, 16)`), so after a pruning layer the literal uses of the old length in
shape arguments (`view/reshape/expand/new_*`, `torch.reshape/zeros/ones/empty/full/arange`)
become the kept length. Refused when the length equals a model dimension (heads, head_dim,
hidden, GQA groups): a literal would then be ambiguous.

`token_prune` calls `rewrite_literals` per pruning layer, between its rewrite and the shape
refresh that the next pruning layer reads (so it is a module, not a pipeline pass); the count
of edits is part of token_prune's findings (`literal_edits` per layer).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from slimcompile.passes.layer_analysis import UnsupportedGraph, example_value

SHAPE_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full"}
SHAPE_FUNCS = {torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange}


def model_dims(layer: Any) -> set[int]:
    """Static sizes of a layer other than its length: heads, head_dim, hidden, GQA groups."""
    q, k, h = example_value(layer.q), example_value(layer.k), example_value(layer.residual_out)
    dims = {q.shape[1], q.shape[3], k.shape[1], h.shape[2], q.shape[1] // k.shape[1]}
    return {int(d) for d in dims if not isinstance(d, torch.SymInt)}


def check_unambiguous(length: int, layer: Any) -> None:
    if length in model_dims(layer):
        raise UnsupportedGraph(
            f"static prompt length {length} equals a model dimension, so its literal uses are ambiguous; "
            "compile with dynamic=True (or call slimcompile.compile) to prune this length"
        )


def replace_literal(arg: Any, old: int, new: int) -> Any:
    if isinstance(arg, bool):
        return arg
    if isinstance(arg, int):
        return new if arg == old else arg
    if isinstance(arg, (list, tuple)):
        return type(arg)(replace_literal(a, old, new) for a in arg)
    return arg


def is_shape_call(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in SHAPE_METHODS) or (n.op == "call_function" and n.target in SHAPE_FUNCS)


def rewrite_literals(nodes: Iterable[fx.Node], old: int, new: int) -> list[fx.Node]:
    """Replace the literal `old` by `new` in the shape arguments of `nodes`; returns the nodes edited."""
    edited = []
    for n in nodes:
        if is_shape_call(n):
            new_args = replace_literal(n.args, old, new)
            if new_args != n.args:
                n.args = new_args
                edited.append(n)
    return edited
