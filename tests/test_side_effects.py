"""Dead-code elimination keeps every node with a side effect (issue 14, item 2).

torch's default `Graph.eliminate_dead_code()` treats every `call_method` as pure, so it
deleted StaticCache's `keys.index_copy_(...)` writes; `slimcompile.passes.side_effects`
keeps in-place methods, setitem, mutating (custom) ops and `out=` calls.
"""

from __future__ import annotations

import operator
import pathlib
import re

import torch
import torch.fx as fx

from slimcompile.passes.side_effects import eliminate_dead_code, has_side_effect


@torch.library.custom_op("slimtest_side_effects::fill_ones", mutates_args={"x"})
def _fill_ones(x: torch.Tensor) -> None:
    x.fill_(1.0)


@_fill_ones.register_fake
def _(x):
    return None


@torch.library.custom_op("slimtest_side_effects::pure_double", mutates_args=())
def _pure_double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_pure_double.register_fake
def _(x):
    return torch.empty_like(x)


def _graph(build) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    """A graph over placeholders `x` [4, 3] and `pos` [2] (int64); `build(g, x, pos)` adds
    nodes, returns (the output node's value, {label: node})."""
    g = fx.Graph()
    x = g.placeholder("x")
    pos = g.placeholder("pos")
    out, named = build(g, x, pos)
    g.output(out)
    return fx.GraphModule(torch.nn.Module(), g), named


def _alive(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node in set(gm.graph.nodes)


def _inputs():
    return torch.zeros(4, 3), torch.tensor([0, 2])


def test_inplace_method_on_placeholder_survives():
    def build(g, x, pos):
        src = g.call_function(torch.ones, (2, 3))
        write = g.call_method("index_copy_", (x, 0, pos, src))  # result unused, like StaticLayer.update
        bump = g.call_method("add_", (x, 1.0))
        dead = g.call_function(operator.mul, (x, 3.0))  # pure and unused
        return g.call_method("sum", (x,)), {"write": write, "bump": bump, "dead": dead, "src": src}

    gm, n = _graph(build)
    assert has_side_effect(n["write"]) and has_side_effect(n["bump"]) and not has_side_effect(n["dead"])
    assert eliminate_dead_code(gm)
    gm.recompile()
    assert _alive(gm, n["write"]) and _alive(gm, n["bump"]) and _alive(gm, n["src"])
    assert not _alive(gm, n["dead"])
    x, pos = _inputs()
    total = gm(x, pos)
    expect = torch.ones(4, 3)
    expect[[0, 2]] = 2.0
    assert torch.equal(x, expect) and total.item() == expect.sum().item()


def test_torch_default_dce_would_drop_the_write():
    """The bug: torch's own DCE deletes an unused in-place method call."""
    def build(g, x, pos):
        src = g.call_function(torch.ones, (2, 3))
        write = g.call_method("index_copy_", (x, 0, pos, src))
        return x, {"write": write}

    gm, n = _graph(build)
    gm.graph.eliminate_dead_code()
    assert not _alive(gm, n["write"])


def test_setitem_forms_survive():
    def build(g, x, pos):
        a = g.call_function(operator.setitem, (x, pos, 5.0))
        b = g.call_method("__setitem__", (x, 1, 7.0))
        view = g.call_function(operator.getitem, (x, 3))
        c = g.call_method("copy_", (view, g.call_function(torch.full, ((3,), 9.0))))
        d = g.call_function(operator.iadd, (x, 0.5))  # `x += 0.5` on a tensor
        return g.call_function(operator.add, (pos, 0)), {"a": a, "b": b, "c": c, "d": d}

    gm, n = _graph(build)
    eliminate_dead_code(gm)
    gm.recompile()
    assert all(_alive(gm, node) for node in n.values())
    x, pos = _inputs()
    gm(x, pos)
    assert torch.equal(x, torch.tensor([[5.5] * 3, [7.5] * 3, [5.5] * 3, [9.5] * 3]))


def test_mutating_ops_survive_and_pure_ops_go():
    def build(g, x, pos):
        custom = g.call_function(torch.ops.slimtest_side_effects.fill_ones.default, (x,))
        packet = g.call_function(torch.ops.slimtest_side_effects.fill_ones, (x,))
        aten_inplace = g.call_function(torch.ops.aten.mul_.Tensor, (x, g.call_function(torch.ones, (3,))))
        out_kw = g.call_function(torch.add, (x, 1.0), {"out": x})
        fn_inplace = g.call_function(torch.relu_, (x,))
        dead_pure_custom = g.call_function(torch.ops.slimtest_side_effects.pure_double.default, (x,))
        dead_aten = g.call_function(torch.ops.aten.add.Tensor, (x, x))
        dead_packet = g.call_function(torch.ops.aten.add, (x, x))  # add has an .out overload; no out= here
        dead_method = g.call_method("view", (x, -1))
        kept = dict(custom=custom, packet=packet, aten_inplace=aten_inplace, out_kw=out_kw, fn_inplace=fn_inplace)
        dead = dict(dead_pure_custom=dead_pure_custom, dead_aten=dead_aten, dead_packet=dead_packet, dead_method=dead_method)
        return pos, {**kept, **dead}

    gm, n = _graph(build)
    eliminate_dead_code(gm)
    for label, node in n.items():
        assert _alive(gm, node) == (not label.startswith("dead")), label
    gm.recompile()
    x, pos = _inputs()
    gm(x, pos)
    assert torch.equal(x, torch.full((4, 3), 2.0))  # fill_ones, *1, +1, relu


def test_passes_use_the_side_effect_aware_dce():
    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = [
        f"{p.relative_to(root)}:{i + 1}"
        for d in ("passes", "slimcompile", "runtime")
        for p in sorted((root / d).rglob("*.py"))
        if p.name != "side_effects.py"
        for i, line in enumerate(p.read_text().splitlines())
        if re.search(r"\.eliminate_dead_code\(\s*\)", line)
    ]
    assert not offenders, f"plain Graph.eliminate_dead_code() drops in-place writes: {offenders}"
