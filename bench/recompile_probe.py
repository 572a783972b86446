"""Which guard makes a ratio schedule recompile per prompt length on CUDA? (diagnostic)

Compiles a small LLaMA with a two-layer ratio schedule, runs several prompt lengths, and prints
every shape guard that pins a length expression to a number, with the stack that added it. Run
once with the Triton scoring path and once with `--impl torch` (option scoring_impl) to bisect.

    python bench/recompile_probe.py [--impl triton|torch] [--no-flatten-linear] [--device cuda]

Each length's logits and per-layer KV lengths are compared with `slimcompile.reference` (so a
fix that drops a guard the compiled code needed shows up as a mismatch). Candidate fixes are
switched by options (`--no-flatten-linear`: flatten_linear=False turns the linear flattening off).
Guards recorded outside the passes' shape re-propagation (AOTAutograd, Inductor) are marked so.
"""

from __future__ import annotations

import argparse
import traceback

import torch
from torch.fx.experimental import symbolic_shapes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", default="auto", help="option scoring_impl: auto, triton or torch")
    p.add_argument("--no-flatten-linear", dest="flatten_linear", action="store_false",
                   help="option flatten_linear=False (brings back the per-length recompile on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # every length keeps > 2048 tokens after the first pruning layer, so no length is special for
    # the scoring kernel's 2048-key splits
    p.add_argument("--lengths", default="6000,9000,13000")
    args = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    import slimcompile  # noqa: F401
    from slimcompile.backend import COMPILATIONS

    from slimcompile.passes import shape_prop

    seen = []
    current = {}
    orig_run_node = shape_prop._FakeProp.run_node

    def run_node(self, n):
        current["node"] = n
        return orig_run_node(self, n)

    shape_prop._FakeProp.run_node = run_node
    orig = symbolic_shapes.ShapeEnv._log_guard

    def log_guard(self, prefix, g, forcing_spec):
        s = str(g)
        if "suppressed" not in prefix and ("Eq(" in s or "==" in s) and ("//" in s or "floor" in s.lower()) and len(seen) < 10:
            stack = traceback.extract_stack()[:-1]
            seen.append(s)
            node = current.get("node")
            in_pass = any("shape_prop.py" in fr.filename for fr in stack)
            where = node.format_node() if node is not None and in_pass else "(outside the passes' re-propagation)"
            print(f"GUARD {s}\nNODE {where}\n" + "".join(traceback.format_list(stack[-30:])), flush=True)
        return orig(self, prefix, g, forcing_spec)

    symbolic_shapes.ShapeEnv._log_guard = log_guard
    torch._dynamo.config.specialize_float = True
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    opts = {"prune_layers": [1, 3], "keep_ratio": 0.5, "block_size": 32, "window": 32, "sink": 32, "min_prune_len": 512,
            "scoring_impl": args.impl, "flatten_linear": args.flatten_linear}
    fn = torch.compile(model, backend="slim", options=opts, dynamic=True)
    from slimcompile import reference
    from slimcompile.options import parse_options

    schedule = parse_options(opts).resolve(cfg.num_hidden_layers)
    with torch.no_grad():
        for n in (int(x) for x in args.lengths.split(",")):
            before = len(COMPILATIONS)
            x = torch.randint(0, 1024, (1, n), device=args.device)
            out = fn(x, use_cache=True, logits_to_keep=1)
            ref = reference.prefill(model, x, schedule)
            err = ((out.logits - ref.logits).abs().max() / ref.logits.abs().max()).item()
            lens_ok = [l.keys.shape[2] for l in out.past_key_values.layers] == [k.shape[2] for k in ref.keys]
            print(f"impl={args.impl} length {n}: +{len(COMPILATIONS) - before} compilations; "
                  f"vs reference: KV lengths {'equal' if lens_ok else 'DIFFER'}, max rel logit diff {err:.1e}", flush=True)
    print(f"impl={args.impl} total compilations {len(COMPILATIONS)} for {args.lengths}", flush=True)


if __name__ == "__main__":
    main()
