"""What differs between the transformers (and torch) releases of the support window, in one place.

slimcompile supports transformers 5.17 (the GPU machine) through the newest release it was tested
with, and torch 2.11 and newer. The differences the core meets are named here, so the rest of
the code does not test version numbers:

- The cache keyword: transformers 5.17 passes and returns `past_key_values`; from 5.2x models
  take `cache` (with `past_key_values` still accepted through a deprecation shim) and model
  outputs carry `.cache`. `cache_in` / `output_cache` / `set_output_cache` read and write
  whichever the call or output uses.

`check_versions()` runs at import: a release below the window is refused (ImportError naming the
installed and the supported versions); one newer than the newest tested release gets one warning
(it is not assumed to work silently, and not refused: users run current releases).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import transformers

TRANSFORMERS_MIN = (5, 17)
TRANSFORMERS_TESTED = ((5, 17), (5, 25))  # both ends run in CI (.ci/run)
TORCH_MIN = (2, 11)
TORCH_TESTED = ((2, 11), (2, 13))  # 2.11 on the GPU machine (bench/gpu_check.py), 2.13 in CI

CACHE_NAMES = ("cache", "past_key_values")


def _version(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    nums = []
    for p in parts[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    return (nums + [0, 0])[0], (nums + [0, 0])[1]


def check_versions() -> None:
    for name, installed, low, tested in (
        ("transformers", transformers.__version__, TRANSFORMERS_MIN, TRANSFORMERS_TESTED),
        ("torch", torch.__version__, TORCH_MIN, TORCH_TESTED),
    ):
        v = _version(installed)
        window = f"{low[0]}.{low[1]} to {tested[-1][0]}.{tested[-1][1]} (tested: {', '.join('%d.%d' % t for t in tested)})"
        if v < low:
            raise ImportError(f"slimcompile supports {name} {window}; {installed} is installed: upgrade {name}")
        if v > tested[-1]:
            warnings.warn(
                f"slimcompile was tested with {name} {window}; {installed} is newer and untested: "
                "run the test suite (python3 -m pytest -q) before trusting its results",
                stacklevel=3,
            )


def cache_kwarg(model: Any) -> str:
    """The keyword this release's forward takes a cache under (passing the other one warns)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return next((n for n in CACHE_NAMES if n in params), "past_key_values")


def cache_in(kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """(keyword, cache) of the cache a forward call carries, or (None, None)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def output_cache(out: Any) -> Any:
    for name in CACHE_NAMES:
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


def set_output_cache(out: Any, cache: Any) -> None:
    for name in CACHE_NAMES:
        if getattr(out, name, None) is not None:
            setattr(out, name, cache)
            return
    raise AttributeError(f"{type(out).__name__} carries no cache field ({CACHE_NAMES})")


def causal_lm_output(logits: torch.Tensor, cache: Any) -> Any:
    """A `CausalLMOutputWithPast` holding `cache` under this release's field name."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    name = next(n for n in CACHE_NAMES if n in fields)
    return CausalLMOutputWithPast(logits=logits, **{name: cache})
