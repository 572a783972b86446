"""The `slim::` custom ops that the rewritten graph calls: block scoring and token selection.

Registered through `torch.library` with fake implementations, so Dynamo, AOTAutograd and
Inductor trace them with symbolic sizes (the output length is an expression of the input
sizes, never data-dependent). CPU runs the torch implementation in `scoring_torch`;
`block_scores` is a `triton_op` whose CUDA attention path runs the Triton kernels of
`triton_scoring` unless its `impl` argument (the `scoring_impl` option) is "torch".
"""

from __future__ import annotations

import torch

from slimcompile.runtime import scoring_torch, triton_scoring
from slimcompile.runtime.triton_scoring import attention_block_scores_triton


@torch.library.triton_op("slim::block_scores", mutates_args=())
def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    sink: int,
    block_size: int,
    n_blocks: int,
    scoring: str,
    pooling: str,
    unit_size: int,
    impl: str,
) -> torch.Tensor:
    """[b, n_blocks] fp32 importance of each prunable block (see DESIGN.md for both scorings).

    scoring="attention" on CUDA runs the Triton kernels of `triton_scoring` unless impl="torch"
    (`impl`: the `scoring_impl` option, "auto", "triton" or "torch"; an argument, so the choice is
    in the graph and every cache key); everything else runs `scoring_torch`. A `triton_op`: its body is
    also its fake implementation (output [b, n_blocks], n_blocks may be symbolic) and Inductor
    traces into it, so it sees the Triton kernels (wrapped with `wrap_triton`) and the torch ops.
    """
    if scoring == "attention":
        if triton_scoring.use_triton(q, impl):
            return attention_block_scores_triton(q, k, scale, sink, block_size, n_blocks, pooling)
        return scoring_torch.attention_block_scores(q, k, scale, sink, block_size, n_blocks, pooling)
    return scoring_torch.tokenunit_block_scores(q, k, sink, block_size, unit_size, n_blocks)


@torch.library.custom_op("slim::select_tokens", mutates_args=())
def select_tokens(scores: torch.Tensor, length: int, sink: int, block_size: int, keep: int) -> torch.Tensor:
    """[b, kept] int64 indices of the tokens that go on, in increasing order."""
    return scoring_torch.select_token_indices(scores, length, sink, block_size, keep)


@select_tokens.register_fake
def _(scores, length, sink, block_size, keep):
    n = scores.shape[1]
    return scores.new_empty((scores.shape[0], length - (n - keep) * block_size), dtype=torch.int64)
