"""`slimcompile.compile(model, **options)`: make `model(...)` and `model.generate(...)` run slim.

`torch.compile(model)` returns a wrapper whose `generate` still calls the uncompiled
`model.forward`; this helper instead replaces the model's `forward` with a compiled one
(`dynamic=True`, so one graph serves every prompt length), which `generate` then uses for
prefill and decode. It also drops inputs that equal their defaults when the prompt has no
padding (an all-ones `attention_mask`, and `position_ids`/`cache_position` derived from it),
so the graph sees a pure causal mask; the padding check runs once per generation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from slimcompile.backend import slim_backend
from slimcompile.options import SlimOptions, parse_options


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
    beyond its depth raise `ValueError` here, not at the first call). `backend` may be a
    `functools.partial(slim_backend, lower=False)` to skip Inductor (tests).
    """
    opts = parse_options(options, **kwargs)
    if opts.pruning:
        opts.resolve(model.config.num_hidden_layers)
    if hasattr(model, "slim"):
        model.forward = model.slim.original_forward
    original = model.forward
    compiled = torch.compile(original, backend=backend, options=opts, dynamic=dynamic)

    @functools.wraps(original)
    def forward(*args: Any, **kw: Any) -> Any:
        if _unpadded(kw):
            for key in ("attention_mask", "position_ids", "cache_position"):
                kw.pop(key, None)
        # Lifted float attributes (eps, scaling) otherwise make AOTAutograd restart Dynamo's
        # analysis to specialise them, which doubles the first compile.
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kw)

    model.forward = forward
    model.slim = SlimHandle(opts, compiled, original)
    return model
