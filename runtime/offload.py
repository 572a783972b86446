"""kv="offload": prompt KV blocks in host memory, an active set of them on the device.

Per layer the device keeps the sink, the tail (window + remainder), every generated token and
an active set of A = decode_budget // block_size prompt blocks; all prompt blocks live in
(pinned) host memory, and a summary per block (a mean key per unit of `unit_size` tokens by
default, the block's mean key, or the per-dimension key min and max: `offload_summary`) stays
on the device.
Host buffers come from `HOST_POOL`, so a later generation of the same or a similar length reuses them.

Policy (`BlockSelector`, plain torch, so the CPU tests run the same code as the GPU):
  scores  = a block score per head, combined over heads and GQA rows    [b, n]
            `offload_summary` "unitmean" (default): q . mean key of each unit_size-token unit, the
            block's best unit counts; "mean": q . mean key of the block; "minmax" (Quest): sum_d max(q_d
            min_d, q_d max_d) over the block's per-dimension key range, an upper bound of q . k in
            the block (lost more prompts than "mean" on SmolLM2 at 2K, docs/accuracy.md).
            `offload_score` "max" (default): the largest over heads; "softmax": each head's softmax
            over blocks (its estimated attention mass), averaged over heads
  new     = top-A blocks
  overlap = |new & active| / A;   swap iff overlap < swap_threshold
  on swap, the blocks of `new` not yet active take the slots of the active blocks that left
  (the others stay where they are), and only those slots are copied in.
Everything is computed on the device, so there is no host synchronisation and the step can be
replayed as a CUDA graph. A step's selection (`plan_next_active`) runs as one Inductor-compiled
region on CUDA (option `decode_compile`, runtime/regions.py), compiled once for all layers and prompt
lengths (the number of blocks is a dynamic size): eagerly it was ~1400 tiny kernels per
step on the side stream, as long as the block copies themselves (bench/RESULTS.md, session 3).

Timing (`OffloadedLayerKV.after_attention`): the first decode step selects with its own query before
attention. From then on, after layer l's attention at step t the selection for step t + 1 is
made from step t's query and the copy runs on a side stream while layers l+1.. compute; step
t + 1 waits for it before layer l's attention. So a selection lags the query by one step (the
paper's decode also reuses its set until the overlap drops), and the copy overlaps the rest of
the step. With A >= the number of blocks every block is resident and nothing is selected:
offload is then exactly the resident cache.
"""

from __future__ import annotations

import math
import weakref

import torch

from slimcompile import env
from slimcompile.runtime.block_copy import copy_blocks
from slimcompile.runtime.config import RuntimeConfig
from slimcompile.runtime.kv_cache import DecodeLayerKV, KVBytes, _nbytes
from slimcompile.runtime.layout import num_blocks
from slimcompile.runtime.regions import CompiledRegion


class HostBufferPool:
    """Reuses (pinned) host buffers across generations: page-locking costs ~0.4-0.5 s per GB on the
    H200's host (a first offload generation at 32K and 64K, bench/RESULTS.md, session 6).

    Buffers are flat and handed out as views: a request takes the smallest free buffer of its dtype
    that holds it, if that is at most twice its size, so a prompt a little shorter than an earlier
    one reuses its memory; new buffers are rounded up by at most 1/8 so that a little longer one
    does too. A buffer taken for a layer returns to the pool when that layer is garbage-collected;
    the pool keeps at most `max_free_bytes` of free buffers (SLIM_HOST_POOL_GIB, default 64).
    """

    def __init__(self, max_free_bytes: int):
        self.max_free_bytes = max_free_bytes
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.free_bytes = 0
        self.allocated = 0  # buffers created (not reused), for tests and reports

    @staticmethod
    def rounded(numel: int) -> int:
        """`numel` rounded up to a multiple of 1/8 of its largest power of two (at most 12.5% more)."""
        step = max(1, (1 << (max(numel, 1).bit_length() - 1)) >> 3)
        return -(-numel // step) * step

    def take(self, owner: object, shape: tuple, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        key = (dtype, pin)
        need = math.prod(shape)
        free = self.free.get(key, [])
        fits = [i for i, t in enumerate(free) if need <= t.numel() <= 2 * need]
        if fits:
            base = free.pop(min(fits, key=lambda i: free[i].numel()))
            self.free_bytes -= base.numel() * base.element_size()
        else:
            base = torch.empty(self.rounded(need), dtype=dtype, pin_memory=pin)
            self.allocated += 1
        weakref.finalize(owner, self._put, key, base)
        return base[:need].view(shape)

    def _put(self, key: tuple, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.free_bytes + size <= self.max_free_bytes:
            self.free.setdefault(key, []).append(t)
            self.free_bytes += size


HOST_POOL = HostBufferPool(int(env.host_pool_gib() * 2**30))  # SLIM_HOST_POOL_GIB, read once (slimcompile/env.py)

_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(dev: torch.device) -> torch.cuda.Stream:
    """One copy stream per device, shared by every layer (the copies are bus-bound anyway)."""
    if dev not in _STREAMS:
        _STREAMS[dev] = torch.cuda.Stream(dev)
    return _STREAMS[dev]


class BlockSelector:
    """Decides the active set of one layer: top-A blocks for a query, kept unless overlap drops."""

    def __init__(self, n_active: int, swap_threshold: float, units: int = 1, combine: str = "max"):
        self.n_active = n_active
        self.swap_threshold = swap_threshold
        self.units = units
        self.combine = combine

    @staticmethod
    def scores(q: torch.Tensor, summaries: torch.Tensor, units: int = 1, combine: str = "max") -> torch.Tensor:
        """q [b, Hq, 1, d] against block summaries -> [b, n] fp32.

        summaries [b, Hkv, n * units, d]: mean keys ("mean": units=1; "unitmean": one per unit of
        a block), score q . mean_key. summaries [2, b, Hkv, n, d]: per-dimension min and max key of
        each block (Quest), score sum_d max(q_d * min_d, q_d * max_d), an upper bound of q . k over
        the block's keys. combine "max": the largest score over heads, GQA rows and units;
        "softmax": per head and GQA row a softmax over all units of the scaled scores (that head's
        estimated attention mass), summed over a block's units and averaged over heads.
        """
        b, hq, _, d = q.shape
        hkv = summaries.shape[-3]
        qg = q.reshape(b, hkv, hq // hkv, d).float()
        # An fp32 einsum (a GEMM on a converted copy of the summaries). A broadcast multiply-and-sum,
        # which Inductor fuses into one reduction over the bf16 summaries, took longer on the H200
        # (1.27 against 1.06 ms per step with the max over heads, bench/RESULTS.md session 6).
        if summaries.dim() == 4:
            s = torch.einsum("bhgd,bhnd->bhgn", qg, summaries.float())
        else:  # max(q_d min_d, q_d max_d) = q_d max_d where q_d > 0, q_d min_d where q_d < 0
            s = torch.einsum("bhgd,bhnd->bhgn", qg.clamp(min=0), summaries[1].float())
            s = s + torch.einsum("bhgd,bhnd->bhgn", qg.clamp(max=0), summaries[0].float())
        s = s.reshape(*s.shape[:3], -1, units)  # [b, h, g, n, units]
        if combine == "softmax":
            p = torch.softmax(s.flatten(-2) * d**-0.5, dim=-1).reshape(s.shape)
            return p.sum(-1).mean(dim=(1, 2))
        return s.amax(dim=(1, 2, 4))

    def block_scores(self, q: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """`scores` with this selector's units and head combination."""
        return self.scores(q, summaries, self.units, self.combine)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """[b, A] block ids, increasing."""
        top = torch.topk(scores, self.n_active, dim=-1, sorted=False).indices
        return torch.sort(top, dim=-1).values

    def plan(self, active: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(next_active [b, A], changed [b, A] bool, overlap [b]) from the current and the newly selected set."""
        A = active.shape[1]
        stays = (active[:, :, None] == new[:, None, :]).any(-1)  # active blocks also in new
        arrives = ~(new[:, :, None] == active[:, None, :]).any(-1)  # new blocks not active yet
        overlap = stays.sum(-1).float() / A
        # Pair the j-th freed slot with the j-th arriving block (stable sorts put them first).
        freed = torch.sort(stays.to(torch.int8), dim=-1, stable=True).indices
        incoming = new.gather(1, torch.sort((~arrives).to(torch.int8), dim=-1, stable=True).indices)
        n_in = arrives.sum(-1, keepdim=True)
        take = torch.arange(A, device=active.device)[None] < n_in
        swap = (overlap < self.swap_threshold)[:, None]
        take = take & swap
        next_active = active.scatter(1, freed, torch.where(take, incoming, active.gather(1, freed)))
        changed = torch.zeros_like(take).scatter(1, freed, take)
        return next_active, changed, overlap


def plan_next_active(q: torch.Tensor, summaries: torch.Tensor, active: torch.Tensor, swaps: torch.Tensor,
                     blocks_copied: torch.Tensor, n_active: int, swap_threshold: float, units: int = 1,
                     combine: str = "max") -> torch.Tensor:
    """A decode step's selection for one layer, in place: `active` [b, A] becomes the next active
    set and the swap / copied-block counters advance; returns which slots changed ([b, A] int8,
    what the copy kernel reads).

    Scores, top-A, the swap plan and the bookkeeping: ~40 small kernels eagerly, the work the side
    stream does before its copies; compiled (`CompiledRegion`) it is a few fused ones."""
    selector = BlockSelector(n_active, swap_threshold, units, combine)
    nxt, changed, _ = selector.plan(active, selector.select(selector.block_scores(q, summaries)))
    active.copy_(nxt)
    swaps.add_(changed.any(-1).to(swaps.dtype))
    blocks_copied.add_(changed.sum())
    return changed.to(torch.int8)


_PLAN_REGIONS: dict[bool, CompiledRegion] = {}


def _plan_region(compiled: bool) -> CompiledRegion:
    if compiled not in _PLAN_REGIONS:
        _PLAN_REGIONS[compiled] = CompiledRegion(plan_next_active, compiled)
    return _PLAN_REGIONS[compiled]


class OffloadedLayerKV(DecodeLayerKV):
    """One layer's KV with its prompt blocks in host memory and an active set on the device.

    Device rows: [0, sink) sink | [sink, sink + A*B) active slots | tail | generated tokens.
    `config` gives decode_reserve, sink, window, block_size, unit_size, decode_budget,
    swap_threshold, offload_summary, offload_score, offload_select, copy_programs, decode_compile.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, config: RuntimeConfig):
        c = config
        reserve, window, block_size, unit_size = c.decode_reserve, c.window, c.block_size, c.unit_size
        summary, combine = c.offload_summary, c.offload_score
        b, h, L, d = keys.shape
        dev = keys.device
        sink = min(c.sink, L)
        n = max(num_blocks(L, sink, window, block_size), 0)
        A = min(n, max(c.decode_budget // block_size, 1))
        tail = L - sink - n * block_size
        self.sink, self.block_size, self.n_blocks, self.n_active, self.tail = sink, block_size, n, A, tail
        self.all_resident = A == n
        resident_prompt = sink + A * block_size + tail
        super().__init__(L, resident_prompt + reserve, dev)
        self.resident_prompt = resident_prompt
        self.k_buf = keys.new_zeros(b, h, resident_prompt + reserve, d)
        self.v_buf = values.new_zeros(b, h, resident_prompt + reserve, d)
        body = slice(sink, sink + n * block_size)
        for buf, src in ((self.k_buf, keys), (self.v_buf, values)):
            buf[:, :, :sink] = src[:, :, :sink]
            buf[:, :, sink + A * block_size : resident_prompt] = src[:, :, sink + n * block_size :]
        if self.all_resident:
            for buf, src in ((self.k_buf, keys), (self.v_buf, values)):
                buf[:, :, body] = src[:, :, body]
            self.host_keys = self.host_values = None
            self.summaries = None
            return
        pin = dev.type == "cuda"
        blocks_k = keys[:, :, body].reshape(b, h, n, block_size, d)
        blocks_v = values[:, :, body].reshape(b, h, n, block_size, d)
        self.host_keys = HOST_POOL.take(self, blocks_k.shape, keys.dtype, pin)
        self.host_values = HOST_POOL.take(self, blocks_v.shape, values.dtype, pin)
        self.host_keys.copy_(blocks_k)
        self.host_values.copy_(blocks_v)
        units = 1
        if summary == "minmax":  # [2, b, h, n, d]
            self.summaries = torch.stack([blocks_k.amin(dim=3), blocks_k.amax(dim=3)])
        elif summary == "unitmean":  # [b, h, n * units, d]; a unit is at most a block
            units = max(block_size // unit_size, 1)
            self.summaries = blocks_k.float().reshape(b, h, n * units, block_size // units, d).mean(dim=3).to(keys.dtype)
        else:  # "mean": [b, h, n, d]
            self.summaries = blocks_k.float().mean(dim=3).to(keys.dtype)
        # The block axis is a dynamic size of the compiled selection: layers (pruned or not) and
        # prompt lengths have different numbers of blocks, and each would otherwise compile anew.
        torch._dynamo.maybe_mark_dynamic(self.summaries, self.summaries.dim() - 2)
        self.selector = BlockSelector(A, c.swap_threshold, units, combine)
        self.plan = _plan_region(c.compile_regions(dev))
        self.select_mode = c.offload_select
        self.copy_programs = c.copy_programs
        self.active = torch.arange(A, device=dev)[None].repeat(b, 1)  # filled by the first prefetch
        self.primed = False
        self.stream = _side_stream(dev) if pin else None
        self.q_buf: torch.Tensor | None = None  # the query the side stream scores with
        self.swaps = torch.zeros(b, dtype=torch.int64, device=dev)  # steps that swapped, per sample
        self.blocks_copied = torch.zeros((), dtype=torch.int64, device=dev)

    # -- DecodeLayerKV ------------------------------------------------------------------------------
    def write_index(self) -> int:
        return self.resident_prompt + self.generated

    def bytes(self) -> KVBytes:
        host = _nbytes(self.host_keys, self.host_values) if self.host_keys is not None else 0
        summ = _nbytes(self.summaries) if self.summaries is not None else 0
        return KVBytes(_nbytes(self.k_buf, self.v_buf) + summ, host)

    def prompt_rows_on_device(self) -> int:
        return self.resident_prompt

    # -- selection and copies -------------------------------------------------------------------------
    def _apply(self, q: torch.Tensor, prime: bool) -> None:
        sel = self.selector
        if prime:
            self.active.copy_(sel.select(sel.block_scores(q, self.summaries)))
            changed = torch.ones_like(self.active, dtype=torch.int8)
            self.blocks_copied += self.active.numel()
        else:
            changed = self.plan(q, self.summaries, self.active, self.swaps, self.blocks_copied,
                                self.n_active, sel.swap_threshold, sel.units, sel.combine)
        copy_blocks(self.k_buf, self.host_keys, self.active, changed, self.sink, self.copy_programs)
        copy_blocks(self.v_buf, self.host_values, self.active, changed, self.sink, self.copy_programs)

    def before_attention(self, q: torch.Tensor) -> None:
        """First step: choose and load the active set from this query. Later steps find it loaded:
        the previous step ended with `join`, which waited for its prefetches. (With
        offload_select="current" every step selects from its own query here, copying on the
        main stream: no lag, no overlap.)"""
        if self.all_resident:
            return
        if not self.primed:
            self._apply(q, prime=True)
        elif self.select_mode == "current":
            self._apply(q, prime=False)

    def after_attention(self, q: torch.Tensor) -> None:
        """Choose next step's active set from this query; copy what changed (side stream on CUDA)."""
        if self.all_resident:
            return
        if not self.primed:  # the first step's set was chosen from this very query
            self.primed = True
            return
        if self.select_mode == "current":
            return
        if self.stream is None:
            self._apply(q, prime=False)
            return
        # The side stream reads a persistent copy of q: the step's own q is freed (and its memory
        # reused by the main stream) as soon as the next layer starts, maybe before the side
        # stream has scored with it. The next write to q_buf comes after `join`.
        if self.q_buf is None or self.q_buf.shape != q.shape:
            self.q_buf = torch.empty_like(q)
        self.q_buf.copy_(q)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._apply(self.q_buf, prime=False)

    def join(self) -> None:
        """Make the main stream wait for this layer's copies (end of a step / of a graph capture)."""
        if not self.all_resident and self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
