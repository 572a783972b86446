"""End-to-end generation benchmark (prefill + decode) on a LLaMA-3.1-8B-shaped model.

Random bf16 weights, batch 1, greedy. In one process it runs, per prompt length:
  hf-eager            `model.generate` with transformers' default DynamicCache
  hf-static-compiled  a StaticCache, so generate compiles the decode step (transformers' fast path)
  hf-offload          DynamicCache(offloading=True), transformers' own KV offload
  slim-resident       slimcompile.compile(model) (default schedule, kv="resident", CUDA graphs)
  slim-offload        the same with kv="offload"
  slim-resident-sdpa    slim-resident with decode_attention="sdpa" (one masked SDPA call per layer)
  slim-resident-matmul  slim-resident with decode_attention="matmul" (decode attention as matmuls)
  slim-resident-nofuse  slim-resident with decode_fuse=False (separate q/k/v and gate/up GEMMs)
  slim-offload-p<N>     slim-offload with copy_programs=N (the block-copy kernel on N programs)
and records TTFT (generate with one new token), end-to-end time for --new tokens, decode
ms/token = (E2E - TTFT) / (new - 1), peak GPU memory, KV bytes on the GPU and in host memory,
and for slim the prompt KV kept on the GPU and the decoder's step / CUDA-graph capture / replay counts
(a slow decode with few replays ran eagerly or re-recorded its graph). Every variant is warmed up
with the same generation at each length before it is timed (`--warmup first`: only at the first). For the warm-up and the timed generation a row also gives per-token times
(median, max, the tokens slower than 3x the median and their excess) and what was compiled inside
the window (Dynamo graphs, Inductor cache misses, new Triton cache entries), so time spent outside
the steady-state step shows where it went. For each slim variant it also profiles a few decode steps
(the kernels that take the most GPU time per step; for slim-offload also how much of the
block-copy kernels' time overlaps other kernels, trace in OUT).
Rows go to OUT/e2e.jsonl as they are measured.

    python bench/e2e.py --out /tmp/e2e                                    # H200
    python bench/e2e.py --device cpu --layers 2 --hidden 128 --lengths 600 --new 4 --out /tmp/e2e   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_profile import breakdown  # noqa: E402
from ttft import add_model_args, build_model  # noqa: E402

VARIANTS = ["hf-eager", "hf-static-compiled", "hf-offload", "slim-resident", "slim-offload", "slim-resident-sdpa",
            "slim-resident-matmul", "slim-resident-nofuse"]
ATTN_SUFFIXES = ("sdpa", "matmul", "triton")  # slim-resident-<impl>: options decode_attention=<impl>


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class TokenClock:
    """A stopping criterion that never stops and stamps the host clock at each generated token.

    It synchronises the device before each stamp (transformers' loop reads its stop flag right
    after, a synchronisation anyway on CUDA), so the gaps are per-token times including the GPU's
    work. Gap i is decode step i (the first stamp follows the prefill).
    """

    def __init__(self):
        self.stamps: list[float] = []
        self._never: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.stamps.append(time.perf_counter())
        if self._never is None or self._never.shape[0] != input_ids.shape[0]:
            self._never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self._never

    def summary(self, prefix: str = "") -> dict[str, Any]:
        gaps = [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]
        if not gaps:
            return {}
        med = statistics.median(gaps)
        slow = [i for i, g in enumerate(gaps) if g > 3 * med]
        return {f"{prefix}step_ms_median": med, f"{prefix}step_ms_max": max(gaps),
                f"{prefix}slow_steps": len(slow), f"{prefix}slow_excess_ms": sum(gaps[i] - med for i in slow),
                f"{prefix}slow_step_index": slow[:8]}


def _triton_cache_entries() -> int:
    d = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return len(os.listdir(d)) if os.path.isdir(d) else 0


def _compile_marks() -> dict[str, int]:
    """Running totals of compile work: Dynamo graphs, Inductor FX-graph cache misses, Triton cache entries."""
    from torch._dynamo.utils import counters

    return {"dynamo_graphs": int(counters["stats"]["unique_graphs"]),
            "inductor_cache_misses": int(counters["inductor"]["fxgraph_cache_miss"]),
            "triton_cache_new": _triton_cache_entries()}


def _compiled_since(marks: dict[str, int], prefix: str = "") -> dict[str, int]:
    now = _compile_marks()
    return {f"{prefix}{k}": now[k] - marks[k] for k in marks}


def _timed_generate(model, x, new, device, clock: TokenClock | None = None, **kw) -> tuple[float, Any]:
    from transformers import StoppingCriteriaList

    if clock is not None:
        kw["stopping_criteria"] = StoppingCriteriaList([clock])
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, return_dict_in_generate=True, **kw)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def _kv_bytes(cache) -> dict[str, int]:
    from slimcompile.runtime.kv_cache import SlimKVCache

    if isinstance(cache, SlimKVCache):
        b = cache.bytes()
        return {"gpu_kv": b.gpu, "host_kv": b.host, "gpu_prompt_kv": cache.prompt_bytes_on_device()}
    gpu = host = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is None:
                continue
            n = t.numel() * t.element_size()
            if t.is_cuda:
                gpu += n
            else:
                host += n
    return {"gpu_kv": gpu, "host_kv": host}


def _decoder_counts(cache) -> dict[str, int]:
    """Decode steps, CUDA graphs recorded and replays of the slim runtime decoder, if one ran."""
    dec = getattr(cache, "decoder", None)
    return {"decode_steps": dec.steps, "graph_captures": dec.captures, "graph_replays": dec.replays} if dec else {}


def _cache_kwargs(name: str, model, length: int, new: int) -> dict:
    from transformers import DynamicCache, StaticCache

    if name == "hf-static-compiled":
        return {"past_key_values": StaticCache(config=model.config, max_cache_len=length + new)}
    if name == "hf-offload":
        return {"past_key_values": DynamicCache(config=model.config, offloading=True)}
    return {}


def _overlap_from_trace(path: str) -> dict[str, float]:
    """Fraction of block-copy kernel time that overlaps other kernels on other streams."""
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    copies = [e for e in kernels if "copy_blocks" in e.get("name", "")]
    others = [e for e in kernels if "copy_blocks" not in e.get("name", "")]
    total = sum(e["dur"] for e in copies)
    overlapped = 0.0
    for c in copies:
        c0, c1, cs = c["ts"], c["ts"] + c["dur"], c.get("args", {}).get("stream")
        spans = sorted((max(c0, o["ts"]), min(c1, o["ts"] + o["dur"])) for o in others
                       if o.get("args", {}).get("stream") != cs and o["ts"] < c1 and o["ts"] + o["dur"] > c0)
        covered, end = 0.0, c0
        for a, b in spans:
            a = max(a, end)
            if b > a:
                covered += b - a
                end = b
        overlapped += covered
    step_us = sum(e["dur"] for e in others)
    return {"copy_kernels": len(copies), "copy_us": total, "copy_overlapped_frac": overlapped / total if total else 0.0,
            "other_kernel_us": step_us}


def profile_decode_steps(name: str, cache, tok, out_dir: str, steps: int = 6) -> dict:
    from torch.profiler import ProfilerActivity, profile

    dec = cache.decoder
    for _ in range(2):
        dec.step(tok)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.step(tok)
        torch.cuda.synchronize()
    path = os.path.join(out_dir, f"{name}_decode_trace.json")
    prof.export_chrome_trace(path)
    stats = breakdown(path, steps)
    if name.startswith("slim-offload"):
        stats.update(_overlap_from_trace(path))
        stats["swaps"] = int(sum(int(l.swaps.sum()) for l in cache.layers if not l.all_resident))
        stats["blocks_copied"] = int(sum(int(l.blocks_copied) for l in cache.layers if not l.all_resident))
    return stats


def variant_options(name: str, slim_options: str) -> dict[str, Any]:
    """The `slimcompile.compile` options of a slim variant: kv from its name, then --slim-options,
    then the variant's switch (decode attention, weight fusion, copy programs) as an option."""
    opts: dict[str, Any] = {"kv": "offload" if name.startswith("slim-offload") else "resident"}
    opts.update(json.loads(slim_options))
    impl = name.rsplit("-", 1)[-1]
    if name.startswith("slim-resident-") and impl in ATTN_SUFFIXES:  # another decode attention
        opts["decode_attention"] = impl
    if name == "slim-resident-nofuse":
        opts["decode_fuse"] = False
    if name.startswith("slim-offload-p"):
        opts["copy_programs"] = int(name[len("slim-offload-p"):])
    return opts


def run_variant(name: str, model, lengths, args, f) -> None:
    import slimcompile

    if name.startswith("slim"):
        slimcompile.compile(model, **variant_options(name, args.slim_options))
    try:
        for i, L in enumerate(lengths):
            new = args.offload_new if name == "hf-offload" else args.new
            if (name == "hf-offload" and L > args.offload_max) or (name == "hf-static-compiled" and L > args.static_max):
                continue
            x = torch.randint(0, model.config.vocab_size, (1, L), device=args.device)
            started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            warm: dict[str, Any] = {}
            t0 = time.perf_counter()
            if i == 0 or args.warmup == "every" or name == "hf-static-compiled":  # warm-up: the same generation
                marks, clock = _compile_marks(), TokenClock()
                _timed_generate(model, x, new, args.device, clock, **_cache_kwargs(name, model, L, new))
                warm = {**clock.summary("warmup_"), **_compiled_since(marks, "warmup_")}
            warm_s = time.perf_counter() - t0
            marks = _compile_marks()
            ttft, first = _timed_generate(model, x, 1, args.device, **_cache_kwargs(name, model, L, new))
            del first  # a finished request's cache is released (offload's pinned buffers go back to their pool)
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            clock = TokenClock()
            e2e, out = _timed_generate(model, x, new, args.device, clock, **_cache_kwargs(name, model, L, new))
            row = {"variant": name, "length": L, "new": new, "ttft_ms": ttft, "e2e_ms": e2e,
                   "decode_ms_per_token": (e2e - ttft) / (new - 1), "warmup_s": warm_s,
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0,
                   **_kv_bytes(out.past_key_values), **_decoder_counts(out.past_key_values),
                   **clock.summary(), **_compiled_since(marks), **warm, "started_utc": started}
            if name.startswith("slim") and args.device == "cuda" and L == lengths[0]:
                try:
                    row["profile"] = profile_decode_steps(name, out.past_key_values, out.sequences[:, -1:], args.out)
                except Exception as e:  # the timing above stands without the trace
                    row["profile"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            del out
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
            f.flush()
    except Exception as e:
        row = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        print(json.dumps(row), flush=True)
        f.write(json.dumps(row) + "\n")
        f.flush()
    finally:
        slimcompile.uncompile(model)  # the class's forward and generate again (the next variant starts clean)
        torch._dynamo.reset()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="32768,65536")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--offload-new", type=int, default=32, help="tokens generated by hf-offload (it copies every layer's KV each step)")
    p.add_argument("--offload-max", type=int, default=32768, help="longest prompt for hf-offload")
    p.add_argument("--static-max", type=int, default=32768, help="longest prompt for hf-static-compiled (it compiles per length)")
    p.add_argument("--warmup", choices=["every", "first"], default="every",
                   help="warm each variant up with the timed generation at every length (default; steady state: "
                        "compiled kernels and the allocator's cache), or only at the first (hf-static-compiled: always "
                        "every, it compiles per length); 'first' shows a new length's first-request costs")
    p.add_argument("--slim-options", default="{}", help="JSON options added to both slim variants")
    add_model_args(p)
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    torch._dynamo.config.specialize_float = True
    os.makedirs(args.out, exist_ok=True)
    model = build_model(args)
    model.generation_config.pad_token_id = 0
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}", flush=True)
    with open(os.path.join(args.out, "e2e.jsonl"), "a") as f, torch.no_grad():
        for name in args.variants.split(","):
            run_variant(name, model, args.lengths, args, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
