"""`slimcompile eval`: RULER-style accuracy of the full model against slim schedules.

Every (task, length) cell runs the same prompts through the full model and through each
slim schedule with greedy decoding, and reports accuracy with a binomial error bar, the
paired disagreement counts (full right / slim wrong and the reverse), and the schedule's
FLOP and KV fractions at that length (`schedule.schedule_cost`).

Two engines:

* ``compiled`` (default): the full model through HF ``model.generate`` and slim through
  ``slimcompile.compile(model, options)`` + ``model.generate`` — the product path. On CPU the
  rewritten graph runs without Inductor (``lower=False``); ``--inductor`` lowers it.
* ``reference``: the plain-PyTorch layer loop of :mod:`slimcompile.reference`, sharing one
  full-model prefill per prompt across all schedules (schedules only recompute the layers
  after their first pruning layer). Same method, much cheaper for sweeps on a CPU.

``--force-drop L`` is a diagnostic (reference engine only): after layer ``L`` it removes
exactly the tokens of the answer-carrying statements (``Sample.needle_spans``) and nothing
else, then decodes greedily. If the answer survives, the question tokens already carried the
needle's information by layer ``L`` (it has "diffused"); if not, pruning at or before ``L``
that drops the needle cannot be saved by later layers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Iterable, Sequence

import torch

# ---------------------------------------------------------------- argument helpers
# One parser for every subcommand: the light helpers live in slimcompile.cli (no torch there).
from slimcompile.cli import (  # noqa: E402,F401  (re-exported: calibrate, demo and tests import them from here)
    DTYPES, MAX_LENGTH, MIN_LENGTH, check_out_path, parse_csv_list, parse_dtype, parse_length, parse_lengths,
    parse_sets, parse_value,
)


def parse_device(text: str | None, flag: str = "--device") -> str:
    """A device string this machine has (default: cuda if available, else cpu); else a ValueError."""
    if text is None:
        return default_device()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{flag}: unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return str(text)
    if dev.type != "cuda":
        raise ValueError(f"{flag}: device {text!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"{flag}: device {text!r}: CUDA is not available on this machine; use cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{flag}: device {text!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return str(text)


def options_error(flag: str, err: Exception) -> ValueError:
    """The SlimOptionError of options given by a command-line flag, its message prefixed with the flag."""
    from slimcompile.options import SlimOptionError

    return SlimOptionError(f"{flag}: {err}")


def model_config(model: str) -> Any:
    """The model's config, read without loading weights (to validate options before a long load)."""
    from slimcompile.inspection import check_config, real_config
    from slimcompile.models import _resolve

    _resolve(model)  # the loader's own errors for an unknown name or a folder without config.json
    cfg, _ = real_config(model)
    check_config(cfg, model)
    return cfg


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def binomial_halfwidth(p: float, n: int, z: float = 1.96) -> float:
    """Half-width of the normal-approximation 95% interval of a proportion (in points of 1)."""
    if n <= 0:
        return float("nan")
    return z * math.sqrt(max(p * (1 - p), 0.0) / n)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95% interval of k successes in n trials (sane at p=0 or 1, unlike the normal one)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def samples_needed(p: float = 0.8, halfwidth: float = 0.05, z: float = 1.96) -> int:
    return math.ceil(z * z * p * (1 - p) / (halfwidth * halfwidth))


def precision_note(n: int) -> str:
    """One honest sentence on what n samples per cell can resolve."""
    hw = 100 * binomial_halfwidth(0.8, n)
    se = 100 * math.sqrt(0.16 / n) if n else float("nan")
    return (
        f"{n} sample(s) per cell: at accuracy 0.8 the 95% interval is about +/-{hw:.0f} points "
        f"(1 standard error {se:.0f} points); +/-5 points at 95% needs ~{samples_needed(0.8, 0.05)} samples "
        f"(~{math.ceil(0.16 / 0.05**2)} gives +/-5 points as one standard error). Paired counts "
        "(full right & slim wrong / the reverse) compare schedules more sharply than the two intervals."
    )


# ---------------------------------------------------------------- the reference engine


@dataclasses.dataclass
class FullTrace:
    """One full-model prefill of one prompt, with what schedules need to resume from any layer."""

    S: int
    cos: torch.Tensor
    sin: torch.Tensor
    hidden: dict[int, torch.Tensor]  # layer -> residual output of that layer [1, S, H]
    queries: dict[int, torch.Tensor]  # layer -> post-RoPE q [1, Hq, S, d]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor


@torch.no_grad()
def trace_full(model, input_ids: torch.Tensor, keep_layers: Iterable[int] = (), keep_all_queries: bool = False) -> FullTrace:
    """Full-model prefill (reference layer loop); keeps hidden states / queries of `keep_layers`."""
    from slimcompile.reference import _attend

    inner = model.model
    b, S = input_ids.shape
    h = inner.embed_tokens(input_ids)
    pos = torch.arange(S, device=input_ids.device)[None].expand(b, S)
    cos, sin = inner.rotary_emb(h, pos)
    want = set(keep_layers)
    hidden, queries, keys, values = {}, {}, [], []
    for li, layer in enumerate(inner.layers):
        h, q, k, v = _attend(layer, h, cos, sin)
        keys.append(k)
        values.append(v)
        if li in want:
            hidden[li] = h
        if li in want or keep_all_queries:
            queries[li] = q
    logits = model.lm_head(inner.norm(h[:, -1:]))
    return FullTrace(S, cos, sin, hidden, queries, keys, values, logits)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def resume_prefill(model, trace: FullTrace, schedule=None, drop: tuple[int, Sequence[int]] | None = None):
    """A reference prefill that reuses `trace` up to the first layer where it differs.

    `schedule`: a LayerSchedule (pruning exactly as :func:`slimcompile.reference.prefill`).
    `drop`: (layer L, token positions): after layer L remove exactly those positions.
    Returns a :class:`slimcompile.reference.ReferenceState`.
    """
    from slimcompile import schedule as sched
    from slimcompile.reference import ReferenceState, _attend, select_kept

    S = trace.S
    events: dict[int, Any] = {}
    if schedule is not None and sched.prunes(schedule, S):
        for i, l in enumerate(schedule.layers):
            events[l] = ("prune", i)
    if drop is not None:
        events[drop[0]] = ("drop", drop[1])
    if not events:
        return ReferenceState(trace.logits, list(trace.keys), list(trace.values), {}, S)
    first = min(events)
    inner = model.model
    if first not in trace.hidden:
        raise ValueError(f"trace lacks layer {first}'s hidden state (pass it in keep_layers)")
    dev = trace.cos.device
    h, cos, sin = trace.hidden[first], trace.cos, trace.sin
    positions = torch.arange(S, device=dev)[None]
    keys, values = list(trace.keys[: first + 1]), list(trace.values[: first + 1])
    q, k = trace.queries.get(first), trace.keys[first]
    kept = {}
    for li in range(first, len(inner.layers)):
        if li > first:
            h, q, k, v = _attend(inner.layers[li], h, cos, sin)
            keys.append(k)
            values.append(v)
        ev = events.get(li)
        if ev is None:
            continue
        if ev[0] == "prune":
            idx = select_kept(schedule, ev[1], q, k)
        else:
            # Positions are original indices; map them to the current (possibly pruned) rows.
            gone = torch.zeros(S, dtype=torch.bool, device=dev)
            gone[torch.as_tensor(list(ev[1]), dtype=torch.long, device=dev)] = True
            idx = torch.nonzero(~gone[positions[0]]).reshape(1, -1)
        h, cos, sin = _gather_rows(h, idx), _gather_rows(cos, idx), _gather_rows(sin, idx)
        positions = torch.gather(positions, 1, idx)
        kept[li] = positions
    logits = model.lm_head(inner.norm(h[:, -1:]))
    return ReferenceState(logits, keys, values, kept, S)


@torch.no_grad()
def greedy_from(model, state, max_new_tokens: int, eos_token_id: int | None, check_every: int = 4) -> list[int]:
    """Greedy decode (batch 1) from a reference state with per-layer KV of any lengths.

    The host looks at the tokens (for EOS) only every `check_every` steps, so on a GPU the steps
    in between queue without a synchronisation; tokens after the first EOS are dropped, so the
    result is the same as checking every step.
    """
    from slimcompile.reference import decode_step

    toks: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        tok = state.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
        if step == max_new_tokens - 1:
            break
        if eos_token_id is not None and (step + 1) % check_every == 0 and bool((torch.cat(toks) == eos_token_id).any()):
            break
        state = decode_step(model, state, tok)
    out = torch.cat(toks).flatten().tolist()
    if eos_token_id is not None and eos_token_id in out:
        out = out[: out.index(eos_token_id) + 1]
    return out


@torch.no_grad()
def force_drop_generate(model, input_ids: torch.Tensor, layer: int, positions: Sequence[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Prefill with exactly `positions` removed after `layer`, then greedy decode; new token ids."""
    trace = trace_full(model, input_ids, keep_layers=[layer])
    state = resume_prefill(model, trace, drop=(layer, positions))
    return greedy_from(model, state, max_new_tokens, eos_token_id)


# ---------------------------------------------------------------- configuration


@dataclasses.dataclass
class Variant:
    """One column of the comparison: the full model, a slim schedule or a forced drop."""

    name: str
    kind: str  # "full" | "slim" | "drop"
    options: dict[str, Any] | None = None
    drop_layer: int | None = None
    schedule: Any = None  # LayerSchedule once resolved


def schedule_name(opts: dict[str, Any]) -> str:
    from slimcompile.options import DEFAULTS

    diff = {k: v for k, v in opts.items() if DEFAULTS.get(k, object()) != v}
    if not diff:
        return "slim(defaults)"
    return "slim(" + ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(diff.items())) + ")"


def build_variants(base_sets: dict[str, Any], schedules: Sequence[str] | None, force_drop: Sequence[int], num_layers: int, include_slim: bool = True) -> list[Variant]:
    from slimcompile.options import SlimOptionError, parse_options

    variants = [Variant("full", "full")]
    raw_list: list[tuple[str, dict[str, Any]]] = []  # (where the options came from, options)
    if include_slim:
        if schedules:
            for s in schedules:
                try:
                    d = json.loads(s)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--schedule must be a JSON object of slim options: {s!r} ({e.msg})") from None
                if not isinstance(d, dict):
                    raise ValueError(f"--schedule must be a JSON object of slim options, got {s!r}")
                raw_list.append((f"--schedule {s}" + (" with --set" if base_sets else ""), {**base_sets, **d}))
        else:
            raw_list.append(("--set", dict(base_sets)))
    seen = set()
    for source, raw in raw_list:
        try:
            opts = parse_options(raw)
            sched = opts.resolve(num_layers) if opts.pruning else None
        except SlimOptionError as e:
            raise options_error(source, e) from None
        d = opts.as_dict()
        name = schedule_name(d)
        if name in seen:
            continue
        seen.add(name)
        variants.append(Variant(name, "slim", d, schedule=sched))
    for L in force_drop:
        if not 0 <= L < num_layers - 1:
            raise ValueError(f"--force-drop {L}: layer must be in 0..{num_layers - 2}")
        variants.append(Variant(f"force-drop@L{L}", "drop", drop_layer=L))
    return variants


# ---------------------------------------------------------------- running


def _new_text(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


class Evaluator:
    """Runs variants over samples with either engine; keeps the model loaded."""

    def __init__(self, model, tokenizer, engine: str = "compiled", inductor: bool = False, eos_token_id: int | None = None):
        if engine not in ("compiled", "reference"):
            raise ValueError(f"unknown engine {engine!r}: 'compiled' or 'reference'")
        self.model, self.tok, self.engine, self.inductor = model, tokenizer, engine, inductor
        gen = getattr(model, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(gen, "eos_token_id", None)
        self.eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        self._compiled_for: str | None = None

    # -- compiled engine: HF generate for full, slimcompile.compile for slim
    def _use(self, variant: Variant) -> None:
        import slimcompile
        from slimcompile.backend import slim_backend

        key = variant.name if variant.kind == "slim" else "full"
        if key == self._compiled_for:
            return
        m = self.model
        if hasattr(m, "slim"):
            m.forward = m.slim.original_forward
            del m.slim
        torch._dynamo.reset()
        if variant.kind == "slim":
            backend = slim_backend if self.inductor else functools.partial(slim_backend, lower=False)
            slimcompile.compile(m, backend=backend, options=variant.options)
        self._compiled_for = key

    def _hf_generate(self, ids: torch.Tensor, max_new: int) -> list[int]:
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=self.eos,
            pad_token_id=self.eos,
        )
        return out[0, ids.shape[1] :].tolist()

    def run_sample(self, sample, variants: Sequence[Variant]) -> dict[str, list[int]]:
        """Generated token ids per variant name for one sample (variants in order)."""
        dev = next(self.model.parameters()).device
        ids = torch.tensor([sample.input_ids], device=dev)
        max_new = sample.max_new_tokens
        out: dict[str, list[int]] = {}
        if self.engine == "reference" or any(v.kind == "drop" for v in variants):
            layers = set()
            for v in variants:
                if v.kind == "slim" and v.schedule is not None:
                    layers.add(v.schedule.layers[0])
                if v.kind == "drop":
                    layers.add(v.drop_layer)
            trace = trace_full(self.model, ids, keep_layers=layers)
            needle = sample.needle_token_indices()
        for v in variants:
            if v.kind == "drop":
                state = resume_prefill(self.model, trace, drop=(v.drop_layer, needle))
                out[v.name] = greedy_from(self.model, state, max_new, self.eos)
            elif self.engine == "reference":
                state = resume_prefill(self.model, trace, v.schedule if v.kind == "slim" else None)
                out[v.name] = greedy_from(self.model, state, max_new, self.eos)
            else:
                self._use(v)
                with torch.no_grad():
                    out[v.name] = self._hf_generate(ids, max_new)
        return out

    def restore(self) -> None:
        m = self.model
        if hasattr(m, "slim"):
            m.forward = m.slim.original_forward
            del m.slim
        self._compiled_for = None


def cost_fractions(variant: Variant, length: int, dims) -> tuple[float, float]:
    from slimcompile.schedule import schedule_cost

    if variant.kind != "slim" or variant.schedule is None:
        return 1.0, 1.0
    c = schedule_cost(variant.schedule, length, dims)
    return c.flop_fraction, c.kv_fraction


def cell_stats(task: str, length: int, variant: str, kind: str, scores: Sequence[float], full: Sequence[float],
               flop: float, kv: float, mean_tokens: float, options=None, drop_layer=None) -> dict[str, Any]:
    """One (task, length, variant) cell: accuracy, error bars and paired counts against `full` (same prompts, same order)."""
    n = len(scores)
    acc = sum(scores) / n if n else float("nan")
    lo, hi = wilson(sum(1 for x in scores if x >= 1.0), n)
    return dict(
        task=task, length=length, variant=variant, kind=kind, n=n, accuracy=acc,
        ci95=binomial_halfwidth(acc, n), wilson_lo=lo, wilson_hi=hi,
        full_right_variant_wrong=sum(1 for a, b in zip(full, scores) if a > b),
        variant_right_full_wrong=sum(1 for a, b in zip(full, scores) if b > a),
        flop_fraction=flop, kv_fraction=kv, mean_prompt_tokens=mean_tokens, options=options, drop_layer=drop_layer,
    )


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from eval runs over disjoint prompts (shards of seeds, tasks or lengths) of the same variants.

    Cells are recomputed from the per-prompt rows, so a cell split over several shards gets one
    accuracy, error bar and paired count over all of its prompts.
    """
    if not results:
        raise ValueError("nothing to merge")
    spec = lambda r: [(v["name"], v["kind"], json.dumps(v.get("options"), sort_keys=True), v.get("drop_layer"))  # noqa: E731
                      for v in r.get("config", {}).get("variants", [])]
    first = spec(results[0])
    for r in results[1:]:
        if spec(r) != first:
            raise ValueError("cannot merge eval results of different variants: "
                             f"{[v[0] for v in first]} vs {[v[0] for v in spec(r)]}")
    variants = {v["name"]: v for v in results[0]["config"]["variants"]}
    costs = {(c["length"], c["variant"]): (c["flop_fraction"], c["kv_fraction"]) for r in results for c in r["cells"]}
    rows: dict[tuple, dict] = {}
    for r in results:
        for s in r["samples"]:
            key = (s["task"], s["length"], s["seed"], s["variant"])
            if key in rows:
                raise ValueError(f"prompt {key[:3]} (task, length, seed) appears in more than one file; shards must not overlap")
            rows[key] = s
    samples = sorted(rows.values(), key=lambda s: (s["length"], s["task"], s["seed"]))
    by_cell: dict[tuple, dict[str, list[dict]]] = {}
    for s in samples:
        by_cell.setdefault((s["length"], s["task"]), {name: [] for name in variants})[s["variant"]].append(s)
    cells = []
    for (length, task), by_v in by_cell.items():
        seeds = [s["seed"] for s in by_v["full"]]
        mean_tokens = sum(s["n_tokens"] for s in by_v["full"]) / max(1, len(seeds))
        full = [s["score"] for s in by_v["full"]]
        for name, v in variants.items():
            if [s["seed"] for s in by_v[name]] != seeds:
                raise ValueError(f"{name} was not run on the same prompts as full for {task} @ {length}")
            flop, kv = costs[(length, name)]
            cells.append(cell_stats(task, length, name, v["kind"], [s["score"] for s in by_v[name]], full, flop, kv,
                                    mean_tokens, v.get("options"), v.get("drop_layer")))
    configs = [r["config"] for r in results]
    config = dict(configs[0], tasks=list(dict.fromkeys(t for c in configs for t in c["tasks"])),
                  lengths=sorted({L for c in configs for L in c["lengths"]}),
                  samples=max(c["n"] for c in cells), seconds=round(sum(c.get("seconds") or 0 for c in configs), 1),
                  merged_from=len(results), seed=None, command=None)
    return {"cells": cells, "samples": samples, "config": config}


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    n_samples: int,
    variants: Sequence[Variant],
    engine: str = "compiled",
    inductor: bool = False,
    seed: int = 0,
    progress=None,
    log=None,
    checkpoint=None,
    tracker=None,
) -> dict[str, Any]:
    """Run every cell; returns {"cells": [...], "samples": [...]} (see `run` for the file format).

    `tracker` (e.g. `ProgressTracker`) gets `start(total, what)` and `advance(n, running_accuracy)`
    after every prompt: generations done of the total and the running accuracy per variant.
    """
    from slimcompile.schedule import ModelDims
    from slimcompile.tasks import make_samples, score

    dims = ModelDims.from_config(model.config, dtype_bytes=next(model.parameters()).element_size())
    ev = Evaluator(model, tokenizer, engine=engine, inductor=inductor)
    per_sample: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    try:
        cell_samples = {(L, t): make_samples(t, L, tokenizer, n_samples, seed=seed) for L in lengths for t in tasks}
        n_prompts = sum(map(len, cell_samples.values()))
        texts: dict[tuple, dict[str, str]] = {}  # (length, task, i) -> variant -> generated text
        running = {v.name: [0.0, 0] for v in variants}  # variant -> [score sum, prompts done]

        def record(key, i: int, sample, outs: dict[str, list[int]]) -> None:
            slot = texts.setdefault((*key, i), {})
            for name, ids in outs.items():
                slot[name] = _new_text(tokenizer, ids)
                running[name][0] += score(sample, slot[name])
                running[name][1] += 1
            if tracker:
                tracker.advance(len(outs), {n: r[0] / r[1] for n, r in running.items() if r[1]})

        variant_outer = engine == "compiled" and not any(v.kind == "drop" for v in variants)
        if tracker:
            # Compiled engine: one generation per prompt and variant; reference: one shared prefill per prompt.
            tracker.start(n_prompts * len(variants), f"{n_prompts} prompts x {len(variants)} variant(s)")
        if variant_outer:
            # Variant-outer order: each schedule is compiled once for the whole run.
            for v in variants:
                t0 = time.perf_counter()
                for key, ss in cell_samples.items():
                    for i, s in enumerate(ss):
                        record(key, i, s, ev.run_sample(s, [v]))
                if log:
                    log(f"{v.name}: {n_prompts} prompts in {time.perf_counter() - t0:.0f}s")
        for length in lengths:
            for task in tasks:
                samples = cell_samples[(length, task)]
                scores: dict[str, list[float]] = {v.name: [] for v in variants}
                t0 = time.perf_counter()
                if not variant_outer:
                    for i, s in enumerate(samples):
                        record((length, task), i, s, ev.run_sample(s, variants))
                for i, s in enumerate(samples):
                    for v in variants:
                        text = texts[(length, task, i)][v.name]
                        sc = score(s, text)
                        scores[v.name].append(sc)
                        per_sample.append(
                            dict(task=task, length=length, n_tokens=s.n_tokens, seed=s.seed, depth=round(s.depth, 4),
                                 variant=v.name, answer=s.answers, output=text, score=sc)
                        )
                mean_tokens = sum(s.n_tokens for s in samples) / max(1, len(samples))
                for v in variants:
                    flop, kv = cost_fractions(v, length, dims)
                    cells.append(cell_stats(task, length, v.name, v.kind, scores[v.name], scores["full"], flop, kv,
                                            mean_tokens, v.options, v.drop_layer))
                if log:
                    accs = "  ".join(f"{v.name}={sum(scores[v.name]) / max(1, len(samples)):.2f}" for v in variants)
                    # In variant-outer order the prompts ran above (timed per variant there).
                    took = "" if variant_outer else f" {time.perf_counter() - t0:.0f}s"
                    log(f"\\[{task} @ {length}] n={len(samples)}{took}  {accs}")
                if progress:
                    progress()
                if checkpoint:
                    checkpoint({"cells": cells, "samples": per_sample, "partial": True})
    finally:
        ev.restore()
    return {"cells": cells, "samples": per_sample}


# ---------------------------------------------------------------- output

CSV_FIELDS = [
    "task", "length", "variant", "kind", "n", "accuracy", "ci95", "wilson_lo", "wilson_hi",
    "full_right_variant_wrong", "variant_right_full_wrong", "flop_fraction", "kv_fraction", "mean_prompt_tokens",
]


def write_outputs(result: dict[str, Any], out: str) -> tuple[str, str]:
    """Write `out` (JSON) and the cell table next to it as CSV; returns both paths."""
    root, ext = os.path.splitext(out)
    csv_path = (root if ext.lower() == ".json" else out) + ".csv"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for c in result["cells"]:
            w.writerow({k: (f"{c[k]:.4f}" if isinstance(c[k], float) else c[k]) for k in CSV_FIELDS})
    return out, csv_path


def format_accuracy(cell: dict[str, Any]) -> str:
    """`0.50 (0.15-0.85)`: accuracy and its Wilson 95% interval (the cell's wilson_lo/wilson_hi)."""
    return f"{cell['accuracy']:.2f} ({cell['wilson_lo']:.2f}-{cell['wilson_hi']:.2f})"


class ProgressTracker:
    """A progress bar on stderr: generations done / total, elapsed, ETA, running accuracy per variant."""

    def __init__(self, console, label: str = "eval"):
        self.console, self.label, self.progress, self.task, self.what = console, label, None, None, ""

    def start(self, total: int, what: str = "") -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.table import Column

        if self.progress is not None:
            self.stop()
        self.progress = Progress(
            TextColumn(f"{self.label}"), BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(),
            # the running accuracies take what is left of the line and are cut there, never the bar
            TextColumn("{task.fields[acc]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=self.console, transient=False,
        )
        self.progress.start()
        from rich.markup import escape

        self.what = escape(what)
        self.task = self.progress.add_task(what, total=total, acc=self.what)

    def advance(self, n: int, accuracy: dict[str, float]) -> None:
        from rich.markup import escape

        short = lambda name: name if len(name) <= 28 else name[:27] + "…"  # noqa: E731
        acc = escape("  ".join(f"{short(k)}={v:.2f}" for k, v in accuracy.items())) if accuracy else self.what
        self.progress.update(self.task, advance=n, acc=acc)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def render_table(result: dict[str, Any], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    cells = result["cells"]
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    lengths = sorted({c["length"] for c in cells})
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    by = {(c["task"], c["length"], c["variant"]): c for c in cells}
    t = Table(title="accuracy (Wilson 95% interval); \\[full right & variant wrong / variant right & full wrong]; "
                    "F = FLOP fraction")
    t.add_column("variant", overflow="fold")
    for L in lengths:
        for task in tasks:
            t.add_column(f"{task}\n@{L}", justify="right")
    t.add_column("mean", justify="right")
    for v in variants:
        row, accs = [escape(v)], []
        for L in lengths:
            for task in tasks:
                c = by.get((task, L, v))
                if c is None:
                    row.append("-")
                    continue
                accs.append(c["accuracy"])
                txt = format_accuracy(c)
                if c["kind"] != "full":
                    txt += f"\n\\[{c['full_right_variant_wrong']}/{c['variant_right_full_wrong']}]"
                if c["kind"] == "slim":
                    txt += f"\nF {c['flop_fraction']:.2f}"
                row.append(txt)
        row.append(f"{sum(accs) / len(accs):.2f}" if accs else "-")
        t.add_row(*row)
    console.print(t)


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from slimcompile.cli import eval_arguments

    eval_arguments(p)


def _validate(args) -> None:
    from slimcompile.tasks import TASKS

    args.task_list = parse_csv_list(args.tasks)
    bad = [t for t in args.task_list if t not in TASKS]
    if bad or not args.task_list:
        raise ValueError(f"--tasks: unknown task(s) {bad}; choose from {','.join(TASKS)}")
    args.length_list = parse_lengths(args.lengths, "--lengths")
    if args.samples < 1:
        raise ValueError(f"--samples: must be >= 1, got {args.samples}")
    args.device = parse_device(args.device)
    parse_dtype(args.dtype)
    check_out_path(args.out)
    args.base_sets = parse_sets(args.sets)
    if args.force_drop and args.engine == "compiled":
        # The forced drop is a reference-loop diagnostic; run the whole comparison in that loop.
        args.engine = "reference"


def _variants(args, num_layers: int) -> list[Variant]:
    return build_variants(args.base_sets, args.schedule, args.force_drop, num_layers, include_slim=not args.no_slim)


def run_merge(args, console) -> int:
    results = []
    for path in args.merge:
        try:
            with open(path) as f:
                results.append(json.load(f))
        except (OSError, ValueError) as e:
            raise ValueError(f"--merge: cannot read eval results from {path}: {e}") from None
        if not isinstance(results[-1], dict) or "samples" not in results[-1] or "config" not in results[-1]:
            raise ValueError(f"--merge: {path} is not the JSON file of a finished `slimcompile eval --out` run")
    result = merge_results(results)
    render_table(result, console)
    console.print(precision_note(result["config"]["samples"]), highlight=False)
    if args.out:
        j, c = write_outputs(result, args.out)
        console.print(f"wrote {j} and {c}", highlight=False)
    return 0


def run(args) -> int:
    from rich.console import Console

    from slimcompile.models import load

    console = Console(stderr=False)
    err = Console(stderr=True)
    if args.merge:
        check_out_path(args.out)
        return run_merge(args, console)
    _validate(args)
    device = args.device
    # Every option set (--set, --schedule, --force-drop) is checked against the model's config
    # before its weights load, so a bad value fails in a second rather than after the load.
    n_layers = model_config(args.model).num_hidden_layers
    variants = _variants(args, n_layers)
    with err.status(f"loading {args.model} ...", spinner="dots") if not args.quiet else contextlib.nullcontext():
        model, tokenizer = load(args.model, dtype=args.dtype, device=device)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; eval needs one")
    if model.config.num_hidden_layers != n_layers:
        variants = _variants(args, model.config.num_hidden_layers)
    ctx = model.config.max_position_embeddings
    too_long = [L for L in args.length_list if L > ctx]
    if too_long:
        err.print(f"[yellow]warning: lengths {too_long} exceed the model's context ({ctx})[/]")
    log = None if args.quiet else (lambda m: err.print(m, highlight=False))
    config = dict(
        model=args.model, tasks=args.task_list, lengths=args.length_list, samples=args.samples,
        engine=args.engine, inductor=args.inductor, device=device, dtype=args.dtype, seed=args.seed,
        variants=[dict(name=v.name, kind=v.kind, options=v.options, drop_layer=v.drop_layer) for v in variants],
        seconds=None, precision_note=precision_note(args.samples),
        command="slimcompile eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else None,
    )
    t0 = time.perf_counter()
    # A partial file holds every finished cell and the config, so a cut-short shard can still be merged.
    checkpoint = (lambda partial: write_outputs({**partial, "config": config}, args.out)) if args.out else None
    tracker = None if args.quiet else ProgressTracker(err)
    try:
        result = evaluate(model, tokenizer, args.task_list, args.length_list, args.samples, variants,
                          engine=args.engine, inductor=args.inductor, seed=args.seed, log=log, checkpoint=checkpoint,
                          tracker=tracker)
    finally:
        if tracker:
            tracker.stop()
    elapsed = time.perf_counter() - t0
    result["config"] = dict(config, seconds=round(elapsed, 1))
    render_table(result, console)
    console.print(precision_note(args.samples), highlight=False)
    console.print(f"engine={args.engine}{' (inductor)' if args.inductor else ''}  device={device}  {elapsed:.0f}s", highlight=False)
    if args.out:
        j, c = write_outputs(result, args.out)
        console.print(f"wrote {j} and {c}", highlight=False)
    return 0

