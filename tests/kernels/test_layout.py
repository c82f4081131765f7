"""The paged layout: views alias vLLM's [B, H, N, C] page exactly, metadata never overlaps K/V."""

import pytest
import torch

from vllm_sparse.kernels import PagedKVCache, summary_states


@pytest.mark.parametrize("key_transposed", [False, True])
@pytest.mark.parametrize("num_kv_heads, block_size, page_size", [(3, 16, 16), (8, 16, 4), (1, 128, 16), (20, 32, 8)])
def test_views_partition_the_block(num_kv_heads, block_size, page_size, key_transposed):
    d = 64
    shape = PagedKVCache.raw_shape(5, block_size, num_kv_heads, d, page_size)
    assert shape == (5, num_kv_heads, block_size + summary_states(block_size, page_size), 2 * d)
    # the page summaries cost exactly 1/page_size of the K/V bytes, whatever the head count
    assert (shape[2] - block_size) * page_size == block_size
    raw = torch.zeros(shape)
    c = PagedKVCache.from_raw(raw, num_kv_heads, page_size, key_transposed)
    marks = {}
    for i, t in enumerate([c.key_cache, c.value_cache, c.key_min, c.key_max], start=1):
        t.fill_(float(i))
        marks[i] = t.numel()
    # every element written by exactly one view, none of them overlapping
    for i, n in marks.items():
        assert int((raw == i).sum()) == n
    assert int((raw != 0).sum()) == sum(marks.values())
    # key of (block 2, token 5, head h) sits in head slot h: row 5 (plain) or column 5 (transposed)
    h, t = num_kv_heads - 1, 5 % block_size
    c.key_cache[2, t, h] = torch.arange(d, dtype=torch.float32)
    keys = raw[2, h].flatten()[: block_size * d]
    got = keys.view(d, block_size)[:, t] if key_transposed else keys.view(block_size, d)[t]
    assert torch.equal(got, torch.arange(d, dtype=torch.float32))
    # one-head block view: block b's head h is block b * H + h
    kb, vb = c.head_blocks
    assert kb.shape == (5 * num_kv_heads, 1, block_size, d)
    assert torch.equal(vb[2 * num_kv_heads + h, 0], c.value_cache[2, :, h])


def test_transposed_keys_match_vllm_cpu_kernel_layout():
    """With key_transposed the key memory is what vLLM's CPU reshape_and_cache (ISA vec16) writes."""
    ops = pytest.importorskip("vllm._custom_ops")
    h, bs, d = 3, 16, 64
    c = PagedKVCache.allocate(6, bs, h, d, bs, torch.bfloat16, key_transposed=True, fill=0.0)
    n = 2 * bs + 5
    k, v = torch.randn(n, h, d).bfloat16(), torch.randn(n, h, d).bfloat16()
    slots = torch.cat([torch.arange(4 * bs, 5 * bs), torch.arange(1 * bs, 2 * bs), torch.arange(2 * bs, 2 * bs + 5)])
    kc, vc = c.kernel_blocks
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, "vec16")
    assert torch.equal(c.key_cache[slots // bs, slots % bs], k)
    assert torch.equal(c.value_cache[slots // bs, slots % bs], v)


def test_views_work_on_a_layer_interleaved_strided_cache():
    """vLLM may place other layers between blocks (block stride > page size): views must follow the strides."""
    h, bs, d, ps = 2, 16, 64, 16
    per_block = PagedKVCache.raw_shape(1, bs, h, d, ps)[1:]
    buf = torch.zeros(4, 3, *per_block)  # [blocks, layers, slots, N, C]
    raw = buf[:, 1]  # layer 1 of 3: a strided, non-contiguous [B, H, N, C] view
    assert not raw.is_contiguous()
    c = PagedKVCache.from_raw(raw, h, ps)
    assert c.slot_rows is None
    c.key_max.fill_(7.0)
    assert int((buf[:, 1] == 7).sum()) == c.key_max.numel() and int((buf[:, [0, 2]] != 0).sum()) == 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="page_size=12"):
        PagedKVCache.raw_shape(2, 16, 2, 64, 12)
    with pytest.raises(ValueError, match="head slots"):
        PagedKVCache.from_raw(torch.zeros(2, 3, 17, 128), 2, 16)
    with pytest.raises(ValueError, match="states per head slot"):
        PagedKVCache.from_raw(torch.zeros(2, 2, 16, 128), 2, 16)


def test_amx_packing_is_a_permutation_with_vllm_offsets():
    """amx_pack puts key (t, e) and value (t, e) where vLLM's AMX kernel reads them; amx_unpack inverts it."""
    from vllm_sparse.kernels.layout import amx_pack, amx_unpack

    bs, d = 32, 64
    k, v = torch.randn(2, 3, bs, d), torch.randn(2, 3, bs, d)  # [blocks, heads, tokens, dims]
    pk, pv = amx_pack(k, v)
    for t, e in [(0, 0), (5, 1), (17, 2), (31, 63), (16, 33)]:
        assert pk[1, 2, (t // 16) * 16 * d + (e // 2) * 32 + (t % 16) * 2 + e % 2] == k[1, 2, t, e]
        assert pv[1, 2, (e // 16) * 16 * bs + (t // 2) * 32 + (e % 16) * 2 + t % 2] == v[1, 2, t, e]
    uk, uv = amx_unpack(pk, pv, bs)
    assert torch.equal(uk, k) and torch.equal(uv, v)


def test_amx_cache_has_no_token_views():
    """The AMX-packed cache keeps its summaries and one-head blocks but refuses [block_size, head_size] reads."""
    c = PagedKVCache.allocate(4, 32, 3, 64, 32, torch.bfloat16, amx=True)
    assert c.key_cache is None and (c.num_blocks, c.block_size, c.num_kv_heads, c.head_size) == (4, 32, 3, 64)
    assert c.head_blocks[0].shape == (12, 1, 32, 64) and c.key_min.shape == (4, 1, 3, 64)
    with pytest.raises(ValueError, match="AMX-packed"):
        c.gather(torch.zeros(1, 1, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="AMX layout needs a bfloat16"):
        PagedKVCache.allocate(4, 32, 3, 64, 32, torch.float32, amx=True)
    with pytest.raises(ValueError, match="AMX layout needs"):
        PagedKVCache.allocate(4, 16, 3, 64, 16, torch.bfloat16, amx=True)
