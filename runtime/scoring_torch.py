"""Plain-PyTorch block scoring and token selection: the CPU path and the test oracle.

Shapes: q [b, Hq, w, d] are the post-RoPE queries of the last w tokens of the current
sequence, k [b, Hkv, L, d] its post-RoPE keys (GQA: Hq is a multiple of Hkv). Blocks are
the `n_blocks` runs of `block_size` tokens starting at `sink` (see slimcompile.schedule).
"""

from __future__ import annotations

import torch


def _grouped(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, int]:
    b, hq, w, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of key heads {hkv}")
    return q.reshape(b, hkv, hq // hkv, w, d), hq // hkv


def attention_token_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[b, L] fp32: softmax attention of the window's queries on each key, mean over heads and queries.

    Query i of the window sits at position L - w + i and sees keys 0..L-w+i (causal).
    """
    b, hq, w, d = q.shape
    L = k.shape[2]
    qg, g = _grouped(q.float(), k)
    logits = torch.einsum("bhgwd,bhld->bhgwl", qg, k.float()) * scale
    qpos = torch.arange(L - w, L, device=q.device)
    causal = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
    logits = logits.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.mean(dim=(1, 2, 3))


def attention_block_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, sink: int, block_size: int, n_blocks: int, pooling: str
) -> torch.Tensor:
    """[b, n_blocks] fp32 block scores for scoring='attention'."""
    tok = attention_token_scores(q, k, scale)
    blocks = tok[:, sink : sink + n_blocks * block_size].reshape(tok.shape[0], n_blocks, block_size)
    return blocks.amax(dim=-1) if pooling == "max" else blocks.mean(dim=-1)


def tokenunit_block_scores(
    q: torch.Tensor, k: torch.Tensor, sink: int, block_size: int, unit_size: int, n_blocks: int
) -> torch.Tensor:
    """[b, n_blocks] fp32: max over a block's TokenUnits of the head-mean |q_mean . k_unit|.

    q_mean is the mean query of the window; k_unit the mean key of `unit_size` tokens.
    """
    b, hkv, _, d = k.shape
    qg, g = _grouped(q.float(), k)
    q_mean = qg.mean(dim=3)  # [b, hkv, g, d]
    units = block_size // unit_size
    ks = k[:, :, sink : sink + n_blocks * block_size].float()
    k_unit = ks.reshape(b, hkv, n_blocks * units, unit_size, d).mean(dim=3)
    s = torch.einsum("bhgd,bhud->bhgu", q_mean, k_unit).abs().mean(dim=(1, 2))  # [b, n_blocks*units]
    return s.reshape(b, n_blocks, units).amax(dim=-1)


def select_token_indices(
    scores: torch.Tensor, length: int, sink: int, block_size: int, keep: int
) -> torch.Tensor:
    """[b, kept] int64 token indices in increasing order: sink, the top-`keep` blocks, the tail.

    kept = length - (n_blocks - keep) * block_size; no host synchronisation.
    """
    b, n = scores.shape
    dev = scores.device
    top = torch.topk(scores, keep, dim=-1, sorted=False).indices
    top = torch.sort(top, dim=-1).values  # original order
    offs = torch.arange(block_size, device=dev)
    body = (sink + top[:, :, None] * block_size + offs).reshape(b, keep * block_size)
    head = torch.arange(sink, device=dev).expand(b, sink)
    tail = torch.arange(sink + n * block_size, length, device=dev).expand(b, length - sink - n * block_size)
    return torch.cat([head, body, tail], dim=1)
