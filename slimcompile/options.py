"""The `options={...}` schema of `backend="slim"`: defaults, validation, resolution against a model.

`SlimOptions` is the single source: each option is one dataclass field declared once with its
default, its help (the README's options table is generated from it, `options_table()`, and a
test compares the two), its validator and the environment variable, if any, that provides its
default (read only in `slimcompile/env.py`; an explicit option always wins). `DEFAULTS` and
`HELP` are derived from the fields. Adding an option is one `_opt(...)` field below (plus its
use), then `python -m slimcompile.options` regenerates the README's table and env.py's list of
variables (tests fail while they are stale); cross-field rules live in `_validate`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from fractions import Fraction
from typing import Any, Callable, Mapping

SCORINGS = ("attention", "tokenunit")
KV_MODES = ("resident", "offload", "dynamic")
OFFLOAD_SUMMARIES = ("minmax", "mean", "unitmean")
OFFLOAD_SCORES = ("max", "softmax")
POOLINGS = ("max", "mean")
SCORING_IMPLS = ("auto", "triton", "torch")
DECODE_ATTENTIONS = ("auto", "triton", "sdpa", "matmul")
OFFLOAD_SELECTS = ("lagged", "current")


class SlimOptionError(ValueError):
    """A bad `options={...}` entry; the message names the key, the value and what is allowed."""


def _err(key: str, value: Any, allowed: str) -> SlimOptionError:
    return SlimOptionError(f"slim option {key!r}={value!r} is invalid: {allowed}")


# ---------------------------------------------------------------- per-field validators
# check(key, value) -> the normalised value, or raises SlimOptionError (via _err).


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _err(key, value, "must be True or False")
    return value


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _err(key, value, "must be a positive int")
    return value


def _nonnegative_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _err(key, value, "must be an int >= 0")
    return value


def _choice(*allowed: Any) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in allowed:
            raise _err(key, value, f"allowed: {list(allowed)}")
        return value
    check.allowed = allowed  # type: ignore[attr-defined]
    return check


def _auto_bool(key: str, value: Any) -> Any:
    """"auto" (decided by the device: on for CUDA), True or False."""
    if value == "auto" or isinstance(value, bool):
        return value
    raise _err(key, value, "must be 'auto', True or False")


def _fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise _err(key, value, "must be a number in (0, 1]")
    return float(value)


def _prune_layers(key: str, layers: Any) -> tuple:
    if layers is None:
        layers = []
    if isinstance(layers, (int, float)) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise _err(key, layers, "must be a list of layer indices (ints) or depth fractions (0 < f < 1)")
    for x in layers:
        ok_int = isinstance(x, int) and not isinstance(x, bool) and x >= 0
        ok_frac = isinstance(x, float) and 0.0 < x < 1.0
        if not (ok_int or ok_frac):
            raise _err(key, layers, "entries must be ints >= 0 or depth fractions 0 < f < 1")
    return tuple(layers)


def _opt(default: Any, help: str, check: Callable[[str, Any], Any] | None = None, env: str | None = None) -> Any:
    """One option: its default, its help (markdown; a README table row), its validator (None: checked
    only across fields in `_validate`) and the environment variable giving its default (env.py)."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "env": env})


# Defaults chosen by the sweeps in docs/accuracy.md (SmolLM2-135M; CPU at 1K/2K with 8-20 prompts
# per cell, then an H200 run with 10-20 prompts per cell at 1K/2K/4K): one prune after L20 of 30
# keeping half the blocks is the cheapest schedule measured that loses no task by more than one
# prompt in 20 against the full model; keeping 20% (the earlier default) lost multi-needle
# prompts (multikey 13/20 vs 17/20, multivalue 0.60 vs 0.70), L14 and tokenunit scoring lost most.
# Layers are a fraction of depth so the default maps onto any depth: floor(0.68 * 30) = 20,
# floor(0.68 * 32) = 21 (whether that is a retrieval layer of another model is unmeasured:
# run `slimcompile calibrate`).


@dataclasses.dataclass(frozen=True)
class SlimOptions:
    """Validated options, not yet tied to a model (layer fractions are still fractions).

    Build it with `parse_options` (the field defaults are the user-facing raw defaults, e.g.
    keep_ratio=0.5 rather than one ratio per pruning layer)."""

    prune_layers: tuple[float | int, ...] = _opt(
        (0.68,), "decoder-layer indices (0-based) after which tokens are pruned; a float `0<f<1` means "
        "`floor(f * num_layers)` (layer 20 of SmolLM2's 30, 21 of a 32-layer model)", _prune_layers)
    keep_ratio: tuple[float, ...] | None = _opt(
        0.5, "float in (0, 1], or one per pruning layer: fraction of the blocks present at that layer that are kept "
        "(cumulative: 0.5 at three layers leaves 1/8); of `n` blocks it keeps `ceil(n * keep_ratio)`, so at least "
        "one block however small the ratio (the ratio is used as the nearest fraction with denominator ≤ 65536, "
        "and at least 1/65536)")
    keep_tokens: tuple[int, ...] | None = _opt(
        None, "int, or one per pruning layer: absolute token budget after that layer (non-increasing), e.g. "
        "`[8192, 4096, 2048]` after `[10, 20, 30]`; give this or `keep_ratio`")
    block_size: int = _opt(32, "tokens per block, the unit of selection", _positive_int)
    unit_size: int = _opt(
        8, "tokens per TokenUnit inside a block (`scoring=\"tokenunit\"`, `offload_summary=\"unitmean\"`); "
        "divides `block_size`", _positive_int)
    scoring: str = _opt(
        "attention", "`\"attention\"`: softmax attention of the window's queries (post-RoPE, that layer's q and k, "
        "GQA-aware) on every key, mean over heads and queries; `\"tokenunit\"`: the paper's max over units of the "
        "head-mean \\|q̄·k̄_unit\\|", _choice(*SCORINGS))
    window: int = _opt(32, "last prompt tokens always kept; their queries score the blocks", _positive_int)
    sink: int = _opt(32, "first prompt tokens always kept", _nonnegative_int)
    min_prune_len: int = _opt(
        512, "shorter prompts are not pruned (a shape guard: a second graph, not a runtime branch)", _positive_int)
    pooling: str = _opt(
        "max", "`\"max\"` or `\"mean\"` over a block's token scores (`scoring=\"attention\"`)", _choice(*POOLINGS))
    enabled: bool = _opt(True, "`False`: only the exact rewrites (causal mask → `is_causal`), no pruning", _bool)
    kv: str = _opt(
        "resident", "decode KV: `\"resident\"` (per-layer static buffers on the device), `\"offload\"` (prompt blocks "
        "in pinned host memory, an active set on the device), `\"dynamic\"` (transformers' DynamicCache through the "
        "compiled decode graph)", _choice(*KV_MODES))
    decode_budget: int = _opt(
        2048, "`kv=\"offload\"`: prompt tokens per layer in the device's active block set (besides sink, tail and "
        "generated tokens)", _positive_int)
    swap_threshold: float = _opt(
        0.9, "`kv=\"offload\"`: load a new block set only when it overlaps the active one by less than this, in (0, 1]",
        _fraction)
    offload_summary: str = _opt(
        "unitmean", "`kv=\"offload\"`: how a block is scored against the query from a GPU-resident summary: "
        "`\"unitmean\"` (mean key per `unit_size` tokens; the block's best unit counts; `unit_size=4` kept more "
        "answers on SmolLM2 but doubles the summary), `\"mean\"` (the block's mean key) or `\"minmax\"` "
        "(per-dimension key min/max, Quest's upper bound of q·k; lost more prompts on SmolLM2)",
        _choice(*OFFLOAD_SUMMARIES))
    offload_score: str = _opt(
        "max", "`kv=\"offload\"`: how heads combine: `\"max\"` (the largest q·summary over heads) or `\"softmax\"` "
        "(each head's softmax over blocks, i.e. its estimated attention mass, averaged over heads)",
        _choice(*OFFLOAD_SCORES))
    decode_reserve: int = _opt(
        256, "`kv=\"resident\"/\"offload\"`: rows reserved for generated tokens; a full buffer grows by this much "
        "(and the decode graph is recorded again)", _positive_int)
    cuda_graphs: bool = _opt(
        True, "`kv=\"resident\"/\"offload\"` on CUDA: replay the decode step as a CUDA graph", _bool)
    # ---- implementation switches (for comparisons; each has an environment default, slimcompile/env.py)
    scoring_impl: str = _opt(
        "auto", "`scoring=\"attention\"` block scores: `\"auto\"` (the Triton kernels on CUDA when triton is "
        "installed, else torch), `\"triton\"` (same as auto) or `\"torch\"` (the torch oracle everywhere); an "
        "argument of the `slim::block_scores` op, so each value is its own graph", _choice(*SCORING_IMPLS),
        env="SLIM_SCORING_IMPL")
    flatten_linear: bool = _opt(
        True, "rewrite the 3-D `linear` calls after a pruning layer into 2-D ones (CUDA's 3-D `linear` pins "
        "the pruned length: one recompilation per prompt length); `False` brings that recompile back", _bool, env="SLIM_FLATTEN_LINEAR")
    decode_attention: str = _opt(
        "auto", "runtime decode attention: `\"auto\"` (the split-K Triton kernel on CUDA when triton is installed, "
        "else `\"sdpa\"`), `\"triton\"` (needs CUDA), `\"sdpa\"` or `\"matmul\"`", _choice(*DECODE_ATTENTIONS),
        env="SLIM_DECODE_ATTN")
    decode_compile: bool | str = _opt(
        "auto", "runtime decode: compile each layer's norms/projections/RoPE/MLP into two Inductor regions shared "
        "by all layers: `\"auto\"` (on CUDA), `True`, `False`", _auto_bool, env="SLIM_DECODE_COMPILE")
    decode_fuse: bool | str = _opt(
        "auto", "runtime decode: `slimcompile.compile` moves each layer's q/k/v and gate/up weights into one matrix "
        "per group, in place, so decode runs one GEMM for each: `\"auto\"` (on CUDA), `True`, `False`", _auto_bool,
        env="SLIM_DECODE_FUSE")
    copy_programs: int = _opt(
        64, "`kv=\"offload\"`: programs of the host-to-GPU block copy kernel; `0` = one per block and kv head",
        _nonnegative_int, env="SLIM_COPY_PROGRAMS")
    offload_select: str = _opt(
        "lagged", "`kv=\"offload\"`: `\"lagged\"` (step t's query picks step t+1's blocks, copied on a side stream "
        "during step t) or `\"current\"` (each step picks its own blocks before attention: an accuracy diagnostic "
        "without copy overlap)", _choice(*OFFLOAD_SELECTS), env="SLIM_OFFLOAD_SELECT")

    @property
    def pruning(self) -> bool:
        return self.enabled and len(self.prune_layers) > 0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def resolve(self, num_layers: int) -> "LayerSchedule":
        """Tie the options to a model of `num_layers` decoder layers."""
        layers = []
        for raw in self.prune_layers:
            idx = int(math.floor(raw * num_layers)) if isinstance(raw, float) else raw
            if not 0 <= idx < num_layers - 1:
                raise _err(
                    "prune_layers",
                    list(self.prune_layers),
                    f"layer {raw!r} -> index {idx} is outside 0..{num_layers - 2} "
                    f"(the model has {num_layers} layers; pruning after the last layer prunes nothing)",
                )
            layers.append(idx)
        if sorted(set(layers)) != layers:
            raise _err("prune_layers", list(self.prune_layers), f"indices {layers} must be strictly increasing")
        return LayerSchedule(self, tuple(layers))


FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(SlimOptions)
# The built-in defaults (environment variables not applied: see `defaults()`), as a user writes them.
DEFAULTS: dict[str, Any] = {f.name: (list(f.default) if isinstance(f.default, tuple) else f.default) for f in FIELDS}
HELP: dict[str, str] = {f.name: f.metadata["help"] for f in FIELDS}
ENV_VARS: dict[str, str] = {f.name: f.metadata["env"] for f in FIELDS if f.metadata["env"]}
OPTIONS_FILE_HELP = ("path (str or `os.PathLike`) of a UTF-8 JSON file holding an object of options, or "
                     "`{\"options\": {...}, ...}` as written by `slimcompile calibrate` (other top-level keys are "
                     "ignored); options given beside it override the file's; files do not nest")


def defaults() -> dict[str, Any]:
    """DEFAULTS with the environment's defaults applied (slimcompile/env.py)."""
    from slimcompile import env

    return {**DEFAULTS, **env.option_defaults(FIELDS)}


def _markdown_value(v: Any) -> str:
    if isinstance(v, str):
        return f'`"{v}"`'
    if isinstance(v, (list, tuple)):
        return f"`{json.dumps(list(v))}`"
    return f"`{v!r}`"


def options_table() -> str:
    """The README's options table (markdown), generated from the fields."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in FIELDS:
        text = f.metadata["help"]
        if f.metadata["env"]:
            text += f" (default from `{f.metadata['env']}`)"
        rows.append(f"| `{f.name}` | {_markdown_value(DEFAULTS[f.name])} | {text} |")
    rows.append(f"| `options_file` | - | {OPTIONS_FILE_HELP} |")
    return "\n".join(rows) + "\n"


def env_table() -> str:
    """slimcompile/env.py's table of the environment defaults (markdown), generated from the fields."""
    rows = ["| variable | default of option | values |", "|---|---|---|"]
    for f in FIELDS:
        if f.metadata["env"]:
            allowed = getattr(f.metadata["check"], "allowed", None)
            if f.metadata["check"] is _auto_bool:
                values = "`auto`, `1`, `0`"
            elif isinstance(f.default, bool):
                values = "`1`, `0`"
            elif allowed:
                values = ", ".join(f"`{v}`" for v in allowed)
            else:
                values = "a whole number" if isinstance(f.default, int) else "a string"
            rows.append(f"| `{f.metadata['env']}` | `{f.name}` | {values} |")
    return "\n".join(rows) + "\n"


def write_docs(root: str | None = None) -> list[str]:
    """Regenerate the README's options table and env.py's variable table from the fields
    (`python -m slimcompile.options`); returns the files it changed."""
    import pathlib

    base = pathlib.Path(root) if root else pathlib.Path(__file__).resolve().parents[1]
    changed = []
    for path, head, table in ((base / "README.md", "| key | default | meaning |", options_table()),
                              (base / "slimcompile" / "env.py", "| variable | default of option | values |", env_table())):
        text = path.read_text()
        start = text.index(head)
        end = text.index("\n\n", start) + 1
        if text[start:end] != table:
            path.write_text(text[:start] + table + text[end:])
            changed.append(str(path))
    return changed


@dataclasses.dataclass(frozen=True)
class LayerSchedule:
    """Options resolved for one model: concrete pruning-layer indices."""

    options: SlimOptions
    layers: tuple[int, ...]

    def keep_at(self, i: int) -> tuple[str, Fraction | int]:
        """('ratio', Fraction) or ('tokens', int) for the i-th pruning layer."""
        o = self.options
        if o.keep_tokens is not None:
            return "tokens", o.keep_tokens[i]
        return "ratio", keep_fraction(o.keep_ratio[i])


# A keep ratio is used as an exact fraction p/q (so the kept length is a closed form of the
# symbolic prompt length): the nearest one with q <= RATIO_DENOMINATOR, and never below
# 1/RATIO_DENOMINATOR, so that ceil(n * ratio) keeps at least one of n >= 1 blocks however
# small the ratio (a ratio of 1e-6 keeps one block, not zero).
RATIO_DENOMINATOR = 1 << 16


def keep_fraction(ratio: float | Fraction) -> Fraction:
    """The exact fraction that `keep_ratio=ratio` stands for (see RATIO_DENOMINATOR)."""
    return max(Fraction(ratio).limit_denominator(RATIO_DENOMINATOR), Fraction(1, RATIO_DENOMINATOR))


def _per_layer(key: str, value: Any, n: int, kind: type) -> tuple:
    vals = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(vals) != n:
        raise _err(key, value, f"give one value or one per pruning layer ({n} pruning layers)")
    for v in vals:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise _err(key, value, "each entry must be an int")
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise _err(key, value, "each entry must be a number")
    return tuple(kind(v) for v in vals)


def _describe(value: Any) -> str:
    """`type: repr` of a user value, shortened."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


_OPTIONS_SHAPE = "a dict (any Mapping) of option names to values, e.g. {'keep_ratio': 0.5}, or {'options_file': 'PATH.json'}"


def read_options_file(path: Any) -> dict[str, Any]:
    """The options held by a JSON options file: its top-level object, or the object under its
    "options" key (the `slimcompile calibrate` format; other top-level keys such as "evidence"
    are ignored). Every problem is a SlimOptionError naming the file."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise _err("options_file", path, "must be the path (a str or os.PathLike) of a JSON file of options")
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise _err("options_file", shown, "no such file; give the path of a JSON file of options "
                   "(e.g. written by `slimcompile calibrate`)")
    if not os.path.isfile(shown):
        raise _err("options_file", shown, "is not a file; give the path of a JSON file of options")
    try:
        with open(shown, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise _err("options_file", shown, f"cannot be read as UTF-8 text ({e})") from None
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as e:
        raise _err("options_file", shown, f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(loaded, dict):
        raise _err("options_file", shown, f"must hold a JSON object of options, {{\"key\": value, ...}} "
                   f"(or {{\"options\": {{...}}}}), but its top level is a JSON {_json_kind(loaded)}")
    if "options" in loaded:
        inner = loaded["options"]
        if not isinstance(inner, dict):
            raise _err("options_file", shown, f"its \"options\" entry must be a JSON object of options, "
                       f"but it is a JSON {_json_kind(inner)}")
        clash = sorted(k for k in loaded if k in DEFAULTS or k == "options_file")
        if clash:
            raise _err("options_file", shown, f"has both an \"options\" object and top-level option key(s) {clash}; "
                       f"put every option inside \"options\"")
        loaded = inner
    if "options_file" in loaded:
        raise _err("options_file", shown, f"sets \"options_file\" itself ({loaded['options_file']!r}); options files "
                   "do not nest: copy the options of that file into this one")
    return loaded


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def parse_options(options: Mapping[str, Any] | SlimOptions | None = None, **kwargs: Any) -> SlimOptions:
    """Validate user options: a dict (or any Mapping) of options, optionally with the key
    'options_file' naming a JSON file of options (keys given beside it override the file's),
    and/or keyword arguments (which override both). None means the defaults."""
    if isinstance(options, SlimOptions):
        if not kwargs:
            return options
        options = options.as_dict()
    if options is not None and not isinstance(options, Mapping):
        hint = ""
        if isinstance(options, (str, os.PathLike)):
            hint = f"; to read options from a file, pass {{'options_file': {os.fspath(options)!r}}}"
        raise SlimOptionError(f"slim options must be {_OPTIONS_SHAPE}, or None for the defaults; "
                              f"got {_describe(options)}{hint}")
    raw: dict[str, Any] = dict(options or {})
    raw.update(kwargs)
    file = None
    if "options_file" in raw:
        file = raw.pop("options_file")
        raw = {**read_options_file(file), **raw}
    try:
        return _validate(raw)
    except SlimOptionError as e:
        if file is None:
            raise
        raise SlimOptionError(f"{e} (options read from options_file {os.fspath(file)!r})") from None


def _validate(raw: dict[str, Any]) -> SlimOptions:
    unknown = sorted((k for k in raw if k not in DEFAULTS), key=repr)
    if unknown:
        raise SlimOptionError(
            f"unknown slim option(s) {unknown}; valid keys are {sorted(DEFAULTS) + ['options_file']}"
        )
    # Giving keep_tokens replaces the default keep_ratio rather than conflicting with it.
    if raw.get("keep_tokens") is not None and "keep_ratio" not in raw:
        raw["keep_ratio"] = None
    v = {**defaults(), **raw}
    # Each field's own validator, in declaration order; then the rules across fields.
    for f in FIELDS:
        check = f.metadata["check"]
        if check is not None:
            v[f.name] = check(f.name, v[f.name])

    enabled = v["enabled"]
    n = len(v["prune_layers"])
    if v["scoring"] == "tokenunit" and v["block_size"] % v["unit_size"] != 0:
        raise _err("unit_size", v["unit_size"], f"must divide block_size={v['block_size']} (scoring='tokenunit')")
    # offload's unit summaries: a unit is at most a block (unit_size >= block_size means one mean key per block).
    if (v["kv"] == "offload" and v["offload_summary"] == "unitmean" and v["unit_size"] < v["block_size"]
            and v["block_size"] % v["unit_size"] != 0):
        raise _err("unit_size", v["unit_size"], f"must divide block_size={v['block_size']} (offload_summary='unitmean')")

    ratio, tokens = v["keep_ratio"], v["keep_tokens"]
    if enabled and n > 0:
        if ratio is not None and tokens is not None:
            raise SlimOptionError(
                f"slim options keep_ratio={ratio!r} and keep_tokens={tokens!r} were both given: give exactly one"
            )
        if ratio is None and tokens is None:
            raise SlimOptionError("slim options: pruning is on but neither keep_ratio nor keep_tokens was given")
    v["keep_ratio"] = v["keep_tokens"] = None
    if ratio is not None and n > 0:
        v["keep_ratio"] = _per_layer("keep_ratio", ratio, n, float)
        for r in v["keep_ratio"]:
            if not 0.0 < r <= 1.0:
                raise _err("keep_ratio", ratio, "each ratio must lie in (0, 1]")
    if tokens is not None and n > 0:
        v["keep_tokens"] = tokens_t = _per_layer("keep_tokens", tokens, n, int)
        floor = v["sink"] + v["window"] + v["block_size"]
        for t in tokens_t:
            if t < floor:
                raise _err(
                    "keep_tokens", tokens, f"each budget must be >= sink + window + block_size = {floor}"
                )
        if any(b > a for a, b in zip(tokens_t, tokens_t[1:])):
            raise _err("keep_tokens", tokens, "budgets must not grow from one pruning layer to the next")
    min_len = v["min_prune_len"]
    need = v["sink"] + v["window"] + v["block_size"]
    if enabled and n > 0 and min_len < need:
        raise _err("min_prune_len", min_len, f"must be >= sink + window + block_size = {need} (one prunable block)")
    return SlimOptions(**v)


if __name__ == "__main__":
    print("\n".join(write_docs()) or "README.md and slimcompile/env.py are up to date")
