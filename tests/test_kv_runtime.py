"""The decode runtime: block KV cache, offload policy and copies, the static decode step.

CPU tests run the same selection code as the GPU (no streams); CUDA-only checks skip cleanly.
"""

import pytest
import torch

import slimcompile
from slimcompile import reference
from slimcompile.options import SlimOptionError, parse_options
from slimcompile.runtime.block_copy import HAS_TRITON, copy_blocks, copy_blocks_torch
from slimcompile.runtime.config import RuntimeConfig
from slimcompile.runtime.kv_cache import ResidentLayerKV, SlimKVCache, write_token
from slimcompile.runtime.offload import BlockSelector, OffloadedLayerKV

from slimtest import PASS_BACKEND, SMALL, ids, tiny

CUDA = torch.cuda.is_available()


def _rt(**options):
    """The runtime's config from options (validated like the user's)."""
    return RuntimeConfig.from_options(parse_options({**SMALL, **options}))


def _kv(b=1, h=2, L=50, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, L, d, generator=g), torch.randn(b, h, L, d, generator=g)


def test_resident_layer_appends_in_place_and_counts_bytes():
    k, v = _kv(L=10)
    layer = ResidentLayerKV(k, v, reserve=3)
    assert layer.capacity == 13 and layer.get_seq_length() == 10 and layer.write_index() == 10
    assert layer.bytes().gpu == 2 * 13 * 2 * 8 * 4 and layer.bytes().host == 0
    assert layer.prompt_rows_on_device() == 10
    storage = layer.k_buf.data_ptr()
    nk, nv = torch.ones(1, 2, 1, 8), torch.full((1, 2, 1, 8), 2.0)
    row = torch.tensor([layer.write_index()])
    write_token(layer.k_buf, layer.v_buf, nk, nv, row)
    layer.advance()
    assert layer.k_buf.data_ptr() == storage  # no reallocation
    torch.testing.assert_close(layer.keys[:, :, :10], k, rtol=0, atol=0)
    assert layer.keys.shape[2] == 11 and layer.k_buf.shape[2] == 13  # `keys` shows the held rows only
    assert torch.equal(layer.keys[:, :, 10], nk[:, :, 0]) and torch.equal(layer.values[:, :, 10], nv[:, :, 0])
    for _ in range(2):
        layer.advance()
    assert layer.free_rows() == 0
    layer.grow(5)
    assert layer.capacity == 18 and layer.k_buf.shape[2] == 18 and torch.equal(layer.keys[:, :, 10], nk[:, :, 0])


def test_cache_from_pruned_prefill_keeps_per_layer_lengths():
    model = tiny("llama", 2)
    opts = parse_options({**SMALL, "prune_layers": [1], "keep_ratio": 0.5})
    x = ids(50)
    state = reference.prefill(model, x, opts.resolve(4))
    cache = SlimKVCache.from_prefill(zip(state.keys, state.values), 50, RuntimeConfig.from_options(opts))
    lengths = [layer.prompt_len for layer in cache.layers]
    assert lengths[0] == lengths[1] == 50 and lengths[2] == lengths[3] < 50
    assert cache.get_seq_length() == 50
    total = sum(layer.bytes().gpu for layer in cache.layers)
    assert cache.bytes().gpu == total
    row = 2 * 2 * 16 * 4  # k and v, 2 kv heads, head_dim 16, fp32
    assert cache.prompt_bytes_on_device() == sum(lengths) * row


def _offloaded(budget, L=70, seed=0, **options):
    k, v = _kv(L=L, seed=seed)
    config = _rt(kv="offload", decode_reserve=4, sink=2, window=4, block_size=4, decode_budget=budget,
                 swap_threshold=0.9, offload_summary="mean", **options)
    return k, v, OffloadedLayerKV(k, v, config)


@pytest.mark.parametrize("mode", ["lagged", "current"])
def test_offload_selects_with_the_previous_or_the_current_query(mode):
    """Default: step t's query chooses the blocks step t+1 attends over. offload_select="current":
    each step's own query chooses its blocks, before its attention."""
    k, v, layer = _offloaded(budget=8, L=130, offload_select=mode)
    layer.selector.swap_threshold = 1.01  # always swap: the set is exactly the top blocks
    g = torch.Generator().manual_seed(5)
    qs = [torch.randn(1, 4, 1, 8, generator=g) for _ in range(3)]
    top = [set(layer.selector.select(layer.selector.block_scores(q, layer.summaries))[0].tolist()) for q in qs]
    assert top[0] != top[1] and top[1] != top[2]
    chosen_by = []
    for q in qs:
        layer.before_attention(q)
        active = set(layer.active[0].tolist())
        chosen_by.append(next(i for i, t in enumerate(top) if t == active))
        layer.after_attention(q)
        layer.join()
    assert chosen_by == ([0, 0, 1] if mode == "lagged" else [0, 1, 2])


def test_offload_round_trip_is_bit_exact():
    k, v, layer = _offloaded(budget=8)
    n = layer.n_blocks
    assert n == (70 - 2 - 4) // 4 and layer.n_active == 2 and not layer.all_resident
    assert layer.host_keys.shape == (1, 2, n, 4, 8)
    # Fetch every block back through the copy path and compare with the prompt's own rows.
    dst = torch.zeros(1, 2, n * 4, 8)
    copy_blocks(dst, layer.host_keys, torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool), 0, 64)
    assert torch.equal(dst, k[:, :, 2 : 2 + n * 4])
    # sink and tail stay on the device, at the ends of the active region
    assert torch.equal(layer.keys[:, :, :2], k[:, :, :2])
    tail = 70 - 2 - n * 4
    assert torch.equal(layer.keys[:, :, 2 + 8 : 2 + 8 + tail], k[:, :, 2 + n * 4 :])
    assert layer.bytes().host == 2 * n * 4 * 2 * 8 * 4
    assert layer.prompt_rows_on_device() == 2 + 8 + tail


def test_copy_blocks_only_touches_changed_slots():
    src = torch.arange(1 * 1 * 5 * 2 * 1, dtype=torch.float32).reshape(1, 1, 5, 2, 1)
    dst = torch.full((1, 1, 1 + 3 * 2, 1), -1.0)
    copy_blocks_torch(dst, src, torch.tensor([[4, 0, 2]]), torch.tensor([[True, False, True]]), 1)
    assert dst.flatten().tolist() == [-1, 8, 9, -1, -1, 4, 5]


def test_selector_keeps_the_set_when_overlap_reaches_the_threshold():
    sel = BlockSelector(n_active=10, swap_threshold=0.9)
    active = torch.arange(10)[None]
    new = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 11]])  # overlap 0.9: no swap
    nxt, changed, overlap = sel.plan(active, new)
    assert overlap.item() == pytest.approx(0.9)
    assert torch.equal(nxt, active) and not changed.any()


def test_selector_swaps_only_the_departed_slots_below_the_threshold():
    sel = BlockSelector(n_active=10, swap_threshold=0.9)
    active = torch.arange(10)[None]
    new = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 12, 11]])  # 8 and 9 leave: overlap 0.8
    nxt, changed, overlap = sel.plan(active, new)
    assert overlap.item() == pytest.approx(0.8)
    assert changed[0].nonzero().flatten().tolist() == [8, 9]  # the slots of blocks 8 and 9
    assert sorted(nxt[0].tolist()) == sorted(new[0].tolist())
    assert nxt[0, :8].tolist() == list(range(8))  # blocks that stay keep their slots


def test_selector_plans_each_sample_of_a_batch_separately():
    sel = BlockSelector(n_active=4, swap_threshold=1.0)
    active = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = torch.tensor([[0, 1, 2, 3], [0, 5, 2, 7]])
    nxt, changed, overlap = sel.plan(active, new)
    assert overlap.tolist() == [1.0, 0.5]
    assert not changed[0].any() and changed[1].tolist() == [False, True, False, True]
    assert nxt[1].tolist() == [0, 5, 2, 7]


def test_selector_scores_and_topk():
    sel = BlockSelector(n_active=2, swap_threshold=0.9)
    q = torch.zeros(1, 4, 1, 3)
    q[0, :, 0, 0] = 1.0
    summaries = torch.zeros(1, 2, 5, 3)
    summaries[0, 1, 3, 0] = 5.0
    summaries[0, 0, 1, 0] = 2.0
    s = sel.scores(q, summaries)
    assert s.shape == (1, 5) and sel.select(s).tolist() == [[1, 3]]


def test_minmax_score_is_an_upper_bound_reached_by_the_best_key():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 8, generator=g)
    keys = torch.randn(1, 2, 5, 3, 8, generator=g)  # 5 blocks of 3 keys
    summaries = torch.stack([keys.amin(dim=3), keys.amax(dim=3)])
    s = BlockSelector.scores(q, summaries)
    exact = torch.einsum("bhgd,bhntd->bhgnt", q.reshape(1, 2, 2, 8), keys).amax(dim=(1, 2, 4))  # [1, 5]
    assert (s >= exact - 1e-5).all()
    brute = (q.reshape(1, 2, 2, 1, 8) * torch.where(q.reshape(1, 2, 2, 1, 8) > 0, summaries[1][:, :, None], summaries[0][:, :, None])).sum(-1)
    torch.testing.assert_close(s, brute.amax(dim=(1, 2)))


def test_softmax_score_is_not_decided_by_the_largest_head():
    """combine="max" follows the head with the largest raw q.k (head 0, flat over blocks);
    "softmax" weighs each head by how much it prefers one block (head 1, peaked on block 2)."""
    q = torch.zeros(1, 2, 1, 2)
    q[0, 0, 0, 0], q[0, 1, 0, 0] = 10.0, 1.0
    summaries = torch.zeros(1, 2, 4, 2)  # 2 kv heads (no GQA), 4 blocks
    summaries[0, 0, :, 0] = torch.tensor([1.0, 0.9, 0.9, 0.9])
    summaries[0, 1, 2, 0] = 5.0
    sel = BlockSelector(n_active=1, swap_threshold=0.9)
    assert sel.select(BlockSelector.scores(q, summaries)).tolist() == [[0]]
    p = BlockSelector.scores(q, summaries, combine="softmax")
    assert sel.select(p).tolist() == [[2]]
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))  # a mean of per-head distributions


def test_unitmean_scores_a_block_by_its_best_unit():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 64, 8, generator=g)
    layer = OffloadedLayerKV(keys, keys.clone(), _rt(kv="offload", decode_reserve=2, sink=4, window=4, block_size=8,
                                                     decode_budget=16, offload_summary="unitmean", unit_size=4))
    n = layer.n_blocks
    assert layer.summaries.shape == (1, 2, n * 2, 8) and layer.selector.units == 2
    body = keys[:, :, 4 : 4 + n * 8].reshape(1, 2, n * 2, 4, 8).mean(dim=3)
    torch.testing.assert_close(layer.summaries, body)
    q = torch.randn(1, 4, 1, 8, generator=g)
    s = BlockSelector.scores(q, layer.summaries, units=2)
    per_unit = torch.einsum("bhgd,bhud->bhgu", q.reshape(1, 2, 2, 8), body)
    torch.testing.assert_close(s, per_unit.reshape(1, 2, 2, n, 2).amax(dim=(1, 2, 4)))


def test_offload_with_unitmean_and_softmax_generates_and_swaps():
    _, _, out = _generate("offload", 16, ids(300), new=6, offload_summary="unitmean", offload_score="softmax", unit_size=2)
    layers = [l for l in out.past_key_values.layers if not l.all_resident]
    assert layers and sum(int(l.swaps.sum()) for l in layers) > 0
    assert out.sequences.shape[1] == 306


def _generate(kv, budget, x, new=8, **extra):
    model = tiny("llama", 2, seed=3)
    opts = {**SMALL, "prune_layers": [1], "keep_ratio": 0.5, "kv": kv, "decode_budget": budget, "decode_reserve": 3, **extra}
    slimcompile.compile(model, backend=PASS_BACKEND, **opts)
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )
    return model, opts, out


@pytest.mark.parametrize("attn", ["sdpa", "matmul", "auto"])
def test_grouped_decode_attention_equals_repeated_kv_attention(attn):
    from slimcompile.runtime.decode import grouped_decode_attention

    impl = _rt(decode_attention=attn).attention_impl(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 16, generator=g), torch.randn(2, 2, 20, 16, generator=g), torch.randn(2, 2, 20, 16, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :13].repeat_interleave(4, 1), v[:, :, :13].repeat_interleave(4, 1), scale=0.3
    ).transpose(1, 2).reshape(2, 1, 128)
    torch.testing.assert_close(grouped_decode_attention(q, k, v, torch.tensor([13]), 0.3, impl), ref, rtol=1e-5, atol=1e-5)


def test_decode_attention_option_rejects_unknown_values(monkeypatch):
    with pytest.raises(SlimOptionError, match="decode_attention.*'auto', 'triton', 'sdpa', 'matmul'"):
        _rt(decode_attention="flash")
    monkeypatch.setenv("SLIM_DECODE_ATTN", "flash")
    with pytest.raises(SlimOptionError, match="SLIM_DECODE_ATTN='flash'"):
        _rt()
    monkeypatch.delenv("SLIM_DECODE_ATTN")
    assert _rt().attention_impl(torch.device("cpu")) == "sdpa"  # the Triton kernel is for CUDA
    with pytest.raises(ValueError, match="decode_attention='triton' needs triton and a CUDA device"):
        _rt(decode_attention="triton").attention_impl(torch.device("cpu"))
    model = tiny("llama", 2)  # refused at compile, before any generation
    with pytest.raises(ValueError, match="decode_attention='triton' needs triton and a CUDA device"):
        slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, decode_attention="triton")


def test_kv_dynamic_keeps_the_compiled_decode_path():
    x = ids(50)
    model, _, out = _generate("dynamic", 2048, x, new=3)
    assert not isinstance(out.past_key_values, SlimKVCache)


@pytest.mark.parametrize(
    "opts,words",
    [
        ({"kv": "paged"}, ["kv", "resident", "offload", "dynamic"]),
        ({"decode_budget": 0}, ["decode_budget", "positive int"]),
        ({"swap_threshold": 1.5}, ["swap_threshold", "(0, 1]"]),
        ({"swap_threshold": 0}, ["swap_threshold"]),
        ({"cuda_graphs": "yes"}, ["cuda_graphs", "True or False"]),
        ({"offload_summary": "median"}, ["offload_summary", "minmax", "mean", "unitmean"]),
        ({"offload_score": "sum"}, ["offload_score", "max", "softmax"]),
        ({"kv": "offload", "offload_summary": "unitmean", "block_size": 32, "unit_size": 12}, ["unit_size", "divide"]),
        ({"decode_reserve": -1}, ["decode_reserve"]),
    ],
)
def test_bad_kv_options_say_what_is_allowed(opts, words):
    with pytest.raises(SlimOptionError) as e:
        parse_options(opts)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_stream_and_graph_paths_match_the_synchronous_path(monkeypatch):
    from slimcompile.runtime import offload

    x = ids(300).cuda()
    seqs = {}
    for name, side, graphs in (("sync", False, False), ("stream", True, False), ("stream+graph", True, True)):
        if not side:
            monkeypatch.setattr(offload, "_side_stream", lambda dev: None)
        else:
            monkeypatch.undo()
        model = tiny("llama", 2, seed=3).cuda()
        opts = {**SMALL, "prune_layers": [1], "keep_ratio": 0.5, "kv": "offload", "decode_budget": 16,
                "swap_threshold": 0.95, "cuda_graphs": graphs}
        slimcompile.compile(model, backend=PASS_BACKEND, **opts)
        seqs[name] = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
    assert torch.equal(seqs["sync"], seqs["stream"]) and torch.equal(seqs["sync"], seqs["stream+graph"])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("programs", [0, 2, 5])
def test_cuda_host_block_copy_matches_torch_copy(programs):
    src = torch.randn(2, 3, 7, 16, 64).to(torch.bfloat16).pin_memory()
    slot = torch.tensor([[6, 0, 3], [1, 2, 5]], device="cuda")
    changed = torch.tensor([[True, False, True], [True, True, False]], device="cuda")
    a = torch.zeros(2, 3, 5 + 3 * 16, 64, dtype=torch.bfloat16, device="cuda")
    b = a.clone()
    copy_blocks(a, src, slot, changed, 5, programs)
    copy_blocks_torch(b, src.cuda(), slot, changed, 5)
    assert torch.equal(a, b)


COPY_KERNEL_SCRIPT = """
import torch
from slimcompile.runtime.block_copy import launch_copy_kernel, copy_blocks_torch
src = torch.randn(2, 3, 7, 16, 64)
slot = torch.tensor([[6, 0, 3], [1, 2, 5]]); changed = torch.tensor([[True, False, True], [True, True, False]])
for programs in (0, 5, 2, 1):
    a = torch.randn(2, 3, 5 + 3 * 16 + 2, 64); b = a.clone()
    launch_copy_kernel(a, src, slot, changed, 5, programs)
    copy_blocks_torch(b, src, slot, changed, 5)
    print(programs, torch.equal(a, b))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_copy_kernel_in_the_interpreter_for_any_number_of_programs():
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", COPY_KERNEL_SCRIPT], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0", "True", "5", "True", "2", "True", "1", "True"]


def test_copy_programs_reach_the_offloaded_layer(monkeypatch):
    with pytest.raises(SlimOptionError, match="copy_programs.*>= 0"):
        _rt(copy_programs=-1)
    monkeypatch.setenv("SLIM_COPY_PROGRAMS", "many")
    with pytest.raises(SlimOptionError, match="SLIM_COPY_PROGRAMS='many'"):
        _rt()
    monkeypatch.setenv("SLIM_COPY_PROGRAMS", "7")
    assert _offloaded(budget=8)[2].copy_programs == 7
    assert _offloaded(budget=8, copy_programs=0)[2].copy_programs == 0  # the option wins


def test_host_buffers_are_reused_by_the_next_generation():
    import gc

    from slimcompile.runtime.offload import HOST_POOL

    k, v, layer = _offloaded(budget=8)
    first = layer.host_keys.data_ptr()
    before = HOST_POOL.allocated
    del layer
    gc.collect()
    _, _, again = _offloaded(budget=8)
    assert HOST_POOL.allocated == before  # both buffers came from the pool
    assert first in (again.host_keys.data_ptr(), again.host_values.data_ptr())


def test_host_pool_reuses_a_buffer_for_a_similar_length_and_not_for_a_much_shorter_one():
    import gc

    from slimcompile.runtime.offload import HostBufferPool

    class Owner:
        pass

    pool = HostBufferPool(1 << 30)
    assert pool.rounded(1000) == 1024 and pool.rounded(1024) == 1024 and pool.rounded(1025) == 1152
    first = Owner()
    t = pool.take(first, (1, 2, 100, 8, 4), torch.float32, pin=False)
    assert t.shape == (1, 2, 100, 8, 4) and t.is_contiguous() and pool.allocated == 1
    ptr = t.data_ptr()
    del first, t
    gc.collect()
    a, b, c = Owner(), Owner(), Owner()
    longer = pool.take(a, (1, 2, 104, 8, 4), torch.float32, pin=False)  # 6656 elements <= rounded(6400) = 6656
    assert longer.data_ptr() == ptr and pool.allocated == 1
    shorter = pool.take(b, (1, 2, 90, 8, 4), torch.float32, pin=False)  # the buffer is taken: a new one
    assert pool.allocated == 2
    del a, longer
    gc.collect()
    tiny_ = pool.take(c, (1, 2, 10, 8, 4), torch.float32, pin=False)  # 640 elements: 6656 is over twice that
    assert tiny_.data_ptr() != ptr and pool.allocated == 3
    assert pool.free_bytes == 6656 * 4  # the first buffer is still free, whole


def test_demo_counts_held_tokens_not_spare_rows():
    from slimcompile.demo import kv_bytes

    model = tiny("llama", 2)
    opts = parse_options({**SMALL, "prune_layers": [1], "keep_ratio": 0.5})
    state = reference.prefill(model, ids(50), opts.resolve(4))
    cache = SlimKVCache.from_prefill(zip(state.keys, state.values), 50, RuntimeConfig.from_options(opts))
    cache.advance()
    total, counts = kv_bytes(cache)
    assert counts == [k.shape[2] + 1 for k in state.keys]
    assert total == sum(2 * (k.numel() + k[:, :, :1].numel()) * 4 for k in state.keys)


def test_conversion_releases_the_prefill_cache_layer_by_layer():
    from transformers import DynamicCache

    from slimcompile.runtime.kv_cache import drain

    dc = DynamicCache()
    for i in range(3):
        dc.update(*_kv(L=20 + i, seed=i), i)
    seen = []

    def watch(pairs):
        for j, kv in enumerate(pairs):
            seen.append([layer.keys is None for layer in dc.layers])
            yield kv

    cache = SlimKVCache.from_prefill(watch(drain(dc)), 22, _rt(enabled=False))
    assert seen == [[True, False, False], [True, True, False], [True, True, True]]
    assert [layer.prompt_len for layer in cache.layers] == [20, 21, 22]


@pytest.mark.parametrize("kv", ["resident", "offload"])
def test_compiled_decode_regions_match_eager_and_compile_once(monkeypatch, kv):
    """decode_compile=True (the CUDA default): the Inductor-compiled per-layer regions (and
    offload's selection) give the eager step's logits, and one graph per region serves every layer."""
    from slimcompile.runtime import offload

    torch._dynamo.reset()
    x = ids(300)
    budget = 2048 if kv == "resident" else 16  # offload: a small active set, so blocks swap
    _, _, eager = _generate(kv, budget, x, new=5, decode_compile=False)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _, _, compiled = _generate(kv, budget, x, new=5, decode_compile=True)
    dec = compiled.past_key_values.decoder
    assert dec.pre.compiled is not None and dec.post.compiled is not None  # no fallback to eager
    regions = 2 if kv == "resident" else 3
    if kv == "offload":
        assert offload._PLAN_REGIONS[True].compiled is not None
        assert sum(int(l.swaps.sum()) for l in compiled.past_key_values.layers if not l.all_resident) > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames <= 1 + regions  # prefill + regions
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.logits[1:], eager.logits[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv", ["resident", "offload"])
def test_a_new_prompt_length_compiles_nothing_new(monkeypatch, kv):
    """Serving many prompt lengths: the prefill graph is dynamic, the decode regions take the
    buffers' capacity and offload's number of blocks as dynamic sizes, so a second length reuses
    every compiled graph (no compile inside that generation, no march towards the recompile limit)."""
    torch._dynamo.reset()
    model = tiny("llama", 2, seed=3)
    slimcompile.compile(model, backend=PASS_BACKEND, **SMALL, prune_layers=[1], keep_ratio=0.5, kv=kv,
                        decode_budget=16, decode_reserve=3, decode_compile=True)
    counts = []
    for length in (300, 420, 520):
        x = ids(length)
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
        if kv == "offload":
            assert {l.n_blocks for l in out.past_key_values.layers if not l.all_resident} != set()
    assert counts[0] >= 1 and counts[1:] == [0, 0], counts


def test_decode_region_falls_back_to_eager_with_a_warning(monkeypatch):
    from slimcompile.runtime import regions

    def broken(*args, **kwargs):
        raise RuntimeError("no backend for this")

    region = regions.CompiledRegion(lambda a: a + 1, compiled=False)
    region.compiled = broken
    with pytest.warns(UserWarning, match="decode step runs eagerly.*RuntimeError: no backend for this"):
        assert region(torch.ones(1)).item() == 2
    assert region.compiled is None
    with pytest.raises(SlimOptionError, match="decode_compile.*'auto', True or False"):
        _rt(decode_compile="yes")
    monkeypatch.setenv("SLIM_DECODE_COMPILE", "2")
    with pytest.raises(SlimOptionError, match="SLIM_DECODE_COMPILE='2'"):
        _rt()
    monkeypatch.setenv("SLIM_DECODE_COMPILE", "1")
    assert _rt().compile_regions(torch.device("cpu")) and not _rt(decode_compile=False).compile_regions(torch.device("cpu"))
    monkeypatch.delenv("SLIM_DECODE_COMPILE")
    assert not _rt().compile_regions(torch.device("cpu")) and _rt().compile_regions(torch.device("cuda"))


def test_a_finished_generation_releases_its_cache_without_a_gc_pass():
    """No reference cycle between the cache and its decoder: dropping the generate output frees
    the KV buffers at once (and returns offload's host buffers to the pool)."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        _, _, out = _generate("offload", 64, ids(300), new=3)
        cache = weakref.ref(out.past_key_values)
        layer = weakref.ref(out.past_key_values.layers[1])
        assert out.past_key_values.decoder is not None
        del out
        assert cache() is None and layer() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fusing_projections_keeps_the_model_and_shares_storage(arch):
    from slimcompile.runtime.fused_weights import fuse_layer, fuse_model, fused_of

    model = tiny(arch, 2, seed=5)
    x = ids(40)
    with torch.no_grad():
        before = model(x).logits
    layer = model.model.layers[0]
    assert fused_of(layer) is None  # separate parameters
    assert fuse_model(model) == 4 and fuse_layer(layer)  # idempotent
    fw = fused_of(layer)
    attn, mlp = layer.self_attn, layer.mlp
    assert fw.qkv_sizes == (64, 32, 32) and fw.inter == 128
    assert fw.qkv.data_ptr() == attn.q_proj.weight.data_ptr() and torch.equal(fw.qkv[96:], attn.v_proj.weight)
    assert torch.equal(fw.gate_up[128:], mlp.up_proj.weight)
    assert (fw.qkv_bias is None) == (arch == "llama")
    if arch == "qwen2":
        assert torch.equal(fw.qkv_bias[64:96], attn.k_proj.bias)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    model.to(torch.float64)  # every parameter gets its own storage again: no stale fused view
    assert fused_of(layer) is None
    mlp.gate_proj = torch.nn.Identity()
    assert not fuse_layer(layer)


@pytest.mark.parametrize("kv", ["resident", "offload"])
def test_fused_decode_gives_the_unfused_tokens(monkeypatch, kv):
    """decode_fuse=True (the CUDA default): one GEMM for q/k/v and one for gate/up, same tokens."""
    torch._dynamo.reset()
    x = ids(300)
    budget = 2048 if kv == "resident" else 16
    _, _, plain = _generate(kv, budget, x, new=6, decode_compile=True, decode_fuse=False)
    assert all(f is None for f in plain.past_key_values.decoder.fused)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _, _, fused = _generate(kv, budget, x, new=6, decode_compile=True, decode_fuse=True)
    dec = fused.past_key_values.decoder
    assert all(f is not None for f in dec.fused) and dec.fused_pre.compiled is not None and dec.fused_post.compiled is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames <= 1 + (2 if kv == "resident" else 3)
    assert torch.equal(fused.sequences, plain.sequences)
    for a, b in zip(fused.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(SlimOptionError, match="decode_fuse.*'auto', True or False"):
        _generate(kv, budget, x, new=2, decode_fuse="on")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_fused_decode_through_inductor_matches_unfused(monkeypatch):
    """The CUDA default path: Inductor prefill over fused parameter views, fused decode regions, CUDA graphs."""
    x = ids(300).cuda()
    outs = {}
    for fuse in ("0", "1"):
        torch._dynamo.reset()
        model = tiny("llama", 2, seed=3).cuda()
        slimcompile.compile(model, **{**SMALL, "prune_layers": [1], "keep_ratio": 0.5, "decode_fuse": fuse == "1"})
        outs[fuse] = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                    return_dict_in_generate=True, output_logits=True)
        assert all((f is not None) == (fuse == "1") for f in outs[fuse].past_key_values.decoder.fused)
    assert torch.equal(outs["0"].sequences, outs["1"].sequences)
    for a, b in zip(outs["0"].logits, outs["1"].logits):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_kv_bytes_name_the_device_not_a_gpu():
    from slimcompile.runtime.kv_cache import KVBytes

    b = KVBytes(3, 4) + KVBytes(1, 0)
    assert repr(b) == "KVBytes(device=4, host=4)" and b.gpu == b.device == 4
