"""Whole-page sparse decode on the GPU through vLLM's own Triton kernel, over compacted block tables.

The backend's CUDA path runs whole-page decode (``exact_pages``, ``quest``) with the plugin's
split-K kernel over one block table per (request, KV head) (:func:`vllm_sparse.kernels.ops.table_decode`,
which needs no vLLM and is what ``benchmarks/gpu_check.sh`` tests on a GPU machine without vLLM).
:func:`unified_table_decode` is the same step through vLLM's ``unified_attention``, the kernel
vLLM's Triton backend decodes with: each (request, KV head) becomes one single-KV-head sequence
over the cache viewed as ``num_blocks * num_kv_heads`` one-head blocks (the layout's head slots,
:attr:`~vllm_sparse.kernels.PagedKVCache.head_blocks`), the CPU path's trick (:mod:`vllm_sparse.cpu_attention`).
``benchmarks/kernels.py`` times both where vLLM is importable; the faster one is the backend's.
"""

from __future__ import annotations

import torch

from vllm_sparse.kernels import PagedKVCache

__all__ = ["one_head_tables", "unified_split_kwargs", "unified_table_decode"]

# vLLM's Triton backend (``vllm/v1/attention/backends/triton_attn.py``): decode batches of at most
# MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads sequences take the split ("3D") kernel, 16 segments per sequence
MIN_LAUNCH_GRID_SIZE_2D = 128
NUM_PAR_SOFTMAX_SEGMENTS = 16


def one_head_tables(tables: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[B, Hkv, W]`` block ids -> ``[B * Hkv, W]`` int32 one-head block ids (``block * Hkv + head``)."""
    b, h, w = tables.shape
    heads = torch.arange(h, device=tables.device)[None, :, None]
    return (tables.long() * num_kv_heads + heads).view(b * h, w).to(torch.int32)


def unified_split_kwargs(num_seqs: int, num_heads: int, num_kv_heads: int, head_size: int,
                         device: torch.device) -> dict:
    """The split-softmax arguments vLLM's Triton backend passes ``unified_attention`` for a decode
    batch: without them the kernel runs one program per (sequence, KV head), which leaves most of a
    GPU idle at small batches. ``num_heads`` / ``num_kv_heads``: of the call's query and cache."""
    threshold = MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads
    if num_seqs > threshold:
        return {}
    segs, rows = NUM_PAR_SOFTMAX_SEGMENTS, threshold
    d = 1 << (head_size - 1).bit_length()
    return dict(seq_threshold_3D=threshold, num_par_softmax_segments=segs,
                softmax_segm_output=torch.empty((rows, num_heads, segs, d), dtype=torch.float32, device=device),
                softmax_segm_max=torch.empty((rows, num_heads, segs), dtype=torch.float32, device=device),
                softmax_segm_expsum=torch.empty((rows, num_heads, segs), dtype=torch.float32, device=device))


def unified_table_decode(query: torch.Tensor, cache: PagedKVCache, tables: torch.Tensor, lens: torch.Tensor,
                         scale: float, out: torch.Tensor, max_len: int) -> torch.Tensor:
    """vLLM's ``unified_attention`` over per-(request, KV head) block tables (:func:`.kernels.ops.table_decode`'s
    semantics, ``S = num_kv_heads``).

    Args:
        query, out: ``[B, num_heads, head_size]``; tables: ``[B, num_kv_heads, W]`` block ids;
        lens: ``[B, num_kv_heads]`` tokens per row; max_len: host bound of ``lens``.
    """
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    b, num_heads, d = query.shape
    hkv = cache.num_kv_heads
    if tables.shape[:2] != (b, hkv):
        raise ValueError(f"tables must be [B={b}, num_kv_heads={hkv}, W]; got {tuple(tables.shape)}")
    g = num_heads // hkv
    key, value = (x.transpose(1, 2) for x in cache.head_blocks)  # [blocks * Hkv, block_size, 1, D]
    unified_attention(q=query.reshape(b * hkv, g, d), k=key, v=value, out=out.view(b * hkv, g, d),
                      cu_seqlens_q=torch.arange(b * hkv + 1, dtype=torch.int32, device=query.device),
                      max_seqlen_q=1, seqused_k=lens.reshape(-1).to(torch.int32).contiguous(), max_seqlen_k=max_len,
                      softmax_scale=scale, causal=True, window_size=(-1, -1),
                      block_table=one_head_tables(tables, hkv), softcap=0, q_descale=None, k_descale=None,
                      v_descale=None, **unified_split_kwargs(b * hkv, g, 1, d, query.device))
    return out
