"""`slimcompile demo`: one long-context retrieval prompt, plain model vs `backend="slim"`.

Loads the model, builds a RULER-style prompt with a planted answer (default: a needle in
~2K tokens of Python documentation, where the default model is competent), and runs it twice: with the plain model (eager, HF
`generate`) and with `slimcompile.compile(model, **options)`. For each it prints the answer,
whether it contains the planted answer, time-to-first-token (a prefill forward with
`logits_to_keep=1`) and end-to-end `generate` time as the median and min-max of `--repeats`
timed runs after the first calls (which compile, for slim: their time and the number of graphs
compiled are printed, and the timed runs are checked to compile nothing), tokens kept per layer
and the KV-cache bytes of the returned cache; then the speedups and the memory saving.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import torch

from slimcompile import hf_compat
from slimcompile.evaluate import model_config, options_error, parse_device, parse_dtype, parse_length, parse_sets


def add_arguments(p: argparse.ArgumentParser) -> None:
    from slimcompile.cli import demo_arguments

    demo_arguments(p)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn, *a, **kw) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    _sync(device)
    return out, time.perf_counter() - t0


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(l.keys, l.values) for l in layers if getattr(l, "keys", None) is not None]
    return [(k, v) for k, v in cache]  # legacy tuple cache


def kv_bytes(cache) -> tuple[int, list[int]]:
    """(total bytes, per-layer token counts) of the tokens a returned KV cache holds."""
    from slimcompile.runtime.kv_cache import SlimKVCache

    if isinstance(cache, SlimKVCache):  # its buffers also have spare rows: count held tokens
        counts = [layer.get_seq_length() for layer in cache.layers]
        return sum(n * layer.row_bytes() for n, layer in zip(counts, cache.layers)), counts
    layers = _cache_layers(cache)
    total = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
    return total, [int(k.shape[-2]) for k, _ in layers]


def _short(answer: str, limit: int = 24) -> str:
    """The answer's first line, cut to fit one table row."""
    line = answer.splitlines()[0] if answer else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _prefill(model, ids: torch.Tensor):
    """The prefill forward `generate` runs: a fresh cache, logits of the last position only."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = {hf_compat.cache_kwarg(model): DynamicCache(config=model.config)}
        return model(input_ids=ids, **cache, use_cache=True, logits_to_keep=1)


def _generate(model, ids: torch.Tensor, max_new: int, eos: int | None):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
            eos_token_id=eos, pad_token_id=eos, return_dict_in_generate=True,
        )


def _n_compilations() -> int:
    from slimcompile import backend

    return len(getattr(backend, "COMPILATIONS", ()))


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def _spread(xs: list[float]) -> str:
    """`5.33 s (5.10-5.71, n=3)`: the median and the min-max of the timed runs."""
    if len(xs) == 1:
        return f"{xs[0]:.2f} s (n=1)"
    return f"{_median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f}, n={len(xs)})"


def measure(model, tok, sample, device: str, max_new: int, eos: int | None, slim: bool, repeats: int = 3,
            status=None) -> dict[str, Any]:
    """First calls (the compile, for slim), then `repeats` timed prefills and generations.

    The first calls are a 2-token `generate` (prefill + decode graphs) and one prefill forward
    (`_prefill`, the TTFT call: transformers' cache, logits of the last position), on the full
    prompt for both sides: slim compiles in them (their time is the "first calls" row, their
    count of backend compilations is printed), the plain model pays its one-time allocations.
    The timed runs must compile nothing: the count of `slimcompile.backend.COMPILATIONS` before
    and after them is recorded (`timed_compilations`, expected 0).
    """
    from slimcompile.tasks import score

    side = "slim" if slim else "plain model"
    ids = torch.tensor([sample.input_ids], device=device)
    n = ids.shape[1]
    row: dict[str, Any] = {}
    before = _n_compilations()
    if status:
        status.update(f"{side}: first calls on the {n}-token prompt"
                      + (" (compiling the prefill and decode graphs) ..." if slim else " (warm-up) ..."))
    _, t_gen = _timed(device, _generate, model, ids, 2, eos)
    _, t_pre = _timed(device, _prefill, model, ids)
    row["first_calls_s"] = t_gen + t_pre
    row["compilations"] = _n_compilations() - before
    before = _n_compilations()
    row["ttft_runs"] = []
    for i in range(repeats):
        if status:
            status.update(f"{side}: timing the prefill of {n} tokens (TTFT), run {i + 1}/{repeats} ...")
        row["ttft_runs"].append(_timed(device, _prefill, model, ids)[1])
    row["e2e_runs"] = []
    for i in range(repeats):
        if status:
            status.update(f"{side}: timing generate ({n} tokens + up to {max_new} new), run {i + 1}/{repeats} ...")
        out, t = _timed(device, _generate, model, ids, max_new, eos)
        row["e2e_runs"].append(t)
    row["timed_compilations"] = _n_compilations() - before
    row["ttft_s"] = _median(row["ttft_runs"])
    row["e2e_s"] = _median(row["e2e_runs"])
    new = out.sequences[0, n:].tolist()
    row["new_tokens"] = len(new)
    row["answer"] = tok.decode(new, skip_special_tokens=True).strip()
    row["correct"] = score(sample, row["answer"]) >= 1.0
    row["kv_bytes"], lens = kv_bytes(hf_compat.output_cache(out))
    # The cache also holds the generated tokens (all but the last); subtract them for prompt tokens.
    row["tokens_per_layer"] = [k - (len(new) - 1) for k in lens]
    return row



def timing_caveat(speedup: float, low: float, high: float, ideal: float) -> str | None:
    """Why a printed TTFT speedup should not be trusted, or None. Both sides run one after the
    other on the same machine, so a change of load between them shows up as a speedup (or a
    slowdown) that the method did not cause: a wide spread between the runs' extremes, or a
    speedup far above the schedule's ideal FLOP ratio (the exact rewrites alone are ~1.1x)."""
    reasons = []
    if low > 0 and high / low > 1.5:
        reasons.append(f"the runs' extremes give {low:.2f}-{high:.2f}x (the load changed while timing)")
    if speedup > 1.5 * ideal:
        reasons.append(f"{speedup:.2f}x is far above the ideal FLOP ratio {ideal:.2f}x (the plain side ran under more load)")
    if not reasons:
        return None
    return "; ".join(reasons) + ": rerun on an idle machine with more --repeats before quoting this speedup"


def run(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    import slimcompile
    from slimcompile import schedule as sched
    from slimcompile.backend import slim_backend
    from slimcompile.models import load
    from slimcompile.options import SlimOptionError, parse_options
    from slimcompile.tasks import make_sample

    console = Console()  # the terminal's width (80 columns when not a terminal); the table fits 80
    # Validate every flag, and the options against the model's config, before loading weights.
    length = parse_length(args.length, "--length")
    options = parse_sets(args.sets)
    if not 0.0 <= args.depth <= 1.0:
        raise ValueError(f"--depth: must be in [0, 1], got {args.depth}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.repeats < 1:
        raise ValueError(f"--repeats: must be >= 1, got {args.repeats}")
    device = parse_device(args.device)
    use_inductor = args.inductor if args.inductor is not None else device.startswith("cuda")
    dtype = parse_dtype(args.dtype) or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        opts = parse_options(options)
        if opts.pruning:
            opts.resolve(model_config(args.model).num_hidden_layers)
    except SlimOptionError as e:
        raise options_error("--set", e) from None

    t_start = time.perf_counter()
    with console.status(f"loading {args.model} ({dtype}, {device}) ...", spinner="dots") as status:
        model, tok = load(args.model, dtype=dtype, device=device)
        if tok is None:
            raise ValueError(f"model {args.model!r} has no tokenizer; the demo needs one")
        n_layers = model.config.num_hidden_layers
        resolved = opts.resolve(n_layers) if opts.pruning else None
        status.update(f"building a {args.task} prompt of ~{length} tokens ...")
        sample = make_sample(args.task, length, tok, args.seed, depth=args.depth)
        max_new = args.max_new_tokens or sample.max_new_tokens
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        ctx = getattr(model.config, "max_position_embeddings", None)
        if ctx and sample.n_tokens + max_new > ctx:
            console.print(f"[yellow]warning: {sample.n_tokens} prompt tokens exceed the model's context ({ctx})[/]")

        plain = measure(model, tok, sample, device, max_new, eos, slim=False, repeats=args.repeats, status=status)
        plain["tokens_per_layer"] = [sample.n_tokens] * n_layers

        backend = functools.partial(slim_backend, lower=False) if not use_inductor else slim_backend
        slimcompile.compile(model, backend=backend, options=options)
        slim = measure(model, tok, sample, device, max_new, eos, slim=True, repeats=args.repeats, status=status)
        model.forward = model.slim.original_forward

    expected = sched.tokens_per_layer(resolved, sample.n_tokens, n_layers)
    cost = sched.schedule_cost(resolved, sample.n_tokens, sched.ModelDims.from_config(model.config))
    measured_ok = slim["tokens_per_layer"] == expected

    lowering = "Inductor" if use_inductor else "rewritten graph, no Inductor"
    dev_type = torch.device(device).type
    console.print(f"{args.task}: {sample.n_tokens}-token prompt, answer {', '.join(sample.answers)} at depth "
                  f"{sample.depth:.2f}  ({args.model}, {device}, {dtype})", highlight=False)
    # One column per run, one row per quantity: fits an 80-column terminal; long cells fold.
    table = Table(show_header=True)
    table.add_column("", overflow="fold")
    table.add_column("plain model (eager)", overflow="fold")
    table.add_column(f"slim ({lowering})", overflow="fold")

    def row(label, fn):
        table.add_row(label, fn(plain), fn(slim))

    row("answer", lambda r: escape(_short(r["answer"])) or "(empty)")
    row("correct", lambda r: "[green]yes[/]" if r["correct"] else "[red]no[/]")
    row("TTFT: median (min-max)", lambda r: _spread(r["ttft_runs"]))
    row(f"generate {max_new} tok (E2E)", lambda r: _spread(r["e2e_runs"]) + f", {r['new_tokens']} tok")
    row("first calls (compile)", lambda r: f"{r['first_calls_s']:.1f} s"
        + (f", {r['compilations']} graph(s) compiled" if r is slim else ", warm-up"))
    row("compiled in timed runs", lambda r: "-" if r is plain else str(r["timed_compilations"]))
    row("tokens kept per layer", lambda r: sched.describe(r["tokens_per_layer"]))
    row(f"KV cache (on {dev_type})", lambda r: _fmt_bytes(r["kv_bytes"]))
    console.print(table)
    o = opts.as_dict()
    console.print(
        f"slim options: prune_layers={o['prune_layers']} -> {list(resolved.layers) if resolved else []}, "
        f"keep_ratio={o['keep_ratio']}, keep_tokens={o['keep_tokens']}, scoring={o['scoring']}, pooling={o['pooling']}, "
        f"block={o['block_size']}, sink={o['sink']}, window={o['window']}",
        highlight=False,
    )
    ttft_x = plain["ttft_s"] / slim["ttft_s"]
    e2e_x = plain["e2e_s"] / slim["e2e_s"]
    # The speedup's range from the extremes of the two sides' timed runs (worst to best case).
    lo = min(plain["ttft_runs"]) / max(slim["ttft_runs"])
    hi = max(plain["ttft_runs"]) / min(slim["ttft_runs"])
    saving = 1 - slim["kv_bytes"] / plain["kv_bytes"]
    console.print(
        f"[bold]TTFT speedup {ttft_x:.2f}x[/] (medians; {lo:.2f}-{hi:.2f}x from the runs' extremes; "
        f"ideal FLOP ratio {cost.ideal_speedup:.2f}x)   [bold]end-to-end {e2e_x:.2f}x[/]   "
        f"[bold]KV cache {100 * saving:.0f}% smaller[/] ({_fmt_bytes(plain['kv_bytes'])} -> {_fmt_bytes(slim['kv_bytes'])})"
    )
    caveat = timing_caveat(ttft_x, lo, hi, cost.ideal_speedup)
    if caveat:
        console.print(f"[yellow]caveat: {caveat}[/]")
    verdict = {
        (True, True): "[green]both answers contain the planted answer[/]",
        (True, False): "[red]slim lost the answer that the plain model found[/]",
        (False, True): "[yellow]slim found the answer; the plain model did not[/]",
        (False, False): "[yellow]neither run found the answer (the model itself fails at this length)[/]",
    }[(plain["correct"], slim["correct"])]
    console.print(verdict)
    if slim["timed_compilations"]:
        console.print(f"[yellow]warning: {slim['timed_compilations']} compilation(s) inside the timed runs: "
                      "the TTFT/generate times above include them[/]")
    if not measured_ok:
        console.print(f"[yellow]note: cache lengths per layer {sched.describe(slim['tokens_per_layer'])} differ from the "
                      f"schedule's {sched.describe(expected)}[/]")
    console.print(f"total {time.perf_counter() - t_start:.0f} s", style="dim")
    return 0
