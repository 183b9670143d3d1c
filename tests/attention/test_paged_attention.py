"""Paged attention: the fast backend against the reference, and the reference against dense
attention on the unpaged K/V (two independent paths)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from flashserve.attention import decode as decode_mod
from flashserve.attention.backend import paged_attention, write_kv
from flashserve.attention.metadata import AttentionMetadata
from flashserve.attention.reference import paged_attention_reference
from flashserve.kernels import ops, reference


def new_caches(shape, dtype, layout="engine"):
    """Zeroed K and V caches in the layout the engine allocates (kernels/ops.py: K transposed within a
    block), or contiguous (blocks, block_size, heads, head_dim) ones, which the kernels read key by key."""
    if layout == "contiguous":
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    cpu = torch.device("cpu")
    return (ops.kv_cache_empty(shape, dtype, cpu, keys=True).zero_(),
            ops.kv_cache_empty(shape, dtype, cpu, keys=False).zero_())


def make_batch(rng: random.Random, specs, block_size, hk, d, hq, dtype, num_blocks=None, layout="engine"):
    """specs: list of (cached_len, query_len). Returns q, k, v, caches, meta and the dense per-seq K/V."""
    need = sum(-(-(c + q) // block_size) for c, q in specs)
    num_blocks = num_blocks or need + 3
    free = list(range(1, num_blocks))
    rng.shuffle(free)  # scattered blocks, so paging mistakes show
    k_cache, v_cache = new_caches((num_blocks, block_size, hk, d), dtype, layout)
    tables, dense, qs, ks, vs, slots = [], [], [], [], [], []
    for cached, ql in specs:
        sl = cached + ql
        blocks = [free.pop() for _ in range(-(-sl // block_size))]
        tables.append(blocks)
        K, V = torch.randn(sl, hk, d, dtype=dtype), torch.randn(sl, hk, d, dtype=dtype)
        dense.append((K, V))
        for t in range(cached):  # the prefix is already in the cache
            k_cache[blocks[t // block_size], t % block_size] = K[t]
            v_cache[blocks[t // block_size], t % block_size] = V[t]
        qs.append(torch.randn(ql, hq, d, dtype=dtype))
        ks.append(K[cached:])
        vs.append(V[cached:])
        slots += [blocks[t // block_size] * block_size + t % block_size for t in range(cached, sl)]
    max_b = max(len(b) for b in tables)
    bt = torch.zeros(len(specs), max_b, dtype=torch.int32)
    for i, b in enumerate(tables):
        bt[i, : len(b)] = torch.tensor(b)
    qlens = [q for _, q in specs]
    slens = [c + q for c, q in specs]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32), block_table=bt,
        slot_mapping=torch.tensor(slots, dtype=torch.int64), max_query_len=max(qlens), max_seq_len=max(slens),
        query_lens_cpu=qlens, seq_lens_cpu=slens,
    )
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta, dense


def dense_attention(q, K, V, scale, window=None, softcap=None):
    """Straight from the definition, on contiguous K/V: softmax(q k^T * scale + causal mask) v."""
    ql, sl = q.shape[0], K.shape[0]
    group = q.shape[1] // K.shape[1]
    out = torch.empty(ql, q.shape[1], q.shape[2], dtype=torch.float64)
    for i in range(ql):
        pos = sl - ql + i
        for h in range(q.shape[1]):
            s = (K[:, h // group].double() @ q[i, h].double()) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            keep = torch.arange(sl) <= pos
            if window:
                keep &= torch.arange(sl) > pos - window
            s[~keep] = -math.inf
            out[i, h] = s.softmax(0) @ V[:, h // group].double()
    return out


SHAPES = [(1, 1), (3, 1), (4, 2), (8, 1)]  # (q heads per kv head, kv heads): MHA, GQA, MQA


@pytest.mark.parametrize("group,hk", SHAPES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_reference_equals_dense(group, hk, block_size):
    rng = random.Random(group * 100 + block_size)
    specs = [(0, 7), (5, 3), (9, 1), (0, 1)]
    for window, softcap in [(None, None), (4, None), (None, 5.0)]:
        q, k, v, kc, vc, meta, dense = make_batch(rng, specs, block_size, hk, 8, hk * group, torch.float32)
        write_kv(k, v, kc, vc, meta.slot_mapping)
        got = paged_attention_reference(q, kc, vc, meta, 0.3, window, softcap)
        start = 0
        for (cached, ql), (K, V) in zip(specs, dense):
            want = dense_attention(q[start : start + ql], K, V, 0.3, window, softcap)
            torch.testing.assert_close(got[start : start + ql].double(), want, atol=1e-5, rtol=1e-5)
            start += ql


def test_write_kv_puts_every_token_at_its_slot():
    rng = random.Random(0)
    q, k, v, kc, vc, meta, dense = make_batch(rng, [(3, 5), (0, 2)], 4, 2, 8, 4, torch.float32)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    slots = meta.slot_mapping
    for cache, rows in ((kc, k), (vc, v)):
        torch.testing.assert_close(cache[slots // 4, slots % 4], rows, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("seed", range(12))
def test_backend_equals_reference_on_random_mixed_batches(dtype, tol, seed):
    rng = random.Random(seed)
    group, hk = rng.choice(SHAPES)
    block_size = rng.choice([1, 4, 16])
    d = rng.choice([8, 16, 64])
    specs = [(rng.randint(0, 40), rng.choice([1, 1, 1, rng.randint(2, 20)])) for _ in range(rng.randint(1, 6))]
    window = rng.choice([None, None, rng.randint(1, 12)])
    softcap = rng.choice([None, None, 3.0])
    q, k, v, kc, vc, meta, _ = make_batch(rng, specs, block_size, hk, d, hk * group, dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    got = paged_attention(q, k, v, kc, vc, meta, d**-0.5, window, softcap)
    write_kv(k, v, kc2, vc2, meta.slot_mapping)
    want = paged_attention_reference(q, kc2, vc2, meta, d**-0.5, window, softcap)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [None, 37])
def test_decode_splits_merge_exactly(monkeypatch, window):
    """Long contexts cut into many KV splits (split size forced small) give the one-split result."""
    rng = random.Random(7)
    specs = [(300, 1), (41, 1), (129, 1)]
    q, k, v, kc, vc, meta, _ = make_batch(rng, specs, 4, 2, 16, 6, torch.float32)
    want = paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.25, window)
    monkeypatch.setattr(decode_mod, "SPLIT_TOKENS", 8)
    got = paged_attention(q, k, v, kc, vc, meta, 0.25, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    torch.testing.assert_close(got, paged_attention_reference(q, kc, vc, meta, 0.25, window), atol=1e-5, rtol=1e-5)


def backend_and_reference(q, k, v, kc, vc, meta, scale, window=None, softcap=None):
    kc2, vc2 = kc.clone(), vc.clone()
    got = paged_attention(q, k, v, kc, vc, meta, scale, window, softcap)
    write_kv(k, v, kc2, vc2, meta.slot_mapping)
    return got, paged_attention_reference(q, kc2, vc2, meta, scale, window, softcap)


def test_decode_default_splits_on_a_long_context():
    """A context past SPLIT_TOKENS is cut into several splits with the real split size."""
    rng = random.Random(11)
    specs = [(decode_mod.SPLIT_TOKENS * 2 + 37, 1), (5, 1)]
    q, k, v, kc, vc, meta, _ = make_batch(rng, specs, 16, 1, 8, 4, torch.float32)
    got, want = backend_and_reference(q, k, v, kc, vc, meta, 0.35)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_survives_empty_split_before_very_negative_scores(monkeypatch):
    """A window leaves a row's early splits empty and every visible score is about -300:
    the merge must not treat an empty split's max as 0 (exp(-300) underflows to 0 in float32)."""
    monkeypatch.setattr(decode_mod, "SPLIT_TOKENS", 8)
    rng = random.Random(3)
    specs = [(60, 1), (6, 1)]
    q, k, v, kc, vc, meta, _ = make_batch(rng, specs, 4, 1, 8, 2, torch.float32)
    q = torch.ones_like(q)
    k = -torch.ones_like(k) + 0.01 * torch.randn_like(k)
    kc.fill_(-1.0)  # the cached prefix is equally far below zero
    got, want = backend_and_reference(q, k, v, kc, vc, meta, 300 / 8, window=5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("group,hk", [(1, 2), (4, 2), (8, 1)])
def test_tiled_softcap_prefill_with_small_tiles(monkeypatch, dtype, tol, window, group, hk):
    """Soft-capped prefill chunks over a cached prefix, tiles forced small so many
    query and KV tiles (and skipped ones) are exercised, next to decodes: the torch twin of the prefill
    kernel (the path without the C++ kernels)."""
    monkeypatch.setattr(ops, "_kernels_for", lambda t: None)
    monkeypatch.setattr(reference, "Q_TILE", 4)
    monkeypatch.setattr(reference, "KV_TILE", 8)
    rng = random.Random(group * 10 + hk)
    specs = [(23, 13), (0, 11), (40, 1), (7, 2)]
    q, k, v, kc, vc, meta, _ = make_batch(rng, specs, 4, hk, 16, hk * group, dtype)
    got, want = backend_and_reference(q, k, v, kc, vc, meta, 0.5, window, 2.0)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_sliding_window_prefill_over_a_long_prefix(block_size):
    """Only the window's blocks are gathered for a chunk far into its sequence."""
    rng = random.Random(block_size)
    specs = [(70, 9), (3, 20), (50, 1)]
    q, k, v, kc, vc, meta, _ = make_batch(rng, specs, block_size, 2, 8, 6, torch.float32)
    got, want = backend_and_reference(q, k, v, kc, vc, meta, 0.4, window=6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("specs", [[(4, 1), (9, 1)], [(4, 6), (9, 1)]])
def test_strided_inputs_from_a_fused_qkv_projection(specs):
    """q, k, v as the model produces them: column slices of one (T, (Hq + 2 Hk) * D) tensor."""
    rng = random.Random(5)
    hq, hk, d = 4, 2, 8
    q, k, v, kc, vc, meta, _ = make_batch(rng, specs, 4, hk, d, hq, torch.float32)
    T = q.shape[0]
    qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=1)
    qs, ks, vs = qkv.split([hq * d, hk * d, hk * d], dim=1)
    qs, ks, vs = qs.view(T, hq, d), ks.view(T, hk, d), vs.view(T, hk, d)
    assert not qs.is_contiguous()
    got, want = backend_and_reference(qs, ks, vs, kc, vc, meta, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("cpp_kernels")
def torch_twin(q, k_cache, v_cache, block_table, seq_lens, max_seq_len, min_seq_len, scale, window=None,
               softcap=None):
    """The C++ decode kernel's torch twin, with the split size decode_attention passes it."""
    return reference.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, max_seq_len, min_seq_len,
                                            scale, window, softcap, decode_mod.SPLIT_TOKENS)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("layout", ["engine", "contiguous"])
def test_cpp_decode_kernel_equals_torch_path(monkeypatch, dtype, tol, seed, layout):
    """The two decode implementations (C++ in-place reads, torch gather + bmm) on random
    paged batches: GQA ratios, block sizes, windows, softcap, several KV splits; the engine's cache
    layout (the kernel's vector path where a block holds whole key vectors) and a contiguous one."""
    rng = random.Random(1000 + seed)
    monkeypatch.setattr(decode_mod, "SPLIT_TOKENS", rng.choice([8, 32, 512]))
    group, hk = rng.choice(SHAPES + [(3, 3), (6, 2)])
    # head sizes off and on the kernel's vector paths; blocks of 8 (AVX2's key vectors), 16 and 32
    # (two key vectors a block); lengths crossing its 64-key tiles
    block_size, d = rng.choice([1, 4, 8, 16, 16, 32]), rng.choice([12, 16, 64, 72, 256])
    specs = [(rng.randint(0, 200), 1) for _ in range(rng.randint(1, 9))]
    window, softcap = rng.choice([None, rng.randint(1, 50)]), rng.choice([None, 4.0])
    q, k, v, kc, vc, meta, _ = make_batch(rng, specs, block_size, hk, d, hk * group, dtype, layout=layout)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    args = (q, kc, vc, meta.block_table, meta.seq_lens, meta.max_seq_len, min(meta.seq_lens_cpu), d**-0.5,
            window, softcap)
    got = decode_mod.decode_attention(*args)
    want = torch_twin(*args)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(6))
def test_two_byte_kv_cache_read_as_float32(monkeypatch, cache_dtype, seed):
    """A float16/bfloat16 cache under float32 queries (kv_cache_dtype): the C++ kernel converts
    rows as it reads them, the torch path converts the gathered blocks; both see the same rounded
    K/V, so they agree to float32 summation order, and both stay within the cache's rounding of
    float64 attention on the unrounded K/V."""
    rng = random.Random(2000 + seed)
    monkeypatch.setattr(decode_mod, "SPLIT_TOKENS", rng.choice([8, 32, 512]))
    group, hk = rng.choice(SHAPES)
    block_size, d = rng.choice([1, 4, 16]), rng.choice([12, 64, 72])  # 12, 72: the converter's scalar tail
    specs = [(rng.randint(0, 150), 1) for _ in range(rng.randint(1, 6))]
    q, k, v, kc, vc, meta, dense = make_batch(rng, specs, block_size, hk, d, hk * group, torch.float32)
    kc2, vc2 = kc.to(cache_dtype), vc.to(cache_dtype)  # the prefix, rounded as write_kv rounds it
    write_kv(k, v, kc2, vc2, meta.slot_mapping)
    assert kc2.dtype == cache_dtype
    args = (q, kc2, vc2, meta.block_table, meta.seq_lens, meta.max_seq_len, min(meta.seq_lens_cpu), d**-0.5)
    got = decode_mod.decode_attention(*args)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch_twin(*args), atol=1e-5, rtol=1e-5)
    rounding = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[cache_dtype]
    for i, (K, V) in enumerate(dense):
        torch.testing.assert_close(got[i].double(), dense_attention(q[i : i + 1], K, V, d**-0.5)[0],
                                   atol=rounding, rtol=rounding)


@pytest.mark.usefixtures("cpp_kernels")
def test_cpp_decode_kernel_softmax_weights_span_the_float_range():
    """Scores far apart (exp of score minus max down to the underflow threshold and below) and one
    key dominating: the kernel's vector exp against float64 dense attention."""
    rng = random.Random(21)
    specs = [(150, 1), (70, 1)]
    q, k, v, kc, vc, meta, dense = make_batch(rng, specs, 16, 1, 64, 2, torch.float32)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    for scale in (0.05, 3.0, 40.0):  # near-uniform weights ... a single key takes almost all
        got = decode_mod.decode_attention(q, kc, vc, meta.block_table, meta.seq_lens, meta.max_seq_len,
                                          min(meta.seq_lens_cpu), scale)
        for i, (K, V) in enumerate(dense):
            want = dense_attention(q[i : i + 1], K, V, scale)[0]
            torch.testing.assert_close(got[i].double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("seed", range(10))
def test_cpp_prefill_kernel_equals_torch_twin(seed):
    """The C++ prefill kernel (in-place reads, rows in the lanes) against its torch twin (gather + SDPA or
    the tiled soft-cap path) on random chunks over cached prefixes: GQA ratios, block sizes, head sizes
    on and off the vector widths, chunks crossing the 64-key tiles and the kernel's row items, windows,
    soft caps, two-byte caches under float32 queries, bfloat16 queries."""
    rng = random.Random(3000 + seed)
    group, hk = rng.choice(SHAPES + [(7, 2)])
    block_size, d = rng.choice([1, 4, 8, 16, 32]), rng.choice([12, 64, 72, 128])
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    cache_dtype = rng.choice([dtype, torch.float16, torch.bfloat16])
    cached, ql = rng.choice([0, rng.randint(1, 150)]), rng.randint(2, 170)
    window, softcap = rng.choice([None, rng.randint(1, 90)]), rng.choice([None, None, 4.0])
    q, k, v, kc, vc, meta, _ = make_batch(rng, [(cached, ql)], block_size, hk, d, hk * group, dtype)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    blocks = meta.block_table[0].long()
    got = ops.paged_prefill_attention(q, kc, vc, blocks, cached + ql, d**-0.5, window, softcap)
    want = reference.paged_prefill_attention(q, kc, vc, blocks, cached + ql, d**-0.5, window, softcap)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("window", [None, 50])
def test_cpp_prefill_rows_do_not_depend_on_the_chunking(window):
    """A 200-token prompt prefilled at once, or in chunks of 37 each over the cache the earlier chunks
    wrote (chunked prefill, prefix-cache hits), gives bit-identical rows: key tiles sit at absolute
    positions and each row runs the same instructions in whichever item it lands."""
    rng = random.Random(9)
    q, k, v, kc, vc, meta, _ = make_batch(rng, [(0, 200)], 16, 2, 64, 6, torch.float32)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    blocks = meta.block_table[0].long()
    whole = ops.paged_prefill_attention(q, kc, vc, blocks, 200, 0.125, window, None)
    for start in range(0, 200, 37):
        end = min(start + 37, 200)
        part = ops.paged_prefill_attention(q[start:end], kc, vc, blocks, end, 0.125, window, None)
        assert torch.equal(part, whole[start:end]), start

