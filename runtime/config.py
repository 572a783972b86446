"""The runtime's own configuration: what the decode step, the KV caches, offload and the block copy
need, built once per compiled model (`slimcompile.compile`, via `RuntimeConfig.from_options`) and
passed down. The runtime reads no environment variable and never sees the user's option schema
(slimcompile/options.py is the one source of names, defaults, help and validation; these fields
mirror the options of the same names, already validated).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    kv: str  # "resident" or "offload" (the runtime's caches; "dynamic" never reaches them)
    decode_reserve: int  # rows reserved for generated tokens; buffers grow by this much
    cuda_graphs: bool  # replay the decode step as a CUDA graph (CUDA only)
    decode_attention: str  # "auto", "triton", "sdpa" or "matmul"
    decode_compile: bool | str  # "auto" (on CUDA), True, False: Inductor regions of the decode step
    decode_fuse: bool | str  # "auto" (on CUDA), True, False: fused q/k/v and gate/up weights
    # kv="offload"
    sink: int
    window: int
    block_size: int
    unit_size: int
    decode_budget: int
    swap_threshold: float
    offload_summary: str  # "unitmean", "mean" or "minmax"
    offload_score: str  # "max" or "softmax"
    offload_select: str  # "lagged" or "current"
    copy_programs: int  # programs of the block copy kernel; 0: one per block and kv head

    @classmethod
    def from_options(cls, options: Any, **overrides: Any) -> "RuntimeConfig":
        """The fields of the same names from validated options (any object with those attributes)."""
        values = {f.name: getattr(options, f.name) for f in dataclasses.fields(cls)}
        values.update(overrides)
        return cls(**values)

    def compile_regions(self, device: torch.device) -> bool:
        """Whether the decode step's and offload's per-layer regions are compiled with Inductor."""
        return on_device(self.decode_compile, device)

    def fuse_weights(self, device: torch.device) -> bool:
        """Whether each layer's q/k/v and gate/up weights are fused for decode."""
        return on_device(self.decode_fuse, device)

    def attention_impl(self, device: torch.device) -> str:
        """The decode attention implementation for `device` ("auto" resolved)."""
        from slimcompile.runtime import decode_attention

        v = self.decode_attention
        if v == "auto":
            return "triton" if device.type == "cuda" and decode_attention.HAS_TRITON else "sdpa"
        if v == "triton" and (device.type != "cuda" or not decode_attention.HAS_TRITON):
            raise ValueError(f"decode_attention='triton' needs triton and a CUDA device (this model is on "
                             f"{device.type}); use 'auto', 'sdpa' or 'matmul'")
        return v


def on_device(switch: bool | str, device: torch.device) -> bool:
    """An "auto" (on CUDA) / True / False switch, resolved for `device`."""
    return device.type == "cuda" if switch == "auto" else bool(switch)
