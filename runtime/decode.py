"""One-token decode step over a `SlimKVCache`, replayed as a CUDA graph on CUDA.

The step runs the model's own modules (LLaMA-family: norms, q/k/v/o projections, RoPE, MLP) in
plain PyTorch, gpt-fast style: each layer writes its new k/v in place at a device-side row and
attends over the valid prefix of its static buffer (every layout keeps its held rows first), whose
length is a device tensor. Grouped-query attention needs no
`repeat_kv`: the G query heads of a kv head become G query rows of one attention call
(q [b, Hkv, G, d] against k [b, Hkv, C, d]), which is exact for a single decode position.

Around attention, each layer's norms, projections, RoPE and MLP run as two Inductor-compiled
regions (option `decode_compile`, on by default on CUDA), compiled once and shared by all layers:
fused elementwise work instead of ~40 small kernels per layer; the pre-attention region also
stores the new k/v in the cache (Inductor fuses k's store into the RoPE kernel). The attention and the KV hooks
(offload's side-stream copies) stay outside them. Where `slimcompile.compile` fused a
layer's q/k/v and gate/up weights (runtime/fused_weights.py, option `decode_fuse`), the regions
run one GEMM for q/k/v and one for gate/up.

With static shapes and no host synchronisation the whole step (32 layers, ~520 kernels on the
LLaMA-8B shape) is captured once as a CUDA graph and replayed, so decode is bound by memory traffic,
not by Python and kernel launches. A graph is re-recorded only when a buffer grows. The first
step runs eagerly (offload chooses its first active set there).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from slimcompile.runtime import decode_attention
from slimcompile.runtime.config import RuntimeConfig
from slimcompile.runtime.fused_weights import fused_of
from slimcompile.runtime.kv_cache import SlimKVCache, write_token
from slimcompile.runtime.regions import CompiledRegion


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n: torch.Tensor, scale: float,
                             impl: str) -> torch.Tensor:
    """q [b, Hq, 1, d] over rows [0, n) of keys/values [b, Hkv, C, d] (n: [1] device tensor); returns [b, 1, Hq * d].

    `impl` (the `decode_attention` option resolved by `RuntimeConfig.attention_impl`; bench/RESULTS.md
    compares them on an H200):

    "triton": the split-K kernel of `runtime.decode_attention`, which spreads the key axis over
    the whole GPU. "sdpa": one masked SDPA call; on CUDA that is the memory-efficient kernel,
    which runs one program per (batch, kv head), so 8 programs stream the whole cache (the slow
    decode step measured in session 2). "matmul": q.K^T and P.V as batched matmuls (scores in
    fp32 after a bf16 product, like transformers' eager attention).
    """
    b, hq, _, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    if impl == "triton":
        o = decode_attention.triton_decode_attention(qg, keys, values, n, scale)
    else:
        valid = torch.arange(keys.shape[2], device=keys.device) < n
        if impl == "matmul":
            s = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale
            s = s.masked_fill(~valid, float("-inf"))
            o = torch.matmul(torch.softmax(s, dim=-1).to(values.dtype), values)
        else:
            o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=valid[None, None, None, :], scale=scale)
    return o.reshape(b, 1, hq * d)


def attention_inputs(layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_buf: torch.Tensor, v_buf: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Input norm, q/k/v projections and RoPE of one decoder layer for one position; stores k and v
    at buffer row `row` (in the compiled region, inside Inductor's kernels) and returns q [b, H, 1, d]."""
    attn = layer.self_attn
    b, hd = h.shape[0], attn.head_dim
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(b, 1, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, 1, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, 1, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    write_token(k_buf, v_buf, k, v, row)
    return q


def attention_output_and_mlp(layer: torch.nn.Module, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """o_proj and residual, post-attention norm, MLP and residual of one decoder layer."""
    h = h + layer.self_attn.o_proj(o)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def fused_attention_inputs(layer: torch.nn.Module, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None, sizes: tuple[int, int, int],
                           h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           k_buf: torch.Tensor, v_buf: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """`attention_inputs` with q, k and v from one GEMM over the layer's fused weight (runtime/fused_weights.py)."""
    b, hd = h.shape[0], layer.self_attn.head_dim
    q, k, v = F.linear(layer.input_layernorm(h), qkv_w, qkv_b).split(sizes, dim=-1)
    q, k, v = (t.view(b, 1, -1, hd).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    write_token(k_buf, v_buf, k, v, row)
    return q


def fused_attention_output_and_mlp(layer: torch.nn.Module, gate_up_w: torch.Tensor, inter: int, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """`attention_output_and_mlp` with gate and up from one GEMM over the layer's fused weight."""
    h = h + layer.self_attn.o_proj(o)
    gate, up = F.linear(layer.post_attention_layernorm(h), gate_up_w).split([inter, inter], dim=-1)
    return h + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)


def dynamic_capacity(k_buf: torch.Tensor, v_buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark the buffers' row axis dynamic: layers keep different numbers of prompt rows and buffers
    grow, and the pre-attention region that writes into them should compile once, not per capacity."""
    for buf in (k_buf, v_buf):
        torch._dynamo.mark_dynamic(buf, 2)
    return k_buf, v_buf


class StaticDecoder:
    """Runs decode steps of `model` against `cache` as `config` says (CUDA-graph replay when
    `config.cuda_graphs` on CUDA; attention implementation, compiled regions, fused weights)."""

    def __init__(self, model: torch.nn.Module, cache: SlimKVCache, batch: int, config: RuntimeConfig):
        self.model = model
        # A weak reference: the cache owns its decoder (cache.decoder), and a cycle would keep the
        # KV buffers (and offload's pooled host buffers) alive until a garbage collection.
        self._cache = weakref.ref(cache)
        dev = next(model.parameters()).device
        self.device = dev
        self.config = config
        self.use_graph = config.cuda_graphs and dev.type == "cuda"
        self.attention_impl = config.attention_impl(dev)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.step_no = torch.zeros(1, dtype=torch.long, device=dev)  # generated tokens before this one
        # RoPE position of this step's token per sequence: the given position_ids, or by default
        # the original prompt length plus the tokens generated before it (filled before each step).
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.bases = torch.tensor([layer.write_index() for layer in cache.layers], dtype=torch.long, device=dev)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0
        self.captures = 0  # graphs recorded; with `replays`, tells a benchmark whether decode ran as graphs
        self.replays = 0
        regions = config.compile_regions(dev)
        self.pre = CompiledRegion(attention_inputs, regions)
        self.post = CompiledRegion(attention_output_and_mlp, regions)
        self.fused_pre = CompiledRegion(fused_attention_inputs, regions)
        self.fused_post = CompiledRegion(fused_attention_output_and_mlp, regions)
        # Views of each layer's fused q/k/v and gate/up weights, where `slimcompile.compile` fused them.
        fuse = config.fuse_weights(dev)
        self.fused = [fused_of(layer) if fuse else None for layer in model.model.layers]

    @property
    def cache(self) -> SlimKVCache:
        cache = self._cache()
        if cache is None:
            raise RuntimeError("the SlimKVCache this decoder stepped was released")
        return cache

    def _forward(self) -> torch.Tensor:
        inner = self.model.model
        h = inner.embed_tokens(self.ids)
        cos, sin = inner.rotary_emb(h, self.positions)
        # Every layer's write row and valid length in two kernels per step, not two per layer.
        rows = self.bases + self.step_no
        lengths = rows + 1
        for li, layer in enumerate(inner.layers):
            kv = self.cache.layers[li]
            fw = self.fused[li]
            row = rows[li : li + 1]
            bufs = dynamic_capacity(kv.k_buf, kv.v_buf)
            if fw is None:
                q = self.pre(layer, h, cos, sin, *bufs, row)
            else:
                q = self.fused_pre(layer, fw.qkv, fw.qkv_bias, fw.qkv_sizes, h, cos, sin, *bufs, row)
            kv.before_attention(q)
            o = grouped_decode_attention(q, kv.k_buf, kv.v_buf, lengths[li : li + 1], layer.self_attn.scaling,
                                         self.attention_impl)
            kv.after_attention(q)
            h = self.post(layer, h, o) if fw is None else self.fused_post(layer, fw.gate_up, fw.inter, h, o)
        for kv in self.cache.layers:
            kv.join()
        return self.model.lm_head(inner.norm(h))

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, 1, vocab] for `input_ids` [b, 1] at the next position; advances the cache.

        `positions` ([b, 1] or [1, 1]): the tokens' RoPE positions, as a caller's `position_ids`
        give them; by default the original prompt length plus the tokens generated so far."""
        if self.cache.ensure_room():  # buffers moved: rows keep their indices, the graph is recorded again
            self.graph = None
        self.ids.copy_(input_ids)
        self.step_no.fill_(self.cache.generated)
        if positions is None:
            self.positions.fill_(self.cache.prompt_len + self.cache.generated)
        else:
            self.positions.copy_(positions.to(self.positions.device).expand_as(self.positions))
        if not self.use_graph or self.steps == 0:
            out = self._forward()
        elif self.graph is None:
            # Warm-up run (also this step's result), then record; replays start at the next step.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._forward()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
            self.captures += 1
        else:
            self.graph.replay()
            self.replays += 1
            out = self.logits
        self.steps += 1
        self.cache.advance()
        return out.clone() if out is self.logits else out
