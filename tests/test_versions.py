"""The support window (issue 20): releases below it are refused at import, newer ones warned about."""

import warnings

import pytest

from slimcompile import hf_compat

# The module objects the check reads (the same as `import torch, transformers`, unless a test
# elsewhere re-imported them).
torch, transformers = hf_compat.torch, hf_compat.transformers


@pytest.mark.parametrize("version", ["5.17.0", "5.25.0", "5.20.1"])
def test_releases_inside_the_window_pass_silently(monkeypatch, version):
    monkeypatch.setattr(transformers, "__version__", version)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_compat.check_versions()


@pytest.mark.parametrize("module,version", [(transformers, "5.16.2"), (transformers, "4.57.0"), (torch, "2.10.0")])
def test_a_release_below_the_window_is_refused(monkeypatch, module, version):
    monkeypatch.setattr(module, "__version__", version)
    with pytest.raises(ImportError, match=f"{version} is installed"):
        hf_compat.check_versions()


@pytest.mark.parametrize("module,version", [(transformers, "5.26.0"), (transformers, "6.0.0.dev0"), (torch, "2.16.0")])
def test_a_release_newer_than_tested_is_warned_about(monkeypatch, module, version):
    monkeypatch.setattr(module, "__version__", version)
    with pytest.warns(UserWarning, match="newer and untested"):
        hf_compat.check_versions()


def test_the_cache_keyword_of_this_release_is_read_and_written():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = hf_compat.causal_lm_output(torch.zeros(1), "C")
    assert hf_compat.output_cache(out) == "C"
    hf_compat.set_output_cache(out, "D")
    assert hf_compat.output_cache(out) == "D"
    assert hf_compat.cache_in({"past_key_values": "P"}) == ("past_key_values", "P")
    assert hf_compat.cache_in({"cache": "Q", "past_key_values": None}) == ("cache", "Q")
    assert isinstance(out, CausalLMOutputWithPast)


def test_the_forward_cache_keyword_of_this_release():
    """Passing the cache under `cache_kwarg` is what this release expects: no deprecation warning."""
    from transformers import DynamicCache

    from slimtest import prompt, tiny

    model = tiny("llama", 2)
    name = hf_compat.cache_kwarg(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            out = model(prompt(8), **{name: DynamicCache(config=model.config)}, use_cache=True)
    assert hf_compat.output_cache(out).get_seq_length() == 8
