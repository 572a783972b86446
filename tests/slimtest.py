"""Helpers shared by the tests: tiny random models, prompts, and a backend that skips Inductor."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from slimcompile.backend import slim_backend

PASS_BACKEND = functools.partial(slim_backend, lower=False)

# Small blocks so that prompts of 40-70 tokens have several blocks to choose from.
SMALL = dict(block_size=4, window=4, sink=2, min_prune_len=16)


def tiny(arch: str = "llama", kv_heads: int = 2, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
    )
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def ids(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + length)
    return torch.randint(0, 128, (batch, length), generator=g)


def interpreter_results(script: str, drop_env: tuple[str, ...] = ()) -> dict:
    """Run `script --interpret` under TRITON_INTERPRET=1 (it must be set before triton is
    imported, hence a subprocess) and return its `RESULTS` line as {case id: verdict}."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    for name in drop_env:
        env.pop(name, None)
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--interpret"], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"interpreter subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")][-1]
    return {r["id"]: r for r in json.loads(line[len("RESULTS "):])}


def tiny_family(family: str, layers: int = 3, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of another family, for the exactness checks of what falls back.

    Families: qwen3 (q/k norms), mistral (sliding window 16), qwen2-sliding (Qwen2 with
    use_sliding_window on every layer), granite (LLaMA look-alike with multipliers), phi3 (fused
    projections), gpt2, gemma2 (soft-capping, local/global layers)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if family == "qwen3":
        cfg, cls = tf.Qwen3Config(**common, head_dim=16), tf.Qwen3ForCausalLM
    elif family == "mistral":
        cfg, cls = tf.MistralConfig(**common, sliding_window=16), tf.MistralForCausalLM
    elif family == "qwen2-sliding":
        cfg = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=16, max_window_layers=0)
        cls = tf.Qwen2ForCausalLM
    elif family == "granite":
        cfg = tf.GraniteConfig(**common, embedding_multiplier=2.0, residual_multiplier=0.5,
                               attention_multiplier=0.3, logits_scaling=4.0)
        cls = tf.GraniteForCausalLM
    elif family == "phi3":
        cfg, cls = tf.Phi3Config(**common, pad_token_id=0), tf.Phi3ForCausalLM
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
        cls = tf.Gemma2ForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=1024)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown family {family!r}")
    cfg.bos_token_id = cfg.eos_token_id = None  # generate runs to max_new_tokens; ids stay in the vocabulary
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cls(cfg).eval()


def prompt(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """Token ids in 1..127 (never 0, which generate may take for padding)."""
    g = torch.Generator().manual_seed(seed + length)
    return torch.randint(1, 128, (batch, length), generator=g)


def mask_gone(context) -> bool:
    """The compiled graph attends causally without a mask: the causal-mask pass removed the mask
    transformers built (5.17 materialises one), or transformers built none (5.2x for SDPA)."""
    return context.mask_removed or (context.layer_map is not None and not context.layer_map.masks()
                                    and context.mask_kept_reason is None)
