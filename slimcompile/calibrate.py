"""`slimcompile calibrate`: find a model's retrieval layers and choose a pruning schedule.

1. Probe: on a few retrieval prompts per (task, length), run the full model layer by layer
   (the reference loop) and measure, per layer, the share of the observation window's
   softmax attention (post-RoPE q/k of that layer, `runtime.scoring_torch.attention_token_scores`)
   that lands on the planted answer's tokens, and how often the answer's blocks would survive
   pruning after that layer at each candidate keep ratio.
2. Grid: single-prune schedules after the top retrieval layers x keep ratios, scored for
   accuracy against the full model on the same prompts (greedy decoding, reference engine).
3. Choice: every task within `--max-task-drop` points (3) of full and the average within
   `--max-mean-drop` points (1), at the largest FLOP reduction (FLOP fraction at the longest
   calibration length). Written as ``{"options": {...}, "evidence": {...}}``, which
   ``backend="slim"`` accepts as ``options={"options_file": PATH}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from typing import Any

import torch

from slimcompile.evaluate import (
    ProgressTracker,
    build_variants,
    check_out_path,
    evaluate,
    model_config,
    options_error,
    parse_csv_list,
    parse_device,
    parse_dtype,
    parse_lengths,
    parse_sets,
    precision_note,
)
from slimcompile.cli import parse_tasks

RETRIEVAL_TASKS = ("passkey", "needle", "multikey")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from slimcompile.cli import calibrate_arguments

    calibrate_arguments(p)


@torch.no_grad()
def layer_needle_mass(model, sample, window: int, sink: int, block_size: int, ratios: list[float]) -> tuple[list[float], list[dict[float, bool]]]:
    """Per layer: attention mass of the window's queries on the needle tokens, and for each ratio
    whether every needle token would be kept by pruning after that layer (attention/max scoring)."""
    from slimcompile.reference import _attend
    from slimcompile.runtime import scoring_torch
    from slimcompile.schedule import num_blocks, ratio_blocks

    dev = next(model.parameters()).device
    ids = torch.tensor([sample.input_ids], device=dev)
    needle = torch.tensor(sample.needle_token_indices(), device=dev)
    inner = model.model
    S = ids.shape[1]
    h = inner.embed_tokens(ids)
    pos = torch.arange(S, device=dev)[None]
    cos, sin = inner.rotary_emb(h, pos)
    n = num_blocks(S, sink, window, block_size)
    masses, kept = [], []
    for layer in inner.layers:
        h, q, k, _ = _attend(layer, h, cos, sin)
        tok = scoring_torch.attention_token_scores(q[:, :, -window:], k, q.shape[-1] ** -0.5)[0]
        masses.append(float(tok[needle].sum()))
        row = {}
        if n > 0:
            blocks = tok[sink : sink + n * block_size].reshape(n, block_size).amax(-1)[None]
            for r in ratios:
                keep = ratio_blocks(n, r)  # the backend's count (at least one block)
                idx = scoring_torch.select_token_indices(blocks, S, sink, block_size, keep)[0]
                row[r] = bool(torch.isin(needle, idx).all())
        kept.append(row)
    return masses, kept


def choose(candidates: list[dict[str, Any]], max_task_drop: float, max_mean_drop: float) -> tuple[dict[str, Any] | None, bool]:
    """The qualifying candidate with the smallest FLOP fraction; else the least lossy (not qualified)."""
    ok = [c for c in candidates if c["max_task_drop"] <= max_task_drop + 1e-9 and c["mean_drop"] <= max_mean_drop + 1e-9]
    if ok:
        return min(ok, key=lambda c: (c["flop_fraction"], c["mean_drop"])), True
    if not candidates:
        return None, False
    return min(candidates, key=lambda c: (c["mean_drop"], c["max_task_drop"], c["flop_fraction"])), False


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from slimcompile.models import load
    from slimcompile.options import SlimOptionError, parse_options
    from slimcompile.schedule import ModelDims, schedule_cost
    from slimcompile.tasks import TASKS, make_samples

    console = Console()
    err = Console(stderr=True)
    # Every flag is validated, and the option sets of the grid against the model's config,
    # before the weights load.
    lengths = parse_lengths(args.lengths, "--lengths")
    tasks = parse_tasks(args.tasks, TASKS)
    try:
        ratios = [float(x) for x in parse_csv_list(args.keep_ratios)]
    except ValueError:
        raise ValueError(f"--keep-ratios must be numbers, got {args.keep_ratios!r}") from None
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ValueError(f"--keep-ratios must lie in (0, 1], got {args.keep_ratios!r}")
    for flag, value in (("--samples", args.samples), ("--probe-samples", args.probe_samples), ("--top-layers", args.top_layers)):
        if value < 1:
            raise ValueError(f"{flag}: must be >= 1, got {value}")
    for flag, value in (("--max-task-drop", args.max_task_drop), ("--max-mean-drop", args.max_mean_drop)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag}: must be a number of points >= 0, got {value}")
    device = parse_device(args.device)
    parse_dtype(args.dtype)
    check_out_path(args.out)
    base = parse_sets(args.sets)
    for key in ("prune_layers", "keep_ratio", "keep_tokens"):
        if key in base:
            raise ValueError(f"--set {key}=...: calibrate chooses {key} itself")
    try:
        base_opts = parse_options(base)
        n_cfg = model_config(args.model).num_hidden_layers
        for r in ratios:  # the grid's option sets (an options_file among --set could clash with them)
            parse_options({**base, "prune_layers": [0], "keep_ratio": r}).resolve(n_cfg)
    except SlimOptionError as e:
        raise options_error("--set", e) from None
    if base_opts.scoring != "attention":
        err.print("[yellow]note: the probe measures softmax attention; the grid uses scoring="
                  f"{base_opts.scoring} as given[/]")
    t0 = time.perf_counter()
    log = (lambda m: None) if args.quiet else (lambda m: err.print(m, highlight=False))

    with err.status(f"loading {args.model} ...", spinner="dots") if not args.quiet else contextlib.nullcontext():
        model, tok = load(args.model, dtype=args.dtype, device=device)
    if tok is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; calibrate needs one")
    n_layers = model.config.num_hidden_layers
    o = base_opts

    # 1. probe
    masses: list[list[float]] = []
    uniform: list[float] = []
    kept_hits: list[list[dict[float, bool]]] = []
    tracker = None if args.quiet else ProgressTracker(err, "1/2 probe")
    if tracker:
        tracker.start(len(lengths) * len(tasks) * args.probe_samples, "attention probe, layer by layer")
    try:
        for L in lengths:
            for task in tasks:
                for s in make_samples(task, L, tok, args.probe_samples, seed=args.seed):
                    m, k = layer_needle_mass(model, s, o.window, o.sink, o.block_size, ratios)
                    masses.append(m)
                    kept_hits.append(k)
                    uniform.append(len(s.needle_token_indices()) / s.n_tokens)
                    if tracker:
                        tracker.advance(1, {})
            log(f"probe @ {L}: {len(masses)} prompts, {time.perf_counter() - t0:.0f}s")
    finally:
        if tracker:
            tracker.stop()
    mean_mass = [sum(m[l] for m in masses) / len(masses) for l in range(n_layers)]
    mean_uniform = sum(uniform) / len(uniform)
    kept_rate = {
        r: [sum(1 for k in kept_hits if k[l].get(r)) / len(kept_hits) for l in range(n_layers)] for r in ratios
    }
    prunable = [l for l in range(n_layers - 1)]
    top = sorted(prunable, key=lambda l: -mean_mass[l])[: args.top_layers]
    top = sorted(top)

    pt = Table(title="attention mass of the last-window queries on the answer's tokens, per layer")
    pt.add_column("layer", justify="right")
    pt.add_column("mass", justify="right")
    pt.add_column("x uniform", justify="right")
    for r in ratios:
        pt.add_column(f"answer kept @{r}", justify="right")
    for l in range(n_layers):
        mark = " *" if l in top else ""
        pt.add_row(f"{l}{mark}", f"{mean_mass[l]:.3f}", f"{mean_mass[l] / mean_uniform:.1f}",
                   *[f"{kept_rate[r][l]:.2f}" for r in ratios])
    console.print(pt)

    # 2. grid
    grid = [{**base, "prune_layers": [l], "keep_ratio": r} for l in top for r in ratios]
    variants = build_variants({}, [json.dumps(g) for g in grid], [], n_layers)
    tracker = None if args.quiet else ProgressTracker(err, "2/2 grid")
    try:
        result = evaluate(model, tok, tasks, lengths, args.samples, variants, engine="reference", seed=args.seed,
                          log=log, tracker=tracker)
    finally:
        if tracker:
            tracker.stop()
    dims = ModelDims.from_config(model.config)
    by = {(c["task"], c["length"], c["variant"]): c for c in result["cells"]}
    candidates = []
    for v in variants[1:]:
        per_task = {}
        for task in tasks:
            accs = [by[(task, L, v.name)]["accuracy"] for L in lengths]
            full = [by[(task, L, "full")]["accuracy"] for L in lengths]
            per_task[task] = (sum(accs) / len(accs), sum(full) / len(full))
        drops = {t: 100 * (f - a) for t, (a, f) in per_task.items()}
        mean_drop = sum(drops.values()) / len(drops)
        cost = schedule_cost(v.schedule, max(lengths), dims)
        candidates.append(dict(
            name=v.name, options=v.options, prune_layer=v.schedule.layers[0], keep_ratio=v.options["keep_ratio"][0],
            accuracy={t: a for t, (a, _) in per_task.items()}, full_accuracy={t: f for t, (_, f) in per_task.items()},
            task_drop=drops, max_task_drop=max(drops.values()), mean_drop=mean_drop,
            flop_fraction=cost.flop_fraction, kv_fraction=cost.kv_fraction,
        ))
    chosen, met = choose(candidates, args.max_task_drop, args.max_mean_drop)

    gt = Table(title=f"candidate schedules (accuracy averaged over lengths {lengths}; FLOP/KV fraction at {max(lengths)})")
    gt.add_column("prune after", justify="right")
    gt.add_column("keep", justify="right")
    for t in tasks:
        gt.add_column(t, justify="right")
    gt.add_column("mean drop (pts)", justify="right")
    gt.add_column("FLOPs", justify="right")
    gt.add_column("KV", justify="right")
    full_row = candidates[0]["full_accuracy"] if candidates else {}
    gt.add_row("full", "1.0", *[f"{full_row.get(t, float('nan')):.2f}" for t in tasks], "-", "1.00", "1.00")
    for c in sorted(candidates, key=lambda c: (c["mean_drop"], c["flop_fraction"])):
        star = " <" if c is chosen else ""
        gt.add_row(f"L{c['prune_layer']}", f"{c['keep_ratio']}", *[f"{c['accuracy'][t]:.2f}" for t in tasks],
                   f"{c['mean_drop']:+.1f}{star}", f"{c['flop_fraction']:.2f}", f"{c['kv_fraction']:.2f}")
    console.print(gt)

    n_per_task = args.samples * len(lengths)
    point = 100 / n_per_task
    resolution = (
        f"{n_per_task} samples per task: one sample is {point:.1f} points, so the {args.max_task_drop:g}-point task rule "
        + ("only admits schedules that lose no sample; " if point > args.max_task_drop else "")
        + "differences inside the binomial error bars are not distinguishable. " + precision_note(args.samples)
    )
    console.print(resolution, highlight=False)
    if chosen is None:
        raise ValueError("no candidate schedules (check --top-layers / --keep-ratios)")
    final = {**parse_options(chosen["options"]).as_dict()}
    depth_fraction = (chosen["prune_layer"] + 0.5) / n_layers
    evidence = dict(
        model=args.model, num_layers=n_layers, lengths=lengths, tasks=tasks, samples=args.samples,
        probe_samples=args.probe_samples, criterion=dict(max_task_drop=args.max_task_drop, max_mean_drop=args.max_mean_drop),
        criterion_met=met, resolution_note=resolution,
        needle_mass_per_layer=[round(x, 5) for x in mean_mass], uniform_mass=round(mean_uniform, 5),
        answer_kept_rate={str(r): [round(x, 3) for x in v] for r, v in kept_rate.items()},
        retrieval_layers=top, chosen=chosen["name"],
        depth_fraction_hint=round(depth_fraction, 4), candidates=candidates, seconds=round(time.perf_counter() - t0, 1),
    )
    with open(args.out, "w") as f:
        json.dump({"options": final, "evidence": evidence}, f, indent=1)
    if met:
        console.print(f"[green]chosen[/]: prune after layer {chosen['prune_layer']} keeping {chosen['keep_ratio']} "
                      f"-> {chosen['flop_fraction']:.2f} of the FLOPs at {max(lengths)} tokens", highlight=False)
    else:
        console.print(f"[yellow]no candidate met the criterion; wrote the least lossy one ({chosen['name']}, "
                      f"mean drop {chosen['mean_drop']:.1f} points) — check the evidence before using it[/]", highlight=False)
    console.print(f"wrote {args.out}  (use: torch.compile(model, backend='slim', options={{'options_file': {args.out!r}}}))",
                  highlight=False)
    return 0

