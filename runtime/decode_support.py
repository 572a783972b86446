"""Which models the runtime decoder (`kv="resident"` / `kv="offload"`) may serve: a positive check.

The decode step in `runtime/decode.py` does not run the model's forward: it calls the layers'
submodules itself (input norm, q/k/v projections, RoPE, grouped attention over its own buffers,
o_proj, post-attention norm, MLP, final norm, lm_head). That is exactly the model's function only
for a model built from the very modules it assumes, wired the way it assumes. A look-alike that
differs in one detail (q/k norms, a sliding window, multipliers, soft-capping, fused projections,
a position-dependent RoPE, a forward hook) would be decoded silently wrong, so the check is
positive: every module the step bypasses must be an instance of exactly the transformers class it
was written for (not a subclass, not a class of the same name), carry no hooks or instance-level
`forward`, and the config must hold only values the step implements. Anything else returns the
reason, and `slimcompile.compile` then decodes that model through transformers' DynamicCache and
the compiled graph (`kv="dynamic"`), with one warning naming the reason. Unknown is unsupported.
"""

from __future__ import annotations

import torch

# RoPE variants whose inv_freq does not depend on the sequence length (the step computes cos/sin
# for one position from the model's own rotary module; "dynamic" and "longrope" rescale with the
# length seen, which a replayed CUDA graph would freeze).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _families() -> dict[type, dict[str, type]]:
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    def family(m):
        prefix = "Llama" if m is llama else "Qwen2"
        return {name: getattr(m, prefix + name) for name in
                ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")}

    return {llama.LlamaForCausalLM: family(llama), qwen2.Qwen2ForCausalLM: family(qwen2)}


def _exact(module: object, cls: type, where: str) -> str | None:
    if type(module) is not cls:
        return f"{where} is {type(module).__module__}.{type(module).__qualname__}, not transformers' {cls.__name__}"
    return None


def _recording_only(hook: object) -> bool:
    """transformers' own output-capturing hooks: installed once per model, they only record outputs
    while a `output_hidden_states`/`output_attentions` call is running (which decodes elsewhere)."""
    return getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def overrides_forward(module: torch.nn.Module) -> bool:
    """An instance-level `forward` other than the class's own method bound to this module (code
    that saved and restored `module.forward` leaves the latter behind, which changes nothing)."""
    own = vars(module).get("forward")
    if own is None:
        return False
    return not (getattr(own, "__func__", None) is getattr(type(module), "forward", None)
                and getattr(own, "__self__", None) is module)


def _hooks(module: torch.nn.Module) -> bool:
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(not _recording_only(h) for h in hooks)


def runtime_decode_refusal(model: torch.nn.Module) -> str | None:
    """None when the runtime decode step computes exactly `model`'s one-token forward; else why not."""
    families = _families()
    fam = families.get(type(model))
    if fam is None:
        known = ", ".join(c.__name__ for c in families)
        return f"the runtime decoder implements {known} exactly; this model is {type(model).__name__}"
    if model.training:
        return "the model is in training mode (dropout); call model.eval()"
    inner = getattr(model, "model", None)
    checks = [
        _exact(inner, fam["Model"], "model.model"),
        _exact(getattr(inner, "embed_tokens", None), torch.nn.Embedding, "embed_tokens"),
        _exact(getattr(inner, "norm", None), fam["RMSNorm"], "the final norm"),
        _exact(getattr(inner, "rotary_emb", None), fam["RotaryEmbedding"], "rotary_emb"),
        _exact(getattr(model, "lm_head", None), torch.nn.Linear, "lm_head"),
    ]
    if (reason := next((c for c in checks if c), None)) is not None:
        return reason
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE_TYPES:
        return f"RoPE type {rope!r} rescales with the sequence length (the runtime decoder supports {list(STATIC_ROPE_TYPES)})"
    cfg = model.config
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
                "final_logit_softcapping", "attn_logit_softcapping"):
        value = getattr(cfg, key, None)
        if value not in (None, 1, 1.0):
            return f"config.{key}={value!r} is not part of the {fam['ForCausalLM'].__name__} computation the runtime decoder implements"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module forward hooks are registered (the runtime decoder would bypass them)"
    for name, module in model.named_modules():
        if _hooks(module):
            return f"module {name or 'model'} has forward hooks (the runtime decoder would bypass them)"
        if module is not model and overrides_forward(module):
            return f"module {name} has an instance-level forward override"
    for i, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        checks = [
            _exact(layer, fam["DecoderLayer"], f"layer {i}"),
            _exact(attn, fam["Attention"], f"layer {i}'s attention"),
            _exact(mlp, fam["MLP"], f"layer {i}'s MLP"),
            _exact(getattr(layer, "input_layernorm", None), fam["RMSNorm"], f"layer {i}'s input norm"),
            _exact(getattr(layer, "post_attention_layernorm", None), fam["RMSNorm"], f"layer {i}'s post-attention norm"),
        ]
        if (reason := next((c for c in checks if c), None)) is not None:
            return reason
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if (reason := _exact(getattr(attn, proj, None), torch.nn.Linear, f"layer {i}'s {proj}")) is not None:
                return reason
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if (reason := _exact(getattr(mlp, proj, None), torch.nn.Linear, f"layer {i}'s {proj}")) is not None:
                return reason
        window = getattr(attn, "sliding_window", None)
        if window is not None:
            return f"layer {i} uses sliding-window attention (window {window}); the runtime decoder attends to every held token"
        if not getattr(attn, "is_causal", True):
            return f"layer {i}'s attention is not causal"
    return None
