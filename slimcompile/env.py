"""Environment variables: the one module that reads `os.environ` for slimcompile.

Behaviour is chosen by options (`options={...}`, slimcompile/options.py). An environment
variable only provides the DEFAULT of the option named beside it: an option given explicitly
(in the dict, an options file or a keyword) always wins, and the value in force is part of the
options that `slimcompile inspect` shows and the backend compiles with. Read each time options
are parsed (`parse_options`), parsed like the option (case-insensitive words; `1`/`0`, `true`/
`false`, `on`/`off` for True/False) and checked by the option's validator; a bad value is a
`SlimOptionError` naming the variable. An empty value counts as unset.

| variable | default of option | values |
|---|---|---|
| `SLIM_SCORING_IMPL` | `scoring_impl` | `auto`, `triton`, `torch` |
| `SLIM_FLATTEN_LINEAR` | `flatten_linear` | `1`, `0` |
| `SLIM_DECODE_ATTN` | `decode_attention` | `auto`, `triton`, `sdpa`, `matmul` |
| `SLIM_DECODE_COMPILE` | `decode_compile` | `auto`, `1`, `0` |
| `SLIM_DECODE_FUSE` | `decode_fuse` | `auto`, `1`, `0` |
| `SLIM_COPY_PROGRAMS` | `copy_programs` | a whole number |
| `SLIM_OFFLOAD_SELECT` | `offload_select` | `lagged`, `current` |

The table is generated from `SlimOptions`' `env` metadata (`python -m slimcompile.options`; tests/test_options.py
checks it). Not option defaults:

- `SLIM_HOST_POOL_GIB` (`host_pool_gib()`): the most GiB of free pinned host buffers that
  kv="offload" keeps for reuse, process-wide (default 64); read once, when runtime/offload.py is
  imported.
- `SLIM_DEBUG` (`debug_dir()`): a directory; the backend dumps what the passes did for every
  compilation there (slimcompile/backend.py).
- `SLIMCOMPILE_CACHE` (`model_cache_dir()`): where the default model is cached as safetensors
  (slimcompile/models.py).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

HOST_POOL_GIB = "SLIM_HOST_POOL_GIB"
DEBUG = "SLIM_DEBUG"
MODEL_CACHE = "SLIMCOMPILE_CACHE"

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


def _read(var: str) -> str | None:
    v = os.environ.get(var)
    if v is None or not v.strip():
        return None
    return v.strip()


def _parse(text: str, default: Any) -> Any:
    """The option value an environment string stands for, shaped like the field's default."""
    low = text.lower()
    if isinstance(default, bool) or default == "auto":
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    if isinstance(default, int) and not isinstance(default, bool):
        return int(low) if low.isdigit() else text
    return low


def option_defaults(fields: Iterable[dataclasses.Field]) -> dict[str, Any]:
    """{option: value} for each option field whose `env` variable is set, parsed and validated by
    the field's own check; a bad value raises SlimOptionError naming the variable."""
    from slimcompile.options import SlimOptionError

    out: dict[str, Any] = {}
    for f in fields:
        var = f.metadata.get("env")
        text = _read(var) if var else None
        if text is None:
            continue
        value = _parse(text, f.default)
        check = f.metadata.get("check")
        if check is not None:
            try:
                value = check(f.name, value)
            except SlimOptionError as e:
                raise SlimOptionError(f"environment variable {var}={text!r} (the default of slim option "
                                      f"{f.name!r}) is invalid: {str(e).split(' is invalid: ', 1)[-1]}") from None
        out[f.name] = value
    return out


def host_pool_gib() -> float:
    """SLIM_HOST_POOL_GIB: GiB of free pinned host buffers kept for reuse (default 64)."""
    text = _read(HOST_POOL_GIB)
    if text is None:
        return 64.0
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not gib >= 0:
        raise ValueError(f"environment variable {HOST_POOL_GIB}={text!r} is invalid: must be a number of GiB >= 0")
    return gib


def debug_dir() -> str | None:
    """SLIM_DEBUG: directory for a dump of every compilation, or None."""
    return _read(DEBUG)


def model_cache_dir() -> str | None:
    """SLIMCOMPILE_CACHE: the model cache directory, or None for the default."""
    return _read(MODEL_CACHE)
