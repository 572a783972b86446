"""Triton attention block scoring (runtime/triton_scoring.py) against the torch oracle.

CPU: the kernels run under Triton's interpreter (TRITON_INTERPRET=1 must be set before triton
is imported, so all interpreter cases run in one subprocess: this file executed as a script
with --interpret); the op's torch path, its symbolic fake shape, the traceability of the
Triton path and an Inductor compile of the CPU path are checked in-process.
CUDA (skipped without a GPU): the compiled kernels on random inputs up to L=32768, eager and
through torch.compile.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
import zlib

import pytest
import torch

import slimtest

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Tiny tiles: several key tiles, stats splits, combine steps, row chunks and pooling programs
# per case. (The interpreter costs ~0.5 ms per tl op per program: keep the grids small.)
TINY = dict(BLOCK_M=16, BLOCK_N1=16, SPLIT=64, BLOCK_N2=32, BLOCK_S=2, BLOCK_R=16, BLOCK_NB=4)

# b, Hq, Hkv, w, d, L, dtype, pooling, sink, block size B, tiles (None: default_config), extras:
# qmul/scale (peaky logits), strided (transposed views), full (also the one-call entry point)
CASES = [
    dict(id="mha-fp32-max-sink0", b=1, hq=2, hkv=2, w=4, d=16, L=100, dtype="float32", pooling="max", sink=0, B=8, cfg=TINY),
    dict(id="gqa-fp32-mean-sink4-w16-b2", b=2, hq=2, hkv=1, w=16, d=32, L=133, dtype="float32", pooling="mean", sink=4, B=16, cfg=TINY),
    dict(id="gqa-fp32-max-peaky", b=1, hq=4, hkv=1, w=4, d=32, L=131, dtype="float32", pooling="max", sink=2, B=8, cfg=TINY, qmul=4.0, scale=1.0, full=True),
    dict(id="gqa-bf16-max-sink3", b=1, hq=8, hkv=2, w=4, d=32, L=150, dtype="bfloat16", pooling="max", sink=3, B=8, cfg=TINY),
    dict(id="mqa-bf16-mean-w16", b=1, hq=4, hkv=1, w=16, d=16, L=97, dtype="bfloat16", pooling="mean", sink=0, B=16, cfg=TINY),
    dict(id="gqa-fp16-max-sink1", b=1, hq=4, hkv=2, w=4, d=16, L=70, dtype="float16", pooling="max", sink=1, B=8, cfg=TINY),
    dict(id="strided-d24-B12-fp32-mean", b=2, hq=4, hkv=2, w=4, d=24, L=90, dtype="float32", pooling="mean", sink=5, B=12, cfg=TINY, strided=True),
    dict(id="default-tiles-bf16-mean", b=1, hq=8, hkv=2, w=16, d=64, L=300, dtype="bfloat16", pooling="mean", sink=0, B=16, cfg=None),
    dict(id="L-equals-w-no-blocks", b=1, hq=2, hkv=1, w=16, d=16, L=16, dtype="float32", pooling="max", sink=0, B=8, cfg=TINY),
]

TOL = {"float32": dict(rtol=1e-4, atol=1e-6), "bfloat16": dict(rtol=1e-3, atol=1e-5), "float16": dict(rtol=1e-3, atol=1e-5)}


def _make_inputs(c: dict, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(zlib.crc32(c["id"].encode()))
    dt = getattr(torch, c["dtype"])
    b, hq, hkv, w, d, L = c["b"], c["hq"], c["hkv"], c["w"], c["d"], c["L"]
    if c.get("strided"):  # q and k as transposed views, like [b, seq, heads, d].transpose(1, 2)
        q = torch.randn(b, w, hq, d, generator=g).transpose(1, 2)
        k = torch.randn(b, L, hkv, d, generator=g).transpose(1, 2)
    else:
        q = torch.randn(b, hq, w, d, generator=g)
        k = torch.randn(b, hkv, L, d, generator=g)
    q = q * c.get("qmul", 1.0)
    scale = c.get("scale", 1.0 / math.sqrt(d))
    return q.to(device=device, dtype=dt), k.to(device=device, dtype=dt), scale


def _run_case(c: dict) -> dict:
    """Runs one case (in the interpreter subprocess); returns a JSON-able verdict."""
    from slimcompile.runtime import scoring_torch as st
    from slimcompile.runtime import triton_scoring as ts

    q, k, scale = _make_inputs(c)
    n_blocks = (c["L"] - c["sink"] - c["w"]) // c["B"]
    t0 = time.perf_counter()
    res = {"id": c["id"], "ok": True, "msg": ""}
    try:
        # passes 1-3 once (the interpreter is slow), then pass 4: = attention_block_scores_triton
        part = ts.attention_token_partials(q, k, scale, c["cfg"])
        tok = part.sum(1) / (c["hq"] * c["w"])
        blk = ts.pool_token_partials(part, c["hq"] * c["w"], c["sink"], c["B"], n_blocks, c["pooling"], c["cfg"])
        if c.get("full"):  # the public entry point composes exactly these two steps
            blk_full = ts.attention_block_scores_triton(q, k, scale, c["sink"], c["B"], n_blocks, c["pooling"], c["cfg"])
            torch.testing.assert_close(blk_full, blk, rtol=0, atol=0)
        tok_ref = st.attention_token_scores(q, k, scale)
        blk_ref = st.attention_block_scores(q, k, scale, c["sink"], c["B"], n_blocks, c["pooling"])
        assert tuple(blk.shape) == (c["b"], n_blocks) and blk.dtype == torch.float32
        assert tuple(tok.shape) == (c["b"], c["L"]) and tok.dtype == torch.float32
        torch.testing.assert_close(tok, tok_ref, **TOL[c["dtype"]])
        torch.testing.assert_close(blk, blk_ref, **TOL[c["dtype"]])
        # probabilities of each query row sum to 1: token scores sum to 1 per batch row
        torch.testing.assert_close(tok.sum(-1), torch.ones(c["b"]), rtol=1e-4, atol=1e-4)
        res["tok_err"] = (tok - tok_ref).abs().max().item()
    except Exception as e:  # reported back to the parent test
        res.update(ok=False, msg=f"{type(e).__name__}: {e}")
    res["seconds"] = time.perf_counter() - t0
    return res


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return slimtest.interpreter_results(__file__, drop_env=("SLIM_SCORING_IMPL",))


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_interpreter_matches_oracle(interpreter_results, case):
    r = interpreter_results[case["id"]]
    assert r["ok"], r["msg"]


# ---------------------------------------------------------------- op, fake, compile (CPU)


SINK, WINDOW, BS = 4, 8, 16


def _scores_fn(scoring: str = "attention", pooling: str = "max", impl: str = "auto"):
    def f(q, k):
        n = (k.shape[2] - SINK - WINDOW) // BS
        return torch.ops.slim.block_scores(q, k, 0.25, SINK, BS, n, scoring, pooling, 8, impl)

    return f


def test_op_cpu_uses_torch_path():
    from slimcompile.runtime import ops, scoring_torch as st  # noqa: F401  (registers the ops)

    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 150, 16)
    n = (150 - SINK - WINDOW) // BS
    for pooling in ("max", "mean"):
        out = torch.ops.slim.block_scores(q, k, 0.25, SINK, BS, n, "attention", pooling, 8, "auto")
        torch.testing.assert_close(out, st.attention_block_scores(q, k, 0.25, SINK, BS, n, pooling))
    out = torch.ops.slim.block_scores(q, k, 0.25, SINK, BS, n, "tokenunit", "max", 8, "auto")
    torch.testing.assert_close(out, st.tokenunit_block_scores(q, k, SINK, BS, 8, n))
    assert out.shape == (2, n)


def test_impl_argument():
    from slimcompile.runtime import ops, triton_scoring as ts  # noqa: F401

    q = torch.zeros(1, 1, 1, 16)
    for impl in ("auto", "triton", "torch"):
        assert not ts.use_triton(q, impl)  # CPU tensors never take the Triton path
    if ts.HAS_TRITON:
        qm = torch.empty(1, 1, 1, 16, device="meta")
        assert not ts.use_triton(qm, "torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        ts.use_triton(q, "cuda")
    k = torch.randn(1, 1, 60, 16)
    with pytest.raises(ValueError, match="impl must be one of"):
        torch.ops.slim.block_scores(q, k, 0.25, SINK, BS, 3, "attention", "max", 8, "cuda")


def test_scoring_impl_option_is_an_argument_of_the_op_in_the_graph():
    """options['scoring_impl'] reaches slim::block_scores as its last argument, so it is in the
    traced graph (and so in Dynamo's and AOTAutograd's cache keys): two compilations that differ only
    in it give two different graphs."""
    import functools

    import slimcompile
    from slimcompile.backend import slim_backend

    from slimtest import SMALL, ids, tiny

    graphs = {}
    for impl in ("torch", "triton"):
        torch._dynamo.reset()
        model = tiny("llama", 2)
        before = len(slimcompile.COMPILATIONS)
        fast = torch.compile(model, backend=functools.partial(slim_backend, lower=False), dynamic=True,
                             options={**SMALL, "prune_layers": [1], "keep_ratio": 0.5, "scoring_impl": impl})
        with torch.no_grad():
            fast(ids(64))
        rec = list(slimcompile.COMPILATIONS)[before:]
        assert rec and all(r.options.scoring_impl == impl for r in rec)
        graphs[impl] = next(r.graph for r in rec if r.variant == "slim")
    torch._dynamo.reset()
    for impl, gm in graphs.items():
        (node,) = [n for n in gm.graph.nodes if n.target == torch.ops.slim.block_scores.default]
        assert node.args[-1] == impl
    assert graphs["torch"].code != graphs["triton"].code


def test_fake_shape_is_symbolic():
    from torch.fx.experimental.proxy_tensor import make_fx

    from slimcompile.runtime import ops  # noqa: F401

    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 200, 16)
    gm = make_fx(_scores_fn(), tracing_mode="symbolic")(q, k)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    shape = out.meta["val"].shape
    assert shape[0] == 1
    assert isinstance(shape[1], torch.SymInt) and shape[1].node.expr.free_symbols
    assert shape[1].node.hint == (200 - SINK - WINDOW) // BS


@needs_triton
def test_triton_path_traces_with_symbolic_length(monkeypatch):
    """AOTAutograd decomposes the triton_op into the 4 wrapped kernels, with L and n_blocks symbolic.

    Runs on CPU with meta tensors (the Triton path forced): no kernel is compiled or launched.
    """
    from torch._functorch.aot_autograd import aot_module_simplified

    from slimcompile.runtime import ops, triton_scoring  # noqa: F401

    monkeypatch.setattr(triton_scoring, "use_triton", lambda q, impl: True)
    graphs = []

    class _Stop(Exception):
        pass

    def backend(gm, example_inputs):
        def fw(g, inps):
            graphs.append(g)

            def run(*args):
                raise _Stop

            return run

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw)

    torch._dynamo.reset()
    try:
        cf = torch.compile(_scores_fn(pooling="mean"), backend=backend, fullgraph=True, dynamic=True)
        q = torch.empty(1, 4, 8, 16, device="meta", dtype=torch.bfloat16)
        k = torch.empty(1, 2, 200, 16, device="meta", dtype=torch.bfloat16)
        with pytest.raises(_Stop):
            cf(q, k)
    finally:
        torch._dynamo.reset()
    (g,) = graphs
    hops = [n for n in g.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(hops) == 4
    assert not any(n.target == torch.ops.slim.block_scores.default for n in g.graph.nodes)
    out = next(n for n in g.graph.nodes if n.op == "output").args[0][-1]
    assert isinstance(out.meta["val"].shape[1], torch.SymInt)


@pytest.mark.slow
def test_compile_inductor_cpu_dynamic():
    """fullgraph + dynamic Inductor compile of the CPU path: one graph serves several lengths."""
    from torch._dynamo.utils import counters

    from slimcompile.runtime import ops, scoring_torch as st  # noqa: F401

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    cf = torch.compile(_scores_fn(), backend="inductor", fullgraph=True, dynamic=True)
    for L in (200, 263, 300):
        q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, L, 16)
        n = (L - SINK - WINDOW) // BS
        out = cf(q, k)
        assert out.shape == (1, n)
        torch.testing.assert_close(out, st.attention_block_scores(q, k, 0.25, SINK, BS, n, "max"), rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - before == 1
    torch._dynamo.reset()


# ---------------------------------------------------------------- CUDA


CUDA_CASES = [
    # b, Hq, Hkv, w, d, L, dtype, pooling, sink, B
    (1, 32, 8, 32, 128, 32768, torch.bfloat16, "max", 4, 64),
    (1, 32, 8, 32, 128, 8191, torch.float16, "mean", 0, 64),
    (2, 8, 2, 16, 64, 5000, torch.float32, "max", 4, 32),
    (1, 16, 16, 64, 64, 4097, torch.bfloat16, "mean", 1, 64),
    (1, 28, 4, 32, 128, 12345, torch.bfloat16, "max", 4, 64),
    (1, 9, 3, 16, 96, 3000, torch.bfloat16, "max", 4, 48),
]


@needs_cuda
@needs_triton
@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_cuda_matches_oracle(case, monkeypatch):
    from slimcompile.runtime import ops, scoring_torch as st, triton_scoring as ts  # noqa: F401

    b, hq, hkv, w, d, L, dt, pooling, sink, B = case
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, w, d, device="cuda", generator=g).to(dt)
    k = torch.randn(b, hkv, L, d, device="cuda", generator=g).to(dt)
    scale = d**-0.5
    n = (L - sink - w) // B
    assert ts.use_triton(q)
    out = torch.ops.slim.block_scores(q, k, scale, sink, B, n, "attention", pooling, 8, "auto")
    ref = st.attention_block_scores(q, k, scale, sink, B, n, pooling)
    assert out.shape == (b, n) and out.dtype == torch.float32
    tol = dict(rtol=2e-3, atol=1e-6) if dt != torch.float32 else dict(rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out, ref, **tol)
    tok = ts.attention_token_scores_triton(q, k, scale)
    torch.testing.assert_close(tok, st.attention_token_scores(q, k, scale), **tol)
    # the same top blocks as the oracle (ties aside)
    kk = max(1, n // 4)
    top = torch.topk(out, kk, dim=-1).indices.sort(-1).values
    top_ref = torch.topk(ref, kk, dim=-1).indices.sort(-1).values
    assert (top == top_ref).float().mean() > 0.98


@needs_cuda
@needs_triton
@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_compile_inductor_sees_kernels(monkeypatch):
    from torch._inductor.utils import run_and_get_code

    from slimcompile.runtime import ops, scoring_torch as st, triton_scoring as ts  # noqa: F401

    torch._dynamo.reset()
    cf = torch.compile(_scores_fn(), backend="inductor", fullgraph=True, dynamic=True)
    for i, L in enumerate((3000, 4321)):
        q = torch.randn(1, 32, 8, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.bfloat16)
        n = (L - SINK - WINDOW) // BS
        if i == 0:
            with torch.compiler.config.patch(force_disable_caches=True):  # cache hits have no code
                out, codes = run_and_get_code(cf, q, k)
            code = "\n".join(codes)
            for name in ("_stats_kernel", "_combine_kernel", "_token_kernel", "_pool_kernel"):
                assert name in code, name
        else:
            out = cf(q, k)
        assert out.shape == (1, n)
        torch.testing.assert_close(out, st.attention_block_scores(q, k, 0.25, SINK, BS, n, "max"), rtol=2e-3, atol=1e-6)
    torch._dynamo.reset()


if __name__ == "__main__":
    if sys.argv[1:] == ["--interpret"]:
        assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
        results = [_run_case(c) for c in CASES]
        for r in results:
            print(f"{r['id']}: ok={r['ok']} {r['seconds']:.2f}s {r['msg']}", file=sys.stderr)
        print("RESULTS " + json.dumps(results))
    else:
        sys.exit(pytest.main([__file__, "-q"]))
