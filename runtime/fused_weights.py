"""One weight matrix for each layer's q/k/v projections and one for its gate/up projections.

At batch 1 a decode step is a chain of matrix-vector products that read every weight once, and
each product is its own kernel. Reading q, k and v (or gate and up) as one matrix turns three
(two) launches into one and gives each GEMM more rows to spread over the GPU. The fused matrices
are built once, in place: each projection's parameter becomes a row-slice view of the fused
matrix, so no weight is stored twice and the model's own modules (the compiled prefill) read the
same memory as the decode step.

The `decode_fuse` option (`RuntimeConfig.fuse_weights`): "auto" (default: on CUDA), True or False. A layer whose projections are not
plain `nn.Linear` on one device and dtype (quantised, offloaded by accelerate, mixed biases)
stays unfused. Nothing but the parameters holds the fused storage: the decode step finds the
fused matrix by checking that a group's parameters lie back to back in one storage
(`fused_of`), so after `model.to(...)` or a `load_state_dict(assign=True)` that separates them
it simply uses the separate projections again, and no stale copy stays alive.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class FusedLayer:
    """Views of a layer's fused projection weights: q/k/v rows in `qkv`, gate/up rows in `gate_up`."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up: torch.Tensor
    inter: int


def _groups(layer: torch.nn.Module):
    """(q, k, v) and (gate, up) linears of a LLaMA-family layer, or None."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    try:
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        mlp.act_fn  # noqa: B018 (the fused MLP applies it)
    except AttributeError:
        return None
    return qkv, gate_up


def _plain(linears) -> bool:
    if not all(type(m) is torch.nn.Linear for m in linears):
        return False
    ws = [m.weight for m in linears]
    return (
        len({(w.device, w.dtype) for w in ws}) == 1
        and ws[0].device.type != "meta"
        and not any(hasattr(m, "_hf_hook") for m in linears)
        and len({m.bias is None for m in linears}) == 1
    )


def _joined(tensors) -> torch.Tensor | None:
    """`tensors` (weights [n_i, H] or biases [n_i]) as one tensor, when they lie back to back in one storage."""
    t0 = tensors[0]
    row = t0[0].numel() if t0.dim() > 1 else 1
    base, n = t0.untyped_storage().data_ptr(), 0
    for t in tensors:
        if (t.untyped_storage().data_ptr() != base or not t.is_contiguous() or t.shape[1:] != t0.shape[1:]
                or t.data_ptr() != t0.data_ptr() + n * row * t.element_size()):
            return None
        n += t.shape[0]
    return t0.as_strided((n, *t0.shape[1:]), t0.stride())


def _fuse_rows(linears) -> None:
    """Concatenate the weights (and biases) and re-point every parameter at its rows of the result."""
    for attr in ("weight", "bias"):
        parts = [getattr(m, attr) for m in linears]
        if parts[0] is None or _joined(parts) is not None:
            continue
        with torch.no_grad():
            whole = torch.cat(parts)
            row = 0
            for p in parts:
                n = p.shape[0]
                p.data = whole[row : row + n]
                row += n


def fuse_layer(layer: torch.nn.Module) -> bool:
    """Fuse one layer's q/k/v and gate/up weights in place (idempotent); False when they cannot be fused."""
    groups = _groups(layer)
    if groups is None or not all(_plain(g) for g in groups) or groups[1][0].bias is not None:
        return False
    for g in groups:
        _fuse_rows(g)
    return True


def fuse_model(model: torch.nn.Module) -> int:
    """Fuse every decoder layer of `model` (a `*ForCausalLM` with `.model.layers`); returns how many were fused."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return 0 if layers is None else sum(fuse_layer(layer) for layer in layers)


def fused_of(layer: torch.nn.Module) -> FusedLayer | None:
    """Views of the layer's fused weights, if its parameters still lie back to back (see `fuse_layer`)."""
    groups = _groups(layer)
    if groups is None:
        return None
    qkv_l, gu_l = groups
    qkv, gate_up = _joined([m.weight for m in qkv_l]), _joined([m.weight for m in gu_l])
    if qkv is None or gate_up is None or gu_l[0].bias is not None:
        return None
    bias = None
    if qkv_l[0].bias is not None:
        bias = _joined([m.bias for m in qkv_l])
        if bias is None:
            return None
    return FusedLayer(qkv, bias, tuple(m.weight.shape[0] for m in qkv_l), gate_up, gu_l[0].weight.shape[0])
