"""A length-aware SDPA attention function for transformers, registered as "sdpa".

transformers builds one attention mask, sized from layer 0's cache, and hands it to every
layer. After pruning, later layers hold fewer keys, so the mask is wider than their keys.
For a causal mask, the last m columns of the bottom-right-aligned mask are exactly the
causal mask of a layer holding m keys (its kept prompt tokens, then the generated ones),
so this function narrows the mask to the layer's key length and otherwise defers to
transformers' own `sdpa_attention_forward`. When widths match it changes nothing.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface


def length_aware_sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        kv = key.shape[-2]
        if attention_mask.shape[-1] != kv:
            attention_mask = attention_mask[..., -kv:]
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register("sdpa", length_aware_sdpa_attention_forward)
