"""Triton kernels for scoring="attention" block scoring (the CUDA path of `slim::block_scores`).

Same semantics as `scoring_torch.attention_block_scores` (the oracle): q [b, Hq, w, d] are the
post-RoPE queries of the last w tokens (query i sits at position L - w + i), k [b, Hkv, L, d]
the post-RoPE keys (GQA: query head hq uses kv head hq // (Hq // Hkv)); logits = scale * q.k,
causal (key j visible to query i iff j <= L - w + i), softmax over keys in fp32, token score =
mean of the probabilities over all query heads and window queries, block score = max or mean
over the tokens [sink + n*B, sink + (n+1)*B) of block n < n_blocks. Needs L >= w.

The [b, Hq, w, L] probability tensor is never materialised. Per (batch, kv head) the R = G*w
query rows of the head group (G = Hq // Hkv) are processed together, so a key tile is read
once per pass and multiplied by all the rows that use it with `tl.dot` (bf16/fp16 operands,
fp32 accumulation; fp32 operands use an exact fp32 dot, not TF32). Softmax in the log2 domain.

1. `_stats_kernel`, grid (cdiv(L, SPLIT), cdiv(R, BLOCK_M), b*Hkv): online softmax over a
   SPLIT-key slice in BLOCK_N1-key tiles -> partial row max / sum-exp, [b*Hkv, n_split, R]
   fp32 each.
2. `_combine_kernel`, grid (cdiv(R, BLOCK_R), b*Hkv): merges the slices (BLOCK_S at a time)
   -> row max and 1 / sum-exp, [b*Hkv, R] fp32 each.
3. `_token_kernel`, grid (cdiv(L, BLOCK_N2), b*Hkv): recomputes S^T = K Q^T for one key tile
   and all R rows (in BLOCK_M chunks; keys on the dot's M side so the sum over rows stays
   inside a warp), normalises, sums over rows -> [b, Hkv, L] fp32 (one writer per element:
   deterministic, no atomics, no zero-fill).
4. `_pool_kernel`, grid (cdiv(n_blocks, BLOCK_NB), b): sums the Hkv partials, divides by Hq*w
   and pools each block (max / mean) -> [b, n_blocks] fp32.

Defaults (`default_config`, swept on an H200 at L = 128K, LLaMA-8B shape): BLOCK_M = 128 rows
(fewer when R is smaller), BLOCK_N1 = 64, SPLIT = 2048, BLOCK_N2 = 128, 4 warps, 3 stages.
Extra memory: 2*b*Hkv*n_split*R + 2*b*Hkv*R + b*Hkv*L + b*n_blocks fp32 words (about 4.6 MiB
at L = 128K for the LLaMA-8B shape), where the oracle allocates several b*Hq*w*L fp32
tensors (512 MiB each there). Measured there: ~0.25 ms of GPU time at L = 128K (token pass
~55%, stats ~42%), against ~2.4-2.9 ms for the torch path; at 8K-32K an eager call is bound
by launch/dispatch overhead (~0.2 ms).

The launchers wrap the kernels with `torch.library.wrap_triton` so that the `triton_op` in
`ops.py` is traceable and Inductor sees the kernels; under `TRITON_INTERPRET=1` (CPU tests) the
kernels are launched directly (and bf16 operands are widened to fp32 before `tl.dot`, whose
interpreter version mishandles bf16). The length L, n_blocks and the grids may be SymInts;
Hq, Hkv, w, d and block_size are constexprs, i.e. specialised (guards) under torch.compile.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # triton is optional: without it the torch path is the only one
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

# True when the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1 before import).
INTERPRETED = False

LOG2E = 1.4426950408889634
IMPLS = ("auto", "triton", "torch")


def use_triton(q: torch.Tensor, impl: str) -> bool:
    """Whether scoring="attention" on this input takes the Triton kernels.

    Triton needs CUDA tensors (and triton importable); impl="torch" (the `scoring_impl` option)
    forces the torch path everywhere. `impl` is an argument of the `slim::block_scores` op, so it
    is part of the traced graph and of every cache key (Dynamo, AOTAutograd, Inductor).
    """
    if impl not in IMPLS:
        raise ValueError(f"slim::block_scores impl must be one of {list(IMPLS)}, got {impl!r}")
    return HAS_TRITON and q.is_cuda and impl != "torch"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_config(d: int, rows: int, block_size: int, elem_size: int) -> dict[str, int]:
    """Tile sizes (constexprs) for head dim d, rows = G*w query rows per kv head.

    Chosen for an H100/H200 class GPU at d in {64, 128}, w in {16, 32, 64}; every block dim
    is >= 16 (tl.dot's minimum). Tests override them with tiny tiles.
    """
    block_d = max(16, next_pow2(d))
    block_m = min(128, max(16, next_pow2(rows)))
    if elem_size >= 4 and block_d >= 128:
        block_m = min(block_m, 64)  # fp32 operands: keep the q tile in budget
    block_t = max(16, next_pow2(block_size))
    return dict(
        BLOCK_D=block_d,
        BLOCK_M=block_m,  # query rows per dot (both passes)
        BLOCK_N1=64,  # keys per tile in the stats pass
        SPLIT=2048,  # keys per stats program (a multiple of BLOCK_N1)
        BLOCK_N2=128,  # keys per token-pass program
        BLOCK_S=32,  # splits per step of the combine pass
        BLOCK_R=32,  # rows per combine program
        BLOCK_T=block_t,  # tokens per block, padded to a power of two
        BLOCK_NB=max(1, 256 // block_t),  # blocks per pooling program
        WARPS1=4,
        WARPS2=4,
        STAGES=3,
    )


if HAS_TRITON:

    @triton.jit
    def _stats_kernel(
        q_ptr, k_ptr, pm_ptr, pl_ptr,
        L, n_split,
        sqb, sqh, sqw, sqd,
        skb, skh, skl, skd,
        qk_scale,
        R: tl.constexpr,
        W: tl.constexpr,
        G: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        DOT_F32: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_r = tl.program_id(1)
        bh = tl.program_id(2)
        qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
        b = (bh // HKV).to(tl.int64)
        h = bh % HKV

        rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < R
        qi = rows % W
        qh = (h * G + rows // W).to(tl.int64)
        dd = tl.arange(0, BLOCK_D)
        dmask = dd < D
        q_ptrs = q_ptr + b * sqb + qh[:, None] * sqh + qi[:, None] * sqw + dd[None, :] * sqd
        q = tl.load(q_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)
        qpos = L - W + qi  # last key each row sees

        k_base = k_ptr + b * skb + h.to(tl.int64) * skh
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        lo = pid_s * SPLIT
        for it in range(0, SPLIT // BLOCK_N):  # constant trip count; the tail is masked
            kk = lo + it * BLOCK_N + tl.arange(0, BLOCK_N)
            kt_ptrs = k_base + kk.to(tl.int64)[None, :] * skl + dd[:, None] * skd
            kt = tl.load(kt_ptrs, mask=dmask[:, None] & (kk < L)[None, :], other=0.0)
            if DOT_F32:
                s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = tl.where(kk[None, :] <= qpos[:, None], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m = m_new

        out = (bh.to(tl.int64) * n_split + pid_s) * R + rows
        tl.store(pm_ptr + out, m, mask=rmask)
        tl.store(pl_ptr + out, l, mask=rmask)

    @triton.jit
    def _combine_kernel(
        pm_ptr, pl_ptr, m_ptr, il_ptr, n_split, R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr
    ):
        pid_r = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        s0 = 0
        while s0 < n_split:  # a while loop: runtime trip count (also under the interpreter)
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = (ss < n_split)[:, None] & rmask[None, :]
            off = (bh * n_split + ss[:, None]) * R + rows[None, :]
            ms = tl.load(pm_ptr + off, mask=mask, other=float("-inf"))
            ls = tl.load(pl_ptr + off, mask=mask, other=0.0)
            m_new = tl.maximum(m, tl.max(ms, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - m_safe) + tl.sum(ls * tl.exp2(ms - m_safe[None, :]), 0)
            m = m_new
            s0 += BLOCK_S
        m = tl.where(m == float("-inf"), 0.0, m)
        il = 1.0 / tl.where(l > 0, l, 1.0)  # l >= 1 on real rows; padded rows are not stored
        tl.store(m_ptr + bh * R + rows, m, mask=rmask)
        tl.store(il_ptr + bh * R + rows, il, mask=rmask)

    @triton.jit
    def _token_kernel(
        q_ptr, k_ptr, m_ptr, il_ptr, tok_ptr,
        L,
        sqb, sqh, sqw, sqd,
        skb, skh, skl, skd,
        qk_scale,
        R: tl.constexpr,
        W: tl.constexpr,
        G: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
        b = (bh // HKV).to(tl.int64)
        h = bh % HKV

        kk = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = kk < L
        dd = tl.arange(0, BLOCK_D)
        dmask = dd < D
        # keys on the dot's M side: S^T = K Q^T is [keys, rows] and the sum over rows stays
        # within a warp (the rows of a tile would be spread over warps the other way round)
        k_ptrs = k_ptr + b * skb + h.to(tl.int64) * skh + kk.to(tl.int64)[:, None] * skl + dd[None, :] * skd
        kt = tl.load(k_ptrs, mask=kmask[:, None] & dmask[None, :], other=0.0)

        acc = tl.zeros([BLOCK_N], tl.float32)
        stat_base = bh.to(tl.int64) * R
        for r0 in range(0, R, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            rmask = rows < R
            qi = rows % W
            qh = (h * G + rows // W).to(tl.int64)
            q_ptrs = q_ptr + b * sqb + qh[None, :] * sqh + qi[None, :] * sqw + dd[:, None] * sqd
            qt = tl.load(q_ptrs, mask=dmask[:, None] & rmask[None, :], other=0.0)
            m = tl.load(m_ptr + stat_base + rows, mask=rmask, other=0.0)
            il = tl.load(il_ptr + stat_base + rows, mask=rmask, other=0.0)
            if DOT_F32:
                s = tl.dot(kt.to(tl.float32), qt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(kt, qt)
            p = tl.exp2(s * qk_scale - m[None, :]) * il[None, :]
            qpos = L - W + qi
            p = tl.where((kk[:, None] <= qpos[None, :]) & rmask[None, :], p, 0.0)
            acc += tl.sum(p, 1)
        tl.store(tok_ptr + bh.to(tl.int64) * L + kk, acc, mask=kmask)

    @triton.jit
    def _pool_kernel(
        tok_ptr, out_ptr,
        L, n_blocks, sink, block_size,
        inv_norm,
        HKV: tl.constexpr,
        IS_MAX: tl.constexpr,
        BLOCK_NB: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        blocks = pid * BLOCK_NB + tl.arange(0, BLOCK_NB)
        bmask = blocks < n_blocks
        tt = tl.arange(0, BLOCK_T)
        tmask = tt < block_size
        idx = sink + blocks.to(tl.int64)[:, None] * block_size + tt[None, :]
        mask = bmask[:, None] & tmask[None, :]
        acc = tl.zeros([BLOCK_NB, BLOCK_T], tl.float32)
        for h in range(0, HKV):
            acc += tl.load(tok_ptr + (b * HKV + h) * L + idx, mask=mask, other=0.0)
        acc = acc * tl.cast(inv_norm, tl.float32)
        if IS_MAX:
            res = tl.max(tl.where(mask, acc, float("-inf")), 1)
        else:
            res = tl.sum(acc, 1) / block_size
        tl.store(out_ptr + b * n_blocks + blocks, res, mask=bmask)

    def _is_interpreted(kernel: Any) -> bool:
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:  # pragma: no cover
            return False
        return isinstance(kernel, InterpretedFunction)

    INTERPRETED = _is_interpreted(_stats_kernel)


def _check(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q [b, Hq, w, d] and k [b, Hkv, L, d] expected, got {tuple(q.shape)} {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of key heads {k.shape[1]}")
    if q.dtype != k.dtype:  # tl.dot needs one operand dtype
        dt = torch.promote_types(q.dtype, k.dtype)
        q, k = q.to(dt), k.to(dt)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        q, k = q.float(), k.float()
    return q, k


def attention_token_partials(
    q: torch.Tensor, k: torch.Tensor, scale: float, config: dict[str, int] | None = None
) -> torch.Tensor:
    """[b, Hkv, L] fp32: per kv head, the sum over its G*w query rows of the softmax probabilities.

    Runs passes 1-3. `config` overrides entries of `default_config` (tests use tiny tiles).
    Called outside the `slim::block_scores` op (whose eager body disables it), a CUDA launch goes
    through the `wrap_triton` higher-order op: correct, but with more eager overhead.
    """
    q, k = _check(q, k)
    b, L = q.shape[0], k.shape[2]
    # head counts, window and head dim are constexprs: specialised (guards) under torch.compile
    hq, w, d, hkv = (int(x) for x in (q.shape[1], q.shape[2], q.shape[3], k.shape[1]))
    g = hq // hkv
    rows = g * w
    cfg = default_config(d, rows, 16, q.element_size())
    if config:
        cfg.update(config)
    split, bn1 = cfg["SPLIT"], cfg["BLOCK_N1"]
    if split % bn1:
        raise ValueError(f"SPLIT {split} must be a multiple of BLOCK_N1 {bn1}")
    # fp32 operands: exact fp32 dot (not TF32). The interpreter's tl.dot is wrong for bf16 (it
    # multiplies the raw uint16 storage), so there bf16 operands are widened first: bf16 products
    # are exact in fp32, so this matches the GPU's bf16 dot with fp32 accumulation.
    dot_f32 = q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16)
    qk_scale = float(scale) * LOG2E
    n_split = triton.cdiv(L, split)
    n_rc = triton.cdiv(rows, cfg["BLOCK_M"])
    dev = q.device

    if INTERPRETED:
        stats_k, combine_k, token_k = _stats_kernel, _combine_kernel, _token_kernel
    else:
        stats_k = wrap_triton(_stats_kernel)
        combine_k = wrap_triton(_combine_kernel)
        token_k = wrap_triton(_token_kernel)

    # Flat [b*Hkv*n_split*R] buffers (the kernels index them): a [.., n_split, ..] shape would make
    # Inductor specialise on n_split == 1 (a guard on the length), i.e. recompile across lengths.
    pm = torch.empty((b * hkv * n_split * rows,), device=dev, dtype=torch.float32)
    pl = torch.empty((b * hkv * n_split * rows,), device=dev, dtype=torch.float32)
    stats_k[(n_split, n_rc, b * hkv)](
        q, k, pm, pl,
        L, n_split,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        qk_scale,
        R=rows, W=w, G=g, HKV=hkv, D=d, DOT_F32=dot_f32,
        SPLIT=split, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn1, BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["WARPS1"], num_stages=cfg["STAGES"],
    )
    m = torch.empty((b * hkv, rows), device=dev, dtype=torch.float32)
    il = torch.empty((b * hkv, rows), device=dev, dtype=torch.float32)
    combine_k[(triton.cdiv(rows, cfg["BLOCK_R"]), b * hkv)](
        pm, pl, m, il, n_split, R=rows, BLOCK_S=cfg["BLOCK_S"], BLOCK_R=cfg["BLOCK_R"], num_warps=4
    )
    tok = torch.empty((b, hkv, L), device=dev, dtype=torch.float32)
    token_k[(triton.cdiv(L, cfg["BLOCK_N2"]), b * hkv)](
        q, k, m, il, tok,
        L,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        qk_scale,
        R=rows, W=w, G=g, HKV=hkv, D=d, DOT_F32=dot_f32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N2"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["WARPS2"], num_stages=cfg["STAGES"],
    )
    return tok


def attention_token_scores_triton(
    q: torch.Tensor, k: torch.Tensor, scale: float, config: dict[str, int] | None = None
) -> torch.Tensor:
    """[b, L] fp32 token scores (same as scoring_torch.attention_token_scores)."""
    tok = attention_token_partials(q, k, scale, config)
    return tok.sum(dim=1) / (q.shape[1] * q.shape[2])


def attention_block_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    sink: int,
    block_size: int,
    n_blocks: int,
    pooling: str,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """[b, n_blocks] fp32 block scores (same as scoring_torch.attention_block_scores)."""
    if pooling not in ("max", "mean"):
        raise ValueError(f"pooling must be max or mean, got {pooling!r}")
    tok = attention_token_partials(q, k, scale, config)
    return pool_token_partials(tok, q.shape[1] * q.shape[2], sink, block_size, n_blocks, pooling, config)


def pool_token_partials(
    tok: torch.Tensor,
    n_rows: int,
    sink: int,
    block_size: int,
    n_blocks: int,
    pooling: str,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """[b, n_blocks] fp32: pass 4, from `attention_token_partials` output; n_rows = Hq * w."""
    b, L = tok.shape[0], tok.shape[2]
    hkv = int(tok.shape[1])
    block_size = int(block_size)
    cfg = default_config(16, 16, block_size, 4)
    if config:
        cfg.update(config)
    if cfg["BLOCK_T"] < block_size:
        raise ValueError(f"BLOCK_T {cfg['BLOCK_T']} < block_size {block_size}")
    pool_k = _pool_kernel if INTERPRETED else wrap_triton(_pool_kernel)
    out = torch.empty((b, n_blocks), device=tok.device, dtype=torch.float32)
    inv_norm = 1.0 / float(n_rows)
    pool_k[(triton.cdiv(n_blocks, cfg["BLOCK_NB"]), b)](
        tok, out,
        L, n_blocks, sink, block_size,
        inv_norm,
        HKV=hkv, IS_MAX=pooling == "max", BLOCK_NB=cfg["BLOCK_NB"], BLOCK_T=cfg["BLOCK_T"],
        num_warps=4,
    )
    return out


__all__ = [
    "HAS_TRITON",
    "attention_block_scores_triton",
    "attention_token_partials",
    "attention_token_scores_triton",
    "default_config",
    "pool_token_partials",
    "use_triton",
]
