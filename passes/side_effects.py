"""Side effects of FX nodes, and dead-code elimination that keeps them.

`torch.fx.Graph.eliminate_dead_code()` removes every node without users unless
`Node.is_impure()` says otherwise, and `is_impure` only knows call_functions of mutable
OpOverloads and a short list of functions: every `call_method` is "pure" to it. Dynamo
graphs express in-place updates as methods (`keys.index_copy_(2, pos, k)`,
`cumulative_length.add_(n)`, `x.copy_(y)`) whose results nobody reads, so the default DCE
deletes them. That is how transformers' `StaticCache` lost all its cache writes
(StaticLayer.update writes the new K/V into a preallocated buffer in place and returns the
buffer: attention then read an all-zero cache).

`has_side_effect(node)` is conservative: a node is kept if it may write to memory that
outlives it, or is otherwise observable. `eliminate_dead_code(gm)` is the only DCE the
passes may call.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

# Python's in-place operator protocol (`x += y` on a tensor mutates x).
_INPLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow", "lshift", "rshift", "and", "xor", "or")
) | {"__setitem__", "__delitem__", "__set__"}

_INPLACE_OPERATORS = frozenset(
    {
        operator.setitem, operator.delitem,
        operator.iadd, operator.isub, operator.imul, operator.imatmul, operator.itruediv,
        operator.ifloordiv, operator.imod, operator.ipow, operator.ilshift, operator.irshift,
        operator.iand, operator.ixor, operator.ior,
    }
)


def _is_inplace_name(name: str) -> bool:
    """`index_copy_`, `add_`, `copy_`, `__setitem__`, `setitem`, `__iadd__` ... (not `__init__`)."""
    if name in _INPLACE_DUNDERS or name == "setitem":
        return True
    return name.endswith("_") and not name.endswith("__")


def _writes_positional_arg(schema: Any) -> bool:
    """Whether an op schema writes to an argument other than a keyword-only `out=`."""
    return any(
        a.alias_info is not None and a.alias_info.is_write and not a.kwarg_only for a in schema.arguments
    )


def _schema_mutates(target: Any, kwargs: dict) -> bool:
    """Mutation according to the operator schema (aten ops, custom ops with `mutates_args`)."""
    if isinstance(target, torch._ops.OpOverload):
        return bool(target._schema.is_mutable)
    if isinstance(target, torch._ops.OpOverloadPacket):
        # The overload is chosen at call time: count an overload's written argument unless it
        # is the keyword-only `out` of an `.out` variant that this call does not pass.
        for name in target.overloads():
            schema = getattr(target, name)._schema
            if _writes_positional_arg(schema):
                return True
            if schema.is_mutable and any(
                a.kwarg_only and a.alias_info is not None and a.alias_info.is_write and a.name in kwargs
                for a in schema.arguments
            ):
                return True
        return False
    custom = getattr(target, "_opoverload", None)  # torch.library.custom_op's CustomOpDef
    if isinstance(custom, torch._ops.OpOverload):
        return bool(custom._schema.is_mutable)
    return False


def has_side_effect(node: fx.Node) -> bool:
    """Whether `node` must be kept even when nothing reads its result.

    True for
    - placeholders and outputs, and whatever torch's own `Node.is_impure()` flags (asserts,
      grad-mode/autocast switches, random ops, mutable OpOverloads, `operator.setitem`);
    - `call_method` of an in-place method: a name ending in `_` (`index_copy_`, `copy_`,
      `add_`, `zero_`, `fill_`, ...) or an in-place dunder (`__setitem__`, `__iadd__`, ...);
    - `call_function` of `operator.setitem`/`delitem`/`iadd`..., of a function whose name ends
      in `_` (`torch.relu_`, `torch.Tensor.index_copy_`, `F.relu_`), of an aten/custom op
      (OpOverload, OpOverloadPacket or `custom_op` object) whose schema writes an argument
      (`mutates_args`), and of anything called with `out=` or `inplace=True`;
    - `call_module` of a module marked `_is_impure` (torch's rule).
    Mutating a graph input (a placeholder, e.g. a cache buffer or a counter) always goes
    through one of these forms, so every write to an input is kept.
    """
    if node.op in ("placeholder", "output"):
        return True
    kwargs = node.kwargs or {}
    if kwargs.get("out") is not None or kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return isinstance(node.target, str) and _is_inplace_name(node.target)
    if node.op == "call_function":
        target = node.target
        if target in _INPLACE_OPERATORS:
            return True
        if _schema_mutates(target, kwargs):
            return True
        name = getattr(target, "__name__", None)
        if isinstance(name, str) and not isinstance(target, torch._ops.OpOverloadPacket) and _is_inplace_name(name):
            return True
    try:
        return bool(node.is_impure())
    except Exception:  # an unresolvable call_module: keep it rather than guess
        return True


def eliminate_dead_code(gm: fx.GraphModule) -> bool:
    """Remove nodes without users and without side effects (`has_side_effect`); True if changed."""
    return gm.graph.eliminate_dead_code(is_impure_node=has_side_effect)
