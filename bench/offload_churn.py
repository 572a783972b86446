"""How often does kv="offload" swap blocks on a trained model? (CPU- or GPU-runnable diagnostic)

Generates from RULER-style prompts with `kv="offload"` and reports, per offloaded layer and
decode step, the fraction of steps that swapped and the blocks copied per swap. On random
weights (bench/e2e.py) nearly every layer swaps ~85% of its active set every step; this measures
a real model, which decides how much PCIe traffic offload costs in practice.

    python bench/offload_churn.py --model smollm2-135m --length 2048 --budget 256 --new 32 --samples 4
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--swap-threshold", type=float, default=0.9)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--task", default="needle")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--options", default="{}", help="JSON slim options added to the offload ones")
    args = p.parse_args(argv)

    import slimcompile
    from slimcompile import models, tasks

    model, tok = models.load(args.model, device=args.device)
    slimcompile.compile(model, kv="offload", decode_budget=args.budget, swap_threshold=args.swap_threshold,
                        **json.loads(args.options))
    steps = swapped = copied = active = 0
    for seed in range(args.samples):
        s = tasks.make_sample(args.task, args.length, tok, seed)
        x = torch.tensor([s.prompt_ids], device=args.device)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new, min_new_tokens=args.new,
                             do_sample=False, return_dict_in_generate=True)
        layers = [l for l in out.past_key_values.layers if not getattr(l, "all_resident", True)]
        # the first decode step loads the whole active set (priming); swaps are counted after it
        n = out.past_key_values.generated - 1
        for l in layers:
            steps += n
            swapped += int(l.swaps.sum())
            copied += int(l.blocks_copied) - l.n_active
            active += l.n_active * n
    row = {"model": args.model, "length": args.length, "budget": args.budget, "swap_threshold": args.swap_threshold,
           "samples": args.samples, "layer_steps": steps, "swap_fraction": swapped / max(steps, 1),
           "blocks_copied_per_layer_step": copied / max(steps, 1),
           "copied_fraction_of_active": copied / max(active, 1)}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
