"""Causal-mask rewrite: a pure causal mask feeding SDPA becomes `attn_mask=None, is_causal=...`.

Under tracing, transformers always materialises the [b, 1, q, kv] boolean mask from `arange`
comparisons, which keeps SDPA off the flash kernel (DESIGN.md: 1.9x slower at 32K). The mask
is recognised structurally: every ancestor is index arithmetic (arange, offsets, indexing,
expand), there is exactly one `kv_idx <= q_idx` comparison, and no tensor input is read
(except the padding mask, when the caller asked to specialise on "no padding" and guards that
at run time). A mask with any other pattern (padding, sliding window, chunks) is left as is.

Prefill (no past, q == kv): `is_causal=True`. One-token decode: the causal row is all True:
no mask, `is_causal=False`. A multi-token step over a cache keeps its mask (bottom-right
causal alignment differs from SDPA's top-left `is_causal`). So does a graph whose KV is
written in place into preallocated buffers (transformers' StaticCache): the keys span
`max_cache_len`, not the queries, and whether earlier calls filled part of the buffer is
not visible in the graph, so the mask transformers built is the only proof of alignment.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from slimcompile.passes.layer_analysis import example_value
from slimcompile.passes.base import Findings, SlimPass
from slimcompile.passes.side_effects import eliminate_dead_code

_COMPARE = {operator.le: "le", operator.ge: "ge", torch.le: "le", torch.ge: "ge"}
_STRICT = {operator.lt, operator.gt, torch.lt, torch.gt}
_INDEX_FUNCS = {torch.arange, operator.add, operator.sub, operator.neg, operator.getitem}
_INDEX_METHODS = {"expand", "view", "reshape", "unsqueeze", "to", "bool", "contiguous"}
_AND = {operator.and_, torch.logical_and, torch.bitwise_and}


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, stack, out = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        stack.extend(n.all_input_nodes)
    return out


def _reads_tensor_input(node: fx.Node) -> set[fx.Node]:
    return {
        a for a in _ancestors(node) if a.op == "placeholder" and isinstance(example_value(a), torch.Tensor)
    }


def _is_all_true(n: Any) -> bool:
    return isinstance(n, fx.Node) and (
        (n.op == "call_method" and n.target == "new_ones") or (n.op == "call_function" and n.target is torch.ones)
    )


def _is_index_arith(n: fx.Node) -> bool:
    if n.op == "placeholder":
        return not isinstance(example_value(n), torch.Tensor)  # SymInt sizes
    if _is_all_true(n):
        return True
    if n.op == "call_function" and n.target in _AND:
        return any(_is_all_true(a) for a in n.args)  # `True & causal`, as transformers' and_masks starts
    if n.op == "call_function":
        return n.target in _INDEX_FUNCS or n.target in _COMPARE
    if n.op == "call_method":
        return n.target in _INDEX_METHODS
    return False


def analyse_mask(mask: fx.Node, padding_inputs: set[fx.Node]) -> tuple[fx.Node | None, str]:
    """Return (causal_node, reason): causal_node computes the pure causal part of `mask`.

    `padding_inputs` are placeholders that may be assumed all-ones (the caller guards it);
    an `and` of the causal part with a term reading only those is then reduced to the causal part.
    """
    node = mask
    while _is_method(node, {"expand", "to", "bool", "contiguous"}):
        node = node.args[0]
    if node.op == "call_function" and node.target in _AND and len(node.args) == 2:
        a, b = node.args
        for causal, pad in ((a, b), (b, a)):
            reads = _reads_tensor_input(pad)
            if reads and reads <= padding_inputs and not _reads_tensor_input(causal):
                node = causal
                break
        else:
            return None, "mask combines terms other than causal and (specialised) padding"
    ancestors = _ancestors(node)
    bad = [n for n in ancestors if not _is_index_arith(n)]
    if bad:
        return None, f"mask reads {bad[0].op} {bad[0].target!r}, not only index arithmetic"
    if any(n.op == "call_function" and n.target in _STRICT for n in ancestors):
        return None, "mask uses a strict comparison (not causal)"
    compares = [n for n in ancestors if n.op == "call_function" and n.target in _COMPARE]
    if len(compares) != 1:
        return None, f"mask has {len(compares)} comparisons (a pure causal mask has one)"
    cmp = compares[0]
    lhs, rhs = (example_value(x) for x in cmp.args)
    kv_side, q_side = (lhs, rhs) if _COMPARE[cmp.target] == "le" else (rhs, lhs)
    # kv indices vary along the last axis, query indices along the one before.
    if not (isinstance(kv_side, torch.Tensor) and isinstance(q_side, torch.Tensor)):
        return None, "causal comparison is not between index tensors"
    if not (kv_side.dim() == q_side.dim() >= 2 and q_side.shape[-1] == 1):
        return None, "comparison is not kv_idx <= q_idx"
    return node, "pure causal"


def _is_method(node: Any, names: set[str]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _same_size(a: Any, b: Any) -> bool:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr
    return a == b


def set_sdpa_mask(sdpa: fx.Node, is_causal: bool) -> None:
    args = list(sdpa.args)
    kwargs = dict(sdpa.kwargs)
    if len(args) > 3:
        args[3] = None
    kwargs["attn_mask"] = None
    if len(args) > 5:
        args[5] = is_causal
    else:
        kwargs["is_causal"] = is_causal
    sdpa.args, sdpa.kwargs = tuple(args), kwargs


@dataclasses.dataclass(frozen=True)
class CausalMaskFindings(Findings):
    removed: bool = False  # the pass removed the mask transformers built
    kept_reason: str | None = None  # why a mask in the graph was kept (None: removed, or there was none)
    is_causal: bool | None = None
    mask_shape: str | None = None
    removed_nodes: tuple[str, ...] = ()
    mask_nodes: int = 0


def _kept(reason: str, summary: str | None = None) -> CausalMaskFindings:
    return CausalMaskFindings(False, summary or reason, kept_reason=reason)


class CausalMask(SlimPass):
    """A pure causal mask feeding SDPA becomes `attn_mask=None, is_causal=...` (module docstring)."""

    name = "causal_mask"
    requires = ("layer_analysis",)

    def __call__(self, gm: fx.GraphModule, inputs: Any, findings: Any) -> CausalMaskFindings:
        lm = findings["layer_analysis"].layer_map
        masks = lm.masks()
        if not masks:
            return CausalMaskFindings(False, "no attention mask in the graph")
        mask_val = example_value(masks[0])
        q_len = mask_val.shape[-2]
        if lm.static_kv:
            return _kept("KV written in place into preallocated buffers (StaticCache): the mask spans max_cache_len, kept")
        padding = inputs.padding_inputs if inputs.assume_no_padding else set()
        for mask in masks:
            causal, reason = analyse_mask(mask, padding)
            if causal is None:
                return _kept(reason, f"mask kept: {reason}")
        kv_len = mask_val.shape[-1]
        if not lm.has_past and not _same_size(q_len, kv_len):
            return _kept(f"{q_len} queries over {kv_len} keys without a past: alignment unknown, mask kept")
        if not lm.has_past:
            is_causal = True
        elif q_len == 1:
            is_causal = False
        else:
            return _kept("multi-token step over a cache: causal alignment is bottom-right, mask kept")
        removed = tuple(sorted({n.name for m in masks for n in _ancestors(m) if n.op != "placeholder"}))
        for layer in lm.layers:
            set_sdpa_mask(layer.sdpa, is_causal)
        eliminate_dead_code(gm)
        shape = f"[{', '.join(str(s) for s in mask_val.shape)}]"
        return CausalMaskFindings(
            True,
            f"causal mask {shape} removed ({len(masks)} mask node(s)); {len(lm.layers)} SDPA calls now is_causal={is_causal}",
            removed=True, is_causal=is_causal, mask_shape=shape, removed_nodes=removed, mask_nodes=len(masks),
        )
