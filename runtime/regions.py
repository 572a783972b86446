"""Per-layer decode work compiled once with Inductor and shared by every layer.

The decode step (runtime/decode.py) and offload's block selection (runtime/offload.py) run the
same small function for each of the model's layers. Compiled with `torch.compile` (static
shapes), each becomes a few fused kernels instead of dozens of tiny ones; Dynamo inlines the
layer's modules, so one graph serves all layers of one shape. Inside the decode step's CUDA
graph the compiled kernels are captured like any others. Whether they are compiled is the
`decode_compile` option (`RuntimeConfig.compile_regions`: on CUDA by default).
"""

from __future__ import annotations

import warnings

import torch


class CompiledRegion:
    """A per-layer function compiled once with Inductor and reused by every layer (the layer is an
    argument; Dynamo inlines its modules, so layers of one shape share a graph). Falls back to
    eager, with a warning, if compilation fails."""

    def __init__(self, fn, compiled: bool):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=False, fullgraph=True) if compiled else None

    def __call__(self, *args):
        if self.compiled is None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except Exception as e:  # an architecture Inductor cannot take: decode stays correct, only slower
            warnings.warn(f"slimcompile: decode step runs eagerly, compiling {self.fn.__name__} failed: "
                          f"{type(e).__name__}: {str(e)[:200]}", stacklevel=2)
            self.compiled = None
            return self.fn(*args)
