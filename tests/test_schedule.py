"""Kept-length arithmetic against a brute-force layout, and the FLOP/KV model by hand."""

import math

import pytest

from slimcompile import schedule as sched
from slimcompile.options import parse_options


def brute_kept(length, sink, window, block, keep):
    n = (length - sink - window) // block
    k = keep(n, length)
    tail = length - sink - n * block
    assert window <= tail < window + block
    return n, k, sink + k * block + tail


@pytest.mark.parametrize("length", [100, 101, 127, 512, 1000, 4099])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.3, 0.01])
def test_ratio_kept_length(length, ratio):
    s = parse_options({"prune_layers": [1], "keep_ratio": ratio, "block_size": 16, "window": 8, "sink": 4, "min_prune_len": 64}).resolve(4)
    n, k, kept = sched.kept_length(s, 0, length)
    assert (n, k, kept) == brute_kept(length, 4, 8, 16, lambda n, L: math.ceil(n * ratio - 1e-12))


@pytest.mark.parametrize("length", [200, 1000, 5000])
def test_budget_kept_length_never_exceeds_budget(length):
    s = parse_options({"prune_layers": [1, 2], "keep_tokens": [600, 300], "block_size": 16, "window": 8, "sink": 4, "min_prune_len": 64}).resolve(4)
    toks = sched.tokens_per_layer(s, length, 4)
    assert toks[:2] == [length, length]

    def by_hand(L, budget, block=16, sink=4, window=8):
        """The most whole blocks that fit the budget, counted one by one (not the closed form)."""
        if L <= budget:
            return L
        n = (L - sink - window) // block
        kept = L - n * block  # sink, tail and the remainder are always kept
        while kept + block <= budget and kept < L:
            kept += block
        return kept

    assert toks[2] == by_hand(length, 600)
    assert toks[3] == by_hand(toks[2], 300) if toks[2] > 300 else toks[3] == toks[2]
    assert toks[2] <= max(600, length if length <= 600 else 0) and toks[3] <= 300


def test_short_prompt_is_not_pruned():
    s = parse_options({"prune_layers": [1], "keep_ratio": 0.5, "min_prune_len": 512}).resolve(4)
    assert sched.tokens_per_layer(s, 511, 4) == [511] * 4
    assert sched.tokens_per_layer(s, 512, 4)[2] < 512


def test_flops_by_hand():
    dims = sched.ModelDims(num_layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)
    # q,o: 8*8 each; k,v: 8*4 each; mlp 3*8*16 -> per token 2*(64*2+32*2+384) = 1152; attention 2*2*4*T^2
    assert dims.layer_flops(10) == 10 * 1152 + 16 * 100
    s = parse_options({"prune_layers": [0], "keep_ratio": 0.5, "block_size": 2, "window": 2, "sink": 0, "min_prune_len": 4}).resolve(2)
    cost = sched.schedule_cost(s, 10, dims)
    assert cost.tokens == [10, 6]  # n=4 blocks, keep 2 -> 10 - 2*2
    assert cost.ideal_speedup == pytest.approx((2 * dims.layer_flops(10)) / (dims.layer_flops(10) + dims.layer_flops(6)))
    assert cost.kv_bytes == [2 * 10 * 1 * 4 * 2, 2 * 6 * 1 * 4 * 2]
