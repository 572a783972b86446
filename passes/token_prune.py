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

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from slimcompile import schedule as sched
from slimcompile.passes import flatten_linear
from slimcompile.passes.layer_analysis import UnsupportedGraph, example_value
from slimcompile.passes.manager import PassResult
from slimcompile.passes.side_effects import eliminate_dead_code
from slimcompile.passes.shape_prop import refresh_example_values
from slimcompile.runtime import ops  # noqa: F401  (registers torch.ops.slim)

# One message for every StaticCache graph (prefill and decode), so the backend warns once.
STATIC_CACHE_REASON = (
    "StaticCache (KV written in place into preallocated buffers): one KV length for all layers; "
    "pruning needs per-layer lengths - use the default DynamicCache (or slimcompile.compile with "
    "kv='resident') to prune"
)

_SHAPE_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full"}
_SHAPE_FUNCS = {torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange}


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


def _model_dims(layer: Any) -> set[int]:
    """Static sizes of a layer other than its length: heads, head_dim, hidden, GQA groups."""
    q, k, h = example_value(layer.q), example_value(layer.k), example_value(layer.residual_out)
    dims = {q.shape[1], q.shape[3], k.shape[1], h.shape[2], q.shape[1] // k.shape[1]}
    return {int(d) for d in dims if not _is_sym(d)}


def _replace_literal(arg: Any, old: int, new: int) -> Any:
    if isinstance(arg, bool):
        return arg
    if isinstance(arg, int):
        return new if arg == old else arg
    if isinstance(arg, (list, tuple)):
        return type(arg)(_replace_literal(a, old, new) for a in arg)
    return arg


def _prune_after(gm: fx.GraphModule, ctx: Any, i: int, layer: Any, cur_val: Any, cur_node: Any) -> tuple[Any, Any]:
    o = ctx.options
    graph = gm.graph
    order = {n: j for j, n in enumerate(graph.nodes)}
    cut = order[layer.residual_out]
    later = [n for n in graph.nodes if order[n] > cut and n.op != "output"]
    later_set = set(later)

    fits = sched.budget_fits(ctx.schedule, i, cur_val)
    n_val, k_val, kept_val = sched.kept_length(ctx.schedule, i, cur_val, fits)
    static = not _is_sym(cur_val)
    if static and cur_val in _model_dims(layer):
        raise UnsupportedGraph(
            f"static prompt length {cur_val} equals a model dimension, so its literal uses are ambiguous; "
            "compile with dynamic=True (or call slimcompile.compile) to prune this length"
        )

    em = _Emitter(graph, layer.residual_out.next)
    if static:
        n_arg, k_arg, kept_arg = n_val, k_val, kept_val
    else:
        n_arg, k_arg, kept_arg = em.arith(
            lambda L: sched.kept_length(ctx.schedule, i, L, fits), cur_node
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
        for n in later:
            if n in added:
                continue
            if (n.op == "call_method" and n.target in _SHAPE_METHODS) or (
                n.op == "call_function" and n.target in _SHAPE_FUNCS
            ):
                new_args = _replace_literal(n.args, cur_val, kept_val)
                if new_args != n.args:
                    n.args = new_args
                    literal_edits += 1
                    changed.add(n)
    if flatten_linear.enabled():
        em.added += flatten_linear.flatten_linears(graph, [n for n in later if n not in added])
        changed = {n for n in changed if not getattr(n, "_erased", False)}
    try:
        refreshed = refresh_example_values(gm, ctx.fake_mode, changed)
    except Exception as e:  # a rewrite that breaks shapes must not reach Inductor
        raise UnsupportedGraph(f"pruning after layer {layer.index} breaks shapes: {type(e).__name__}: {e}") from e
    ctx.prune.append(
        {
            "layer": layer.index,
            "length_in": str(cur_val),
            "n_blocks": str(n_val),
            "kept_blocks": str(k_val),
            "kept_length": str(kept_val),
            "keep": str(ctx.schedule.keep_at(i)[1]) + (" tokens" if ctx.schedule.keep_at(i)[0] == "tokens" else ""),
            "gathered": [layer.residual_out.name] + gathered_extra,
            "inserted": [n.name for n in em.added],
            "literal_edits": literal_edits,
            "nodes_repropagated": refreshed,
        }
    )
    return kept_val, kept_arg


def _replace_sym(user: fx.Node, old: fx.Node, new: Any) -> None:
    def sub(a: Any) -> Any:
        return new if a is old else a

    user.args = fx.node.map_aggregate(user.args, sub)
    user.kwargs = fx.node.map_aggregate(user.kwargs, sub)


def token_prune_pass(gm: fx.GraphModule, ctx: Any) -> PassResult:
    lm, schedule = ctx.layer_map, ctx.schedule
    if schedule is None or not ctx.options.pruning:
        return PassResult(False, "pruning disabled")
    if lm.static_kv:
        raise UnsupportedGraph(STATIC_CACHE_REASON)
    if lm.has_past:
        return PassResult(False, "call extends a cache (decode/continuation): prompt pruning applies to prefill only")
    if lm.masks():
        raise UnsupportedGraph(f"the attention mask could not be removed ({ctx.mask_kept_reason}); pruning needs a causal mask")
    seq = lm.seq_len
    if not sched.prunes(schedule, seq):
        guard = f"{seq} < min_prune_len={ctx.options.min_prune_len}"
        ctx.guards.append(guard)
        return PassResult(False, f"prompt too short to prune ({guard}): unpruned graph", {"guards": [guard]})
    if _is_sym(seq):
        ctx.guards.append(f"{seq} >= {ctx.options.min_prune_len}  (min_prune_len)")
    seq_node = next(
        (n for n in gm.graph.nodes if n.op == "placeholder" and _same_len(example_value(n), seq)), None
    )
    if _is_sym(seq) and seq_node is None:
        raise UnsupportedGraph(f"no graph input carries the sequence length {seq}")
    cur_val, cur_node = seq, (seq_node if _is_sym(seq) else seq)
    for i, layer_idx in enumerate(schedule.layers):
        kind, value = schedule.keep_at(i)
        if kind == "tokens" and _is_sym(cur_val):
            ctx.guards.append(
                f"{cur_val} {'<=' if sched.budget_fits(schedule, i, cur_val) else '>'} {value}  (keep_tokens at layer {layer_idx})"
            )
        cur_val, cur_node = _prune_after(gm, ctx, i, lm.layers[layer_idx], cur_val, cur_node)
    eliminate_dead_code(gm)
    kept = ", ".join(f"L{p['layer']}: {p['length_in']} -> {p['kept_length']}" for p in ctx.prune)
    return PassResult(True, f"pruned after {len(ctx.prune)} layer(s): {kept}", {"prune": ctx.prune, "guards": ctx.guards})
