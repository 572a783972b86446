"""A plain-PyTorch reference of the method: an explicit layer loop with gathers.

It uses the HF model's own modules and the torch scoring/selection functions, with none
of the FX machinery, so tests can hold the compiled backend to it: same logits, same
per-layer KV, same greedy tokens. Batch of equal-length unpadded prompts.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from slimcompile import schedule as sched
from slimcompile.options import LayerSchedule
from slimcompile.runtime import scoring_torch


@dataclasses.dataclass
class ReferenceState:
    logits: torch.Tensor  # [b, 1, vocab] logits of the last position
    keys: list[torch.Tensor]  # per layer [b, Hkv, L_layer, d]
    values: list[torch.Tensor]
    kept_indices: dict[int, torch.Tensor]  # pruning layer -> [b, kept] original positions kept
    next_position: int


def _attend(layer, h, cos, sin, past_k=None, past_v=None, is_causal=True):
    attn = layer.self_attn
    b, L, _ = h.shape
    x = layer.input_layernorm(h)
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, L, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, L, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, L, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    groups = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=is_causal, scale=attn.scaling
    )
    h = h + attn.o_proj(o.transpose(1, 2).reshape(b, L, -1))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, q, k, v


def select_kept(schedule: LayerSchedule, i: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[b, kept] rows kept at the i-th pruning layer, from that layer's post-RoPE q [b,Hq,L,d] and k."""
    o = schedule.options
    L = k.shape[2]
    n, k_blocks, _ = sched.kept_length(schedule, i, L)
    qw = q[:, :, -o.window :]
    if o.scoring == "attention":
        scores = scoring_torch.attention_block_scores(qw, k, q.shape[-1] ** -0.5, o.sink, o.block_size, n, o.pooling)
    else:
        scores = scoring_torch.tokenunit_block_scores(qw, k, o.sink, o.block_size, o.unit_size, n)
    return scoring_torch.select_token_indices(scores, L, o.sink, o.block_size, k_blocks)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, schedule: LayerSchedule | None) -> ReferenceState:
    inner = model.model
    b, S = input_ids.shape
    h = inner.embed_tokens(input_ids)
    pos = torch.arange(S, device=input_ids.device)[None].expand(b, S)
    cos, sin = inner.rotary_emb(h, pos)
    pruning = schedule is not None and sched.prunes(schedule, S)
    prune_at = {l: i for i, l in enumerate(schedule.layers)} if pruning else {}
    positions = pos
    keys, values, kept = [], [], {}
    for li, layer in enumerate(inner.layers):
        h, q, k, v = _attend(layer, h, cos, sin)
        keys.append(k)
        values.append(v)
        if li in prune_at:
            idx = select_kept(schedule, prune_at[li], q, k)
            h = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
            cos = torch.gather(cos, 1, idx[..., None].expand(-1, -1, cos.shape[-1]))
            sin = torch.gather(sin, 1, idx[..., None].expand(-1, -1, sin.shape[-1]))
            positions = torch.gather(positions, 1, idx)
            kept[li] = positions
    logits = model.lm_head(inner.norm(h[:, -1:]))
    return ReferenceState(logits, keys, values, kept, S)


@torch.no_grad()
def decode_step(model, state: ReferenceState, token: torch.Tensor) -> ReferenceState:
    """Feed one token per sequence ([b, 1]) at position `state.next_position`."""
    inner = model.model
    h = inner.embed_tokens(token)
    pos = torch.full_like(token, state.next_position)
    cos, sin = inner.rotary_emb(h, pos)
    keys, values = [], []
    for li, layer in enumerate(inner.layers):
        h, _, k, v = _attend(layer, h, cos, sin, state.keys[li], state.values[li], is_causal=False)
        keys.append(k)
        values.append(v)
    logits = model.lm_head(inner.norm(h))
    return ReferenceState(logits, keys, values, state.kept_indices, state.next_position + 1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, schedule: LayerSchedule | None, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy generation; returns [b, S + new] like `model.generate` (stops when all hit EOS)."""
    state = prefill(model, input_ids, schedule)
    out = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        tok = state.logits[:, -1].argmax(-1, keepdim=True)
        if eos_token_id is not None:
            tok = torch.where(done[:, None], torch.full_like(tok, eos_token_id), tok)
            done |= tok[:, 0] == eos_token_id
        out = torch.cat([out, tok], dim=1)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        state = decode_step(model, state, tok)
    return out
