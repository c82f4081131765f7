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

__all__ = ["one_head_tables", "unified_table_decode"]


def one_head_tables(tables: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[B, Hkv, W]`` block ids -> ``[B * Hkv, W]`` int32 one-head block ids (``block * Hkv + head``)."""
    b, h, w = tables.shape
    heads = torch.arange(h, device=tables.device)[None, :, None]
    return (tables.long() * num_kv_heads + heads).view(b * h, w).to(torch.int32)


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
                      v_descale=None)
    return out
