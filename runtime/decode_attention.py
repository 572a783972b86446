"""Split-K ("flash-decoding") attention for one decode position over a prefix of a static KV buffer.

q [b, Hkv, G, d] holds the G query heads of each kv head as rows (grouped-query attention with
no `repeat_kv`); k, v [b, Hkv, C, d] are a layer's static decode buffers, of which rows
[0, n) are valid, with n a device tensor (so a CUDA graph can replay the call as the cache
fills). The output is softmax(scale * q.k^T) v over those rows, [b, Hkv, G, d] in q's dtype.

Why a kernel: one masked SDPA call on CUDA runs the memory-efficient kernel with one program
per (batch, kv head), so 8 programs stream a 32K-token cache and the decode step is bound by
attention, not by the weights (bench/RESULTS.md, session 2). Here the key axis is split into
chunks over the whole GPU (Dao et al.'s flash-decoding); on the H200 at 32K this took a decode
token from 23.8 to 10.1 ms, the attention reading the KV at ~2.9 TB/s (session 3):
1. `_decode_partial_kernel`, grid (n_split, b*Hkv): online softmax over one CHUNK of rows, BLOCK_N
   keys per `tl.dot` (all G rows of the head group at once, G padded to 16), stopping at n ->
   per-split row max, sum-exp and unnormalised output (fp32). Chunks past n exit at once.
2. `_decode_combine_kernel`, grid (G, b*Hkv): merges the splits -> the output row.
Logits are in the log2 domain (exp2). The number of splits depends on C (the capacity, fixed
between buffer growths), never on n. CHUNK and the split count are runtime arguments, not
constexprs, so a new prompt length (a new capacity) reuses the compiled kernels instead of
JIT-compiling new ones inside the first generation at that length (bench/RESULTS.md, session 6). The torch path (`reference_decode_attention`) is the
oracle; under TRITON_INTERPRET=1 the kernels run on the CPU for the tests, with bf16 operands
widened to fp32 first (the interpreter's bf16 `tl.dot` is wrong; products are exact in fp32).
"""

from __future__ import annotations

import functools

import torch

from slimcompile.runtime.triton_scoring import HAS_TRITON, INTERPRETED, LOG2E, next_pow2

if HAS_TRITON:  # optional: without it the torch paths are the only ones
    import triton
    import triton.language as tl


def reference_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: torch.Tensor, scale: float) -> torch.Tensor:
    """The oracle: masked softmax attention in fp32 over rows [0, n) of k/v; [b, Hkv, G, d] in q's dtype."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(torch.arange(k.shape[2], device=k.device) >= n, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["CHUNK", "N_SPLIT"])  # no per-value variants (e.g. a count divisible by 16)
    def _decode_partial_kernel(
        Q, K, V, N, PO, PM, PL, qk_scale, H, CHUNK, N_SPLIT,
        sqb, sqh, sqg, skb, skh, skc, svb, svh, svc,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        split = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        n = tl.load(N).to(tl.int32)
        rg = tl.arange(0, BLOCK_G)
        rd = tl.arange(0, BLOCK_D)
        gd_mask = (rg[:, None] < G) & (rd[None, :] < D)
        q = tl.load(Q + b * sqb + h * sqh + rg[:, None] * sqg + rd[None, :], mask=gd_mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, n)
        off = start
        while off < end:  # a while loop: runtime trip count (also under the interpreter)
            rn = off + tl.arange(0, BLOCK_N)
            nd_mask = (rn[:, None] < end) & (rd[None, :] < D)
            k = tl.load(k_base + rn[:, None] * skc + rd[None, :], mask=nd_mask, other=0.0)
            v = tl.load(v_base + rn[:, None] * svc + rd[None, :], mask=nd_mask, other=0.0)
            if DOT_F32:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(rn[None, :] < end, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_F32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
            off += BLOCK_N
        row = (bh * N_SPLIT + split) * G + rg
        tl.store(PM + row, m_i, mask=rg < G)
        tl.store(PL + row, l_i, mask=rg < G)
        tl.store(PO + row[:, None] * D + rd[None, :], acc, mask=gd_mask)

    @triton.jit(do_not_specialize=["N_SPLIT"])
    def _decode_combine_kernel(
        PO, PM, PL, O, H, N_SPLIT, sob, soh, sog,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        g = tl.program_id(0)
        bh = tl.program_id(1)
        rs = tl.arange(0, BLOCK_S)
        rd = tl.arange(0, BLOCK_D)
        m_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
        s0 = 0
        while s0 < N_SPLIT:  # while loops: N_SPLIT is a runtime value (also under the interpreter)
            m = tl.load(PM + (bh * N_SPLIT + s0 + rs) * G + g, mask=s0 + rs < N_SPLIT, other=float("-inf"))
            m_max = tl.maximum(m_max, m)
            s0 += BLOCK_S
        big = tl.max(m_max, 0)  # finite: split 0 always holds row 0
        l_sum = tl.zeros([BLOCK_S], tl.float32)
        o_sum = tl.zeros([BLOCK_D], tl.float32)
        s0 = 0
        while s0 < N_SPLIT:
            rows = (bh * N_SPLIT + s0 + rs) * G + g
            ok = s0 + rs < N_SPLIT
            w = tl.exp2(tl.load(PM + rows, mask=ok, other=float("-inf")) - big)
            l_sum += w * tl.load(PL + rows, mask=ok, other=0.0)
            po = tl.load(PO + rows[:, None] * D + rd[None, :], mask=ok[:, None] & (rd[None, :] < D), other=0.0)
            o_sum += tl.sum(w[:, None] * po, 0)
            s0 += BLOCK_S
        out = o_sum / tl.sum(l_sum, 0)
        b = bh // H
        h = bh % H
        tl.store(O + b * sob + h * soh + g * sog + rd, out.to(O.dtype.element_ty), mask=rd < D)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Launch defaults, from the session-5 sweep on an H200 (bench/decode_attn_sweep.py, bench/RESULTS.md).
BLOCK_N, NUM_WARPS, NUM_STAGES = 128, 4, 2


def split_config(capacity: int, programs: int, device: torch.device, block_n: int = BLOCK_N) -> tuple[int, int]:
    """(CHUNK, n_split): chunks of a power-of-two number of rows, about 2 programs per SM in all (bench/RESULTS.md, session 5 sweep)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 4
    chunk = next_pow2(max(1, -(-capacity * programs // (2 * sms))))
    chunk = min(max(chunk, block_n), 8192)
    return chunk, -(-capacity // chunk)


def triton_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: torch.Tensor, scale: float,
    block_n: int = BLOCK_N, chunk: int | None = None, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Split-K decode attention (see the module docstring); same contract as `reference_decode_attention`."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    b, hkv, g, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, hkv) or k.shape[3] != d:
        raise ValueError(f"q [b, Hkv, G, d] and k, v [b, Hkv, C, d] expected, got {tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)}")
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    capacity = k.shape[2]
    if chunk is None:
        chunk, n_split = split_config(capacity, b * hkv, q.device, block_n)
    else:
        n_split = -(-capacity // chunk)
    if chunk % block_n:
        raise ValueError(f"chunk {chunk} must be a multiple of block_n {block_n}")
    dot_f32 = q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16)
    block_g, block_d = max(16, next_pow2(g)), max(16, next_pow2(d))
    f32 = dict(device=q.device, dtype=torch.float32)
    po = torch.empty(b * hkv * n_split * g * d, **f32)
    pm = torch.empty(b * hkv * n_split * g, **f32)
    pl = torch.empty(b * hkv * n_split * g, **f32)
    _decode_partial_kernel[(n_split, b * hkv)](
        q, k, v, n, po, pm, pl, float(scale) * LOG2E, hkv, chunk, n_split,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        G=g, BLOCK_G=block_g, D=d, BLOCK_D=block_d, BLOCK_N=block_n, DOT_F32=dot_f32,
        num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty(b, hkv, g, d, device=q.device, dtype=q.dtype)
    _decode_combine_kernel[(g, b * hkv)](
        po, pm, pl, out, hkv, n_split, out.stride(0), out.stride(1), out.stride(2),
        G=g, D=d, BLOCK_D=block_d, BLOCK_S=min(16, next_pow2(n_split)), num_warps=4,
    )
    return out
