"""Run one `slimcompile eval` as many small processes (shards of seeds per task and length), then merge.

The reference engine on a 135M model is bound by Python and kernel launches, not by the GPU, but
processes sharing one GPU are time-sliced: on an H200, 14 processes slowed each other to ~8 s per
1K prompt (docs/accuracy.md, session 4), so keep `--procs` small (the default is 2). Each shard is `--shard-size` prompts of one (task, length)
cell (seeds `s..s+k-1`; within a shard, answer depths are spread over 0-100%). Shards are queued
round-robin over the cells, so when `--deadline` stops the run every cell has about the same
number of prompts; shards still running then are killed and left out. The merged result
(`slimcompile eval --merge`) has one accuracy, error bar and paired count per cell.

    python bench/eval_shards.py --procs 2 --tasks passkey,needle --lengths 1K:250,2K:250,4K:100 \\
        --shard-size 25 --deadline 420 --out /tmp/eval -- --schedule '{"prune_layers":[20],"keep_ratio":0.2}'

Arguments after `--` go to every `slimcompile eval` (schedules, --set, --device, --dtype ...).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from slimcompile.evaluate import parse_length  # noqa: E402


def shard_plan(tasks: list[str], lengths: list[tuple[int, int]], shard_size: int) -> list[tuple[str, int, int, int]]:
    """(task, length, first seed, count) for every shard, round-robin over the cells."""
    per_cell = [[(t, L, s, min(shard_size, n - s)) for s in range(0, n, shard_size)] for L, n in lengths for t in tasks]
    plan = []
    for i in range(max(map(len, per_cell), default=0)):
        plan += [cell[i] for cell in per_cell if i < len(cell)]
    return plan


def parse_cells(text: str) -> list[tuple[int, int]]:
    """"1K:250,2K:100" -> [(1024, 250), (2048, 100)]."""
    out = []
    for item in text.split(","):
        length, _, n = item.partition(":")
        if not n:
            raise ValueError(f"--lengths: {item!r} needs a sample count, e.g. 1K:250")
        out.append((parse_length(length), int(n)))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", required=True)
    p.add_argument("--lengths", required=True, help="LENGTH:SAMPLES,... e.g. 1K:250,2K:250,4K:100")
    p.add_argument("--shard-size", type=int, default=25)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--deadline", type=float, default=None, help="seconds; then unfinished shards are killed")
    p.add_argument("--out", required=True, help="folder for the shards' files and merged.json")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    plan = shard_plan(tasks, parse_cells(args.lengths), args.shard_size)
    shard_dir = os.path.join(args.out, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    cli = [sys.executable, "-m", "slimcompile.cli", "eval", "--engine", "reference", "--quiet"]
    t0 = time.perf_counter()
    running: list[tuple[subprocess.Popen, str, object]] = []  # (process, its JSON, its log file)
    done: list[str] = []
    queue = list(plan)
    while queue or running:
        while queue and len(running) < args.procs:
            task, L, seed, n = queue.pop(0)
            out = os.path.join(shard_dir, f"{task}_{L}_{seed}.json")
            log = open(out[:-5] + ".log", "w")
            cmd = cli + ["--tasks", task, "--lengths", str(L), "--samples", str(n), "--seed", str(seed), "--out", out, *extra]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, log))
        time.sleep(0.5)
        for item in list(running):
            proc, out, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                if proc.returncode == 0:
                    done.append(out)
                else:
                    print(f"shard failed ({proc.returncode}): {out}; see its .log", flush=True)
        if args.deadline is not None and time.perf_counter() - t0 > args.deadline:
            for proc, _, log in running:
                proc.kill()
                proc.wait()
                log.close()
            print(f"deadline: {len(running)} shards killed, {len(queue)} not started", flush=True)
            queue, running = [], []
    print(f"{len(done)} of {len(plan)} shards finished in {time.perf_counter() - t0:.0f}s", flush=True)
    files = sorted(f for f in done if os.path.exists(f))
    if not files:
        return 1
    return subprocess.call([sys.executable, "-m", "slimcompile.cli", "eval", "--merge", *files,
                            "--out", os.path.join(args.out, "merged.json")])


if __name__ == "__main__":
    sys.exit(main())
