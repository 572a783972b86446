"""The runtime decoder serves only what it computes exactly; everything else is exact through
transformers' cache, with one warning (issue 14, items 3 and 4).

Every check compares `slimcompile.compile(model)` (default options: kv="resident") with the plain
model: generated tokens and every step's logits (`output_logits=True`). The graph runs without
Inductor (PASS_BACKEND); the rewrite semantics are the same (tests/test_inductor.py lowers).
"""

import warnings

import pytest
import torch
from transformers import DynamicCache

import slimcompile
from slimcompile import hf_compat
from slimcompile.runtime.decode_support import runtime_decode_refusal
from slimcompile.runtime.kv_cache import SlimKVCache

from slimtest import PASS_BACKEND, SMALL, prompt, tiny, tiny_family

pytestmark = pytest.mark.parity
NEW = 6


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Warnings are once per process and message; each test sees its own."""
    from slimcompile import backend

    monkeypatch.setattr(backend, "_warned", set())  # slimcompile.compile's warnings go through it too


def _generate(model, x, **kw):
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kw)
    return out


def _assert_same_generation(a, b, atol=1e-4):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits) == NEW
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=atol)


def _slim_warnings(record):
    return [str(w.message) for w in record if "slimcompile" in str(w.message)]


# -- item 3: only layers the runtime implements exactly ------------------------------------------

@pytest.mark.parametrize("family,why", [
    ("qwen3", "Qwen3ForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2-sliding", "sliding-window"),
    ("granite", "GraniteForCausalLM"),
    ("phi3", "Phi3ForCausalLM"),
    ("gpt2", "GPT2LMHeadModel"),
    ("gemma2", "Gemma2ForCausalLM"),
])
def test_models_the_runtime_does_not_implement_decode_exactly_with_one_warning(family, why):
    model = tiny_family(family)
    x = prompt(40)
    ref = _generate(model, x)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, prune_layers=[1], keep_ratio=0.5)
        out = _generate(model, x)
    fallback = [m for m in _slim_warnings(record) if "falls back to kv='dynamic'" in m]
    assert len(fallback) == 1 and why in fallback[0], _slim_warnings(record)
    assert not isinstance(hf_compat.output_cache(out), SlimKVCache)
    _assert_same_generation(out, ref)


def test_a_llama_look_alike_differing_in_one_detail_is_refused():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP

    assert runtime_decode_refusal(tiny("llama", 2)) is None
    assert runtime_decode_refusal(tiny("qwen2", 2)) is None

    # A subclass that scales the MLP (same class name, one detail different).
    class LlamaMLPScaled(LlamaMLP):
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny("llama", 2)
    layer = model.model.layers[1]
    scaled = LlamaMLPScaled(model.config)
    scaled.load_state_dict(layer.mlp.state_dict())
    layer.mlp = scaled
    assert "LlamaMLPScaled" in runtime_decode_refusal(model)

    model = tiny("llama", 2)
    model.model.layers[0].register_forward_hook(lambda m, a, o: o)
    assert "forward hooks" in runtime_decode_refusal(model)

    model = tiny("llama", 2)
    model.config.logits_scaling = 2.0
    assert "logits_scaling" in runtime_decode_refusal(model)

    model = tiny("llama", 2)
    model.model.rotary_emb.rope_type = "dynamic"
    assert "dynamic" in runtime_decode_refusal(model)

    model = tiny("llama", 2)
    model.model.layers[0].mlp.forward = lambda x: 2 * x
    assert "instance-level forward" in runtime_decode_refusal(model)
    model = tiny("llama", 2)
    model.model.layers[0].mlp.forward = model.model.layers[0].mlp.forward  # saved and restored: no change
    assert runtime_decode_refusal(model) is None

    model = tiny("llama", 2).train()
    assert "training" in runtime_decode_refusal(model)
    assert LlamaDecoderLayer is type(tiny("llama", 2).model.layers[0])


def test_a_subclassed_layer_decodes_exactly_through_the_fallback():
    from transformers.models.llama.modeling_llama import LlamaMLP

    class LlamaMLPScaled(LlamaMLP):
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny("llama", 2)
    for layer in model.model.layers:
        scaled = LlamaMLPScaled(model.config)
        scaled.load_state_dict(layer.mlp.state_dict())
        layer.mlp = scaled
    x = prompt(40)
    ref = _generate(model, x)
    with pytest.warns(UserWarning, match="LlamaMLPScaled"):
        slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, enabled=False)
    _assert_same_generation(_generate(model, x), ref)


def test_llama_and_qwen2_still_decode_in_the_runtime():
    for arch in ("llama", "qwen2"):
        model = tiny(arch, 2)
        x = prompt(40)
        ref = _generate(model, x)
        slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, enabled=False)
        out = _generate(model, x)
        assert isinstance(hf_compat.output_cache(out), SlimKVCache)
        _assert_same_generation(out, ref)


# -- item 4: inputs and generation features ------------------------------------------------------

@pytest.mark.parametrize("opts", [{"enabled": False}, {"prune_layers": [1], "keep_ratio": 1.0}],
                         ids=["exact", "pruning-graph-keeping-all"])
def test_custom_position_ids_are_honoured_in_prefill_and_decode(opts):
    model = tiny("llama", 2)
    x = prompt(40)
    positions = (torch.arange(40) * 3).unsqueeze(0)
    with torch.no_grad():
        ref = model(x, position_ids=positions, use_cache=True, logits_to_keep=1)
        nxt = ref.logits[:, -1:].argmax(-1)
        ref2 = model(nxt, past_key_values=ref.past_key_values, position_ids=torch.tensor([[200]]), use_cache=True)
    slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, **opts)
    with torch.no_grad():
        out = model(x, position_ids=positions, use_cache=True, logits_to_keep=1)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        cache = hf_compat.output_cache(out)
        assert isinstance(cache, SlimKVCache)
        out2 = model(nxt, past_key_values=cache, position_ids=torch.tensor([[200]]), use_cache=True)
    torch.testing.assert_close(out2.logits, ref2.logits, rtol=1e-5, atol=1e-5)


def test_default_position_ids_are_dropped_so_the_prompt_is_still_pruned():
    model = tiny("llama", 2)
    x = prompt(48)
    slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, prune_layers=[1], keep_ratio=0.5)
    with torch.no_grad():
        out = model(x, position_ids=torch.arange(48).unsqueeze(0), use_cache=True, logits_to_keep=1)
    assert hf_compat.output_cache(out).layers[3].prompt_len < 48


@pytest.mark.parametrize("kv", ["resident", "offload"])
@pytest.mark.parametrize("feature,kw", [
    ("beam", {"num_beams": 2}),
    ("prompt-lookup", {"prompt_lookup_num_tokens": 3}),
    ("hidden-states", {"output_hidden_states": True}),
])
def test_generation_features_the_runtime_cannot_serve_run_exactly_with_a_warning(kv, feature, kw):
    model = tiny("llama", 2)
    x = prompt(40)
    ref = _generate(model, x, **kw)
    slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, enabled=False, kv=kv)
    with pytest.warns(UserWarning, match="decodes with kv='dynamic'"):
        out = _generate(model, x, **kw)
    _assert_same_generation(out, ref)
    if feature == "hidden-states":
        assert len(out.hidden_states) == NEW and all(h is not None for step in out.hidden_states for h in step)
        for a, b in zip(out.hidden_states, ref.hidden_states):
            for ha, hb in zip(a, b):
                torch.testing.assert_close(ha, hb, rtol=1e-4, atol=1e-4)
    # The next plain generation is served by the runtime again.
    plain = _generate(model, x)
    assert isinstance(hf_compat.output_cache(plain), SlimKVCache)


def test_assisted_generation_with_an_assistant_model_is_exact():
    model, assistant = tiny("llama", 2), tiny("llama", 2, layers=2, seed=3)
    x = prompt(40)
    ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                         assistant_model=assistant, pad_token_id=0)
    slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, enabled=False)
    with pytest.warns(UserWarning, match="assisted"):
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                             assistant_model=assistant, pad_token_id=0)
    assert torch.equal(out, ref)


def test_cache_operations_on_the_runtime_cache_refuse_clearly():
    model = tiny("llama", 2)
    slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, enabled=False)
    with torch.no_grad():
        cache = hf_compat.output_cache(model(prompt(40), use_cache=True))
    for call in (lambda: cache.reorder_cache(torch.tensor([0])), lambda: cache.crop(10),
                 lambda: cache.batch_repeat_interleave(2), lambda: cache.batch_select_indices(torch.tensor([0]))):
        with pytest.raises(NotImplementedError, match="kv='dynamic'"):
            call()
    with torch.no_grad(), pytest.raises(ValueError, match="one token per sequence"):
        model(prompt(3), past_key_values=cache, use_cache=True)
    with torch.no_grad(), pytest.raises(ValueError, match="hidden states"):
        model(prompt(1), past_key_values=cache, use_cache=True, output_hidden_states=True)


def test_a_user_dynamic_cache_passed_to_forward_still_converts_and_a_static_one_does_not():
    model = tiny("llama", 2)
    slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, enabled=False)
    with torch.no_grad():
        out = model(prompt(40), past_key_values=DynamicCache(config=model.config), use_cache=True)
    assert isinstance(hf_compat.output_cache(out), SlimKVCache)


def test_uncompile_restores_the_model():
    model = tiny("llama", 2)
    forward, generate = model.forward, model.generate
    slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, enabled=False)
    assert model.forward is not forward and hasattr(model, "slim")
    slimcompile.uncompile(model)
    assert not hasattr(model, "slim") and "forward" not in vars(model) and "generate" not in vars(model)
    assert model.forward == forward and model.generate == generate
    # Restoring the original forward by hand leaves the class's own bound method on the instance:
    # the runtime decoder still serves the model.
    model.forward = model.forward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, enabled=False)
    assert model.slim.runtime_kv


@pytest.mark.slow
def test_generation_that_transformers_compiles_itself_stays_exact():
    """transformers' own auto-compile (a static cache with a compile_config) wraps the model's
    `__call__`, and so slimcompile's forward, in its torch.compile: the tokens and logits are eager's."""
    from transformers import CompileConfig

    model = tiny("llama", 2)
    x = prompt(40)
    config = CompileConfig(fullgraph=False, dynamic=False)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told so
    kw = dict(cache_implementation="static", compile_config=config)
    ref = _generate(model, x, **kw)
    assert hasattr(model, "_compiled_call")  # transformers compiled its forward
    del model._compiled_call
    slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, prune_layers=[1], keep_ratio=0.5)
    with pytest.warns(UserWarning, match="cache_implementation='static'"):
        out = _generate(model, x, **kw)
    assert hasattr(model, "_compiled_call")
    _assert_same_generation(out, ref)
