"""Dense causal attention of a prefill / chunked-prefill / decode batch over the paged cache.

Semantics of :func:`.reference.paged_attention`: request ``b`` owns query rows
``query_start_loc[b]:query_start_loc[b+1]``, the *last* ``q_len`` positions of its
``seq_lens[b]`` tokens; row ``i`` attends positions ``0 .. seq_lens[b] - q_len + i`` — with a
sliding window only the last ``window`` of them — with the layer's logit soft cap and sinks.

One program takes ``BLOCK_Q`` consecutive query tokens of one request and the whole GQA
group of one KV head (``BLOCK_M = BLOCK_Q * next_pow2(group)`` rows), so every K/V tile is
read once per group, and runs an fp32 online softmax over the causal key range. The grid
is the static upper bound ``num_tokens // BLOCK_Q + B`` of query blocks (as vLLM's unified
attention does): each program finds its request by binary search over
``query_start_loc`` and exits if it has no rows, so no host sync is needed. With a window, a
program starts at the first key its first row attends: key tiles wholly behind the window are
neither read nor computed (vLLM may have freed their blocks).
All-decode batches (every ``q_len == 1``) go to the split-K decode kernel instead.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .layout import PagedKVCache
from .triton_common import (INTERPRET, LOG2E, check_query, check_sinks, dot, load_rows, math_mode, paged_slots,
                            soft_cap, softmax_step, start_with_sinks)
from .triton_sparse_attn import dense_decode_triton

__all__ = ["paged_attention_triton"]



@triton.jit
def _find_request(query_start_loc_ptr, q_block, num_reqs, BLOCK_Q: tl.constexpr):
    """Largest ``b`` with ``query_start_loc[b] // BLOCK_Q + b <= q_block``."""
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_prefill_kernel(
    # -- pointers ------------------------------------------------------------------
    q_ptr,  # [num_tokens, num_heads, head_size]
    k_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    v_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_table_ptr,  # [B, max_blocks] int
    seq_lens_ptr,  # [B] int
    query_start_loc_ptr,  # [B + 1] int
    sinks_ptr,  # [num_heads] sink logits (HAS_SINKS)
    out_ptr,  # [num_tokens, num_heads, head_size]
    # -- sizes / scalars -----------------------------------------------------------
    scale_log2e,
    softcap_log2e,  # logit soft cap * log2(e) (HAS_SOFTCAP)
    window,  # attend the last `window` positions only (the row's own included); <= 0: all
    num_reqs,
    q_per_kv,  # num_heads // num_kv_heads
    # -- strides -------------------------------------------------------------------
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btn,
    stride_ot, stride_oh, stride_od,
    # -- meta ----------------------------------------------------------------------
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_GP: tl.constexpr,  # next_pow2(q_per_kv)
    BLOCK_Q: tl.constexpr,  # query tokens per program
    TILE_N: tl.constexpr,  # keys per loop step
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_GP
    q_block = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = _find_request(query_start_loc_ptr, q_block, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    local = q_block - (q_start // BLOCK_Q + b)
    if local * BLOCK_Q >= q_len:
        return
    b = b.to(tl.int64)
    n = tl.load(seq_lens_ptr + b).to(tl.int32)

    m = tl.arange(0, BLOCK_M)
    qi = local * BLOCK_Q + m // BLOCK_GP  # query row inside the request
    g = m % BLOCK_GP
    row_valid = (qi < q_len) & (g < q_per_kv)
    q_pos = n - q_len + qi  # [BLOCK_M] position of each row
    tok = (q_start + qi).to(tl.int64)
    head = kvh * q_per_kv + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_SIZE
    # q: [BLOCK_M, BLOCK_D]
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    # keys from the block's first row's window to its last row's position
    span = tl.where(window > 0, window, n)  # keys a row attends at most (n: all)
    kv_start = tl.maximum(n - q_len + local * BLOCK_Q - span + 1, 0)
    kv_end = tl.minimum(n, n - q_len + (local + 1) * BLOCK_Q)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:
        m_i, l_i = start_with_sinks(m_i, l_i, sinks_ptr, head, row_valid, True)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_off = tl.arange(0, TILE_N)
    for t in range(kv_start, kv_end, TILE_N):
        pos = t + n_off
        valid = pos < kv_end
        blk, off = paged_slots(block_table_ptr, b, stride_btb, stride_btn, pos, valid, BLOCK_SIZE)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = load_rows(k_ptr, blk, off, kvh, d, kv_mask, stride_kb, stride_kt, stride_kh, stride_kd)
        v = load_rows(v_ptr, blk, off, kvh, d, kv_mask, stride_vb, stride_vt, stride_vh, stride_vd)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = dot(q, tl.trans(k), IEEE) * scale_log2e  # [BLOCK_M, TILE_N]
        if HAS_SOFTCAP:
            s = soft_cap(s, softcap_log2e)
        allowed = valid[None, :] & (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - span)
        s = tl.where(allowed, s, float("-inf"))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, v, IEEE, True)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_mask[None, :],
    )


def paged_attention_triton(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense causal paged attention (see :func:`.reference.paged_attention`).

    Args:
        query: ``[num_tokens, num_heads, head_size]``.
        block_table: ``[B, max_blocks]`` int32/int64.
        seq_lens: ``[B]`` int, context length including this step's tokens.
        query_start_loc: ``[B + 1]`` int, cumulative query lengths.
        out: optional ``[num_tokens, num_heads, head_size]`` output.
        max_query_len: host bound of the query lengths; ``1`` promises one query token per
            request and routes to the split-K decode kernel. ``None``: read from
            ``query_start_loc`` (a device sync).
        max_seq_len: host bound of ``seq_lens`` for the decode split count (``None``: sync).
        window: a row attends only the last ``window`` positions up to its own (``-1``: all); the
            keys behind every row's window are never read.
        softcap: the layer's logit soft cap (``0``: none).
        sinks: optional ``[num_heads]`` per-head sink logits (any float dtype).
    Returns:
        ``out``; rows past ``query_start_loc[-1]`` are left untouched.
    """
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_size]; got {tuple(query.shape)}")
    num_tokens, num_heads, d = query.shape
    check_query(query, cache)
    check_sinks(sinks, num_heads)
    num_reqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_reqs + 1:
        raise ValueError(
            f"query_start_loc must have B + 1 = {num_reqs + 1} entries; got {query_start_loc.shape[0]}"
        )
    if out is None:
        out = torch.empty_like(query)
    if num_reqs == 0 or num_tokens == 0:
        return out
    all_decode = max_query_len == 1
    if max_query_len is None:
        q_lens = query_start_loc[1:] - query_start_loc[:-1]
        max_query_len = int(q_lens.max())
        all_decode = max_query_len == 1 and int(q_lens.min()) == 1
    if all_decode and num_tokens >= num_reqs:
        # one query per request: request b's row is query_start_loc[b] = b
        dense_decode_triton(query[:num_reqs], cache, block_table, seq_lens, scale, out=out[:num_reqs],
                            max_seq_len=max_seq_len, window=window, softcap=softcap, sinks=sinks)
        return out

    q_per_kv = num_heads // cache.num_kv_heads
    block_gp = triton.next_power_of_2(q_per_kv)
    upcast, ieee = math_mode(query, cache)  # ieee: fp32 FMA dots (no tf32), smaller tiles
    if INTERPRET:
        block_m, tile_n = 64, 128
    else:
        block_m = 64 if max_query_len >= 64 and not ieee else 16
        tile_n = 32 if ieee else 64
    block_m = max(block_m, block_gp)
    block_q = block_m // block_gp
    kc, vc = cache.key_cache, cache.value_cache
    grid = (num_tokens // block_q + num_reqs, cache.num_kv_heads)
    _paged_prefill_kernel[grid](
        query, kc, vc, block_table, seq_lens, query_start_loc, sinks if sinks is not None else query, out,
        scale * LOG2E, float(softcap or 0.0) * LOG2E, int(window), num_reqs, q_per_kv,
        *query.stride(), *kc.stride(), *vc.stride(), *block_table.stride(), *out.stride(),
        BLOCK_SIZE=cache.block_size, HEAD_SIZE=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_GP=block_gp, BLOCK_Q=block_q, TILE_N=tile_n,
        UPCAST=upcast, IEEE=ieee, HAS_SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None,
        num_warps=4,
    )
    return out
