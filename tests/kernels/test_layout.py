"""The paged layout: views alias vLLM's [B, H, N, C] page exactly, metadata never overlaps K/V."""

import pytest
import torch

from vllm_sparse.kernels import PagedKVCache, meta_slots


@pytest.mark.parametrize("num_kv_heads, block_size, page_size", [(3, 16, 16), (8, 16, 4), (1, 128, 16), (20, 32, 8)])
def test_views_partition_the_block(num_kv_heads, block_size, page_size):
    d = 64
    shape = PagedKVCache.raw_shape(5, block_size, num_kv_heads, d, page_size)
    assert shape == (5, num_kv_heads + meta_slots(num_kv_heads, block_size, page_size), block_size, 2 * d)
    raw = torch.zeros(shape)
    c = PagedKVCache.from_raw(raw, num_kv_heads, page_size)
    marks = {}
    for i, t in enumerate([c.key_cache, c.value_cache, c.key_min, c.key_max], start=1):
        t.fill_(float(i))
        marks[i] = t.numel()
    # every element written by exactly one view, none of them overlapping
    for i, n in marks.items():
        assert int((raw == i).sum()) == n
    assert int((raw != 0).sum()) == sum(marks.values())
    # key of (block 2, token 5, head h) sits in head slot h, row 5, first half
    h = num_kv_heads - 1
    c.key_cache[2, 5 % block_size, h] = torch.arange(d, dtype=torch.float32)
    assert torch.equal(raw[2, h, 5 % block_size, :d], torch.arange(d, dtype=torch.float32))


def test_views_work_on_a_layer_interleaved_strided_cache():
    """vLLM may place other layers between blocks (block stride > page size): views must follow the strides."""
    h, bs, d, ps = 2, 16, 64, 16
    per_block = PagedKVCache.raw_shape(1, bs, h, d, ps)[1:]
    buf = torch.zeros(4, 3, *per_block)  # [blocks, layers, slots, N, C]
    raw = buf[:, 1]  # layer 1 of 3: a strided, non-contiguous [B, H, N, C] view
    assert not raw.is_contiguous()
    c = PagedKVCache.from_raw(raw, h, ps)
    c.key_max.fill_(7.0)
    assert int((buf[:, 1] == 7).sum()) == c.key_max.numel() and int((buf[:, [0, 2]] != 0).sum()) == 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="page_size=12"):
        PagedKVCache.raw_shape(2, 16, 2, 64, 12)
    with pytest.raises(ValueError, match="head slots"):
        PagedKVCache.from_raw(torch.zeros(2, 2, 16, 128), 2, 16)
