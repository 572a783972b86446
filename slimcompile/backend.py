"""The `slim` torch.compile backend: run the pass pipeline on the Dynamo graph, then Inductor.

Registered under the `torch_dynamo_backends` entry point, so `torch.compile(model,
backend="slim", options={...})` works without importing slimcompile. A graph the analysis
does not recognise is compiled unchanged, with one warning saying why; a graph it
recognises but cannot prune is compiled with the exact rewrites only, also with a warning.

Padded prompts. A graph with a 2-D `attention_mask` input is lowered twice in one backend
call: the pruned variant (which assumes the mask is all ones) and the exact unpruned variant.
The function returned to Dynamo is a small dispatcher that checks `mask.all()` per call and
runs one of them. Dynamo calls a backend's result unboxed, `compiled_fn(*args)`
(torch/_dynamo/output_graph.py, the `compiled_fn(*args, **kwargs)` calls after
`call_user_compiler`), and that is also the only convention `compile_fx` honours for a Dynamo
graph: `aot_module_simplified` returns `forward(*runtime_args)` (torch/_functorch/
aot_autograd.py, the non-`GmWrapper` branch), yet `simple_wraps` (functools.wraps, which
copies `__dict__`) and `torch._dynamo.disable` (torch/_dynamo/backends/common.py) copy the
inner runtime wrapper's `_boxed_call = True` onto it. The dispatcher used to trust that flag
and call `fn([args])`, so Inductor's `call(args)` unpacked a one-element list: `ValueError:
not enough values to unpack` on the CPU, `IndexError` in `copy_misaligned_inputs` on CUDA
(issue 14.5). Both variants were broken that way; only the exact one is reached in practice,
because `slimcompile.compile` drops an all-ones mask. The variants are called `fn(*args)` now.
Compiling the two variants one after the other under Dynamo's tracing context is fine: what
the second compile overwrites there (`fw_metadata`, `output_strides`, `params_flat`) is read
only during a compile, never by the returned functions, and both variants' shape guards land
in the one shape env Dynamo installs guards from (tests/test_inductor.py checks both variants
against eager / the reference through Inductor).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from slimcompile.options import SlimOptionError, SlimOptions, parse_options
from slimcompile.passes.base import PassInputs
from slimcompile.passes.layer_analysis import UnsupportedGraph, example_value
from slimcompile.passes.pipeline import (  # noqa: F401  (copy_graph_module, run_passes: public here too)
    CompileContext,
    PassRecord,
    copy_graph_module,
    padding_inputs,
    run_passes,
)

log = logging.getLogger("slimcompile")


@dataclasses.dataclass
class Compilation:
    """What one backend call did: the pass records (each with its findings), the read-only
    context view over inputs and findings, the variant and why it fell back, the final graph."""

    options: SlimOptions
    records: list[PassRecord]
    context: CompileContext
    fallback: str | None  # why the graph was compiled without (some) rewrites
    variant: str  # "slim", "exact" (no pruning) or "unchanged"
    graph: fx.GraphModule | None = None

    @property
    def findings(self) -> dict:
        """Each pass's typed findings, by pass name."""
        return self.context.findings


# The last compilations of this process: a debug aid (`slimcompile inspect`, SLIM_DEBUG). To
# receive a backend's own records, pass `on_compile=callback` (see `slim_backend`).
COMPILATIONS: collections.deque[Compilation] = collections.deque(maxlen=64)
_warned: set[str] = set()


def warn_once(msg: str, stacklevel: int = 3) -> None:
    """One warning per message per process (the backend's and `slimcompile.compile`'s fallbacks)."""
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=stacklevel)


_warn_once = warn_once


def graph_fake_mode(gm: fx.GraphModule) -> Any:
    """The fake mode of Dynamo's example values (not the tracing context's): the passes
    re-propagate shapes under it, and its shape env is the one Dynamo installs guards from."""
    return next((v.fake_mode for n in gm.graph.nodes if isinstance(v := example_value(n), FakeTensor)), None)


_padding_inputs = padding_inputs


def _inductor(gm: fx.GraphModule, example_inputs: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _call(fn: Callable, args: tuple) -> Any:
    # Unboxed, as Dynamo calls a backend's result. Never dispatch on `_boxed_call`: compile_fx's
    # result for a Dynamo graph carries that flag (copied by functools.wraps) but is unboxed.
    return fn(*args)


def _unchanged(options: SlimOptions, fake_mode: Any) -> CompileContext:
    return CompileContext(PassInputs(options, fake_mode))


def _compile_variant(gm, example_inputs, options, fake_mode, assume_no_padding, lower, on_compile=None) -> tuple[Callable, Compilation]:
    try:
        new_gm, pm, ctx = run_passes(gm, options, fake_mode, assume_no_padding)
        variant, fallback = ("slim" if ctx.prune else "exact"), None
    except UnsupportedGraph as e:
        # Recognised-but-unprunable graphs keep the exact rewrites; unrecognised ones stay unchanged.
        reasons = [str(e)]
        if options.pruning:
            exact = dataclasses.replace(options, enabled=False)
            try:
                new_gm, pm, ctx = run_passes(gm, exact, fake_mode, False)
                variant = "exact"
            except UnsupportedGraph as e2:
                new_gm, pm, ctx, variant = gm, None, _unchanged(options, fake_mode), "unchanged"
                if str(e2) not in reasons:  # the exact retry often fails for the same reason
                    reasons.append(str(e2))
        else:
            new_gm, pm, ctx, variant = gm, None, _unchanged(options, fake_mode), "unchanged"
        fallback = "; and ".join(reasons)
        what = "without pruning" if variant == "exact" else "unchanged (plain Inductor)"
        _warn_once(f"slimcompile: compiling this graph {what}: {fallback}")
    record = Compilation(options, pm.records if pm else [], ctx, fallback, variant, new_gm)
    COMPILATIONS.append(record)
    if on_compile is not None:
        on_compile(record)
    _maybe_dump(record)
    return (_inductor(new_gm, example_inputs) if lower else new_gm.forward), record


def slim_backend(
    gm: fx.GraphModule,
    example_inputs: list,
    options: dict | SlimOptions | None = None,
    lower: bool = True,
    on_compile: Callable[[Compilation], Any] | None = None,
    **_: Any,
):
    """torch.compile backend entry: `torch.compile(model, backend="slim", options={...})`.

    `lower=False` runs the rewritten FX graph as Python instead of lowering it through
    Inductor: the same rewrite semantics in seconds, which pass tests use.
    `on_compile(record)` receives the `Compilation` of every variant this call compiles (e.g.
    `functools.partial(slim_backend, on_compile=records.append)`): the records without reading
    the process-wide `COMPILATIONS` deque, which stays as a debug aid.
    """
    try:
        opts = options if isinstance(options, SlimOptions) else parse_options(options)
    except SlimOptionError as exc:
        bad = exc  # `exc` is unbound after the except block; the closure keeps `bad`
        # Raised here, Dynamo would wrap it in BackendCompilerFailed (a RuntimeError); raised by the
        # compiled function, it reaches the caller as the ValueError the README promises.
        def refuse(*args: Any) -> Any:
            raise bad

        return refuse
    fake_mode = graph_fake_mode(gm)
    padding = _padding_inputs(gm)
    if not (opts.pruning and padding):
        compiled, _ = _compile_variant(gm, example_inputs, opts, fake_mode, False, lower, on_compile)
        return compiled

    # The prompt may carry a padding mask. Prune under the assumption that it is all ones and
    # check that per call; a padded batch runs the exact (unpruned) variant. Both are compiled
    # now, inside Dynamo's compile context, so their shape guards are installed.
    fast, _ = _compile_variant(gm, example_inputs, opts, fake_mode, True, lower, on_compile)
    exact, _ = _compile_variant(
        gm, example_inputs, dataclasses.replace(opts, enabled=False), fake_mode, False, lower, on_compile
    )
    mask_positions = [i for i, _ in padding]

    def run(*args: Any) -> Any:
        if all(bool(args[i].all()) for i in mask_positions):
            return _call(fast, args)
        _warn_once(
            "slimcompile: padded batch (attention_mask has zeros): running the exact unpruned graph; "
            "pruning supports unpadded prompts only"
        )
        return _call(exact, args)

    return run


def _maybe_dump(record: Compilation) -> None:
    """With SLIM_DEBUG=DIR set, write the pass artefacts of every compilation under DIR."""
    root = os.environ.get("SLIM_DEBUG")
    if not root:
        return
    from slimcompile.inspect_dump import dump_compilation

    dump_compilation(record, os.path.join(root, f"compile_{next(_dump_counter)}"))


_dump_counter = itertools.count()
