"""The state one backend compilation shares between passes: options, fake mode, findings."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx as fx

from slimcompile.options import LayerSchedule, SlimOptions


@dataclasses.dataclass
class SlimContext:
    options: SlimOptions
    fake_mode: Any = None
    schedule: LayerSchedule | None = None  # set once the layer count is known
    layer_map: Any = None
    # Placeholders holding the user's 2-d padding mask; may be assumed all-ones when the
    # compiled callable checks that at run time (`assume_no_padding`).
    padding_inputs: set[fx.Node] = dataclasses.field(default_factory=set)
    assume_no_padding: bool = False
    mask_removed: bool = False
    mask_kept_reason: str | None = None
    prune: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one entry per pruning layer
    guards: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
