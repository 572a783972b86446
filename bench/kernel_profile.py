"""Where the GPU time of a torch.profiler trace goes: kernel time per category and the top kernels.

Used by bench/ttft.py (one prefill per variant) and bench/e2e.py (a few decode steps). Kernels
are put in the first category whose pattern matches their name, so a pruned schedule's scoring,
selection and gathers can be compared with its GEMMs and attention in the same trace. "busy" is
the union of kernel intervals; "wall" runs from the first kernel's start to the last one's end,
so wall - busy is the time the GPU sat idle between kernels.
"""

from __future__ import annotations

import json
import re

# Order matters: the first match wins (Inductor names a fused kernel after the ops in it).
CATEGORIES: list[tuple[str, str]] = [
    ("attention", r"^_decode_(partial|combine)_kernel|flash|fmha|attention|attn|cudnn"),
    ("slim scoring", r"^_(stats|combine|token|pool)_kernel"),
    ("selection + gather", r"topk|sort|radix|gather|index|scatter|cub::|bitonic"),
    ("gemm", r"gemm|cutlass|nvjet|xmma|cublas|splitk|triton_tem|_mm_"),
]
OTHER = "other"


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return OTHER


def kernel_events(path: str) -> list[dict]:
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    return [e for e in events if e.get("cat") == "kernel" and "dur" in e]


def _union_us(kernels: list[dict]) -> float:
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        a = max(a, end)
        if b > a:
            busy += b - a
            end = b
    return busy


def breakdown(path: str, steps: int = 1, top: int = 8) -> dict:
    """Per-step kernel time (us) by category, busy/wall time and the `top` kernels by total time."""
    kernels = kernel_events(path)
    if not kernels:
        return {"kernels": 0}
    per_cat: dict[str, float] = {c: 0.0 for c, _ in CATEGORIES}
    per_cat[OTHER] = 0.0
    per_name: dict[str, list[float]] = {}
    for e in kernels:
        per_cat[category(e["name"])] += e["dur"]
        t = per_name.setdefault(e["name"][:90], [0.0, 0])
        t[0] += e["dur"]
        t[1] += 1
    wall = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "kernels": round(len(kernels) / steps, 1),
        "kernel_us": round(sum(e["dur"] for e in kernels) / steps, 1),
        "busy_us": round(_union_us(kernels) / steps, 1),
        "wall_us": round(wall / steps, 1),
        "category_us": {c: round(us / steps, 1) for c, us in per_cat.items()},
        "top_kernels_us": [[name, round(us / steps, 1), round(n / steps, 1)] for name, (us, n) in rows],
    }
