"""Copy chosen KV blocks from host memory into device slots, without a host synchronisation.

`copy_blocks(dst, src, slot_src, changed, row0, programs)` writes, for every batch row b and slot a with
`changed[b, a]`, block `slot_src[b, a]` of `src` [b, Hkv, n, B, d] into rows
[row0 + a*B, row0 + (a+1)*B) of `dst` [b, Hkv, C, d]. Which blocks move is decided on the device
(`offload.BlockSelector`), so the indices never reach the host.

On CUDA with `src` in pinned host memory a Triton kernel reads the blocks straight from host
memory over the bus (zero-copy: pinned memory is mapped into the device's address space under
unified addressing). A fixed number of programs (option `copy_programs`, default 64) loop over
the (slot, kv head) jobs: with one program per job the copy takes every SM while it waits on the
bus and slows the main stream's GEMMs and KV writes (measured on an H200, bench/RESULTS.md).
Slots that did not change load nothing.
Elsewhere (CPU, or `src` on the device) it is a torch gather + `where`, which the CPU tests use
as the semantics.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


def copy_blocks_torch(dst: torch.Tensor, src: torch.Tensor, slot_src: torch.Tensor, changed: torch.Tensor, row0: int) -> None:
    b, h, n, B, d = src.shape
    A = slot_src.shape[1]
    idx = slot_src.to(src.device)
    blocks = src[torch.arange(b, device=src.device)[:, None], :, idx]  # [b, A, h, B, d]
    blocks = blocks.permute(0, 2, 1, 3, 4).reshape(b, h, A * B, d).to(dst.device, non_blocking=True)
    region = dst[:, :, row0 : row0 + A * B]
    keep = changed.to(device=dst.device, dtype=torch.bool)[:, None, :, None, None].expand(b, 1, A, B, 1).reshape(b, 1, A * B, 1)
    region.copy_(torch.where(keep, blocks, region))


if HAS_TRITON:

    @triton.jit
    def _copy_blocks_kernel(
        src_ptr, dst_ptr, slot_ptr, changed_ptr,
        A, H, total, n_prog, row0,
        s_b, s_h, s_n, s_t, s_d,
        d_b, d_h, d_r, d_d,
        BLOCK_T: tl.constexpr, D: tl.constexpr, ITERS: tl.constexpr,
    ):
        # Each program copies jobs pid, pid + P, ... of the (batch * slot, kv head) jobs, so a small
        # grid leaves most SMs to the main stream's kernels while the copy streams over the bus.
        t = tl.arange(0, BLOCK_T)
        dd = tl.arange(0, D)
        for i in tl.static_range(ITERS):
            job = tl.program_id(0) + i * n_prog
            # Masks are built without combining a scalar with a block (`scalar & block`): triton
            # 3.9's interpreter then gives the mask an integer dtype and rejects the load. Jobs past
            # the end read job 0's (valid) slot and copy nothing.
            live = tl.where(job < total, 1, 0)
            jc = job * live
            pa = jc // H  # b * A + a
            h = jc % H
            bi = pa // A
            a = pa % A
            moved = tl.where(tl.load(changed_ptr + pa) != 0, live, 0)
            blk = tl.load(slot_ptr + pa)
            src = src_ptr + bi * s_b + h * s_h + blk * s_n + t[:, None] * s_t + dd[None, :] * s_d
            mask = (t[:, None] * 0 + dd[None, :]) < D * moved  # [BLOCK_T, D]: all true iff this job moves
            x = tl.load(src, mask=mask, other=0.0)
            dst = dst_ptr + bi * d_b + h * d_h + (row0 + a * BLOCK_T + t)[:, None] * d_r + dd[None, :] * d_d
            tl.store(dst, x, mask=mask)


def _triton_ok(dst: torch.Tensor, src: torch.Tensor) -> bool:
    B, d = src.shape[3], src.shape[4]
    pow2 = lambda x: x & (x - 1) == 0  # noqa: E731
    return HAS_TRITON and dst.is_cuda and not src.is_cuda and src.is_pinned() and pow2(B) and pow2(d) and B >= 1


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, slot_src: torch.Tensor, changed: torch.Tensor, row0: int,
                programs: int) -> None:
    """Copy the changed slots' blocks from `src` into `dst` (see the module docstring); `programs`:
    the kernel's program count (the `copy_programs` option; 0: one per slot and kv head). The
    default 64 (bench/RESULTS.md, session 4): 10.95-11.6 ms/token at 32K against 12.8-13.5 with
    one program per block."""
    if not _triton_ok(dst, src):
        copy_blocks_torch(dst, src, slot_src, changed, row0)
        return
    launch_copy_kernel(dst, src, slot_src, changed, row0, programs)


def launch_copy_kernel(dst: torch.Tensor, src: torch.Tensor, slot_src: torch.Tensor, changed: torch.Tensor, row0: int, programs: int) -> None:
    b, h, n, B, d = src.shape
    A = slot_src.shape[1]
    slot = slot_src.contiguous()
    moved = changed.to(torch.int8).contiguous()
    total = b * A * h
    n_prog = min(total, programs) if programs > 0 else total
    _copy_blocks_kernel[(n_prog,)](
        src, dst, slot, moved,
        A, h, total, n_prog, row0,
        src.stride(0), src.stride(1), src.stride(2), src.stride(3), src.stride(4),
        dst.stride(0), dst.stride(1), dst.stride(2), dst.stride(3),
        BLOCK_T=B, D=d, ITERS=-(-total // n_prog), num_warps=4,
    )
