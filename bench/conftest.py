"""Fixtures for the pytest-benchmark microbenchmarks in bench/.

`device`: "cuda" when a GPU is present, else "cpu" (the CPU runs use tiny sizes, so CI only
checks that the benchmarks run). When pytest-benchmark is not installed (e.g. a GPU image
without it), a minimal stand-in `benchmark` fixture times the function (median of the
rounds, printed and kept in `benchmark.stats`) so the same files still run.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


if importlib.util.find_spec("pytest_benchmark") is None:

    class _MiniBenchmark:
        def __init__(self, name: str) -> None:
            self.name = name
            self.extra_info: dict = {}
            self.stats: dict = {}

        def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=10, warmup_rounds=1, iterations=1):
            kwargs = kwargs or {}
            for _ in range(warmup_rounds):
                target(*args, **kwargs)
            times, result = [], None
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(iterations):
                    result = target(*args, **kwargs)
                times.append((time.perf_counter() - t0) / iterations)
            self.stats = dict(median=statistics.median(times), min=min(times), rounds=rounds)
            print(f"\n[bench] {self.name}: median {self.stats['median'] * 1e3:.3f} ms, min {self.stats['min'] * 1e3:.3f} ms "
                  f"({rounds} rounds) {self.extra_info}")
            return result

        def __call__(self, target, *args, **kwargs):
            return self.pedantic(target, args=args, kwargs=kwargs, rounds=10, warmup_rounds=2)

    @pytest.fixture
    def benchmark(request):
        return _MiniBenchmark(request.node.name)
