"""Launch-parameter sweep of the split-K decode attention kernel (runtime/decode_attention.py).

Times `triton_decode_attention` at the LLaMA-3.1-8B shape (batch 1, 8 kv heads of 4 query heads,
head dim 128, bf16) for one decode position over a full buffer of each capacity, for every
combination of rows per split (CHUNK), keys per `tl.dot` (BLOCK_N), warps and pipeline stages,
checks each result against the fp32 oracle, and reports the achieved KV read bandwidth. The
kernel's current defaults (`split_config`'s CHUNK and `BLOCK_N`, `NUM_WARPS`, `NUM_STAGES`) are the
first row per capacity. Rows go to OUT/decode_attn_sweep.jsonl.

    python bench/decode_attn_sweep.py --out /tmp/sweep                     # H200
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch


def time_call(fn, reps: int, per_graph: int = 20) -> float:
    """Median ms of one call: a CUDA graph of `per_graph` calls replayed `reps` times (CUDA events),
    so the host's launch cost, larger than the kernels' time here, does not count."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per_graph)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    from slimcompile.runtime.decode_attention import (BLOCK_N, NUM_STAGES, NUM_WARPS, reference_decode_attention,
                                                      split_config, triton_decode_attention)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacities", default="33024,16640", help="buffer rows (32K and 16K prompts + 256 generated)")
    p.add_argument("--chunks", default="256,512,1024,2048")
    p.add_argument("--block-n", default="64,128")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3,4")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    with open(os.path.join(args.out, "decode_attn_sweep.jsonl"), "w") as f:
        for cap in ints(args.capacities):
            g = torch.Generator(device=dev).manual_seed(cap)
            q = torch.randn(1, 8, 4, 128, device=dev, dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, 8, cap, 128, device=dev, dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, 8, cap, 128, device=dev, dtype=torch.bfloat16, generator=g)
            n = torch.tensor([cap], device=dev)
            ref = reference_decode_attention(q, k, v, n, 0.088)
            kv_bytes = 2 * k.numel() * k.element_size()
            default = (split_config(cap, 8, dev)[0], BLOCK_N, NUM_WARPS, NUM_STAGES)
            grid = itertools.product(ints(args.chunks), ints(args.block_n), ints(args.warps), ints(args.stages))
            configs = [default] + [c for c in grid if c != default]
            rows = []
            for chunk, bn, w, st in configs:
                row = {"capacity": cap, "chunk": chunk, "block_n": bn, "warps": w, "stages": st,
                       "default": (chunk, bn, w, st) == default}
                if chunk % bn:
                    continue
                try:
                    call = lambda: triton_decode_attention(q, k, v, n, 0.088, block_n=bn, chunk=chunk, num_warps=w, num_stages=st)  # noqa: E731
                    err = (call().float() - ref.float()).abs().max().item()
                    ms = time_call(call, args.reps)
                    row.update(ms=ms, tb_per_s=kv_bytes / ms / 1e9, max_abs_err=err)
                except Exception as e:  # e.g. out of shared memory for a large tile: skip the config
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
            ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
            dflt = next(r for r in rows if r["default"])
            print(f"capacity {cap}: default {dflt['ms']:.4f} ms ({dflt['tb_per_s']:.2f} TB/s); best:", flush=True)
            for r in ok[:5]:
                print(f"  chunk {r['chunk']} block_n {r['block_n']} warps {r['warps']} stages {r['stages']}: "
                      f"{r['ms']:.4f} ms ({r['tb_per_s']:.2f} TB/s, err {r['max_abs_err']:.1e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
