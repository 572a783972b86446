"""Layer analysis: find each decoder layer's nodes in a Dynamo graph of a HF LLaMA-family model.

Builds a `LayerMap` from `nn_module_stack` metadata and op patterns: per layer its input and
output residual nodes, post-RoPE q and k, the SDPA call and its KV outputs; shared: the
attention-mask node and the sequence length. Raises `UnsupportedGraph` with the reason when
the graph is not one it understands; the backend then compiles the graph unchanged.

Two KV-cache forms are recognised: transformers' `DynamicCache` (`torch.cat([past, new])`,
one length per layer, the form pruning needs) and an in-place written buffer such as
`StaticCache` (`keys.index_copy_(2, pos, k)` into a preallocated `[b, h, max_cache_len, d]`
tensor that SDPA then reads whole). The second is recorded per layer (`kv_write`) so the
passes can refuse what they cannot do with it: every StaticCache layer has the one length
`max_cache_len`, so a pruned layer could not hold fewer rows.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any

import torch
import torch.fx as fx

from slimcompile.passes.base import Findings, SlimPass
from slimcompile.passes.side_effects import has_side_effect

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
SUPPORTED_LAYER_TYPES = ("LlamaDecoderLayer", "Qwen2DecoderLayer")
_LAYER_PATH = re.compile(r"\.layers[\.\[](\d+)\]?$")
_SHAPE_OPS = {"reshape", "view", "expand", "contiguous", "transpose"}


class UnsupportedGraph(Exception):
    """The graph is not a whole HF LLaMA-family forward this backend can rewrite."""


@dataclasses.dataclass
class LayerNodes:
    index: int
    nodes: list[fx.Node]
    residual_in: fx.Node
    residual_out: fx.Node
    q: fx.Node
    k: fx.Node
    sdpa: fx.Node
    kv_outputs: tuple[fx.Node, fx.Node] | None  # the cache's key/value tensors after update
    past_kv: tuple[fx.Node, fx.Node] | None  # placeholders of the cache before update (decode)
    mask: fx.Node | None  # the SDPA attn_mask argument in the captured graph
    # An in-place write into the tensor SDPA reads as keys (StaticCache's `keys.index_copy_`):
    # the layer's KV lives in a preallocated buffer that outlives the call.
    kv_write: fx.Node | None = None

    @property
    def current_mask(self) -> fx.Node | None:
        """The mask the SDPA call reads now (passes rewrite the graph, never this analysis)."""
        return sdpa_mask(self.sdpa)

    def summary(self) -> dict[str, Any]:
        return {
            "layer": self.index,
            "residual_in": self.residual_in.name,
            "residual_out": self.residual_out.name,
            "q": self.q.name,
            "k": self.k.name,
            "sdpa": self.sdpa.name,
            "kv_outputs": [n.name for n in self.kv_outputs] if self.kv_outputs else None,
            "past_kv": [n.name for n in self.past_kv] if self.past_kv else None,
            "mask": self.current_mask.name if self.current_mask is not None else None,
            "kv_write": self.kv_write.name if self.kv_write is not None else None,
        }


@dataclasses.dataclass
class LayerMap:
    model_type: str
    layer_type: str
    layers: list[LayerNodes]
    seq_len: Any  # SymInt or int: tokens entering layer 0 in this call
    has_past: bool  # the call extends a non-empty cache (decode or continuation)

    @property
    def static_kv(self) -> bool:
        """The KV is written in place into preallocated buffers (transformers' StaticCache)."""
        return any(layer.kv_write is not None for layer in self.layers)

    def masks(self) -> list[fx.Node]:
        """Distinct mask nodes the SDPA calls read now, in layer order (read from the graph)."""
        return list(dict.fromkeys(m for layer in self.layers if (m := layer.current_mask) is not None))

    def summary(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "layer_type": self.layer_type,
            "num_layers": len(self.layers),
            "masks": sorted({m.name for m in self.masks()}),
            "seq_len": str(self.seq_len),
            "has_past": self.has_past,
            "static_kv": self.static_kv,
            "layers": [layer.summary() for layer in self.layers],
        }


def sdpa_mask(sdpa: fx.Node) -> fx.Node | None:
    mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    return mask if isinstance(mask, fx.Node) else None


def count_layers(gm: fx.GraphModule) -> int:
    """Decoder layers named in the graph's `nn_module_stack` (0 if none): resolves the schedule."""
    found = {hit[0] for n in gm.graph.nodes if (hit := _layer_of(n)) is not None}
    return max(found) + 1 if found else 0


def example_value(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, fx.Node) else node


def _layer_of(node: fx.Node) -> tuple[int, str] | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in stack.values():
        m = _LAYER_PATH.search(path)
        if m and getattr(cls, "__name__", "").endswith("DecoderLayer"):
            return int(m.group(1)), cls.__name__
    return None


def _is_method(node: Any, names: set[str]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _through_shape_ops(node: fx.Node) -> fx.Node:
    """Walk back from an SDPA key/value argument to the tensor before repeat_kv's reshapes."""
    while True:
        if _is_method(node, _SHAPE_OPS):
            node = node.args[0]
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        else:
            return node


def _cache_update(node: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """For `torch.cat([past, new], dim=-2)` (DynamicLayer.update) return (new, past placeholder or None)."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    parts = node.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    past, new = parts
    if past.op == "placeholder":
        return new, past
    if past.op == "call_function" and past.target is torch.tensor:  # empty cache: torch.tensor([])
        return new, None
    return None


def _inplace_write(buffer: fx.Node) -> fx.Node | None:
    """The first node that writes `buffer` in place (`buffer.index_copy_(...)`, `buffer[i] = x`,
    `buffer.copy_(x)`, a mutating op with `buffer` as its first argument), if any."""
    for user in buffer.users:
        if user.op in ("call_method", "call_function") and user.args and user.args[0] is buffer and has_side_effect(user):
            return user
    return None


def analyze(gm: fx.GraphModule) -> LayerMap:
    by_layer: dict[int, list[fx.Node]] = {}
    layer_types = set()
    model_type = None
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if model_type is None and stack:
            model_type = next(iter(stack.values()))[1].__name__
        hit = _layer_of(node)
        if hit is not None:
            by_layer.setdefault(hit[0], []).append(node)
            layer_types.add(hit[1])
    if not by_layer:
        raise UnsupportedGraph("no decoder layers found (no nn_module_stack entry '*.layers.N' of a *DecoderLayer)")
    if len(layer_types) != 1 or next(iter(layer_types)) not in SUPPORTED_LAYER_TYPES:
        raise UnsupportedGraph(
            f"decoder layer type {sorted(layer_types)} is not supported (supported: {list(SUPPORTED_LAYER_TYPES)})"
        )
    indices = sorted(by_layer)
    if indices != list(range(indices[-1] + 1)):
        raise UnsupportedGraph(f"the graph holds layers {indices}, not a whole model (a graph break?)")

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    layers: list[LayerNodes] = []
    prev_out: fx.Node | None = None
    for idx in indices:
        nodes = [n for n in by_layer[idx] if n.op != "placeholder"]
        node_set = set(nodes)
        sdpas = [n for n in nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
        if len(sdpas) != 1:
            raise UnsupportedGraph(f"layer {idx}: expected one scaled_dot_product_attention call, found {len(sdpas)}")
        sdpa = sdpas[0]
        q = sdpa.args[0]
        k_src = _through_shape_ops(sdpa.args[1])
        v_src = _through_shape_ops(sdpa.args[2])
        kv_outputs = past_kv = None
        k_upd, v_upd = _cache_update(k_src), _cache_update(v_src)
        if k_upd and v_upd:
            k = k_upd[0]
            kv_outputs = (k_src, v_src)
            if k_upd[1] is not None:
                past_kv = (k_upd[1], v_upd[1])
        else:
            k = k_src
        kv_write = _inplace_write(k_src) or _inplace_write(v_src)
        mask = sdpa_mask(sdpa)
        # The layer's output is the node every later computation reads the residual stream from.
        outs = [
            n
            for n in nodes
            if any(u not in node_set and u.op != "output" for u in n.users)
            and n not in (kv_outputs or ())
            and isinstance(example_value(n), torch.Tensor)
            and example_value(n).dim() == 3
        ]
        if len(outs) != 1:
            raise UnsupportedGraph(f"layer {idx}: cannot identify the residual output ({[n.name for n in outs]})")
        residual_in = prev_out
        if residual_in is None:
            # Layer 0 reads the embeddings: the 3-d tensor from outside the layers that it uses first.
            ins = [
                a
                for n in nodes
                for a in n.all_input_nodes
                if a not in node_set
                and a.op != "placeholder"
                and isinstance(example_value(a), torch.Tensor)
                and example_value(a).dim() == 3
                and example_value(a).shape[-1] == example_value(outs[0]).shape[-1]
                and example_value(a).dtype.is_floating_point
            ]
            if not ins:
                raise UnsupportedGraph("layer 0: cannot identify the input hidden states")
            residual_in = min(ins, key=order.__getitem__)
        layers.append(LayerNodes(idx, nodes, residual_in, outs[0], q, k, sdpa, kv_outputs, past_kv, mask, kv_write))
        prev_out = outs[0]
    seq_len = example_value(layers[0].residual_in).shape[1]
    return LayerMap(
        model_type=model_type or "?",
        layer_type=next(iter(layer_types)),
        layers=layers,
        seq_len=seq_len,
        has_past=layers[0].past_kv is not None,
    )


@dataclasses.dataclass(frozen=True)
class LayerAnalysisFindings(Findings):
    layer_map: LayerMap | None = None

    def details(self) -> dict[str, Any]:
        return self.layer_map.summary() if self.layer_map is not None else {}


class LayerAnalysis(SlimPass):
    """Find each decoder layer's nodes; the other passes read the `LayerMap` (never change it)."""

    name = "layer_analysis"

    def __call__(self, gm: fx.GraphModule, inputs: Any, findings: Any) -> LayerAnalysisFindings:
        lm = analyze(gm)
        kind = "decode/continuation" if lm.has_past else "in-place KV buffers (StaticCache-like)" if lm.static_kv else "prefill"
        return LayerAnalysisFindings(
            False,
            f"{lm.model_type}: {len(lm.layers)} x {lm.layer_type}, seq_len={lm.seq_len}, {kind}, masks={len(lm.masks())}",
            lm,
        )
