"""Token-prune insertion: after each pruning layer, score blocks, keep the top ones, gather.

After layer l's residual output (i.e. after its MLP: layer l itself and its KV stay full),
the pass inserts
    q_win = q_l[:, :, -window:]                      post-RoPE queries of the window
    scores = slim::block_scores(q_win, k_l, ...)     [b, n_blocks]
    idx = slim::select_tokens(scores, L, ...)        [b, kept], increasing, sink+blocks+tail
    hidden' = gather(hidden, 1, idx)                 and the same for RoPE cos/sin,
and routes every later use of the hidden state, of cos/sin and of the sequence length to
the pruned versions. Kept tokens keep their original positions because cos/sin are
gathered, not recomputed. The kept length is a closed form of the symbolic prompt length
(`slimcompile.schedule`), so one graph serves every prompt length that passes the guard
`L >= min_prune_len`. In a graph traced with static shapes, the literal length in later
`view/reshape/expand` arguments is replaced instead (refused when the length equals a
model dimension, where a literal would be ambiguous).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from slimcompile import schedule as sched
from slimcompile.passes import static_length
from slimcompile.passes.base import Findings, SlimPass, copy_provenance
from slimcompile.passes.layer_analysis import UnsupportedGraph, example_value
from slimcompile.passes.side_effects import eliminate_dead_code
from slimcompile.passes.shape_prop import refresh_example_values
from slimcompile.runtime import ops  # noqa: F401  (registers torch.ops.slim)

# One message for every StaticCache graph (prefill and decode), so the backend warns once.
STATIC_CACHE_REASON = (
    "StaticCache (KV written in place into preallocated buffers): one KV length for all layers; "
    "pruning needs per-layer lengths - use the default DynamicCache (or slimcompile.compile with "
    "kv='resident') to prune"
)

def _is_sym(x: Any) -> bool:
    return isinstance(x, torch.SymInt)


def _same_len(a: Any, b: Any) -> bool:
    if _is_sym(a) and _is_sym(b):
        return a.node.expr == b.node.expr
    if _is_sym(a) or _is_sym(b):
        return False
    return isinstance(a, int) and isinstance(b, int) and a == b


def _depends_on(x: Any, length: Any) -> bool:
    """Whether a SymInt/tensor shape involves the symbols of `length` (dynamic graphs only)."""
    if not _is_sym(length):
        return False
    syms = length.node.expr.free_symbols
    vals = list(x.shape) if isinstance(x, torch.Tensor) else [x]
    return any(_is_sym(v) and v.node.expr.free_symbols & syms for v in vals)


class _Emitter:
    """Appends nodes in order before `anchor` (so a run of inserts keeps program order)."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph, self.anchor = graph, anchor
        self.tracer = GraphAppendingTracer(graph)
        self.added: list[fx.Node] = []

    def call(self, target: Any, *args: Any, op: str = "call_function", **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs)
        self.added.append(node)
        return node

    def arith(self, fn: Any, length: fx.Node) -> Any:
        """Emit the SymInt arithmetic of `fn(length)` as operator.* nodes."""
        with self.graph.inserting_before(self.anchor):
            before = set(self.graph.nodes)
            out = fn(Proxy(length, self.tracer))
            self.added.extend(n for n in self.graph.nodes if n not in before)
        return _unwrap(out)


def _unwrap(x: Any) -> Any:
    if isinstance(x, Proxy):
        return x.node
    if isinstance(x, tuple):
        return tuple(_unwrap(v) for v in x)
    return x


def _prune_after(gm: fx.GraphModule, inputs: Any, i: int, layer: Any, cur_val: Any, cur_node: Any) -> tuple[Any, Any, dict]:
    """Prune after `layer`: insert scoring, selection and gathers, route later uses to them (and, in
    a static graph, rewrite the length literals), re-propagate shapes; returns the kept length
    (value, graph argument) and this layer's report."""
    o, schedule = inputs.options, inputs.schedule
    graph = gm.graph
    order = {n: j for j, n in enumerate(graph.nodes)}
    cut = order[layer.residual_out]
    later = [n for n in graph.nodes if order[n] > cut and n.op != "output"]
    later_set = set(later)

    fits = sched.budget_fits(schedule, i, cur_val)
    n_val, k_val, kept_val = sched.kept_length(schedule, i, cur_val, fits)
    static = not _is_sym(cur_val)
    if static:
        static_length.check_unambiguous(cur_val, layer)

    em = _Emitter(graph, layer.residual_out.next)
    if static:
        n_arg, k_arg, kept_arg = n_val, k_val, kept_val
    else:
        n_arg, k_arg, kept_arg = em.arith(
            lambda L: sched.kept_length(schedule, i, L, fits), cur_node
        )
    q, k = layer.q, layer.k
    head_dim = example_value(q).shape[-1]
    q_win = em.call(operator.getitem, q, (slice(None), slice(None), slice(-o.window, None), slice(None)))
    scores = em.call(
        torch.ops.slim.block_scores.default,
        q_win, k, float(head_dim) ** -0.5, o.sink, o.block_size, n_arg, o.scoring, o.pooling, o.unit_size, o.scoring_impl,
    )
    idx = em.call(torch.ops.slim.select_tokens.default, scores, cur_node, o.sink, o.block_size, k_arg)

    def gather(src: fx.Node) -> fx.Node:
        val = example_value(src)
        batch = example_value(layer.residual_out).shape[0]
        if val.shape[0] != batch:  # cos/sin [1, L, d] shared by the batch; selection is per sample
            batch_node = em.call("size", layer.residual_out, 0, op="call_method")
            src = em.call("expand", src, batch_node, *([-1] * (val.dim() - 1)), op="call_method")
        index = em.call("unsqueeze", idx, -1, op="call_method")
        index = em.call("expand", index, -1, -1, val.shape[-1], op="call_method")
        return em.call(torch.gather, src, 1, index)

    hidden = gather(layer.residual_out)
    replaced: dict[fx.Node, fx.Node] = {layer.residual_out: hidden}
    gathered_extra = []
    # Everything defined before the cut and read after it must be consistent with the new length.
    for src in list(graph.nodes):
        if order.get(src, 1 << 60) > cut or src.op == "output" or src in replaced:
            continue
        readers = [u for u in src.users if u in later_set]
        if not readers:
            continue
        val = example_value(src)
        if _is_sym(val) and not static and _same_len(val, cur_val):
            replaced[src] = kept_arg
        elif isinstance(val, torch.Tensor) and val.dim() == 3 and _same_len(val.shape[1], cur_val):
            if val.shape[1] != cur_val or (static and list(val.shape).count(cur_val) > 1):
                raise UnsupportedGraph(f"{src.name} {tuple(val.shape)}: ambiguous sequence axis")
            replaced[src] = gather(src)
            gathered_extra.append(src.name)
        elif isinstance(val, torch.Tensor) and static and cur_val in tuple(val.shape):
            raise UnsupportedGraph(f"{src.name} {tuple(val.shape)} depends on the prompt length and is read after layer {layer.index}")
        elif _depends_on(val, cur_val):
            raise UnsupportedGraph(
                f"{src.name} ({val if _is_sym(val) else tuple(val.shape)}) depends on the prompt length "
                f"and is read after layer {layer.index}; no rule to prune it"
            )
    added = set(em.added)
    changed: set[fx.Node] = set()
    for src, new in replaced.items():
        for user in list(src.users):
            if user in later_set and user not in added:
                user.replace_input_with(src, new) if isinstance(new, fx.Node) else _replace_sym(user, src, new)
                changed.add(user)
    literal_edits = 0
    if static:
        edited = static_length.rewrite_literals([n for n in later if n not in added], cur_val, kept_val)
        literal_edits = len(edited)
        changed.update(edited)
    copy_provenance(layer.residual_out, em.added)
    try:
        refreshed = refresh_example_values(gm, inputs.fake_mode, changed)
    except Exception as e:  # a rewrite that breaks shapes must not reach Inductor
        raise UnsupportedGraph(f"pruning after layer {layer.index} breaks shapes: {type(e).__name__}: {e}") from e
    report = (
        {
            "layer": layer.index,
            "length_in": str(cur_val),
            "n_blocks": str(n_val),
            "kept_blocks": str(k_val),
            "kept_length": str(kept_val),
            "keep": str(schedule.keep_at(i)[1]) + (" tokens" if schedule.keep_at(i)[0] == "tokens" else ""),
            "gathered": [layer.residual_out.name] + gathered_extra,
            "inserted": [n.name for n in em.added],
            "literal_edits": literal_edits,
            "nodes_repropagated": refreshed,
        }
    )
    return kept_val, kept_arg, report


def _replace_sym(user: fx.Node, old: fx.Node, new: Any) -> None:
    def sub(a: Any) -> Any:
        return new if a is old else a

    user.args = fx.node.map_aggregate(user.args, sub)
    user.kwargs = fx.node.map_aggregate(user.kwargs, sub)


@dataclasses.dataclass(frozen=True)
class TokenPruneFindings(Findings):
    prune: tuple[dict[str, Any], ...] = ()  # one entry per pruning layer
    guards: tuple[str, ...] = ()  # conditions on the prompt length this graph assumes
    # The first pruning layer's residual output: nodes after it see pruned lengths (flatten_linear).
    cut: fx.Node | None = None

    def details(self) -> dict[str, Any]:
        return {"prune": list(self.prune), "guards": list(self.guards)}


class TokenPrune(SlimPass):
    """After each scheduled layer: block scores, token selection, gathers (module docstring)."""

    name = "token_prune"
    requires = ("layer_analysis", "causal_mask")

    def __call__(self, gm: fx.GraphModule, inputs: Any, findings: Any) -> TokenPruneFindings:
        lm, schedule = findings["layer_analysis"].layer_map, inputs.schedule
        if inputs.schedule_error is not None:
            raise inputs.schedule_error
        if schedule is None or not inputs.options.pruning:
            return TokenPruneFindings(False, "pruning disabled")
        if lm.static_kv:
            raise UnsupportedGraph(STATIC_CACHE_REASON)
        if lm.has_past:
            return TokenPruneFindings(False, "call extends a cache (decode/continuation): prompt pruning applies to prefill only")
        if lm.masks():  # what the SDPA calls read now: causal_mask removed a pure causal mask
            raise UnsupportedGraph(
                f"the attention mask could not be removed ({findings['causal_mask'].kept_reason}); pruning needs a causal mask"
            )
        seq = lm.seq_len
        if not sched.prunes(schedule, seq):
            guard = f"{seq} < min_prune_len={inputs.options.min_prune_len}"
            return TokenPruneFindings(False, f"prompt too short to prune ({guard}): unpruned graph", guards=(guard,))
        guards = []
        if _is_sym(seq):
            guards.append(f"{seq} >= {inputs.options.min_prune_len}  (min_prune_len)")
        seq_node = next(
            (n for n in gm.graph.nodes if n.op == "placeholder" and _same_len(example_value(n), seq)), None
        )
        if _is_sym(seq) and seq_node is None:
            raise UnsupportedGraph(f"no graph input carries the sequence length {seq}")
        cur_val, cur_node = seq, (seq_node if _is_sym(seq) else seq)
        prune = []
        for i, layer_idx in enumerate(schedule.layers):
            kind, value = schedule.keep_at(i)
            if kind == "tokens" and _is_sym(cur_val):
                guards.append(
                    f"{cur_val} {'<=' if sched.budget_fits(schedule, i, cur_val) else '>'} {value}  (keep_tokens at layer {layer_idx})"
                )
            cur_val, cur_node, report = _prune_after(gm, inputs, i, lm.layers[layer_idx], cur_val, cur_node)
            prune.append(report)
        eliminate_dead_code(gm)
        kept = ", ".join(f"L{p['layer']}: {p['length_in']} -> {p['kept_length']}" for p in prune)
        return TokenPruneFindings(
            True, f"pruned after {len(prune)} layer(s): {kept}", prune=tuple(prune), guards=tuple(guards),
            cut=lm.layers[schedule.layers[0]].residual_out,
        )
