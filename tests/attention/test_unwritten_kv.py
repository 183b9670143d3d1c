"""KV caches are allocated without zeroing (runner/kv_cache.py): slots no request has written
hold garbage. Every attention path must give the same result when that garbage is NaN as when
it is zero (the reference reads only written slots)."""
from __future__ import annotations

import random

import pytest
import torch

from flashserve.attention.backend import paged_attention, write_kv
from flashserve.kernels.reference import paged_decode_attention as decode_attention_torch
from flashserve.attention.kv_quant import Int8KVCache
from flashserve.attention.reference import paged_attention_reference
from tests.attention.test_paged_attention import make_batch

HK, D, HQ = 2, 32, 6
SCALE = D**-0.5


def _poisoned(cache: torch.Tensor) -> torch.Tensor:
    """The cache with every slot make_batch left unwritten (exact zeros) set to NaN."""
    out = cache.clone()
    out[cache == 0] = float("nan")
    return out


def _batch(seed: int, query_lens):
    """Rows of different lengths, most ending inside a block, so short rows read block 0 (padding)
    and every row's last block has unwritten slots."""
    rng = random.Random(seed)
    specs = [(rng.randint(0, 40), ql) for ql in query_lens]
    return make_batch(rng, specs, 8, HK, D, HQ, torch.float32)


@pytest.mark.parametrize("window,softcap", [(None, None), (11, None), (None, 30.0)])
@pytest.mark.parametrize("seed", range(3))
def test_torch_decode_ignores_nan_in_unwritten_slots(seed, window, softcap):
    q, k, v, kc, vc, meta, _ = _batch(seed, [1, 1, 1, 1])
    write_kv(k, v, kc, vc, meta.slot_mapping)
    want = paged_attention_reference(q, kc, vc, meta, SCALE, window, softcap)
    got = decode_attention_torch(q, _poisoned(kc), _poisoned(vc), meta.block_table, meta.seq_lens,
                                 meta.max_seq_len, min(meta.seq_lens_cpu), SCALE, window, softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [5, 1, 9, 1]])
@pytest.mark.parametrize("seed", range(3))
def test_every_backend_path_ignores_nan_in_unwritten_slots(seed, query_lens):
    """paged_attention as the engine calls it: C++ decode when built, SDPA prefill, mixed batches."""
    q, k, v, kc, vc, meta, _ = _batch(seed, query_lens)
    want = paged_attention_reference(q, *_written(k, v, kc, vc, meta), meta, SCALE)
    got = paged_attention(q, k, v, _poisoned(kc), _poisoned(vc), meta, SCALE)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _written(k, v, kc, vc, meta):
    kc, vc = kc.clone(), vc.clone()
    write_kv(k, v, kc, vc, meta.slot_mapping)
    return kc, vc


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [5, 1, 9, 1]])
def test_int8_cache_ignores_garbage_in_unwritten_slots(query_lens):
    """Int8KVCache is allocated with torch.empty too: NaN scales in unwritten slots stay out."""
    q, k, v, kc, vc, meta, _ = _batch(7, query_lens)
    caches = []
    for dense in (kc, vc):
        cache = Int8KVCache(*dense.shape, torch.float32, torch.device("cpu"))
        cache.data.random_(-128, 128)
        cache.scale.fill_(float("nan"))
        written = (dense != 0).any(-1).any(-1).flatten().nonzero().flatten()  # the cached prefix's slots
        cache.write(dense.reshape(-1, HK, D)[written], written)
        caches.append(cache)
    got = paged_attention(q, k, v, *caches, meta, SCALE)
    want = paged_attention_reference(q, *_written(k, v, kc, vc, meta), meta, SCALE)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
