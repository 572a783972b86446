"""`slimcompile inspect`: show what the slim backend's passes do to a model, without running it.

The model is traced by Dynamo through the slim backend (`lower=False` unless `--lower`), and the
compiled function stops before executing, so the model never runs on data. For a named model or
a folder only the config is read: the trace uses a structurally identical copy (same
architecture, number of layers and GQA ratio; tiny widths), since the passes depend on the
graph's structure, not on its widths. FLOPs and KV bytes are computed from the real config.
With `--prompt-file` the real model is loaded, traced on the tokenized prompt and run once
through `slimcompile.reference.prefill` to show which positions each pruning layer kept.

The JSON object of `--format json` (also `summary.json` of `--dump`) is documented in
docs/inspect.md; `SCHEMA` names its version.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

SCHEMA = "slimcompile.inspect/1"
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_SEQ = 4096
TINY_MODELS = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}
# Widths of the structural copy that is traced (the passes do not depend on them).
TRACE_HEAD_DIM = 8
TRACE_HIDDEN = 32
TRACE_INTERMEDIATE = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slimcompile.cli import inspect_arguments

    inspect_arguments(parser)


# ---------------------------------------------------------------- input parsing

from slimcompile.cli import parse_sets  # noqa: E402,F401  (one --set syntax for every subcommand)


def _known_names() -> str:
    return ", ".join(repr(n) for n in (DEFAULT_MODEL, *TINY_MODELS))


def real_config(model: str) -> tuple[Any, str]:
    """(config, kind) of a model name or folder; kind is 'tiny', 'smollm2' or 'path'."""
    from transformers import AutoConfig

    from slimcompile import models

    if model in TINY_MODELS:
        return models.tiny_config(TINY_MODELS[model]), "tiny"
    if model == DEFAULT_MODEL:
        cached = models.cache_dir(DEFAULT_MODEL)
        if (cached / "config.json").is_file():
            return AutoConfig.from_pretrained(str(cached)), "smollm2"
        gguf = models.gguf_path()  # ModelLoadError (a ValueError) says how to install it
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name), "smollm2"
    path = Path(model).expanduser()
    if not path.exists():
        if os.sep in model or model.startswith((".", "~")) or (os.altsep and os.altsep in model):
            raise FileNotFoundError(
                f"model folder {model!r} does not exist; pass a Hugging Face model folder (with config.json) "
                f"or one of {_known_names()}"
            )
        raise ValueError(f"unknown model name {model!r}; known names: {_known_names()} (or pass a local model folder)")
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{model!r} is not a model folder (no config.json in it); pass a Hugging Face model folder "
            f"or one of {_known_names()}"
        )
    if not os.access(path / "config.json", os.R_OK):
        raise ValueError(f"{str(path / 'config.json')!r} is not readable")
    try:
        return AutoConfig.from_pretrained(str(path)), "path"
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read a model config from {str(path)!r}: {e}") from e


_NEEDED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def check_config(cfg: Any, model: str) -> None:
    """Refuse configs that are not LLaMA-family shaped (the FLOP model and the shrunken copy need these fields)."""
    missing = [k for k in _NEEDED if getattr(cfg, k, None) is None]
    if missing:
        raise ValueError(
            f"{model!r} has model_type {getattr(cfg, 'model_type', '?')!r}, not a LLaMA-family config "
            f"(missing {', '.join(missing)}); the slim backend supports model types {list(SUPPORTED_MODEL_TYPES)}"
        )


def trace_config(cfg: Any) -> Any:
    """A structurally identical config with tiny widths: same layers, architecture and GQA ratio."""
    c = copy.deepcopy(cfg)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % kv == 0:
        c.num_attention_heads, c.num_key_value_heads = heads // kv, 1
    c.head_dim = TRACE_HEAD_DIM
    c.hidden_size = TRACE_HIDDEN
    c.intermediate_size = TRACE_INTERMEDIATE
    return c


def _build_model(cfg: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot build a causal LM of model_type {getattr(cfg, 'model_type', '?')!r}: {e}") from e
    return model.eval()


def _dims_dict(cfg: Any) -> dict[str, Any]:
    from slimcompile.schedule import ModelDims

    d = ModelDims.from_config(cfg)
    return {
        "num_layers": d.num_layers,
        "hidden": d.hidden,
        "intermediate": d.intermediate,
        "heads": d.heads,
        "kv_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "vocab": d.vocab,
    }


# ---------------------------------------------------------------- tracing


class _TraceDone(Exception):
    """Raised by the compiled function instead of running it: the trace is all we want."""


def _inductor_modules() -> set[str]:
    try:
        from torch._inductor.codecache import PyCodeCache
    except ImportError:
        return set()
    files = set()
    for mod in list(PyCodeCache.modules) + list(PyCodeCache.modules_no_attr.values()):
        f = getattr(mod, "__file__", None)
        if f and callable(getattr(mod, "call", None)):  # the wrapper ("output code"), not a kernel module
            files.add(f)
    return files


def trace(model: Any, input_ids: Any, options: Any, lower: bool) -> tuple[list[Any], float, list[str] | None]:
    """Trace `model(input_ids)` through the slim backend; returns (compilations, seconds, inductor files).

    The compiled function raises instead of running, so the model never runs on data.
    """
    import torch

    from slimcompile import backend as slim

    torch._dynamo.reset()
    ind_before = _inductor_modules() if lower else set()
    ours: list[Any] = []

    def inspect_backend(gm, example_inputs):
        before = list(slim.COMPILATIONS)
        slim.slim_backend(gm, example_inputs, options=options, lower=lower)
        ours.extend(c for c in slim.COMPILATIONS if not any(c is b for b in before))

        def stop(*args: Any) -> Any:
            raise _TraceDone

        return stop

    compiled = torch.compile(model, backend=inspect_backend, dynamic=True)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            compiled(input_ids, use_cache=True, logits_to_keep=1)
    except _TraceDone:
        pass
    except torch._dynamo.exc.BackendCompilerFailed as e:
        inner = getattr(e, "inner_exception", None)
        if isinstance(inner, ValueError):  # e.g. an option that does not fit this model
            raise ValueError(str(inner)) from e
        raise
    finally:
        seconds = time.perf_counter() - t0
        torch._dynamo.reset()
    inductor = sorted(_inductor_modules() - ind_before) if lower else None
    return ours, seconds, inductor


def _main_compilation(comps: list[Any]) -> Any:
    for c in comps:
        if c.variant != "unchanged":
            return c
    return comps[0] if comps else None


# ---------------------------------------------------------------- report


def _kept_value(expr: str, seq_symbol: str, seq: int) -> int | None:
    """Evaluate a kept-length expression (str of a SymInt) at S; None if it cannot be evaluated."""
    try:
        import sympy

        sym = sympy.Symbol(seq_symbol, integer=True, positive=True)
        e = sympy.sympify(expr, locals={seq_symbol: sym})
        v = e.subs(sym, seq)
        return int(v) if v.is_number else None
    except Exception:  # noqa: BLE001 - display only
        return None


def _ranges(positions: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for p in positions:
        if out and p == out[-1][1] + 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return out


def build_report(
    *,
    model_name: str,
    real_cfg: Any,
    traced_cfg: Any,
    traced_real_weights: bool,
    options: Any,
    seq: int,
    traced_seq: int,
    comps: list[Any],
    trace_seconds: float,
    lowered: bool,
    inductor_code: list[str] | None,
    kept_positions: dict[int, list[int]] | None = None,
    prompt_file: str | None = None,
    architecture: str | None = None,
    node_targets: dict[str, str] | None = None,
) -> dict[str, Any]:
    from slimcompile import schedule as sched
    from slimcompile.inspect_dump import compilation_summary, jsonable

    dims = sched.ModelDims.from_config(real_cfg, dtype_bytes=2)
    rec = _main_compilation(comps)
    comp = compilation_summary(rec) if rec is not None else None
    variant = rec.variant if rec is not None else "unchanged"
    schedule = options.resolve(dims.num_layers) if options.pruning else None
    cost = sched.schedule_cost(schedule if variant == "slim" else None, seq, dims)
    seq_symbol = comp["layer_map"]["seq_len"] if comp and comp.get("layer_map") else None
    prune = []
    per_layer = cost.tokens
    for p in (comp or {}).get("prune", []):
        entry = dict(p)
        if node_targets is not None:
            entry["inserted_ops"] = [node_targets.get(n, "?") for n in p.get("inserted", [])]
        layer = p["layer"]
        entry["kept_length_at_seq"] = per_layer[layer + 1] if layer + 1 < len(per_layer) else None
        if seq_symbol:
            entry["kept_length_expr_at_seq"] = _kept_value(p["kept_length"], seq_symbol, seq)
        prune.append(entry)
    prune_layers = {p["layer"] for p in prune}
    layers = []
    for lay in (comp or {}).get("layers", []):
        i = lay["layer"]
        layers.append({**lay, "prunes_after": i in prune_layers, "tokens": per_layer[i] if i < len(per_layer) else None})
    fallback = rec.fallback if rec is not None else "no graph reached the backend"
    notes = []
    if len(comps) > 1:
        notes.append(f"{len(comps)} compilations (graph breaks or a padding variant); the report shows the first rewritten one")
    if variant != "slim" and options.pruning and fallback is None:
        notes.append(f"no pruning at S={traced_seq}: prompt shorter than min_prune_len={options.min_prune_len}")
    kept = None
    if kept_positions is not None:
        kept = {
            str(layer): {"count": len(pos), "ranges": _ranges(pos)} for layer, pos in sorted(kept_positions.items())
        }
    report = {
        "schema": SCHEMA,
        "model": {
            "name": model_name,
            "architecture": (getattr(real_cfg, "architectures", None) or [architecture])[0],
            "model_type": getattr(real_cfg, "model_type", None),
            **_dims_dict(real_cfg),
        },
        "traced": {
            "real_weights": traced_real_weights,
            "prompt_file": prompt_file,
            "seconds": trace_seconds,
            "lowered": lowered,
            **{k: v for k, v in _dims_dict(traced_cfg).items() if k in ("hidden", "intermediate", "heads", "kv_heads", "head_dim")},
        },
        "seq": seq,
        "traced_seq": traced_seq,
        "seq_symbol": seq_symbol,
        "options": options.as_dict(),
        "schedule_layers": list(schedule.layers) if schedule else [],
        "variant": variant,
        "fallback": fallback,
        "compilations": len(comps),
        "passes": comp["passes"] if comp else [],
        "layer_map": comp["layer_map"] if comp else None,
        "layers": layers,
        "mask": comp["mask"] if comp else None,
        "prune": prune,
        "guards": comp["guards"] if comp else [],
        "shape_env_guards": comp["shape_env_guards"] if comp else [],
        "per_layer_tokens": list(cost.tokens),
        "flops": {
            "per_layer": list(cost.flops),
            "per_layer_unpruned": list(cost.flops_unpruned),
            "total": sum(cost.flops),
            "total_unpruned": sum(cost.flops_unpruned),
            "fraction": cost.flop_fraction,
        },
        "ideal_speedup": cost.ideal_speedup,
        "kv_bytes": {
            "dtype_bytes": dims.dtype_bytes,
            "per_layer": list(cost.kv_bytes),
            "per_layer_unpruned": list(cost.kv_bytes_unpruned),
            "total": sum(cost.kv_bytes),
            "total_unpruned": sum(cost.kv_bytes_unpruned),
            "fraction": cost.kv_fraction,
        },
        "kept_positions": kept,
        "inductor_code": inductor_code,
        "notes": notes,
    }
    return jsonable(report)


# ---------------------------------------------------------------- text output


class _Out:
    """Tables through `rich` when it is installed, else aligned plain text."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        try:
            from rich.console import Console

            width = None if self.tty else 200
            self._target = stream if self.tty else io.StringIO()
            self.console = Console(file=self._target, width=width, markup=False, highlight=False, emoji=False)
        except ImportError:
            self.console = None

    def _flush(self) -> None:
        if self.console is not None and not self.tty:  # plain text: no padding to the console width
            text = self._target.getvalue()
            self._target.seek(0)
            self._target.truncate()
            self.stream.write("".join(l.rstrip() + "\n" for l in text.splitlines()))

    def line(self, text: str = "") -> None:
        if self.console is not None:
            self.console.print(text, soft_wrap=True)
            self._flush()
        else:
            print(text, file=self.stream)

    def table(
        self,
        title: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        right: Sequence[str] = (),
        wrap: Sequence[str] = (),
    ) -> None:
        rows = [["" if v is None else str(v) for v in r] for r in rows]
        if self.console is not None:
            from rich import box
            from rich.table import Table

            enc = (getattr(self.stream, "encoding", None) or "utf-8").lower().replace("-", "")
            style = box.SIMPLE_HEAD if enc.startswith("utf") else box.ASCII2
            t = Table(title=title, title_justify="left", box=style, pad_edge=False)
            for c in columns:
                t.add_column(
                    c,
                    justify="right" if c in right else "left",
                    overflow="fold" if c in wrap else "ellipsis",
                    no_wrap=c not in wrap,
                )
            for r in rows:
                t.add_row(*r)
            self.console.print(t)
            self._flush()
            return
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]

        def fmt(vals: Sequence[str]) -> str:
            return "  ".join(v.rjust(w) if c in right else v.ljust(w) for v, w, c in zip(vals, widths, columns)).rstrip()

        print(title, file=self.stream)
        print(fmt(columns), file=self.stream)
        print(fmt(["-" * w for w in widths]), file=self.stream)
        for r in rows:
            print(fmt(r), file=self.stream)
        print(file=self.stream)


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f}"


def _gflop(f: int) -> str:
    return f"{f / 1e9:.3f}" if f < 1e11 else f"{f / 1e9:.0f}"


def render_text(report: dict[str, Any], stream: Any) -> None:
    out = _Out(stream)
    m, t = report["model"], report["traced"]
    gqa = m["heads"] // m["kv_heads"] if m["kv_heads"] else "?"
    out.line(
        f"slimcompile inspect: {m['name']} ({m['architecture']}), {m['num_layers']} layers, hidden {m['hidden']}, "
        f"heads {m['heads']}/{m['kv_heads']} (GQA {gqa}), head_dim {m['head_dim']}, intermediate {m['intermediate']}, "
        f"vocab {m['vocab']}"
    )
    what = "the real model" if t["real_weights"] else (
        f"a structural copy (hidden {t['hidden']}, heads {t['heads']}/{t['kv_heads']}, head_dim {t['head_dim']}, "
        f"intermediate {t['intermediate']})"
    )
    out.line(
        f"traced: {what} at prompt length {report['traced_seq']} (symbol {report['seq_symbol']}), "
        f"{'through Inductor' if t['lowered'] else 'lower=False'}, not run; {t['seconds']:.1f} s"
    )
    opts = " ".join(f"{k}={json.dumps(v)}" for k, v in report["options"].items())
    out.line(f"options: {opts}")
    out.line(f"pruning layers: {report['schedule_layers'] or 'none'}")
    fb = report["fallback"]
    out.line(f"result: variant={report['variant']}  fallback: {fb if fb else 'none'}")
    for n in report["notes"]:
        out.line(f"note: {n}")
    out.line()

    if not report["passes"]:
        out.line("Pass pipeline: no pass records (the graph is compiled unchanged; see fallback)")
    else:
        out.table(
            "Pass pipeline",
            ["#", "pass", "changed", "ms", "+nodes", "-nodes", "summary"],
            [
                [i, p["name"], "yes" if p["changed"] else "no", f"{p['seconds'] * 1e3:.1f}", p["nodes_added"], p["nodes_removed"], p["summary"]]
                for i, p in enumerate(report["passes"])
            ],
            right=("#", "ms", "+nodes", "-nodes"),
            wrap=("summary",),
        )
    lm = report["layer_map"]
    if lm:
        title = (
            f"Layer map: {lm['model_type']}, {lm['num_layers']} x {lm['layer_type']}, seq_len={lm['seq_len']}, "
            f"{'decode' if lm['has_past'] else 'prefill'}"
        )
        cols = ["layer", "residual in", "residual out", "q", "k", "sdpa", "kv outputs", "mask", "prune"]
        rows = [
            [
                lay["layer"], lay["residual_in"], lay["residual_out"], lay["q"], lay["k"], lay["sdpa"],
                ", ".join(lay["kv_outputs"] or []) or "-", lay["mask"] or "-", "after" if lay["prunes_after"] else "",
            ]
            for lay in report["layers"]
        ]
        if all(r[7] == "-" for r in rows):  # masks removed: say so once below instead of a column of dashes
            cols.pop(7)
            rows = [r[:7] + r[8:] for r in rows]
        out.table(title, cols, rows, right=("layer",), wrap=tuple(cols))  # narrow terminal: wrap, never cut
    mask = report["mask"]
    if mask and report["variant"] != "unchanged":
        out.line(f"causal mask: {'removed (SDPA is_causal=True)' if mask['removed'] else 'kept: ' + str(mask['kept_reason'])}")
    out.line()

    if report["prune"]:
        out.line("Pruning (nodes inserted after each pruning layer)")
        for p in report["prune"]:
            nodes = p.get("inserted", [])
            ops = p.get("inserted_ops")
            if not ops:
                out.line(f"  after layer {p['layer']} (keep {p['keep']}): {len(nodes)} node(s) inserted: {', '.join(nodes)}")
                ops, nodes = [], []
            arith = [n for n, o in zip(nodes, ops) if o.startswith("operator.") and o != "operator.getitem"]
            rest = [f"{n} ({o})" for n, o in zip(nodes, ops) if n not in arith]
            if ops:
                out.line(f"  after layer {p['layer']} (keep {p['keep']}): {len(nodes)} node(s) inserted")
            if arith:
                out.line(f"    kept-length arithmetic: {', '.join(arith)}")
            if rest:
                out.line(f"    scoring, selection, gathers: {', '.join(rest)}")
            out.line(f"    gathered: {', '.join(p.get('gathered', []))}")
            out.line(f"    blocks: {p['n_blocks']} -> kept {p['kept_blocks']}")
            at = p.get("kept_length_at_seq")
            ev = p.get("kept_length_expr_at_seq")
            check = "" if ev is None or ev == at else f"  (!! the expression gives {ev})"
            out.line(f"    kept length: {p['length_in']} -> {p['kept_length']}   = {at} at S={report['seq']}{check}")
        out.line()
    out.line("Guards (slim)")
    for g in report["guards"] or ["(none)"]:
        out.line(f"  {g}")
    if report["shape_env_guards"]:
        out.line(f"  + {len(report['shape_env_guards'])} symbolic-shape guard(s) in Dynamo's shape environment (JSON: shape_env_guards)")
    out.line()

    if report.get("kept_positions"):
        span = report.get("answer_positions")
        where = f"; the planted answer sits at positions {span[0]}-{span[1]}" if span else ""
        out.line(f"Kept prompt positions (reference prefill of the prompt{where})")
        for layer, k in report["kept_positions"].items():
            rng = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in k["ranges"])
            out.line(f"  after layer {layer}: {k['count']} of {report['seq']}: {rng}")
        out.line()

    fl, kv = report["flops"], report["kv_bytes"]
    runs: list[list[int]] = []  # [first, last] layers with the same token count
    for i, tok in enumerate(report["per_layer_tokens"]):
        if runs and report["per_layer_tokens"][runs[-1][0]] == tok:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    out.table(
        f"Cost at S={report['seq']} (real dims)",
        ["layers", "tokens", "GFLOP/layer", "% unpruned", "KV MiB/layer"],
        [
            [
                f"{a}-{b}" if b > a else a,
                report["per_layer_tokens"][a],
                _gflop(fl["per_layer"][a]),
                f"{100 * fl['per_layer'][a] / fl['per_layer_unpruned'][a]:.0f}",
                _mib(kv["per_layer"][a]),
            ]
            for a, b in runs
        ],
        right=("tokens", "GFLOP/layer", "% unpruned", "KV MiB/layer"),
    )
    out.line(
        f"total: {_gflop(fl['total'])} GFLOP vs {_gflop(fl['total_unpruned'])} unpruned ({100 * fl['fraction']:.1f}%): "
        f"ideal speedup {report['ideal_speedup']:.2f}x"
    )
    out.line(
        f"KV cache ({'bf16' if kv['dtype_bytes'] == 2 else str(kv['dtype_bytes']) + ' bytes/value'}): "
        f"{_mib(kv['total'])} MiB vs {_mib(kv['total_unpruned'])} MiB unpruned ({100 * kv['fraction']:.1f}%)"
    )
    if report.get("inductor_code") is not None:
        out.line(f"Inductor output code: {', '.join(report['inductor_code']) or 'not located (use TORCH_LOGS=output_code)'}")
    if report.get("dump"):
        out.line(f"dump: {report['dump']}")


def _node_targets(record: Any) -> dict[str, str]:
    """Node name -> a short form of its op, in the compilation's final graph."""
    out: dict[str, str] = {}
    gm = getattr(record, "graph", None) if record is not None else None
    if gm is None:
        return out
    for n in gm.graph.nodes:
        if n.op == "call_method":
            out[n.name] = f".{n.target}"
        elif n.op == "call_function":
            t = n.target
            name = getattr(t, "__name__", None) if not hasattr(t, "_schema") else None
            mod = getattr(t, "__module__", "") or ""
            if name and mod in ("_operator", "operator"):
                out[n.name] = f"operator.{name}"
            elif name and mod.startswith("torch"):
                out[n.name] = f"torch.{name}"
            else:
                out[n.name] = str(t)
    return out


# ---------------------------------------------------------------- plot


def render_plot(report: dict[str, Any], path: str, kept: dict[int, list[int]] | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "--plot needs matplotlib, which is not installed; install it with: pip install 'slimcompile[plot]' "
            "(or pip install matplotlib)"
        ) from e
    S = report["seq"]
    tokens = report["per_layer_tokens"]
    has_map = bool(kept)
    rows = len(kept) if has_map else 0
    fig, axes = plt.subplots(
        2 if has_map else 1,
        1,
        figsize=(9, 4 + (1.2 + 0.5 * rows if has_map else 0)),
        squeeze=False,
        gridspec_kw={"height_ratios": [4, 1 + 0.5 * rows]} if has_map else None,
    )
    ax = axes[0][0]
    layers = list(range(len(tokens)))
    ax.bar(layers, [S] * len(tokens), width=0.9, color="#dddddd", label=f"unpruned ({S})")
    ax.bar(layers, tokens, width=0.9, color="#3b75af", label="kept")
    ax.set_xlim(-0.6, len(tokens) - 0.4)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for l in report["schedule_layers"]:
        if report["variant"] == "slim":
            ax.axvline(l + 0.5, color="#c44e52", lw=1, ls="--")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("tokens")
    ax.set_title(
        f"{report['model']['name']}: tokens per layer at S={S} — ideal speedup {report['ideal_speedup']:.2f}x, "
        f"KV {100 * report['kv_bytes']['fraction']:.0f}% of full",
        fontsize=10,
    )
    ax.legend(loc="lower left", fontsize=8)
    if has_map:
        import numpy as np

        ax2 = axes[1][0]
        order = sorted(kept)
        grid = np.zeros((len(order), S))
        for r, layer in enumerate(order):
            grid[r, kept[layer]] = 1.0
        ax2.imshow(grid, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1.2)
        ax2.set_yticks(range(len(order)), [f"after L{l}" for l in order])
        ax2.set_xlabel("prompt position (blue: kept)")
        ax2.set_title("positions kept by each pruning layer (prompt file)", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise ValueError(f"cannot write the plot to {path!r}: {e}") from e
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- prompt file


def _read_prompt(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {path!r} does not exist (or is not a file)")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the prompt file {path!r} as UTF-8 text: {e}") from e


def _tokenize(tokenizer: Any, text: str, vocab: int) -> Any:
    import torch

    if tokenizer is None:  # tiny model without the SmolLM2 tokenizer: bytes as token ids
        return torch.tensor([[b % vocab for b in text.encode("utf-8")]], dtype=torch.long)
    return tokenizer(text, return_tensors="pt").input_ids


# ---------------------------------------------------------------- command


def _status(msg: str) -> None:
    print(f"[slimcompile inspect] {msg}", file=sys.stderr, flush=True)


def inspect_model(args: argparse.Namespace) -> tuple[dict[str, Any], list[Any], dict[int, list[int]] | None]:
    import torch

    from slimcompile.evaluate import MAX_LENGTH, options_error
    from slimcompile.options import SlimOptionError, parse_options

    if args.seq is not None and not 2 <= args.seq <= MAX_LENGTH:
        raise ValueError(f"--seq must be an int from 2 to {MAX_LENGTH}, got {args.seq}")
    try:
        options = parse_options(parse_sets(args.sets))
    except SlimOptionError as e:
        raise options_error("--set", e) from None
    if args.plot and not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}")
    if args.plot:
        render_plot_check()
    real_cfg, kind = real_config(args.model)
    check_config(real_cfg, args.model)
    try:
        schedule = options.resolve(real_cfg.num_hidden_layers) if options.pruning else None  # fail early on bad layers
    except SlimOptionError as e:
        raise options_error("--set", e) from None

    kept: dict[int, list[int]] | None = None
    task = getattr(args, "task", None)
    prompt_source = args.prompt_file
    answer_span = None
    if task:
        from slimcompile.cli import parse_length

        length = parse_length(args.length, "--length")
        prompt_source = f"--task {task} --length {args.length} --seed {args.seed} --depth {args.depth}"
    if args.prompt_file or task:
        from slimcompile import models, reference

        text = _read_prompt(args.prompt_file) if args.prompt_file else None
        _status(f"loading {args.model} (real weights) for the prompt ...")
        model, tokenizer = models.load(args.model, dtype=torch.float32, device="cpu")
        if task:
            from slimcompile.tasks import make_sample

            if tokenizer is None:
                raise ValueError(f"--task needs a tokenizer; {args.model!r} has none (use --prompt-file)")
            sample = make_sample(task, length, tokenizer, args.seed, depth=args.depth)
            ids = torch.tensor([sample.input_ids], dtype=torch.long)
            span = sample.needle_token_indices()
            answer_span = [int(min(span)), int(max(span))] if span else None
        else:
            ids = _tokenize(tokenizer, text, model.config.vocab_size)
        if args.seq is not None and ids.shape[1] > args.seq:
            if answer_span is not None:
                raise ValueError(f"--seq {args.seq} would cut the task prompt of {ids.shape[1]} tokens: use --length")
            ids = ids[:, -args.seq :]
        if ids.shape[1] < 2:
            raise ValueError(f"the prompt file {args.prompt_file!r} has {ids.shape[1]} token(s); need at least 2")
        seq = int(ids.shape[1])
        real_cfg, traced_cfg, real_weights = model.config, model.config, True
    else:
        seq = args.seq or DEFAULT_SEQ
        traced_cfg, real_weights = trace_config(real_cfg), False
        model = _build_model(traced_cfg)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, max(2, min(traced_cfg.vocab_size, 1000)), (1, seq), generator=g)
    _status(f"tracing {args.model} ({real_cfg.num_hidden_layers} layers) at S={seq}{' with Inductor' if args.lower else ''} ...")
    comps, seconds, inductor = trace(model, ids, options, args.lower)
    if prompt_source and schedule is not None:
        rec = _main_compilation(comps)
        if rec is not None and rec.variant == "slim":
            _status("reference prefill of the prompt to find the kept positions ...")
            state = reference.prefill(model, ids, schedule)
            kept = {int(l): [int(p) for p in pos[0].tolist()] for l, pos in state.kept_indices.items()}
    report = build_report(
        model_name=args.model,
        real_cfg=real_cfg,
        traced_cfg=traced_cfg,
        traced_real_weights=real_weights,
        options=options,
        seq=seq,
        traced_seq=seq,
        comps=comps,
        trace_seconds=seconds,
        lowered=args.lower,
        inductor_code=inductor,
        kept_positions=kept,
        prompt_file=prompt_source,
        architecture=type(model).__name__,
        node_targets=_node_targets(_main_compilation(comps)),
    )
    report["answer_positions"] = answer_span
    return report, comps, kept


def render_plot_check() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "--plot needs matplotlib, which is not installed; install it with: pip install 'slimcompile[plot]' "
            "(or pip install matplotlib)"
        ) from e


def run(args: argparse.Namespace) -> int:
    from slimcompile.inspect_dump import dump_compilation

    report, comps, kept = inspect_model(args)
    rec = _main_compilation(comps)
    report["dump"] = str(Path(args.dump)) if args.dump else None
    if args.dump:
        try:
            if rec is not None:
                dump_compilation(rec, args.dump, summary=report, inductor_code=report["inductor_code"])
                for i, c in enumerate(x for x in comps if x is not rec):
                    dump_compilation(c, Path(args.dump) / f"compile_{i + 1}")
            else:
                Path(args.dump).mkdir(parents=True, exist_ok=True)
                (Path(args.dump) / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise ValueError(f"cannot write the dump folder {args.dump!r}: {e}") from e
    if args.plot:
        render_plot(report, args.plot, kept)
    if args.format == "json":
        print(json.dumps(report, indent=1))
    else:
        render_text(report, sys.stdout)
    return 0
