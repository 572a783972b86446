"""`slimcompile demo`: one long-context retrieval prompt, plain model vs `backend="slim"`.

Loads the model, builds a RULER-style prompt with a planted answer (default: a needle in
~2K tokens of Python documentation, where the default model is competent), and runs it twice: with the plain model (eager, HF
`generate`) and with `slimcompile.compile(model, **options)`. For each it prints the answer,
whether it contains the planted answer, time-to-first-token (a prefill forward with
`logits_to_keep=1`, timed after a warm-up/compile call), end-to-end `generate` time, tokens
kept per layer and the KV-cache bytes of the returned cache; then the speedups and the memory
saving.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import torch

from slimcompile.evaluate import model_config, options_error, parse_device, parse_dtype, parse_length, parse_sets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="known model name or local HF folder (default smollm2-135m)")
    p.add_argument(
        "--length", default="2K", help="prompt length in tokens, e.g. 2K or 2048 (default 2K: SmolLM2-135M fails retrieval beyond ~2-4K even unpruned)"
    )
    p.add_argument("--task", default="needle", choices=("passkey", "needle", "multikey"), help="retrieval task (default needle)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    p.add_argument("--depth", type=float, default=0.5, help="where the answer sits, 0..1 of the text (default 0.5)")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", help="slim option (JSON value, else string); repeatable")
    p.add_argument(
        "--inductor",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lower the rewritten graph through Inductor (default: on CUDA yes; on CPU no, since Inductor's "
        "C++ compile of a 30-layer model takes minutes on a small CPU)",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: enough for the task's answer (16)")


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
        return model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)


def _generate(model, ids: torch.Tensor, max_new: int, eos: int | None):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
            eos_token_id=eos, pad_token_id=eos, return_dict_in_generate=True,
        )


def _n_compilations() -> int:
    from slimcompile import backend

    return len(getattr(backend, "COMPILATIONS", ()))


def measure(model, tok, sample, device: str, max_new: int, eos: int | None, slim: bool, status=None) -> dict[str, Any]:
    """Warm-up/compile, TTFT, generate; answer, correctness and KV bytes."""
    from slimcompile.tasks import score

    ids = torch.tensor([sample.input_ids], device=device)
    row: dict[str, Any] = {}
    if slim:
        if status:
            status.update("slim: compiling (warm-up generate on the prompt: prefill + decode graphs) ...")
        _, row["compile_s"] = _timed(device, _generate, model, ids, 2, eos)
    else:
        # Eager needs no compile; a short warm-up keeps one-time allocator costs out of TTFT.
        _timed(device, _generate, model, ids[:, :64], 2, eos)
        row["compile_s"] = None
    if status:
        status.update(f"{'slim' if slim else 'plain'}: timing the prefill (TTFT) ...")
    before = _n_compilations()
    _, ttft = _timed(device, _prefill, model, ids)
    if slim and _n_compilations() != before:  # the timed call recompiled: time it again
        _, ttft = _timed(device, _prefill, model, ids)
    row["ttft_s"] = ttft
    if status:
        status.update(f"{'slim' if slim else 'plain'}: generating ...")
    out, row["e2e_s"] = _timed(device, _generate, model, ids, max_new, eos)
    new = out.sequences[0, ids.shape[1] :].tolist()
    row["new_tokens"] = len(new)
    row["answer"] = tok.decode(new, skip_special_tokens=True).strip()
    row["correct"] = score(sample, row["answer"]) >= 1.0
    row["kv_bytes"], lens = kv_bytes(out.past_key_values)
    # The cache also holds the generated tokens (all but the last); subtract them for prompt tokens.
    row["tokens_per_layer"] = [n - (len(new) - 1) for n in lens]
    return row


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    import slimcompile
    from slimcompile import schedule as sched
    from slimcompile.backend import slim_backend
    from slimcompile.models import load
    from slimcompile.options import SlimOptionError, parse_options
    from slimcompile.tasks import make_sample

    console = Console(width=max(120, Console().width))
    # Validate every flag, and the options against the model's config, before loading weights.
    length = parse_length(args.length, "--length")
    options = parse_sets(args.sets)
    if not 0.0 <= args.depth <= 1.0:
        raise ValueError(f"--depth: must be in [0, 1], got {args.depth}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
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

        status.update(f"plain model: prefill of {sample.n_tokens} tokens ...")
        plain = measure(model, tok, sample, device, max_new, eos, slim=False, status=status)
        plain["tokens_per_layer"] = [sample.n_tokens] * n_layers

        backend = functools.partial(slim_backend, lower=False) if not use_inductor else slim_backend
        slimcompile.compile(model, backend=backend, options=options)
        slim = measure(model, tok, sample, device, max_new, eos, slim=True, status=status)
        model.forward = model.slim.original_forward

    expected = sched.tokens_per_layer(resolved, sample.n_tokens, n_layers)
    cost = sched.schedule_cost(resolved, sample.n_tokens, sched.ModelDims.from_config(model.config))
    measured_ok = slim["tokens_per_layer"] == expected

    lowering = "Inductor" if use_inductor else "rewritten graph, no Inductor"
    table = Table(title=f"{args.task}: {sample.n_tokens}-token prompt, answer {', '.join(sample.answers)} "
                        f"at depth {sample.depth:.2f}  ({args.model}, {device}, {dtype})")
    table.add_column("run")
    table.add_column("answer", overflow="ellipsis", max_width=24)
    table.add_column("correct", justify="center")
    table.add_column("TTFT", justify="right")
    table.add_column("compile", justify="right")
    table.add_column("generate (E2E)", justify="right")
    table.add_column("tokens kept per layer", overflow="fold")
    table.add_column("KV cache", justify="right")
    for name, r in (("plain model (eager)", plain), (f"slim ({lowering})", slim)):
        table.add_row(
            name,
            _short(r["answer"]) or "(empty)",
            "[green]yes[/]" if r["correct"] else "[red]no[/]",
            f"{r['ttft_s']:.2f} s",
            "-" if r["compile_s"] is None else f"{r['compile_s']:.1f} s",
            f"{r['e2e_s']:.2f} s ({r['new_tokens']} tok)",
            sched.describe(r["tokens_per_layer"]),
            _fmt_bytes(r["kv_bytes"]),
        )
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
    saving = 1 - slim["kv_bytes"] / plain["kv_bytes"]
    console.print(
        f"[bold]TTFT speedup {ttft_x:.2f}x[/] (ideal FLOP ratio {cost.ideal_speedup:.2f}x)   "
        f"[bold]end-to-end {e2e_x:.2f}x[/]   [bold]KV cache {100 * saving:.0f}% smaller[/] "
        f"({_fmt_bytes(plain['kv_bytes'])} -> {_fmt_bytes(slim['kv_bytes'])})"
    )
    verdict = {
        (True, True): "[green]both answers contain the planted answer[/]",
        (True, False): "[red]slim lost the answer that the plain model found[/]",
        (False, True): "[yellow]slim found the answer; the plain model did not[/]",
        (False, False): "[yellow]neither run found the answer (the model itself fails at this length)[/]",
    }[(plain["correct"], slim["correct"])]
    console.print(verdict)
    if not measured_ok:
        console.print(f"[yellow]note: cache lengths per layer {sched.describe(slim['tokens_per_layer'])} differ from the "
                      f"schedule's {sched.describe(expected)}[/]")
    console.print(f"total {time.perf_counter() - t_start:.0f} s", style="dim")
    return 0
