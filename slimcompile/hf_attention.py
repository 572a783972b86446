"""A length-aware SDPA attention function, in effect only inside `length_aware_sdpa()`.

transformers builds one attention mask, sized from layer 0's cache, and hands it to every
layer. After pruning, later layers hold fewer keys, so the mask is wider than their keys. For
a causal mask the last m columns of the bottom-right-aligned mask are exactly the causal mask
of a layer holding m keys, so this function narrows the mask to the layer's key length and
otherwise defers to transformers' own `sdpa_attention_forward` (widths equal: no change).

Why not in the graph alone: Dynamo runs SDPA on fake tensors while it traces, and a mask wider
than the keys fails there, before the backend sees the graph. transformers 5.2x builds no mask
for a pure causal SDPA step, and passes/decode_kv.py narrows any mask left in the graph; 5.17
materialises the mask under tracing, so its decode trace needs the slice in the traced code.

Nothing is registered at import: `length_aware_sdpa()` swaps transformers' "sdpa" entry for
the duration of a call (slimcompile.compile's forward enters it around the compiled call) and
restores the previous entry on exit, so models outside that call, and the uncompiled model
(whose caches are full length), run transformers' own function.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

_lock = threading.RLock()
_depth = 0
_saved = None


def length_aware_sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        kv = key.shape[-2]
        if attention_mask.shape[-1] != kv:
            attention_mask = attention_mask[..., -kv:]
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


@contextlib.contextmanager
def length_aware_sdpa() -> Iterator[None]:
    """Within the block, transformers' "sdpa" attention narrows a wide mask to each layer's keys."""
    global _depth, _saved
    mapping = AttentionInterface._global_mapping
    with _lock:
        if _depth == 0:
            _saved = mapping.get("sdpa")
            mapping["sdpa"] = length_aware_sdpa_attention_forward
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                mapping["sdpa"] = _saved
