"""Slim against eager (no pruning) and against the plain-PyTorch reference (with a schedule).

These run the rewritten FX graph without Inductor (`lower=False`): the rewrite semantics in
seconds. tests/test_inductor.py repeats the key checks through Inductor.
"""

import operator

import pytest
import torch

import slimcompile
from slimcompile import reference
from slimcompile.backend import COMPILATIONS
from slimcompile.options import parse_options
from slimcompile.passes.layer_analysis import example_value

from slimtest import PASS_BACKEND, SMALL, ids, tiny

MODELS = [("llama", 4), ("llama", 2), ("qwen2", 2)]  # (arch, kv heads): MHA, GQA, Qwen2 with q/k/v bias


def _kv(out):
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


@pytest.mark.parametrize("arch,kv_heads", MODELS)
@pytest.mark.parametrize("opts", [{"enabled": False}, {"prune_layers": [1], "keep_ratio": 1.0}])
def test_no_pruning_matches_eager(arch, kv_heads, opts):
    model = tiny(arch, kv_heads)
    fast = torch.compile(model, backend=PASS_BACKEND, options={**SMALL, **opts}, dynamic=True)
    x = ids(45)
    with torch.no_grad():
        ref = model(x, use_cache=True)
        out = fast(x, use_cache=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for (k, v), (rk, rv) in zip(_kv(out), _kv(ref)):
        torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)
    _assert_causal_sdpa_without_mask(COMPILATIONS[-1])


def _assert_causal_sdpa_without_mask(record):
    """Every SDPA call of the compiled graph is `is_causal=True` with no mask: the causal-mask pass
    removed the mask transformers built (5.17), or transformers built none (5.2x for SDPA)."""
    from slimcompile.passes.layer_analysis import SDPA_TARGETS

    sdpa = [n for n in record.graph.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    assert sdpa and all(n.kwargs.get("attn_mask") is None and len(n.args) <= 3 for n in sdpa)
    assert all(n.kwargs.get("is_causal") is True for n in sdpa)
    summary = next(r for r in record.records if r.name == "causal_mask")
    assert record.context.mask_removed or summary.summary == "no attention mask in the graph"


SCHEDULES = [
    {"prune_layers": [1], "keep_ratio": 0.5},
    {"prune_layers": [0, 2], "keep_ratio": [0.6, 0.5], "pooling": "mean"},
    {"prune_layers": [1, 2], "keep_tokens": [30, 20]},
    {"prune_layers": [1], "keep_ratio": 0.4, "scoring": "tokenunit", "unit_size": 2},
]


@pytest.mark.parametrize("arch,kv_heads", MODELS)
@pytest.mark.parametrize("opts", SCHEDULES, ids=["ratio", "two-layers-mean", "budgets", "tokenunit"])
def test_schedule_matches_reference(arch, kv_heads, opts):
    model = tiny(arch, kv_heads)
    options = {**SMALL, **opts}
    schedule = parse_options(options).resolve(4)
    fast = torch.compile(model, backend=PASS_BACKEND, options=options, dynamic=True)
    for length in (41, 58):
        _assert_prefill_matches_reference(fast, model, schedule, length)


def _assert_prefill_matches_reference(fast, model, schedule, length):
    """Logits, per-layer KV lengths and KV of `fast` equal the reference's, and something was pruned."""
    x = ids(length)
    with torch.no_grad():
        out = fast(x, use_cache=True, logits_to_keep=1)
    ref = reference.prefill(model, x, schedule)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    kv = _kv(out)
    assert [k.shape[2] for k, _ in kv] == [k.shape[2] for k in ref.keys]
    assert kv[-1][0].shape[2] < length  # something was pruned
    for (k, v), rk, rv in zip(kv, ref.keys, ref.values):
        torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)


def test_batch_selects_per_sample():
    model = tiny("llama", 2)
    options = {**SMALL, "prune_layers": [1], "keep_ratio": 0.5}
    fast = torch.compile(model, backend=PASS_BACKEND, options=options, dynamic=True)
    x = ids(50, batch=3)
    with torch.no_grad():
        out = fast(x, use_cache=True, logits_to_keep=1)
    ref = reference.prefill(model, x, parse_options(options).resolve(4))
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    kept = ref.kept_indices[1]
    assert kept.shape[0] == 3 and not torch.equal(kept[0], kept[1])  # different blocks per sample
    torch.testing.assert_close(out.past_key_values.layers[2].keys, ref.keys[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), ("qwen2", 2)])
def test_generate_matches_reference(arch, kv_heads):
    model = tiny(arch, kv_heads)
    options = {**SMALL, "prune_layers": [1, 2], "keep_ratio": 0.5}
    schedule = parse_options(options).resolve(4)
    x = ids(47)
    ref = reference.generate(model, x, schedule, 16)
    slimcompile.compile(model, backend=PASS_BACKEND, **options)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)
    assert out.shape == (1, 47 + 16)
    assert torch.equal(out, ref)
    assert model.slim.options.pruning
    # The schedule changes the KV the decode steps see; the test would be vacuous if it did not.
    state = reference.prefill(model, x, schedule)
    assert [k.shape[2] for k in state.keys] != [47] * 4


def test_static_shapes_rewrite_literal_lengths():
    model = tiny("llama", 2)
    options = {**SMALL, "prune_layers": [1], "keep_ratio": 0.5}
    fast = torch.compile(model, backend=PASS_BACKEND, options=options, dynamic=False)
    x = ids(50)
    with torch.no_grad():
        out = fast(x, use_cache=True, logits_to_keep=1)
    ref = reference.prefill(model, x, parse_options(options).resolve(4))
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    record = COMPILATIONS[-1]
    assert record.variant == "slim" and record.context.prune[0]["literal_edits"] > 0


def test_static_length_equal_to_a_model_dimension_falls_back_with_warning():
    model = tiny("llama", 2)  # hidden 64
    options = {**SMALL, "prune_layers": [1], "keep_ratio": 0.5}
    fast = torch.compile(model, backend=PASS_BACKEND, options=options, dynamic=False)
    x = ids(64)
    with pytest.warns(UserWarning, match="equals a model dimension"), torch.no_grad():
        out = fast(x, use_cache=True)
    with torch.no_grad():
        ref = model(x, use_cache=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert COMPILATIONS[-1].variant == "exact"


def test_short_prompt_takes_unpruned_path():
    model = tiny("llama", 2)
    options = {**SMALL, "prune_layers": [1], "keep_ratio": 0.5, "min_prune_len": 40}
    fast = torch.compile(model, backend=PASS_BACKEND, options=options, dynamic=True)
    with torch.no_grad():
        fast(ids(50), use_cache=True)
        x = ids(30)
        out = fast(x, use_cache=True)
        ref = model(x, use_cache=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [30] * 4
    assert COMPILATIONS[-1].variant == "exact" and "min_prune_len" in " ".join(COMPILATIONS[-1].context.guards)


def test_padded_batch_stays_exact():
    model = tiny("llama", 2)
    options = {**SMALL, "prune_layers": [1], "keep_ratio": 0.5}
    fast = torch.compile(model, backend=PASS_BACKEND, options=options, dynamic=True)
    x = ids(48, batch=2)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding in the second prompt
    with torch.no_grad():
        ref = model(x, attention_mask=mask, use_cache=True)
        with pytest.warns(UserWarning, match="padded batch"):
            out = fast(x, attention_mask=mask, use_cache=True)
        unpadded = fast(x, attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert out.past_key_values.layers[3].keys.shape[2] == 48
    assert unpadded.past_key_values.layers[3].keys.shape[2] < 48  # all-ones mask: pruned variant


def test_padded_batch_exact_without_pruning_keeps_mask():
    model = tiny("llama", 2)
    fast = torch.compile(model, backend=PASS_BACKEND, options={"enabled": False}, dynamic=True)
    x = ids(30, batch=2)
    mask = torch.ones_like(x)
    mask[0, :7] = 0
    with torch.no_grad():
        out = fast(x, attention_mask=mask, use_cache=True)
        ref = model(x, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert not COMPILATIONS[-1].context.mask_removed


def test_unsupported_model_falls_back_with_warning():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=128)).eval()
    fast = torch.compile(model, backend=PASS_BACKEND, options={"prune_layers": [0], "keep_ratio": 0.5, **SMALL})
    x = ids(40)
    with pytest.warns(UserWarning, match="unchanged.*(not supported|no decoder layers)"), torch.no_grad():
        out = fast(x)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x).logits, rtol=1e-5, atol=1e-5)
    assert COMPILATIONS[-1].variant == "unchanged"


@pytest.mark.parametrize("kv", ["dynamic", "resident"])
def test_generate_compiles_once_for_every_prompt_length(kv):
    model = tiny("llama", 2)
    options = {**SMALL, "prune_layers": [1], "keep_ratio": 0.5, "kv": kv}
    slimcompile.compile(model, backend=PASS_BACKEND, **options)
    COMPILATIONS.clear()
    for length in (33, 41, 50, 64, 71):
        x = ids(length)
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
    prefill = [c for c in COMPILATIONS if not c.context.layer_map.has_past]
    decode = [c for c in COMPILATIONS if c.context.layer_map.has_past]
    assert len(prefill) == 1 and prefill[0].variant == "slim"
    # kv="dynamic" decodes through one compiled decode graph; kv="resident" in the runtime decoder
    assert len(decode) == (1 if kv == "dynamic" else 0), [str(c.context.layer_map.seq_len) for c in decode]


def test_causal_mask_pass_leaves_no_mask_and_causal_sdpa():
    from slimcompile.passes.layer_analysis import SDPA_TARGETS

    model = tiny("llama", 2)
    fast = torch.compile(model, backend=PASS_BACKEND, options={"enabled": False}, dynamic=True)
    with torch.no_grad():
        fast(ids(40), use_cache=True)
    record = COMPILATIONS[-1]
    nodes = list(record.graph.graph.nodes)
    sdpa = [n for n in nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    assert len(sdpa) == 4
    assert all(n.kwargs.get("attn_mask") is None and n.kwargs.get("is_causal") is True for n in sdpa)
    # The [b, 1, S, S] mask and the index comparison that built it are gone from the graph.
    assert not any(n.op == "call_function" and n.target in (operator.le, operator.ge) for n in nodes)
    assert not any(
        isinstance(v := n.meta.get("example_value"), torch.Tensor) and v.dtype == torch.bool and v.dim() == 4 for n in nodes
    )
    summary = next(r for r in record.records if r.name == "causal_mask")
    # transformers 5.17 materialises the mask (the pass removes it); 5.2x builds none for SDPA.
    assert (summary.changed and summary.nodes_removed > 0) or summary.summary == "no attention mask in the graph"


@pytest.mark.parametrize("flatten", ["default", "0"])
def test_flatten_linear_rewrite_matches_reference(monkeypatch, flatten):
    """The 2-D linears after a cut (the CUDA recompile fix, on by default): same logits; SLIM_FLATTEN_LINEAR=0 keeps 3-D."""
    from slimcompile.passes.flatten_linear import LINEAR_TARGETS

    if flatten == "0":
        monkeypatch.setenv("SLIM_FLATTEN_LINEAR", "0")
    else:
        monkeypatch.delenv("SLIM_FLATTEN_LINEAR", raising=False)
    model = tiny("llama", 2)
    options = {**SMALL, "prune_layers": [1, 2], "keep_ratio": 0.5}
    schedule = parse_options(options).resolve(4)
    fast = torch.compile(model, backend=PASS_BACKEND, options=options, dynamic=True)
    COMPILATIONS.clear()
    for length in (41, 58):
        _assert_prefill_matches_reference(fast, model, schedule, length)
    assert len(COMPILATIONS) == 1
    graph = COMPILATIONS[-1].graph.graph
    linears = [n for n in graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS]
    dims = [example_value(n.args[0]).dim() for n in linears]
    if flatten == "0":
        assert dims.count(2) == 0
    else:
        assert dims.count(2) >= 7 * 2 + 1  # q,k,v,o,gate,up,down of layers 2 and 3, and lm_head
