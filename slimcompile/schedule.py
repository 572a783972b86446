"""Kept-length arithmetic of a pruning schedule, on ints or SymInts, and the FLOP/KV model.

The same functions compute the kept length inside the FX pass (where `length` is a
SymInt, so the result is a sympy expression of the prompt length) and the numbers
the CLI, the reference and the benchmarks report, so they cannot disagree.

Layout of a sequence of length L at a pruning layer:
    [ sink | n blocks of block_size | window_eff ]     window_eff = L - sink - n*block_size
with n = (L - sink - window) // block_size, so window <= window_eff < window + block_size:
the tail that does not fill a block is kept with the window. Kept length after keeping
k blocks is L - (n - k) * block_size; a keep ratio r keeps k = ceil(n * r) blocks
(`ratio_blocks`), at least one however small r is. Blocks of later pruning layers coincide with the
original blocks, because the kept prefix/suffix lengths do not change.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Sequence

from slimcompile.options import LayerSchedule, keep_fraction
from slimcompile.runtime.layout import num_blocks  # noqa: F401  (re-exported: callers import it from here)


def ratio_blocks(n: Any, ratio: float | Fraction) -> Any:
    """Blocks a keep ratio keeps of `n` (int or SymInt): ceil(n * r) for the exact fraction r
    of `options.keep_fraction` (r >= 1/65536), so every ratio keeps at least one block when
    n >= 1 and ratio 1.0 keeps every block. The backend, the reference and `calibrate` all
    count through this function."""
    r = keep_fraction(ratio)
    p, q = r.numerator, r.denominator
    return (n * p + q - 1) // q


def keep_blocks(schedule: LayerSchedule, i: int, length: Any, n: Any, fits: bool | None = None) -> Any:
    """Blocks kept at the i-th pruning layer, a closed form of `length` (SymInt or int).

    A token budget that covers the whole sequence is a `length <= budget` test; on a
    SymInt that becomes a shape guard (one more compilation at most), never a runtime branch.
    """
    kind, value = schedule.keep_at(i)
    if kind == "ratio":
        return ratio_blocks(n, value)
    if (length <= value) if fits is None else fits:
        return n
    return n - (length - value + schedule.options.block_size - 1) // schedule.options.block_size


def budget_fits(schedule: LayerSchedule, i: int, length: Any) -> bool | None:
    """For a token budget: whether it covers `length` (a guard on a SymInt); None for ratios."""
    kind, value = schedule.keep_at(i)
    return bool(length <= value) if kind == "tokens" else None


def kept_length(schedule: LayerSchedule, i: int, length: Any, fits: bool | None = None) -> tuple[Any, Any, Any]:
    """(n_blocks, kept_blocks, kept_length) at the i-th pruning layer for an input of `length`."""
    o = schedule.options
    n = num_blocks(length, o.sink, o.window, o.block_size)
    k = keep_blocks(schedule, i, length, n, fits)
    return n, k, length - (n - k) * o.block_size


def prunes(schedule: LayerSchedule, prompt_len: Any) -> bool:
    """Whether a prompt of this length takes the pruned path (a guard when it is a SymInt)."""
    return schedule.options.pruning and bool(prompt_len >= schedule.options.min_prune_len)


def tokens_per_layer(schedule: LayerSchedule | None, prompt_len: int, num_layers: int) -> list[int]:
    """Tokens each decoder layer processes (and keeps in its KV cache) for a prompt."""
    out, cur = [], prompt_len
    pruning = schedule is not None and prunes(schedule, prompt_len)
    prune_at = {l: i for i, l in enumerate(schedule.layers)} if pruning else {}
    for layer in range(num_layers):
        out.append(cur)
        if layer in prune_at:
            cur = kept_length(schedule, prune_at[layer], cur)[2]
    return out


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """What the FLOP and KV model needs to know of a LLaMA-family decoder."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, cfg: Any, dtype_bytes: int = 2) -> "ModelDims":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            vocab=cfg.vocab_size,
            dtype_bytes=dtype_bytes,
        )

    def layer_flops(self, tokens: int) -> int:
        """Prefill FLOPs of one layer over `tokens` tokens (matmuls only, causal attention)."""
        h, d = self.hidden, self.head_dim
        proj = h * (self.heads * d) * 2 + h * (self.kv_heads * d) * 2  # q, o and k, v
        mlp = 3 * h * self.intermediate
        attn = 2 * self.heads * d * tokens * tokens  # QK^T and PV over the causal half
        return 2 * tokens * (proj + mlp) + attn

    def kv_bytes(self, tokens: int) -> int:
        return 2 * tokens * self.kv_heads * self.head_dim * self.dtype_bytes


@dataclasses.dataclass(frozen=True)
class ScheduleCost:
    tokens: list[int]
    flops: list[int]
    flops_unpruned: list[int]
    kv_bytes: list[int]
    kv_bytes_unpruned: list[int]

    @property
    def flop_fraction(self) -> float:
        return sum(self.flops) / sum(self.flops_unpruned)

    @property
    def ideal_speedup(self) -> float:
        return sum(self.flops_unpruned) / sum(self.flops)

    @property
    def kv_fraction(self) -> float:
        return sum(self.kv_bytes) / sum(self.kv_bytes_unpruned)


def schedule_cost(schedule: LayerSchedule | None, prompt_len: int, dims: ModelDims) -> ScheduleCost:
    tokens = tokens_per_layer(schedule, prompt_len, dims.num_layers)
    return ScheduleCost(
        tokens=tokens,
        flops=[dims.layer_flops(t) for t in tokens],
        flops_unpruned=[dims.layer_flops(prompt_len)] * dims.num_layers,
        kv_bytes=[dims.kv_bytes(t) for t in tokens],
        kv_bytes_unpruned=[dims.kv_bytes(prompt_len)] * dims.num_layers,
    )


def describe(values: Sequence[int]) -> str:
    """Compact run-length form of per-layer token counts: '2048x14, 410x16'."""
    parts, prev, count = [], None, 0
    for v in list(values) + [None]:
        if v == prev:
            count += 1
            continue
        if prev is not None:
            parts.append(f"{prev}x{count}" if count > 1 else str(prev))
        prev, count = v, 1
    return ", ".join(parts)
