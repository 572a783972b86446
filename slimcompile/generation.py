"""`slimcompile.compile(model, **options)`: make `model(...)` and `model.generate(...)` run slim.

`torch.compile(model)` returns a wrapper whose `generate` still calls the uncompiled
`model.forward`; this helper instead replaces the model's `forward` with a compiled one
(`dynamic=True`, so one graph serves every prompt length), which `generate` then uses for
prefill and decode. `slimcompile.uncompile(model)` undoes it.

Inputs: at a prefill without padding, an all-ones `attention_mask` is dropped, and
`position_ids` / `cache_position` are dropped only when they equal their defaults (checked once
per prefill), so the graph sees a pure causal mask; any other positions are passed on and
honoured (pruning gathers cos/sin; a mask that is then not pure causal runs the exact graph).

Decode (`options.kv`): with "resident" (default) or "offload", an unpadded prefill's per-layer
KV is moved into a `runtime.kv_cache.SlimKVCache`, which `generate` passes back; calls that carry
it run `runtime.decode.StaticDecoder` (static buffers, CUDA-graph replay on CUDA) instead of the
compiled graph. The runtime decoder serves only what it computes exactly; everything else decodes
through transformers' own cache and the compiled graph (what `kv="dynamic"` always does), with
one warning naming the reason:
- a model the runtime does not implement exactly (`runtime.decode_support`), decided once here;
- a generation it cannot serve, decided per `generate` call from the resolved generation config:
  any mode but greedy search and sampling (beam search, assisted / prompt-lookup decoding, ...),
  per-step hidden states or attentions, a cache passed in or a `cache_implementation`;
- a prefill call with padding, hidden states/attentions requested, or a cache that is not
  transformers' default DynamicCache (e.g. a StaticCache).
A forward call that carries a SlimKVCache and asks for something the step cannot give (several
tokens, hidden states, a padding mask) raises a ValueError that says what to use instead.

The hook is the instance's `forward` and `generate`, which every transformers release calls
through `__call__`; the cache keyword (`past_key_values` in 5.17, `cache` later) is read through
`slimcompile.hf_compat`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import weakref
from typing import Any, Iterator

import torch

from slimcompile import hf_attention, hf_compat
from slimcompile.backend import slim_backend, warn_once
from slimcompile.options import SlimOptions, parse_options
from slimcompile.runtime.config import RuntimeConfig
from slimcompile.runtime.decode import StaticDecoder
from slimcompile.runtime.decode_support import overrides_forward, runtime_decode_refusal
from slimcompile.runtime.fused_weights import fuse_model
from slimcompile.runtime.kv_cache import SlimKVCache, drain


def _warn_once(msg: str) -> None:
    warn_once(msg, stacklevel=4)


@dataclasses.dataclass
class SlimHandle:
    """Attached to a model as `model.slim`: what `slimcompile.compile` did and the per-generation facts.

    `decode_refusal` is why the runtime decoder cannot serve this model (None: it can);
    `generation_refusals` is a stack of the running `generate` calls' reasons (None: the runtime
    may serve that generation); `unpadded` remembers, per transformers cache, whether the prompt
    that filled it had no padding (one host sync per generation, at prefill).
    """

    options: SlimOptions
    runtime: RuntimeConfig  # built once from `options`: what the runtime decoder and its caches read
    compiled_forward: Any
    original_forward: Any
    original_generate: Any
    decode_refusal: str | None
    generation_refusals: list[str | None] = dataclasses.field(default_factory=list)
    unpadded: "weakref.WeakKeyDictionary[Any, bool]" = dataclasses.field(default_factory=weakref.WeakKeyDictionary)

    @property
    def runtime_kv(self) -> bool:
        """Whether decode may run in the runtime decoder now (model, options and the current generation)."""
        if self.options.kv == "dynamic" or self.decode_refusal is not None:
            return False
        return not self.generation_refusals or self.generation_refusals[-1] is None

    def call_compiled(self, *args: Any, **kw: Any) -> Any:
        """The compiled forward, called the one way its graphs were traced (other settings would
        miss Dynamo's guards and compile again)."""
        # Lifted float attributes (eps, scaling) otherwise make AOTAutograd restart Dynamo's
        # analysis to specialise them, which doubles the first compile.
        # hf_attention: transformers 5.17 materialises one mask as wide as layer 0's cache; the
        # scoped override slices it to each layer's keys while this call is traced and run.
        with torch._dynamo.config.patch(specialize_float=True), hf_attention.length_aware_sdpa():
            return self.compiled_forward(*args, **kw)

    @contextlib.contextmanager
    def generation(self, refusal: str | None) -> Iterator[None]:
        self.generation_refusals.append(refusal)
        try:
            yield
        finally:
            self.generation_refusals.pop()


def _is_unpadded(handle: SlimHandle, mask: torch.Tensor | None, cache: Any) -> bool:
    if mask is None:
        return True
    if cache is not None:
        known = handle.unpadded.get(cache)
        if known is not None:
            return known
    known = bool(mask.all())
    if cache is not None:
        handle.unpadded[cache] = known
    return known


def _default_positions(value: Any, length: int, past: int) -> bool:
    """Whether `position_ids` [b, L] / [L] or `cache_position` [L] equal past + arange(L)."""
    if not isinstance(value, torch.Tensor) or value.shape[-1] != length:
        return False
    expected = torch.arange(past, past + length, device=value.device, dtype=value.dtype)
    return bool((value == expected).all())


def _generation_refusal(model: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    """Why the runtime decoder cannot serve this `generate` call (None: it can).

    Positive: only greedy search and sampling with transformers' default cache are served."""
    from transformers.generation.configuration_utils import GenerationMode

    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config" and hasattr(config, k)})
    if kwargs.get("custom_generate") is not None:
        return "a custom_generate decoding loop"
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"generation mode {mode.value!r} (the runtime decoder serves greedy search and sampling)"
    if config.output_hidden_states or config.output_attentions:
        return "per-step hidden states or attentions were requested (output_hidden_states / output_attentions)"
    _, cache = hf_compat.cache_in(kwargs)
    if cache is not None:
        return f"a cache was passed in ({type(cache).__name__})"
    if getattr(config, "cache_implementation", None) is not None:
        return f"cache_implementation={config.cache_implementation!r}"
    if config.use_cache is False:
        return "use_cache=False"
    return None


def _call_refusal(kw: dict[str, Any], cache: Any) -> str | None:
    """Why a fresh prefill call's KV cannot move into the runtime decoder (None: it can)."""
    from transformers.cache_utils import DynamicCache

    if kw.get("output_hidden_states") or kw.get("output_attentions"):
        return "hidden states or attentions were requested"
    if cache is not None and type(cache) is not DynamicCache:
        return f"the call carries a {type(cache).__name__}, not transformers' default DynamicCache"
    return None


def _decode(handle: SlimHandle, model: torch.nn.Module, cache: SlimKVCache, input_ids: Any, kw: dict[str, Any]) -> Any:
    """One generated token through the runtime decoder (`kv='resident'` / `'offload'`)."""
    kv = handle.options.kv
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
        raise ValueError(
            f"kv={kv!r} decodes one token per sequence per call (input_ids [batch, 1]); got {shape}. "
            "Pass kv='dynamic' to slimcompile.compile for multi-token continuation or inputs_embeds"
        )
    if kw.get("output_hidden_states") or kw.get("output_attentions"):
        raise ValueError(f"kv={kv!r} decode does not return hidden states or attentions; pass kv='dynamic' for them")
    mask = kw.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError(f"kv={kv!r} decode serves unpadded sequences only; this attention_mask has zeros (pass kv='dynamic')")
    positions = kw.get("position_ids")
    if positions is None and kw.get("cache_position") is not None:
        positions = kw["cache_position"].view(1, -1)
    if cache.decoder is None:
        cache.decoder = StaticDecoder(model, cache, input_ids.shape[0], handle.runtime)
    logits = cache.decoder.step(input_ids, positions)
    return hf_compat.causal_lm_output(logits, cache)


def _has_kv(cache: Any) -> bool:
    return cache is not None and len(getattr(cache, "layers", ())) > 0 and getattr(cache.layers[0], "keys", None) is not None


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
    "offload", the model is checked once for the runtime decoder (`runtime.decode_support`); a
    model it does not implement exactly decodes with `kv="dynamic"` and one warning. On CUDA
    (option `decode_fuse`), each layer's q/k/v and gate/up weights are first moved, in place, into
    one matrix per group (same values; runtime/fused_weights.py). `backend` may be a
    `functools.partial(slim_backend, lower=False)` to skip Inductor (tests).
    """
    opts = parse_options(options, **kwargs)
    if opts.pruning:
        opts.resolve(model.config.num_hidden_layers)
    uncompile(model)
    runtime = RuntimeConfig.from_options(opts)
    refusal = runtime_decode_refusal(model) if opts.kv != "dynamic" else None
    if refusal is None and opts.kv != "dynamic" and overrides_forward(model):
        refusal = "model.forward is overridden on the instance (the runtime decoder would bypass it)"
    if refusal is not None:
        _warn_once(f"slimcompile: kv={opts.kv!r} falls back to kv='dynamic' (transformers' cache through the "
                   f"compiled graph) for this model: {refusal}")
    elif opts.kv != "dynamic":
        runtime.attention_impl(next(model.parameters()).device)  # decode_attention="triton" off CUDA: refused now
    if refusal is None and opts.kv != "dynamic" and runtime.fuse_weights(next(model.parameters()).device):
        # Before tracing, so the compiled prefill is built on the fused layout it will keep.
        fuse_model(model)
    original = model.forward
    original_generate = model.generate
    compiled = torch.compile(original, backend=backend, options=opts, dynamic=dynamic)
    handle = SlimHandle(opts, runtime, compiled, original, original_generate, refusal)

    @functools.wraps(original)
    def forward(*args: Any, **kw: Any) -> Any:
        cache_key, cache = hf_compat.cache_in(kw)
        input_ids = args[0] if args else kw.get("input_ids")
        if isinstance(cache, SlimKVCache):
            return _decode(handle, model, cache, input_ids, kw)
        past = 0 if cache is None else cache.get_seq_length()
        unpadded = _is_unpadded(handle, kw.get("attention_mask"), cache)
        if unpadded:
            kw.pop("attention_mask", None)
            if past == 0 and isinstance(input_ids, torch.Tensor):
                for key in ("position_ids", "cache_position"):
                    if kw.get(key) is not None and _default_positions(kw[key], input_ids.shape[-1], 0):
                        kw.pop(key)
        out = handle.call_compiled(*args, **kw)
        if not (handle.runtime_kv and past == 0 and unpadded and isinstance(input_ids, torch.Tensor)):
            return out
        out_cache = hf_compat.output_cache(out)
        if not _has_kv(out_cache):
            return out
        why = _call_refusal(kw, cache)
        if why is not None:
            _warn_once(f"slimcompile: this call decodes through transformers' cache (kv='dynamic'): {why}")
            return out
        hf_compat.set_output_cache(out, SlimKVCache.from_prefill(drain(out_cache), input_ids.shape[1], runtime))
        return out

    @functools.wraps(original_generate)
    def generate(*args: Any, **kw: Any) -> Any:
        why = None
        if opts.kv != "dynamic" and refusal is None:
            why = _generation_refusal(model, kw)
            if why is not None:
                _warn_once(f"slimcompile: this generation decodes with kv='dynamic' instead of kv={opts.kv!r}: {why}")
        with handle.generation(why):
            return original_generate(*args, **kw)

    model.forward = forward
    model.generate = generate
    model.slim = handle
    return model


def uncompile(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `slimcompile.compile(model)`: the original `forward` and `generate` come back (fused
    weights stay fused: they are the same values, as row views of one matrix). A no-op otherwise."""
    handle = getattr(model, "slim", None)
    if isinstance(handle, SlimHandle):
        model.forward = handle.original_forward
        model.generate = handle.original_generate
        for name in ("forward", "generate"):
            # The originals were bound methods of the class: drop the instance attributes entirely.
            if getattr(vars(model).get(name), "__func__", None) is getattr(type(model), name, None):
                del vars(model)[name]
        del model.slim
    return model
