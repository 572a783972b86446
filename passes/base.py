"""The pass protocol: typed inputs in, typed findings out, one record per pass.

A pass is a small object (vLLM's `InductorPass`, one module per pass as in
torch/_inductor/fx_passes):

    class MyPass(SlimPass):
        name = "my_pass"
        requires = ("layer_analysis",)      # findings it reads (the manager checks they exist)
        def __call__(self, gm, inputs, findings) -> MyFindings: ...

- `inputs` is a frozen `PassInputs`: what the caller decided before the pipeline (options,
  fake mode, padding inputs, the resolved schedule). Passes never write it.
- `findings` is a read-only view of the findings of the passes named in `requires`. A pass
  returns its own frozen `Findings`; it never changes another pass's findings (or the graph
  analysis they hold). The manager stores them, so there is one reporting channel: the
  compilation record's `findings` (tools read `PassRecord.details`, derived from them).
- `uuid()` identifies the pass's code and name, for cache keys.
- Raising `UnsupportedGraph` means "this graph cannot be rewritten"; the backend falls back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import sys
from typing import Any, ClassVar, Mapping

import torch.fx as fx


@dataclasses.dataclass(frozen=True)
class PassInputs:
    """What every pass may read; fixed before the pipeline runs."""

    options: Any  # SlimOptions
    fake_mode: Any = None
    schedule: Any = None  # LayerSchedule resolved once from the graph's layer count, or None (no pruning)
    schedule_error: Exception | None = None  # the options do not fit this graph's layers (token_prune raises it)
    # Placeholders holding the user's 2-d padding mask; may be assumed all-ones when the
    # compiled callable checks that at run time (`assume_no_padding`).
    padding_inputs: frozenset = frozenset()
    assume_no_padding: bool = False


@dataclasses.dataclass(frozen=True)
class Findings:
    """What a pass found or did. Subclasses add typed fields and `details()` for tools."""

    changed: bool
    summary: str

    def details(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("changed", "summary")
        }


class FindingsView(Mapping):
    """Read-only access to the findings a pass declared in `requires`."""

    def __init__(self, store: Mapping[str, Findings], allowed: tuple[str, ...], who: str):
        self._store, self._allowed, self._who = store, allowed, who

    def __getitem__(self, name: str) -> Findings:
        if name not in self._allowed:
            raise KeyError(f"pass {self._who!r} reads {name!r} findings without declaring it in `requires`")
        return self._store[name]

    def __iter__(self):
        return (n for n in self._allowed if n in self._store)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class SlimPass:
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()

    def __call__(self, gm: fx.GraphModule, inputs: PassInputs, findings: Mapping[str, Findings]) -> Findings:
        raise NotImplementedError

    def uuid(self) -> str:
        """A hash of the pass's module source and name (vLLM's `InductorPass.uuid`)."""
        src = inspect.getsource(sys.modules[type(self).__module__])
        return hashlib.sha256(f"{self.name}\0{src}".encode()).hexdigest()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "seq_nr", "source_fn_stack")


def copy_provenance(src: fx.Node, nodes: Any) -> None:
    """Give every inserted node in `nodes` the provenance metadata of the node it derives from
    (`nn_module_stack`, `stack_trace`, `seq_nr`, `source_fn_stack`, where `src` has them)."""
    for n in nodes:
        if not isinstance(n, fx.Node):
            continue
        for key in PROVENANCE_KEYS:
            if key in src.meta and key not in n.meta:
                value = src.meta[key]
                n.meta[key] = dict(value) if isinstance(value, dict) else value
