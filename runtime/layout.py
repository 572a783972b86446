"""The block layout of a prompt at a pruning layer, shared by the compiler and the runtime.

A sequence of length L is `[sink | n blocks of block_size | tail]`, the tail holding the last
`window` tokens plus the remainder; only the n blocks are ever dropped (prefill) or offloaded
(decode). `slimcompile.schedule` and `runtime.offload` both count blocks with `num_blocks`, so
the two cannot disagree. No imports: the light command-line path may load it.
"""

from __future__ import annotations

from typing import Any


def num_blocks(length: Any, sink: int, window: int, block_size: int) -> Any:
    """n for a length L (int or SymInt): (L - sink - window) // block_size (negative when L is too short)."""
    return (length - sink - window) // block_size
