"""Write what one backend compilation did to a folder: per-pass code, diffs and a JSON summary.

Used by `slimcompile inspect --dump DIR` and by the backend when the environment variable
`SLIM_DEBUG=DIR` is set (every compilation of the program goes to `DIR/compile_N/`).

Layout of one dump folder (NN is the pass's position in the pipeline, from 00):

    NN_<pass>.before.py   graph code the pass received
    NN_<pass>.after.py    graph code the pass left
    NN_<pass>.diff        unified diff before -> after; empty iff the pass left the code unchanged
    graph.py              code of the final graph handed to Inductor (or run as Python)
    summary.json          `compilation_summary(record)`, or inspect's full report
    inductor.txt          only where Inductor ran: where its output code is (or how to get it)
    inductor/             copies of Inductor's output code files, when they were found

A compilation that fell back to "unchanged" has no pass records: only graph.py and summary.json.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

SCHEMA = "slimcompile.compilation/1"

INDUCTOR_HOWTO = (
    "To see Inductor's generated code, run the program with TORCH_LOGS=output_code (the log names the "
    "file: 'Output code written to: ...'), or run `slimcompile inspect --lower --dump DIR`, which copies it "
    "into DIR/inductor/."
)


def jsonable(x: Any) -> Any:
    """A JSON-safe copy of `x`: SymInts, sympy expressions, fx nodes and the like become strings."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = sorted(x, key=str) if isinstance(x, (set, frozenset)) else x
        return [jsonable(v) for v in items]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if hasattr(x, "name") and type(x).__name__ == "Node":  # fx.Node
        return x.name
    return str(x)


def pass_diff(name: str, before: str, after: str, index: int = 0) -> str:
    stem = f"{index:02d}_{name}"
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"{stem}.before.py",
            tofile=f"{stem}.after.py",
        )
    )


def pass_summary(rec: Any) -> dict[str, Any]:
    """One PassRecord without its code and details (those are in the dump files / other keys)."""
    return {
        "name": rec.name,
        "changed": rec.changed,
        "summary": rec.summary,
        "seconds": rec.seconds,
        "nodes_added": rec.nodes_added,
        "nodes_removed": rec.nodes_removed,
    }


def _shape_env_guards(ctx: Any) -> list[str]:
    """The symbolic-shape guards Dynamo's shape environment holds (what the compiled graph is valid for)."""
    env = getattr(getattr(ctx, "fake_mode", None), "shape_env", None)
    if env is None:
        return []
    out = []
    for g in getattr(env, "guards", []) or []:
        expr = getattr(g, "expr", g)
        s = str(expr)
        if s not in out:
            out.append(s)
    return out


def compilation_summary(record: Any) -> dict[str, Any]:
    """The JSON-safe summary of one `slimcompile.backend.Compilation` (docs/inspect.md: "compilation")."""
    ctx = record.context
    lm = getattr(ctx, "layer_map", None)
    lm_summary = lm.summary() if lm is not None else None
    return jsonable(
        {
            "schema": SCHEMA,
            "variant": record.variant,
            "fallback": record.fallback,
            "options": record.options.as_dict(),
            "schedule_layers": list(ctx.schedule.layers) if getattr(ctx, "schedule", None) else None,
            "passes": [pass_summary(r) for r in record.records],
            "layer_map": {k: v for k, v in lm_summary.items() if k != "layers"} if lm_summary else None,
            "layers": lm_summary["layers"] if lm_summary else [],
            "mask": {"removed": ctx.mask_removed, "kept_reason": ctx.mask_kept_reason},
            "prune": list(ctx.prune),
            "guards": list(ctx.guards),
            "shape_env_guards": _shape_env_guards(ctx),
            "notes": list(getattr(ctx, "notes", []) or []),
        }
    )


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def dump_compilation(
    record: Any,
    directory: str | os.PathLike,
    summary: dict[str, Any] | None = None,
    inductor_code: Iterable[str] | None = None,
) -> Path:
    """Write one compilation's artefacts under `directory` (created if needed); returns the folder.

    `summary`: the object written to summary.json (default: `compilation_summary(record)`).
    `inductor_code`: paths of Inductor output code files, when the caller captured them; the
    files are copied to `inductor/` and listed in inductor.txt. Pass `None` when Inductor did
    not run (no inductor.txt) and an empty list when it ran but the code was not found.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(record.records):
        stem = f"{i:02d}_{rec.name}"
        _write(folder / f"{stem}.before.py", rec.code_before)
        _write(folder / f"{stem}.after.py", rec.code_after)
        _write(folder / f"{stem}.diff", pass_diff(rec.name, rec.code_before, rec.code_after, i))
    graph = getattr(record, "graph", None)
    if graph is not None:
        _write(folder / "graph.py", graph.code if hasattr(graph, "code") else str(graph.graph))
    if inductor_code is not None:
        paths = [p for p in inductor_code if p and os.path.isfile(p)]
        lines = []
        if paths:
            (folder / "inductor").mkdir(exist_ok=True)
            lines.append("Inductor output code of this compilation (copied to inductor/):")
            for j, p in enumerate(paths):
                dest = folder / "inductor" / f"output_code_{j}{Path(p).suffix or '.py'}"
                shutil.copyfile(p, dest)
                lines.append(f"  {p} -> inductor/{dest.name}")
        else:
            lines.append("Inductor ran, but its output code file could not be located from this process.")
        lines.append(INDUCTOR_HOWTO)
        _write(folder / "inductor.txt", "\n".join(lines) + "\n")
    data = summary if summary is not None else compilation_summary(record)
    _write(folder / "summary.json", json.dumps(jsonable(data), indent=1) + "\n")
    return folder
