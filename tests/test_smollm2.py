"""The real default model (SmolLM2-135M, 30 layers) at ~1K tokens: eager and reference equivalence.

Loads the converted model from the cache (the first run converts the GGUF, ~50 s).
"""

import functools

import pytest
import torch

import slimcompile
from slimcompile import reference
from slimcompile.backend import COMPILATIONS, slim_backend
from slimcompile.options import parse_options

from slimtest import mask_gone

pytestmark = pytest.mark.slow

OPTIONS = {"prune_layers": [14, 20], "keep_ratio": [0.3, 0.5], "block_size": 32, "window": 32, "sink": 32, "min_prune_len": 512}


@pytest.fixture(scope="module")
def smol():
    models = pytest.importorskip("slimcompile.models")
    model, tokenizer = models.load("smollm2-135m")
    return model, tokenizer


@pytest.fixture(scope="module")
def prompt(smol):
    from slimcompile import tasks

    sample = tasks.make_sample("needle", 1000, smol[1], seed=3)
    return torch.tensor([sample.input_ids])


def test_unpruned_matches_eager(smol, prompt):
    model, _ = smol
    torch._dynamo.reset()
    fast = torch.compile(model, backend=functools.partial(slim_backend, lower=False), options={"enabled": False}, dynamic=True)
    with torch.no_grad():
        out = fast(prompt, use_cache=True, logits_to_keep=1)
        ref = model(prompt, use_cache=True, logits_to_keep=1)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.past_key_values.layers[29].keys, ref.past_key_values.layers[29].keys, rtol=1e-4, atol=1e-4)
    assert mask_gone(COMPILATIONS[-1].context) and COMPILATIONS[-1].context.layer_map.layer_type == "LlamaDecoderLayer"


def test_schedule_through_inductor_matches_reference(smol, prompt):
    model, _ = smol
    schedule = parse_options(OPTIONS).resolve(model.config.num_hidden_layers)
    ref = reference.prefill(model, prompt, schedule)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="slim", options=OPTIONS, dynamic=True)
    with torch.no_grad(), torch._dynamo.config.patch(specialize_float=True):
        out = fast(prompt, use_cache=True, logits_to_keep=1)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [k.shape[2] for k in ref.keys]
    assert lengths[15] < lengths[14] and lengths[21] < lengths[20]
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.past_key_values.layers[25].values, ref.values[25], rtol=1e-3, atol=1e-3)


def test_generate_matches_reference(smol, prompt):
    # Decode through the rewritten graphs without Inductor: a second 30-layer Inductor compile
    # (the decode graph) would double this module's CI time; tests/test_inductor.py covers
    # generation through Inductor on the tiny model.
    model, tokenizer = smol
    schedule = parse_options(OPTIONS).resolve(model.config.num_hidden_layers)
    want = reference.generate(model, prompt, schedule, 16, eos_token_id=model.config.eos_token_id)
    torch._dynamo.reset()
    slimcompile.compile(model, backend=functools.partial(slim_backend, lower=False), **OPTIONS)
    try:
        got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    finally:
        model.forward = model.slim.original_forward
        del model.slim
    n = min(got.shape[1], want.shape[1])
    assert n > prompt.shape[1]
    assert torch.equal(got[:, :n], want[:, :n]), (
        tokenizer.decode(got[0, prompt.shape[1] :]),
        tokenizer.decode(want[0, prompt.shape[1] :]),
    )
