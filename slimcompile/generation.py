"""`slimcompile.compile(model, **options)`: make `model(...)` and `model.generate(...)` run slim.

`torch.compile(model)` returns a wrapper whose `generate` still calls the uncompiled
`model.forward`; this helper instead replaces the model's `forward` with a compiled one
(`dynamic=True`, so one graph serves every prompt length), which `generate` then uses for
prefill and decode. It also drops inputs that equal their defaults when the prompt has no
padding (an all-ones `attention_mask`, and `position_ids`/`cache_position` derived from it),
so the graph sees a pure causal mask; the padding check runs once per generation.

Decode (`options.kv`): with "resident" (default) or "offload", an unpadded prefill's per-layer
KV is moved into a `runtime.kv_cache.SlimKVCache`, which `generate` then passes back; calls that
carry it run `runtime.decode.StaticDecoder` (static buffers, CUDA-graph replay on CUDA) instead
of the compiled graph. With "dynamic", or a padded batch, decode stays on transformers'
DynamicCache through the compiled decode graph.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from transformers.modeling_outputs import CausalLMOutputWithPast

from slimcompile.backend import slim_backend
from slimcompile.options import SlimOptions, parse_options
from slimcompile.runtime.decode import StaticDecoder
from slimcompile.runtime.fused_weights import fuse_enabled, fuse_model
from slimcompile.runtime.kv_cache import SlimKVCache, drain


@dataclasses.dataclass
class SlimHandle:
    """Attached to a model as `model.slim`: the options, the compiled forward and the original."""

    options: SlimOptions
    compiled_forward: Any
    original_forward: Any


def _unpadded(kwargs: dict[str, Any]) -> bool:
    mask = kwargs.get("attention_mask")
    if mask is None:
        return True
    cache = kwargs.get("past_key_values")
    known = getattr(cache, "_slim_unpadded", None) if cache is not None else None
    if known is None:
        known = bool(mask.all())  # one host sync per generation, at prefill
        if cache is not None:
            try:
                cache._slim_unpadded = known
            except AttributeError:
                pass
    return known


def _has_kv(out: Any) -> bool:
    cache = getattr(out, "past_key_values", None)
    return cache is not None and len(getattr(cache, "layers", ())) > 0 and getattr(cache.layers[0], "keys", None) is not None


def _decode(model: torch.nn.Module, cache: SlimKVCache, input_ids: torch.Tensor | None, opts: SlimOptions) -> Any:
    """One generated token through the runtime decoder (`kv='resident'` / `'offload'`)."""
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(
            f"kv={opts.kv!r} decodes one token per sequence per call (input_ids [batch, 1]); got {shape}. "
            "Use kv='dynamic' for multi-token continuation (e.g. assisted generation)"
        )
    if cache.decoder is None:
        cache.decoder = StaticDecoder(model, cache, input_ids.shape[0], use_graph=opts.cuda_graphs)
    logits = cache.decoder.step(input_ids)
    return CausalLMOutputWithPast(logits=logits, past_key_values=cache)


def compile(
    model: torch.nn.Module,
    *,
    dynamic: bool = True,
    options: dict | None = None,
    backend: Any = slim_backend,
    **kwargs: Any,
) -> torch.nn.Module:
    """Compile `model` with the slim backend in place and return it.

    Options are validated now against the model (unknown keys, bad values, layer indices
    beyond its depth raise `ValueError` here, not at the first call). With `kv` "resident" or
    "offload" on CUDA (`SLIM_DECODE_FUSE`), each layer's q/k/v and gate/up weights are first
    moved, in place, into one matrix per group (same values; runtime/fused_weights.py). `backend` may be a
    `functools.partial(slim_backend, lower=False)` to skip Inductor (tests).
    """
    opts = parse_options(options, **kwargs)
    if opts.pruning:
        opts.resolve(model.config.num_hidden_layers)
    if opts.kv != "dynamic" and fuse_enabled(next(model.parameters()).device):
        # Before tracing, so the compiled prefill is built on the fused layout it will keep.
        fuse_model(model)
    if hasattr(model, "slim"):
        model.forward = model.slim.original_forward
    original = model.forward
    compiled = torch.compile(original, backend=backend, options=opts, dynamic=dynamic)

    @functools.wraps(original)
    def forward(*args: Any, **kw: Any) -> Any:
        cache = kw.get("past_key_values")
        input_ids = args[0] if args else kw.get("input_ids")
        if isinstance(cache, SlimKVCache):
            return _decode(model, cache, input_ids, opts)
        fresh = cache is None or cache.get_seq_length() == 0
        unpadded = _unpadded(kw)
        if unpadded:
            for key in ("attention_mask", "position_ids", "cache_position"):
                kw.pop(key, None)
        # Lifted float attributes (eps, scaling) otherwise make AOTAutograd restart Dynamo's
        # analysis to specialise them, which doubles the first compile.
        with torch._dynamo.config.patch(specialize_float=True):
            out = compiled(*args, **kw)
        if opts.kv != "dynamic" and fresh and unpadded and input_ids is not None and _has_kv(out):
            out.past_key_values = SlimKVCache.from_prefill(drain(out.past_key_values), input_ids.shape[1], opts)
        return out

    model.forward = forward
    model.slim = SlimHandle(opts, compiled, original)
    return model
