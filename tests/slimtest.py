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
