"""The `options={...}` schema of `backend="slim"`: defaults, validation, resolution against a model.

This module is the one place where option names, defaults and allowed values are
defined; the README's options table is generated from `DEFAULTS` and `HELP`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from fractions import Fraction
from typing import Any, Mapping

# Defaults chosen by the sweeps in docs/accuracy.md (SmolLM2-135M; CPU at 1K/2K with 8-20 prompts
# per cell, then an H200 run with 10-20 prompts per cell at 1K/2K/4K): one prune after L20 of 30
# keeping half the blocks is the cheapest schedule measured that loses no task by more than one
# prompt in 20 against the full model; keeping 20% (the earlier default) lost multi-needle
# prompts (multikey 13/20 vs 17/20, multivalue 0.60 vs 0.70), L14 and tokenunit scoring lost most.
# Layers are a fraction of depth so the default maps onto any depth: floor(0.68 * 30) = 20,
# floor(0.68 * 32) = 21 (whether that is a retrieval layer of another model is unmeasured:
# run `slimcompile calibrate`).
DEFAULTS: dict[str, Any] = {
    "prune_layers": [0.68],
    "keep_ratio": 0.5,
    "keep_tokens": None,
    "block_size": 32,
    "unit_size": 8,
    "scoring": "attention",
    "window": 32,
    "sink": 32,
    "min_prune_len": 512,
    "pooling": "max",
    "enabled": True,
    "kv": "resident",
    "decode_budget": 2048,
    "swap_threshold": 0.9,
    "offload_summary": "unitmean",
    "offload_score": "max",
    "decode_reserve": 256,
    "cuda_graphs": True,
}

HELP: dict[str, str] = {
    "prune_layers": "decoder-layer indices after which tokens are pruned; a float 0<f<1 means floor(f * num_layers)",
    "keep_ratio": "float in (0, 1], or one per pruning layer: fraction of the blocks present at that layer that are kept "
    "(ceil(n * ratio) of n blocks, so at least one block however small the ratio)",
    "keep_tokens": "int, or one per pruning layer: absolute token budget after that layer (non-increasing)",
    "block_size": "tokens per block (the unit of selection)",
    "unit_size": "tokens per TokenUnit inside a block (scoring='tokenunit', offload_summary='unitmean'); must divide block_size",
    "scoring": "'attention' (softmax attention of the window's queries) or 'tokenunit' (the paper's |q·k_unit|)",
    "window": "last prompt tokens always kept; their queries score the blocks",
    "sink": "first prompt tokens always kept",
    "min_prune_len": "prompts shorter than this are not pruned (a shape guard, not a runtime branch)",
    "pooling": "'max' or 'mean' pooling of token scores within a block (scoring='attention')",
    "enabled": "False: only the exact rewrites (causal mask), no pruning",
    "kv": "decode KV: 'resident' (per-layer static buffers on the device), 'offload' (prompt blocks in pinned "
    "host memory, an active set on the device) or 'dynamic' (transformers' DynamicCache through the compiled graph)",
    "decode_budget": "kv='offload': prompt tokens per layer in the device's active block set (besides sink, tail, generated)",
    "swap_threshold": "kv='offload': swap in a new block set only when it overlaps the active one by less than this (0..1]",
    "offload_summary": "kv='offload': block summary that scores blocks against the query: 'unitmean' (mean key "
    "per unit_size tokens, the block's best unit counts; default), 'mean' (the block's mean key) or "
    "'minmax' (per-dimension key range, Quest's upper bound of q.k; measured worse on SmolLM2, docs/accuracy.md)",
    "offload_score": "kv='offload': how heads combine into a block score: 'max' (largest q.summary over heads) or "
    "'softmax' (each head's softmax over blocks of the scaled q.summary, i.e. its estimated attention mass, averaged over heads)",
    "decode_reserve": "kv='resident'/'offload': rows reserved for generated tokens; buffers grow by this much when full",
    "cuda_graphs": "kv='resident'/'offload' on CUDA: replay the decode step as a CUDA graph",
}

SCORINGS = ("attention", "tokenunit")
KV_MODES = ("resident", "offload", "dynamic")
OFFLOAD_SUMMARIES = ("minmax", "mean", "unitmean")
OFFLOAD_SCORES = ("max", "softmax")
POOLINGS = ("max", "mean")


class SlimOptionError(ValueError):
    """A bad `options={...}` entry; the message names the key, the value and what is allowed."""


def _err(key: str, value: Any, allowed: str) -> SlimOptionError:
    return SlimOptionError(f"slim option {key!r}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class SlimOptions:
    """Validated options, not yet tied to a model (layer fractions are still fractions)."""

    prune_layers: tuple[float | int, ...]
    keep_ratio: tuple[float, ...] | None
    keep_tokens: tuple[int, ...] | None
    block_size: int
    unit_size: int
    scoring: str
    window: int
    sink: int
    min_prune_len: int
    pooling: str
    enabled: bool
    kv: str = "resident"
    decode_budget: int = 2048
    swap_threshold: float = 0.9
    offload_summary: str = "unitmean"
    offload_score: str = "max"
    decode_reserve: int = 256
    cuda_graphs: bool = True

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


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _err(key, value, "must be True or False")
    return value


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _err(key, value, "must be a positive int")
    return value


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
    v = {**DEFAULTS, **raw}

    enabled = _bool("enabled", v["enabled"])

    layers = v["prune_layers"]
    if layers is None:
        layers = []
    if isinstance(layers, (int, float)) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise _err("prune_layers", layers, "must be a list of layer indices (ints) or depth fractions (0 < f < 1)")
    for x in layers:
        ok_int = isinstance(x, int) and not isinstance(x, bool) and x >= 0
        ok_frac = isinstance(x, float) and 0.0 < x < 1.0
        if not (ok_int or ok_frac):
            raise _err("prune_layers", layers, "entries must be ints >= 0 or depth fractions 0 < f < 1")
    n = len(layers)

    for key in ("block_size", "unit_size", "window", "min_prune_len"):
        _positive_int(key, v[key])
    sink = v["sink"]
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise _err("sink", sink, "must be an int >= 0")
    if v["scoring"] == "tokenunit" and v["block_size"] % v["unit_size"] != 0:
        raise _err("unit_size", v["unit_size"], f"must divide block_size={v['block_size']} (scoring='tokenunit')")
    # offload's unit summaries: a unit is at most a block (unit_size >= block_size means one mean key per block).
    if (v["kv"] == "offload" and v["offload_summary"] == "unitmean" and v["unit_size"] < v["block_size"]
            and v["block_size"] % v["unit_size"] != 0):
        raise _err("unit_size", v["unit_size"], f"must divide block_size={v['block_size']} (offload_summary='unitmean')")
    if v["scoring"] not in SCORINGS:
        raise _err("scoring", v["scoring"], f"allowed: {list(SCORINGS)}")
    if v["pooling"] not in POOLINGS:
        raise _err("pooling", v["pooling"], f"allowed: {list(POOLINGS)}")

    ratio, tokens = v["keep_ratio"], v["keep_tokens"]
    if enabled and n > 0:
        if ratio is not None and tokens is not None:
            raise SlimOptionError(
                f"slim options keep_ratio={ratio!r} and keep_tokens={tokens!r} were both given: give exactly one"
            )
        if ratio is None and tokens is None:
            raise SlimOptionError("slim options: pruning is on but neither keep_ratio nor keep_tokens was given")
    ratio_t = tokens_t = None
    if ratio is not None and n > 0:
        ratio_t = _per_layer("keep_ratio", ratio, n, float)
        for r in ratio_t:
            if not 0.0 < r <= 1.0:
                raise _err("keep_ratio", ratio, "each ratio must lie in (0, 1]")
    if tokens is not None and n > 0:
        tokens_t = _per_layer("keep_tokens", tokens, n, int)
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

    if v["kv"] not in KV_MODES:
        raise _err("kv", v["kv"], f"allowed: {list(KV_MODES)}")
    _positive_int("decode_budget", v["decode_budget"])
    _positive_int("decode_reserve", v["decode_reserve"])
    thr = v["swap_threshold"]
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 < thr <= 1.0:
        raise _err("swap_threshold", thr, "must be a number in (0, 1]")
    if v["offload_summary"] not in OFFLOAD_SUMMARIES:
        raise _err("offload_summary", v["offload_summary"], f"allowed: {list(OFFLOAD_SUMMARIES)}")
    if v["offload_score"] not in OFFLOAD_SCORES:
        raise _err("offload_score", v["offload_score"], f"allowed: {list(OFFLOAD_SCORES)}")
    _bool("cuda_graphs", v["cuda_graphs"])

    return SlimOptions(
        prune_layers=tuple(layers),
        keep_ratio=ratio_t,
        keep_tokens=tokens_t,
        block_size=v["block_size"],
        unit_size=v["unit_size"],
        scoring=v["scoring"],
        window=v["window"],
        sink=v["sink"],
        min_prune_len=min_len,
        pooling=v["pooling"],
        enabled=enabled,
        kv=v["kv"],
        decode_budget=v["decode_budget"],
        swap_threshold=float(thr),
        offload_summary=v["offload_summary"],
        offload_score=v["offload_score"],
        decode_reserve=v["decode_reserve"],
        cuda_graphs=v["cuda_graphs"],
    )
