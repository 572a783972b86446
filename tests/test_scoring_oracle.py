"""An independent check of the scoring and selection oracle (`runtime/scoring_torch.py`), which the
reference and the CPU path both use: brute force over hand-made inputs, one number at a time,
with plain Python loops and `math`, sharing no code with the implementation (issue 15, part 5)."""

import math

import pytest
import torch

from slimcompile.runtime.scoring_torch import (
    attention_block_scores,
    select_token_indices,
    tokenunit_block_scores,
)


def _inputs(seed=0, b=2, hq=4, hkv=2, w=3, L=23, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, w, d, generator=g), torch.randn(b, hkv, L, d, generator=g)


def _attention_by_hand(q, k, scale, sink, block, n_blocks, pooling):
    b, hq, w, d = q.shape
    hkv, L = k.shape[1], k.shape[2]
    out = []
    for s in range(b):
        token = [0.0] * L
        for h in range(hq):
            kh = h // (hq // hkv)  # query head h reads kv head h // group
            for i in range(w):
                pos = L - w + i  # the window's i-th query sits here and sees keys 0..pos
                logits = [scale * sum(float(q[s, h, i, c]) * float(k[s, kh, j, c]) for c in range(d))
                          for j in range(pos + 1)]
                top = max(logits)
                z = sum(math.exp(x - top) for x in logits)
                for j, x in enumerate(logits):
                    token[j] += math.exp(x - top) / z / (hq * w)
        row = []
        for n in range(n_blocks):
            vals = token[sink + n * block: sink + (n + 1) * block]
            row.append(max(vals) if pooling == "max" else sum(vals) / len(vals))
        out.append(row)
    return out


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_attention_block_scores_by_hand(pooling):
    q, k = _inputs()
    sink, block, n_blocks = 2, 4, 4
    got = attention_block_scores(q, k, 0.5, sink, block, n_blocks, pooling)
    want = torch.tensor(_attention_by_hand(q, k, 0.5, sink, block, n_blocks, pooling))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_tokenunit_block_scores_by_hand():
    q, k = _inputs(seed=3)
    b, hq, w, d = q.shape
    hkv = k.shape[1]
    sink, block, unit, n_blocks = 1, 4, 2, 5
    want = []
    for s in range(b):
        row = []
        for n in range(n_blocks):
            best = -1.0
            for u in range(block // unit):
                start = sink + n * block + u * unit
                total = 0.0
                for h in range(hq):
                    kh = h // (hq // hkv)
                    qm = [sum(float(q[s, h, i, c]) for i in range(w)) / w for c in range(d)]
                    km = [sum(float(k[s, kh, start + t, c]) for t in range(unit)) / unit for c in range(d)]
                    total += abs(sum(a * bb for a, bb in zip(qm, km))) / hq
                best = max(best, total)
            row.append(best)
        want.append(row)
    got = tokenunit_block_scores(q, k, sink, block, unit, n_blocks)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_selection_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [0.5, 0.4, 0.7, 0.1, 0.6]])
    sink, block, length, keep = 3, 4, 3 + 5 * 4 + 6, 2
    got = select_token_indices(scores, length, sink, block, keep)
    for s, row in enumerate(scores.tolist()):
        best = sorted(sorted(range(5), key=lambda n: -row[n])[:keep])  # the top blocks, in order
        want = list(range(sink))
        for n in best:
            want += list(range(sink + n * block, sink + (n + 1) * block))
        want += list(range(sink + 5 * block, length))  # the tail (window + remainder)
        assert got[s].tolist() == want
    assert got.shape[1] == length - (5 - keep) * block
