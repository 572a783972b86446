"""Per-pass tests on captured Dynamo graphs (vLLM style): op counts before/after each pass.

One prefill graph of a tiny LLaMA (dynamic shapes), one with static shapes and one decode graph
over per-layer KV lengths are captured once per module; each test copies a graph and runs the
passes on it under the capture's fake mode (no Inductor, milliseconds per test).
"""

from __future__ import annotations

import operator

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

import slimcompile  # noqa: F401  (the import must leave transformers' "sdpa" alone)
from slimcompile import hf_attention
from slimcompile.backend import graph_fake_mode
from slimcompile.options import parse_options
from slimcompile.passes.base import PROVENANCE_KEYS, PassInputs, SlimPass, copy_provenance
from slimcompile.passes.causal_mask import CausalMask
from slimcompile.passes.decode_kv import DecodeKV
from slimcompile.passes.flatten_linear import LINEAR_TARGETS, FlattenLinear
from slimcompile.passes.layer_analysis import SDPA_TARGETS, LayerAnalysis, example_value
from slimcompile.passes.pipeline import PassManager, copy_graph_module, default_passes, make_inputs, run_passes
from slimcompile.passes.shape_check import ShapeCheck
from slimcompile.passes.token_prune import TokenPrune

from slimtest import SMALL, tiny

LAYERS = 4
PRUNE = {**SMALL, "prune_layers": [1, 2], "keep_ratio": 0.5}


def _capture(model, *args, dynamic=True, **kwargs):
    box = {}

    def grab(gm, example_inputs):
        box["gm"], box["fake_mode"] = gm, graph_fake_mode(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab, dynamic=dynamic)(*args, **kwargs)
    return box


@pytest.fixture(scope="module")
def model():
    return tiny("llama", 2, layers=LAYERS)


@pytest.fixture(scope="module")
def prefill(model):
    box = _capture(model, torch.randint(0, 128, (1, 40)), use_cache=True, logits_to_keep=1)
    _run(box, [LayerAnalysis(), CausalMask(), TokenPrune()], PRUNE)  # warm up: the ops' first fake call
    return box


@pytest.fixture(scope="module")
def static_prefill(model):
    return _capture(model, torch.randint(0, 128, (1, 40)), dynamic=False, use_cache=True, logits_to_keep=1)


@pytest.fixture(scope="module")
def decode(model):
    """A one-token step over a cache whose layers hold 20, 20, 12 and 12 keys (as after pruning
    after layer 1), with a padding mask so transformers builds a [1, 1, 1, 21] mask."""
    cache = DynamicCache(config=model.config)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate((20, 20, 12, 12)):
        cache.update(torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g), i)
    mask = torch.ones(1, 21, dtype=torch.long)
    mask[0, 0] = 0
    with hf_attention.length_aware_sdpa():  # the trace itself fails on a mask wider than the keys
        return _capture(model, torch.tensor([[5]]), past_key_values=cache, attention_mask=mask,
                        position_ids=torch.tensor([[20]]), use_cache=True)


def _run(box, passes, options=None, assume_no_padding=False):
    gm = copy_graph_module(box["gm"])
    opts = parse_options(options if options is not None else {"enabled": False})
    pm = PassManager(passes)
    pm.run(gm, make_inputs(gm, opts, box["fake_mode"], assume_no_padding))
    return gm, pm


def _count(gm, pred) -> int:
    return sum(1 for n in gm.graph.nodes if pred(n))


def _fn(*targets):
    return lambda n: n.op == "call_function" and n.target in targets


def _mask_nodes(gm) -> int:
    return _count(gm, lambda n: isinstance(v := example_value(n), torch.Tensor) and v.dtype == torch.bool and v.dim() == 4)


def test_layer_analysis_finds_every_layer(prefill):
    gm, pm = _run(prefill, [LayerAnalysis()])
    lm = pm.findings["layer_analysis"].layer_map
    assert len(lm.layers) == LAYERS and not lm.has_past and isinstance(lm.seq_len, torch.SymInt)
    assert not pm.records[0].changed and pm.records[0].nodes_added == pm.records[0].nodes_removed == 0


def test_causal_mask_removes_the_mask_or_finds_none(prefill):
    before = _mask_nodes(prefill["gm"])
    gm, pm = _run(prefill, [LayerAnalysis(), CausalMask()])
    f = pm.findings["causal_mask"]
    sdpa = [n for n in gm.graph.nodes if _fn(*SDPA_TARGETS)(n)]
    assert len(sdpa) == LAYERS and all(n.kwargs.get("attn_mask") is None and n.kwargs["is_causal"] is True for n in sdpa)
    assert _mask_nodes(gm) == 0 and _count(gm, _fn(operator.le, operator.ge)) == 0
    if before:  # transformers 5.17 materialises the mask under tracing
        assert f.removed and f.mask_nodes == 1 and pm.records[1].nodes_removed >= before
    else:  # 5.2x builds none for a pure causal SDPA
        assert not f.removed and f.kept_reason is None and pm.records[1].nodes_removed == 0
    # the analysis is not changed by the pass: its layers still name the captured mask (if any)
    assert all((layer.mask is not None) == bool(before) for layer in pm.findings["layer_analysis"].layer_map.layers)


def test_decode_kv_narrows_each_wider_mask_in_the_graph(decode):
    gm = copy_graph_module(decode["gm"])
    # Undo the narrowing the traced attention function did: every SDPA reads the one wide mask.
    for n in list(gm.graph.nodes):
        if _fn(*SDPA_TARGETS)(n) and (m := n.kwargs.get("attn_mask")) is not None and _fn(operator.getitem)(m):
            n.replace_input_with(m, m.args[0])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    widths = {str(example_value(n.kwargs["attn_mask"]).shape[-1]) for n in gm.graph.nodes if _fn(*SDPA_TARGETS)(n)}
    assert len(widths) == 1  # one mask, sized from layer 0
    getitems = _count(gm, _fn(operator.getitem))
    opts = parse_options({"enabled": False})
    pm = PassManager([LayerAnalysis(), CausalMask(), DecodeKV(), ShapeCheck()])
    pm.run(gm, make_inputs(gm, opts, decode["fake_mode"], False))
    f = pm.findings["decode_kv"]
    assert pm.findings["causal_mask"].kept_reason  # a padding mask is not pure causal: kept
    assert f.kind == "decode" and f.narrowed_layers == (2, 3) and len(set(f.past_lengths)) == 2
    assert _count(gm, _fn(operator.getitem)) == getitems + 2  # one slice per narrowed layer
    for layer in pm.findings["layer_analysis"].layer_map.layers:
        mask, keys = example_value(layer.current_mask), example_value(layer.sdpa.args[1])
        assert str(mask.shape[-1]) == str(keys.shape[-2])


def test_decode_kv_keeps_a_graph_whose_masks_fit(decode):
    gm, pm = _run(decode, [LayerAnalysis(), CausalMask(), DecodeKV()])
    f = pm.findings["decode_kv"]
    assert f.kind == "decode" and f.narrowed_layers == () and not pm.records[-1].changed


def test_token_prune_inserts_scoring_selection_and_gathers(prefill):
    gm, pm = _run(prefill, [LayerAnalysis(), CausalMask(), TokenPrune()], PRUNE)
    f = pm.findings["token_prune"]
    assert [p["layer"] for p in f.prune] == [1, 2] and f.guards and f.cut is not None
    assert _count(gm, _fn(torch.ops.slim.block_scores.default)) == 2
    assert _count(gm, _fn(torch.ops.slim.select_tokens.default)) == 2
    assert _count(gm, _fn(torch.gather)) == 2 * 3  # hidden, cos, sin after each pruning layer
    assert _count(prefill["gm"], _fn(torch.gather)) == 0


def test_token_prune_leaves_a_decode_graph_alone(decode):
    gm, pm = _run(decode, [LayerAnalysis(), CausalMask(), TokenPrune()], PRUNE)
    assert not pm.records[-1].changed and "prefill only" in pm.findings["token_prune"].summary
    assert _count(gm, _fn(torch.ops.slim.block_scores.default)) == 0


def test_flatten_linear_converts_the_linears_after_the_cut(prefill):
    def two_d(gm):  # a linear reading `x.reshape(-1, h)`
        return sum(1 for n in gm.graph.nodes if _fn(*LINEAR_TARGETS)(n) and getattr(n.args[0], "target", None) == "reshape")

    base = [LayerAnalysis(), CausalMask()]
    gm_off, _ = _run(prefill, [*base, FlattenLinear(), TokenPrune()], {**PRUNE, "flatten_linear": False})
    gm, pm = _run(prefill, [*base, FlattenLinear(), TokenPrune()], PRUNE)
    f = pm.findings["flatten_linear"]
    assert f.converted == 7 * 2 + 1  # q,k,v,o,gate,up,down of layers 2 and 3, and lm_head
    assert two_d(gm) == f.converted and two_d(gm_off) == 0
    assert pm.records[2].nodes_added == 5 * f.converted and pm.records[2].nodes_removed == f.converted



def test_static_length_rewrites_the_literal_length(static_prefill):
    gm, pm = _run(static_prefill, [LayerAnalysis(), CausalMask(), TokenPrune(), ShapeCheck()], PRUNE)
    (first, second) = pm.findings["token_prune"].prune
    assert first["length_in"] == "40" and first["literal_edits"] > 0 and second["literal_edits"] > 0
    kept = int(second["kept_length"])
    assert _count(gm, lambda n: n.op == "call_method" and n.target in ("view", "reshape") and 40 in n.args[1:]) < \
        _count(static_prefill["gm"], lambda n: n.op == "call_method" and n.target in ("view", "reshape") and 40 in n.args[1:])
    assert any(n.op == "call_method" and kept in n.args[1:] for n in gm.graph.nodes)


def test_pipeline_order_records_and_findings(prefill):
    gm, pm, ctx = run_passes(prefill["gm"], parse_options(PRUNE), prefill["fake_mode"], False)
    names = ["layer_analysis", "causal_mask", "decode_kv", "flatten_linear", "token_prune", "shape_prop"]
    assert [r.name for r in pm.records] == names == [p.name for p in default_passes()]
    assert all(r.findings is pm.findings[r.name] for r in pm.records)
    assert len(ctx.prune) == 2 and ctx.guards and (ctx.mask_removed or not ctx.layer_map.masks())
    assert len({p.uuid() for p in default_passes()}) == len(names) and len(pm.uuid()) == 64


def test_a_pass_reads_only_the_findings_it_requires(prefill):
    class Sneaky(SlimPass):
        name = "sneaky"
        requires = ("layer_analysis",)

        def __call__(self, gm, inputs, findings):
            return findings["causal_mask"]

    with pytest.raises(KeyError, match="requires"):
        _run(prefill, [LayerAnalysis(), CausalMask(), Sneaky()])
    with pytest.raises(RuntimeError, match="requires"):
        _run(prefill, [CausalMask()])


def test_inputs_and_findings_are_frozen(prefill):
    _, pm = _run(prefill, [LayerAnalysis(), CausalMask()])
    with pytest.raises(AttributeError):
        pm.findings["causal_mask"].removed = True
    with pytest.raises(AttributeError):
        PassInputs(parse_options({})).schedule = None


def test_inserted_nodes_carry_provenance(prefill):
    gm, pm = _run(prefill, [LayerAnalysis(), CausalMask(), TokenPrune(), FlattenLinear()], PRUNE)
    old = set(prefill["gm"].graph.nodes)
    old_names = {n.name for n in old}
    new = [n for n in gm.graph.nodes if n.name not in old_names and n.op not in ("placeholder", "output")]
    assert len(new) > 50
    missing = [n.name for n in new if not (n.meta.get("nn_module_stack") and n.meta.get("stack_trace"))]
    assert not missing, missing


def test_copy_provenance_copies_the_keys_the_source_has():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,))
    b = g.call_function(torch.neg, (a,))
    a.meta.update(nn_module_stack={"m": ("model.layers.0", object)}, stack_trace="File x, line 1", seq_nr=7)
    b.meta["stack_trace"] = "mine"
    copy_provenance(a, [b, 3])
    assert b.meta["nn_module_stack"] == a.meta["nn_module_stack"] and b.meta["nn_module_stack"] is not a.meta["nn_module_stack"]
    assert b.meta["stack_trace"] == "mine" and b.meta["seq_nr"] == 7  # what the node has is kept
    assert "source_fn_stack" in PROVENANCE_KEYS and "source_fn_stack" not in b.meta


def test_importing_slimcompile_leaves_transformers_sdpa_alone():
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
    with hf_attention.length_aware_sdpa():
        with hf_attention.length_aware_sdpa():
            assert AttentionInterface._global_mapping["sdpa"] is hf_attention.length_aware_sdpa_attention_forward
        assert AttentionInterface._global_mapping["sdpa"] is hf_attention.length_aware_sdpa_attention_forward
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward


def test_backend_reports_its_records_to_on_compile(model):
    import functools

    from slimcompile.backend import slim_backend

    records = []
    backend = functools.partial(slim_backend, lower=False, on_compile=records.append)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, options=PRUNE, dynamic=True)(torch.randint(0, 128, (1, 40)), use_cache=True)
    (rec,) = records
    assert rec.variant == "slim" and rec.findings["token_prune"].prune and rec.context.prune
