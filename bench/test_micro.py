"""Microbenchmarks (pytest-benchmark): block scoring torch vs Triton, and the hidden-state gather.

On CUDA: LLaMA-3.1-8B shape (Hq=32, Hkv=8, d=128, window 32, blocks of 64, bf16) at L = 8K,
32K, 128K, each implementation eager (one custom-op call) and under torch.compile (Inductor,
dynamic=True: one graph for all lengths; this is how the rewritten model calls it). Without
CUDA: tiny sizes, torch implementation eager only, so CI just checks that they run. Timed
functions synchronise the GPU; every benchmark asserts its output shape.

    python -m pytest bench/test_micro.py -q --benchmark-columns=median,min,max,rounds --benchmark-sort=name
"""

from __future__ import annotations

import functools

import pytest
import torch

from slimcompile.runtime import ops  # noqa: F401  (registers torch.ops.slim.*)
from slimcompile.runtime import scoring_torch, triton_scoring

CUDA = torch.cuda.is_available()
SINK, WINDOW = 4, 32

if CUDA:
    LENGTHS = [8192, 32768, 131072]
    IMPLS = ["torch", "triton"]
    MODES = ["eager", "compiled"]
    HEADS, KV_HEADS, HEAD_DIM, W, BLOCK, DTYPE = 32, 8, 128, 32, 64, torch.bfloat16
    HIDDEN = 4096
else:
    LENGTHS = [512]
    IMPLS = ["torch"]
    MODES = ["eager"]
    HEADS, KV_HEADS, HEAD_DIM, W, BLOCK, DTYPE = 4, 2, 16, 8, 16, torch.float32
    HIDDEN = 64
SCALE = HEAD_DIM**-0.5


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _rounds(L: int) -> int:
    return 20 if L <= 32768 else 10


def _n_blocks(L):
    return (L - SINK - WINDOW) // BLOCK


def _scores_eager(q, k, impl):
    return torch.ops.slim.block_scores(q, k, SCALE, SINK, BLOCK, _n_blocks(k.shape[2]), "attention", "max", 8, impl)


# One function per implementation: the implementation (option scoring_impl) is the op's last
# argument, a constant of each function's graph.
def _scores_torch(q, k):
    return torch.ops.slim.block_scores(q, k, SCALE, SINK, BLOCK, _n_blocks(k.shape[2]), "attention", "max", 8, "torch")


def _scores_triton(q, k):
    return torch.ops.slim.block_scores(q, k, SCALE, SINK, BLOCK, _n_blocks(k.shape[2]), "attention", "max", 8, "triton")


_COMPILED: dict = {}


def _compiled(impl: str):
    if impl not in _COMPILED:
        fn = {"torch": _scores_torch, "triton": _scores_triton}[impl]
        _COMPILED[impl] = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=True)
    return _COMPILED[impl]


@pytest.mark.parametrize("L", LENGTHS, ids=lambda L: f"L{L}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_block_scores(benchmark, device, impl, mode, L):
    """slim::block_scores(scoring="attention", pooling="max"): one call per round."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, HEADS, W, HEAD_DIM, device=device, generator=g).to(DTYPE)
    k = torch.randn(1, KV_HEADS, L, HEAD_DIM, device=device, generator=g).to(DTYPE)
    n_blocks = _n_blocks(L)
    if impl == "triton":
        assert triton_scoring.use_triton(q, impl)
    fn = functools.partial(_scores_eager, impl=impl) if mode == "eager" else _compiled(impl)

    def run():
        out = fn(q, k)
        _sync()
        return out

    # compile (no compile cache: time and check a fresh compilation of each implementation)
    with torch.compiler.config.patch(force_disable_caches=True):
        run()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_extra_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    benchmark.extra_info.update(impl=impl, mode=mode, L=L)
    out = benchmark.pedantic(run, rounds=_rounds(L), warmup_rounds=2, iterations=1)
    assert out.shape == (1, n_blocks) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("L", LENGTHS, ids=lambda L: f"L{L}")
@pytest.mark.parametrize("how", ["gather", "index_select"])
def test_gather_hidden(benchmark, device, how, L):
    """Hidden states [1, L, hidden] -> the kept tokens (half the blocks), in original order."""
    h = torch.randn(1, L, HIDDEN, device=device).to(DTYPE)
    n_blocks = _n_blocks(L)
    scores = torch.rand(1, n_blocks, device=device)
    idx = scoring_torch.select_token_indices(scores, L, SINK, BLOCK, n_blocks // 2)
    kept = idx.shape[1]
    assert kept == L - (n_blocks - n_blocks // 2) * BLOCK

    if how == "gather":
        def run():
            out = torch.gather(h, 1, idx[:, :, None].expand(-1, -1, HIDDEN))
            _sync()
            return out
    else:
        def run():
            out = h.index_select(1, idx[0])
            _sync()
            return out

    benchmark.extra_info.update(L=L, kept=kept)
    out = benchmark.pedantic(run, rounds=_rounds(L), warmup_rounds=2, iterations=1)
    assert out.shape == (1, kept, HIDDEN)
    torch.testing.assert_close(out[0, :SINK], h[0, :SINK])
