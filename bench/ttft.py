"""End-to-end prefill (time-to-first-token) benchmark on a LLaMA-3.1-8B-shaped model.

Random bf16 weights (speed does not depend on values), batch 1, `logits_to_keep=1`. In one
process it times HF eager SDPA, `torch.compile` default Inductor and slim variants, each
compiled once (`dynamic=True`) and timed at every prompt length, with CUDA events (median of
`--reps` after a warm-up). With `--profile-length L` each variant's prefill at length L is also run
once under torch.profiler, and its kernel time is split into GEMMs, attention, slim scoring,
selection + gathers and the rest (bench/kernel_profile.py). Every measurement is appended to OUT/ttft.jsonl as it is made, so a
run cut short still leaves its numbers; a table is printed at the end.

    python bench/ttft.py --out /tmp/ttft                      # all variants, 8K..128K
    python bench/ttft.py --layers 4 --hidden 256 --lengths 1024,2048 --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_profile import breakdown  # noqa: E402

VARIANTS: dict[str, dict[str, Any] | None] = {
    "eager": None,
    "inductor": None,
    "slim-off": {"enabled": False},
    "slim-default": {},
    "R1": {"prune_layers": [8, 16, 24], "keep_ratio": 0.5},
    # DESIGN.md's prototype pruned "after layers 8/16/24" counting from 1: our 0-based [7, 15, 23]
    "R1-proto": {"prune_layers": [7, 15, 23], "keep_ratio": 0.5},
    "R2": {"prune_layers": [10, 20, 30], "keep_tokens": [8192, 4096, 2048], "scoring": "tokenunit"},
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--out, --device and the model shape (LLaMA-3.1-8B by default), shared with bench/e2e.py."""
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.lengths) + 1024,
        rope_theta=500000.0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    return model.eval()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def kv_bytes(out: Any) -> int:
    cache = out.past_key_values
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def ideal_ratio(opts: dict | None, length: int, model: torch.nn.Module) -> float:
    from slimcompile import schedule as sched
    from slimcompile.options import parse_options

    if opts is None or opts.get("enabled") is False:
        return 1.0
    o = parse_options(opts)
    return sched.schedule_cost(o.resolve(model.config.num_hidden_layers), length, sched.ModelDims.from_config(model.config)).ideal_speedup


def make_fn(name: str, model: torch.nn.Module) -> Callable:
    opts = VARIANTS[name]
    if name == "eager":
        return model
    if name == "inductor":
        return torch.compile(model, dynamic=True)
    return torch.compile(model, backend="slim", options=opts, dynamic=True)


def compilations(name: str) -> int:
    if name not in ("eager", "inductor"):
        from slimcompile.backend import COMPILATIONS

        return len(COMPILATIONS)
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def profile_call(call: Callable[[], Any], path: str) -> dict:
    """One profiled call; the kernel-time breakdown of its trace (written to `path`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = call()
        torch.cuda.synchronize()
    del out
    prof.export_chrome_trace(path)
    return breakdown(path)


def run_variant(name: str, model, lengths, args, out_file) -> list[dict]:
    rows = []
    fn = make_fn(name, model)
    before = compilations(name)
    for length in lengths:
        if name == "inductor" and length > args.inductor_max:
            continue
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=args.device)
        call = lambda: fn(ids, use_cache=True, logits_to_keep=1)  # noqa: E731
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                first_ms, out = timed(call, args.device)
                first_wall = time.perf_counter() - t0
                del out
                times, peak = [], 0
                for _ in range(args.reps):
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    ms, out = timed(call, args.device)
                    times.append(ms)
                    if args.device == "cuda":
                        peak = max(peak, torch.cuda.max_memory_allocated())
                    kv = kv_bytes(out)
                    del out
        except Exception as e:  # record and go on: one failing variant must not lose the others
            row = {"variant": name, "length": length, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(row), flush=True)
            out_file.write(json.dumps(row) + "\n")
            out_file.flush()
            break
        row = {
            "variant": name,
            "length": length,
            "ms": statistics.median(times),
            "ms_all": times,
            "first_call_s": first_wall,
            "peak_gib": peak / 2**30,
            "kv_gib": kv / 2**30,
            "ideal": ideal_ratio(VARIANTS[name], length, model),
            "compilations": compilations(name) - before,
        }
        if length == args.profile_length and args.device == "cuda":
            try:
                with torch.no_grad():
                    row["profile"] = profile_call(call, os.path.join(args.out, f"{name}_{length}_prefill_trace.json"))
            except Exception as e:  # the timing stands without the profile
                row["profile"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_file.write(json.dumps(row) + "\n")
        out_file.flush()
    del fn
    torch._dynamo.reset()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["variant"], r["length"]): r for r in rows if "ms" in r}
    lines = [
        "| variant | prompt | ms | vs eager | vs inductor | vs slim-off | ideal | achieved/ideal | peak GiB | KV GiB | first call s | compiles |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['variant']} | {r['length']} | error: {r['error']} |")
            continue
        L = r["length"]

        def ratio(base: str) -> str:
            b = by.get((base, L))
            return f"{b['ms'] / r['ms']:.2f}x" if b else "-"

        off = by.get(("slim-off", L))
        ach = f"{(off['ms'] / r['ms']) / r['ideal']:.2f}" if off and r["ideal"] != 1.0 else "-"
        lines.append(
            f"| {r['variant']} | {L // 1024}K | {r['ms']:.1f} | {ratio('eager')} | {ratio('inductor')} | {ratio('slim-off')} "
            f"| {r['ideal']:.2f} | {ach} | {r['peak_gib']:.1f} | {r['kv_gib']:.2f} | {r['first_call_s']:.0f} | {r['compilations']} |"
        )
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """Kernel time (ms) per category of each profiled prefill, and its share of the busy time."""
    from kernel_profile import CATEGORIES, OTHER

    cats = [c for c, _ in CATEGORIES] + [OTHER]
    lines = ["| variant | prompt | wall ms | busy ms | " + " | ".join(cats) + " | kernels |",
             "|---|---|---|---|" + "---|" * len(cats) + "---|"]
    for r in rows:
        p = r.get("profile")
        if not p or "category_us" not in p:
            continue
        busy = p["busy_us"]
        cells = " | ".join(f"{p['category_us'][c] / 1e3:.2f} ({100 * p['category_us'][c] / busy:.1f}%)" for c in cats)
        lines.append(f"| {r['variant']} | {r['length'] // 1024}K | {p['wall_us'] / 1e3:.1f} | {busy / 1e3:.1f} | {cells} | {p['kernels']:.0f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,32768,65536,131072")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--inductor-max", type=int, default=32768, help="longest prompt for default Inductor (its S x S mask)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile-length", type=int, default=None, help="also profile one prefill per variant at this length (CUDA)")
    add_model_args(p)
    p.add_argument("--set", action="append", default=[], help="VARIANT:key=json override, e.g. R1:keep_ratio=0.4")
    p.add_argument(
        "--no-specialize-float",
        action="store_true",
        help="leave torch._dynamo.config.specialize_float at its default; by default it is set to True "
        "for every variant, which avoids AOTAutograd restarting Dynamo to specialise the model's float attributes",
    )
    args = p.parse_args(argv)
    if not args.no_specialize_float:
        torch._dynamo.config.specialize_float = True
    args.lengths = [int(x) for x in args.lengths.split(",")]
    for item in args.set:
        var, kv = item.split(":", 1)
        key, val = kv.split("=", 1)
        VARIANTS[var] = {**(VARIANTS[var] or {}), key: json.loads(val)}
    import slimcompile  # noqa: F401  (registers the slim ops and attention function)

    os.makedirs(args.out, exist_ok=True)
    model = build_model(args)
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}", flush=True)
    rows = []
    with open(os.path.join(args.out, "ttft.jsonl"), "a") as f:
        for name in args.variants.split(","):
            rows += run_variant(name, model, args.lengths, args, f)
    text = table(rows)
    prof = profile_table(rows)
    if prof:
        text += "\n\nKernel time per category, one profiled prefill (ms, share of busy time):\n\n" + prof
    print(text)
    with open(os.path.join(args.out, "ttft.md"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
