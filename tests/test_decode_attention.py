"""Split-K decode attention (runtime/decode_attention.py) against its torch oracle.

CPU: the kernels run under Triton's interpreter in one subprocess (TRITON_INTERPRET=1 must be
set before triton is imported). CUDA (skipped without a GPU): compiled kernels at real sizes,
and inside a CUDA graph whose replays follow a growing valid length.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

import slimtest

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# b, Hkv, G, d, capacity C, valid n, dtype, chunk (rows per split), block_n
CASES = [
    dict(id="fp32-several-splits", b=1, h=2, G=4, d=32, C=300, n=250, dtype="float32", chunk=64, block_n=32),
    dict(id="fp32-one-valid-row-b2", b=2, h=2, G=3, d=16, C=200, n=1, dtype="float32", chunk=64, block_n=32),
    dict(id="bf16-all-valid-G8-d64", b=1, h=1, G=8, d=64, C=130, n=130, dtype="bfloat16", chunk=64, block_n=32),
    dict(id="bf16-partial-last-tile", b=1, h=2, G=4, d=32, C=300, n=77, dtype="bfloat16", chunk=128, block_n=32),
    dict(id="fp16-d24-padded", b=1, h=2, G=2, d=24, C=100, n=99, dtype="float16", chunk=32, block_n=16),
    dict(id="fp32-peaky-logits", b=1, h=1, G=4, d=16, C=96, n=90, dtype="float32", chunk=32, block_n=16, kmul=30.0),
]
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2), "float16": dict(rtol=2e-3, atol=2e-3)}


def _inputs(c: dict, device: str = "cpu"):
    g = torch.Generator().manual_seed(len(c["id"]) * 7919 + c["C"])
    dt = getattr(torch, c["dtype"])
    q = torch.randn(c["b"], c["h"], c["G"], c["d"], generator=g)
    k = torch.randn(c["b"], c["h"], c["C"], c["d"], generator=g) * c.get("kmul", 1.0)
    v = torch.randn(c["b"], c["h"], c["C"], c["d"], generator=g)
    k[:, :, c["n"]:] = 1e4  # rows past n must not be read: huge garbage would dominate the softmax
    return [t.to(device=device, dtype=dt) for t in (q, k, v)] + [torch.tensor([c["n"]], device=device)]


def _run_case(c: dict) -> dict:
    from slimcompile.runtime import decode_attention as da

    q, k, v, n = _inputs(c)
    try:
        out = da.triton_decode_attention(q, k, v, n, 0.125, block_n=c["block_n"], chunk=c["chunk"])
        ref = da.reference_decode_attention(q, k, v, n, 0.125)
        assert out.shape == ref.shape and out.dtype == q.dtype
        torch.testing.assert_close(out, ref, **TOL[c["dtype"]])
        return {"id": c["id"], "ok": True, "msg": ""}
    except Exception as e:  # reported back to the parent test
        return {"id": c["id"], "ok": False, "msg": f"{type(e).__name__}: {e}"}


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return slimtest.interpreter_results(__file__)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_interpreter_matches_oracle(interpreter_results, case):
    r = interpreter_results[case["id"]]
    assert r["ok"], r["msg"]


def test_split_config_covers_the_capacity_in_block_multiples():
    from slimcompile.runtime.decode_attention import split_config

    for cap in (1, 64, 1000, 33024, 131328):
        chunk, n_split = split_config(cap, 8, torch.device("cpu"))
        assert chunk % 64 == 0 and chunk & (chunk - 1) == 0 and (n_split - 1) * chunk < cap <= n_split * chunk


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_oracle_and_replays_in_a_graph(dtype):
    from slimcompile.runtime import decode_attention as da

    c = dict(id="cuda", b=1, h=8, G=4, d=128, C=33024, n=32768, dtype=str(dtype).split(".")[1])
    q, k, v, n = _inputs(c, "cuda")
    torch.testing.assert_close(da.triton_decode_attention(q, k, v, n, 0.088), da.reference_decode_attention(q, k, v, n, 0.088), **TOL[c["dtype"]])
    da.triton_decode_attention(q, k, v, n, 0.088)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.triton_decode_attention(q, k, v, n, 0.088)
    for length in (5, 20000, 33024):
        n.fill_(length)
        k[:, :, :length] = k[:, :, :length].clamp(max=10)
        graph.replay()
        torch.testing.assert_close(out, da.reference_decode_attention(q, k, v, n, 0.088), **TOL[c["dtype"]])


def _variants(kernel) -> int:
    """Compiled specialisations of a Triton kernel, over devices (triton 3.x: `device_caches`)."""
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@needs_cuda
@needs_triton
def test_cuda_new_capacities_reuse_the_compiled_kernels():
    """Prompt lengths change the capacity, hence CHUNK and the split count: runtime arguments, so
    a new length launches the kernels already compiled instead of JIT-compiling new ones."""
    from slimcompile.runtime import decode_attention as da

    seen = None
    for C in (16640, 32768, 33024, 50000, 65792):  # chunks 512 / 1024 / 2048, 25 to 33 splits on an H200
        c = dict(id="cuda", b=1, h=8, G=4, d=128, C=C, n=C - 100, dtype="bfloat16")
        q, k, v, n = _inputs(c, "cuda")
        torch.testing.assert_close(da.triton_decode_attention(q, k, v, n, 0.088), da.reference_decode_attention(q, k, v, n, 0.088), **TOL["bfloat16"])
        counts = (_variants(da._decode_partial_kernel), _variants(da._decode_combine_kernel))
        assert seen is None or counts == seen, (C, counts, seen)
        seen = counts


if __name__ == "__main__" and "--interpret" in sys.argv:
    print("RESULTS " + json.dumps([_run_case(c) for c in CASES]))
