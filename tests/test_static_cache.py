"""transformers' StaticCache through the slim backend (issue 14, item 2).

StaticLayer.update writes the new K/V in place (`keys.index_copy_(2, pos, k)`) into
buffers of `max_cache_len` rows and returns the buffers. The default FX dead-code
elimination deleted those writes (their results are unused), so attention read an all-zero
cache. Unpruned, a StaticCache call must equal eager: logits and cache contents. Pruning
needs one KV length per layer, which a StaticCache cannot hold: the backend compiles the
exact variant with one warning naming StaticCache.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import transformers

import slimcompile
from slimcompile import backend
from slimcompile.backend import COMPILATIONS, slim_backend

from slimtest import PASS_BACKEND, SMALL, ids, tiny

PROMPT, MAX_LEN = 40, 64
SCHEDULE = {**SMALL, "prune_layers": [1], "keep_ratio": 0.5}  # prunes a 40-token prompt with a DynamicCache
ARCHS = ["llama", "qwen2"]


def _static(model) -> transformers.StaticCache:
    return transformers.StaticCache(config=model.config, max_cache_len=MAX_LEN)


def _assert_same_cache(cache, ref):
    assert len(cache.layers) == len(ref.layers)
    for layer, ref_layer in zip(cache.layers, ref.layers):
        assert layer.is_initialized and ref_layer.is_initialized
        assert layer.keys.abs().sum() > 0  # rows were written
        torch.testing.assert_close(layer.keys, ref_layer.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.values, ref_layer.values, rtol=1e-5, atol=1e-5)
        assert int(layer.cumulative_length) == int(ref_layer.cumulative_length)


def _run_steps(model, fast, steps: int):
    """Prefill PROMPT tokens and `steps` one-token decode steps through a StaticCache, eagerly
    and through `fast`, comparing logits and caches after every call."""
    x = ids(PROMPT)
    cache, ref_cache = _static(model), _static(model)
    with torch.no_grad():
        ref = model(x, past_key_values=ref_cache, use_cache=True).logits
        out = fast(x, past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        _assert_same_cache(cache, ref_cache)
        tok = ref[:, -1:].argmax(-1)
        for step in range(steps):
            pos = torch.tensor([PROMPT + step])
            ref = model(tok, past_key_values=ref_cache, use_cache=True, cache_position=pos).logits
            out = fast(tok, past_key_values=cache, use_cache=True, cache_position=pos).logits
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            _assert_same_cache(cache, ref_cache)
            tok = ref[:, -1:].argmax(-1)


def _writes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "index_copy_")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_unpruned_static_cache_forward_matches_eager(arch, dynamic):
    model = tiny(arch, 2)
    fast = torch.compile(model, backend=PASS_BACKEND, options={"enabled": False}, dynamic=dynamic)
    COMPILATIONS.clear()
    _run_steps(model, fast, steps=0)
    record = COMPILATIONS[-1]
    assert record.variant == "exact" and record.fallback is None
    assert record.context.layer_map.static_kv
    assert _writes(record.graph) == 2 * model.config.num_hidden_layers  # every K and V write survived
    assert not record.context.mask_removed  # the mask spans max_cache_len: kept


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("opts", [{"enabled": False}, SCHEDULE], ids=["unpruned", "schedule"])
def test_static_cache_decode_steps_match_eager(arch, opts):
    model = tiny(arch, 2)
    fast = torch.compile(model, backend=PASS_BACKEND, options=opts, dynamic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run_steps(model, fast, steps=3)
    assert all(_writes(c.graph) == 2 * model.config.num_hidden_layers for c in COMPILATIONS if c.graph is not None)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_schedule_with_static_cache_is_exact_with_one_warning(arch, dynamic, monkeypatch):
    monkeypatch.setattr(backend, "_warned", set())  # the backend warns once per message per process
    model = tiny(arch, 2)
    fast = torch.compile(model, backend=PASS_BACKEND, options=SCHEDULE, dynamic=dynamic)
    COMPILATIONS.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_steps(model, fast, steps=2)  # prefill and decode: still one warning
    slim = [str(w.message) for w in caught if "slimcompile" in str(w.message)]
    assert len(slim) == 1, slim
    assert "StaticCache" in slim[0] and "without pruning" in slim[0] and "per-layer" in slim[0]
    assert COMPILATIONS and all(c.variant == "exact" and "StaticCache" in c.fallback for c in COMPILATIONS)
    assert not any(c.context.prune for c in COMPILATIONS)


def test_same_schedule_prunes_with_a_dynamic_cache():
    """Control for the test above: the schedule does prune this prompt with the default cache."""
    model = tiny("llama", 2)
    fast = torch.compile(model, backend=PASS_BACKEND, options=SCHEDULE, dynamic=True)
    with torch.no_grad():
        fast(ids(PROMPT), use_cache=True, logits_to_keep=1)
    assert COMPILATIONS[-1].variant == "slim" and COMPILATIONS[-1].context.prune


@pytest.mark.parametrize("opts", [{"enabled": False}, SCHEDULE], ids=["unpruned", "schedule"])
def test_generate_with_static_cache_matches_eager(opts, monkeypatch):
    monkeypatch.setattr(backend, "_warned", set())
    model, eager = tiny("llama", 2), tiny("llama", 2)
    x = ids(PROMPT)
    kw = dict(
        attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
        cache_implementation="static", pad_token_id=0,
    )
    with torch.no_grad():
        ref = eager.generate(x, **kw)
    slimcompile.compile(model, backend=PASS_BACKEND, **opts)
    COMPILATIONS.clear()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = model.generate(x, **kw)
    assert torch.equal(out, ref)
    assert COMPILATIONS and all(c.variant == "exact" for c in COMPILATIONS)
    assert all(_writes(c.graph) == 2 * model.config.num_hidden_layers for c in COMPILATIONS)
    if opts is SCHEDULE:
        assert any("StaticCache" in str(w.message) for w in caught)


@pytest.mark.slow
def test_unpruned_static_cache_through_inductor():
    model = tiny("llama", 2)
    fast = torch.compile(
        model, backend=functools.partial(slim_backend, options={"enabled": False}), dynamic=False
    )
    COMPILATIONS.clear()
    _run_steps(model, fast, steps=1)
    assert COMPILATIONS and all(c.variant == "exact" for c in COMPILATIONS)
