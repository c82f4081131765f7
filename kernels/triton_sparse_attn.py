"""Split-K (flash-decoding) attention of one decode query per request, straight from the paged cache.

One kernel serves three ops:

* **sparse** (:func:`sparse_attention_triton`): each (request, selection head) attends the
  positions listed in ``indices[b, s, :]`` (``-1`` = skip), read in place from the paged
  cache — no gathered copy. ``S = num_kv_heads`` (the GQA group shares the set: one program
  loads each selected K/V row once for the whole group) or ``S = num_heads``.
* **dense** (:func:`dense_decode_triton`): positions ``0 .. seq_lens[b]-1``.
* **per-head tables** (:func:`table_decode_triton`): the dense loop, but each (request, selection
  head) walks its own block table ``tables[b, s]`` for ``lens[b, s]`` tokens — whole-page sparse
  decode over compacted tables of the chosen pages (:func:`.selection.compact_pages`): contiguous
  page rows, no per-token index.

The slot axis (indices, or positions) is cut into ``num_splits`` contiguous splits; each
program runs an fp32 online softmax over its split and, when there is more than one split,
writes a partial ``(acc, max, sum)`` that :func:`_merge_splits_kernel` combines. Semantics
are those of :func:`.reference.sparse_attention` / :func:`.reference.dense_decode`, except
that a row with no valid position at all returns zeros (the reference returns NaN).

A layer's logit soft cap is applied to every logit before the softmax; its sinks (one logit per
query head, attached to no value) start the first split's running ``(max, sum)``, so the merge
counts each exactly once. Dense decode with a sliding window walks only the window's positions.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .layout import PagedKVCache
from .triton_common import (INTERPRET, LOG2E, check_query, check_sinks, dot, load_rows, math_mode, paged_slots,
                            soft_cap, softmax_step, start_with_sinks)

__all__ = ["sparse_attention_triton", "dense_decode_triton", "table_decode_triton", "decode_num_splits"]



@triton.jit
def _split_decode_kernel(
    # -- pointers ------------------------------------------------------------------
    q_ptr,  # [B, num_heads, head_size]
    k_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    v_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_table_ptr,  # [B, max_blocks] int, or [B, S, max_blocks]: one table per selection head
    idx_ptr,  # [B, S, L] int positions (USE_INDICES), -1 = skip
    seq_lens_ptr,  # [B] int, or [B, S] (dense mode: positions 0 .. len-1 of the row's table)
    sinks_ptr,  # [num_heads] sink logits (HAS_SINKS)
    out_ptr,  # [B, num_heads, head_size]            (written when NUM_SPLITS == 1)
    acc_ptr,  # [B, num_heads, NUM_SPLITS, head_size] fp32 partial numerators
    ml_ptr,  # [B, num_heads, NUM_SPLITS, 2] fp32 (running max in log2 units, running sum)
    # -- sizes / scalars -----------------------------------------------------------
    scale_log2e,  # softmax scale * log2(e)
    softcap_log2e,  # logit soft cap * log2(e) (HAS_SOFTCAP)
    window,  # dense mode: attend the last `window` positions only; <= 0: all
    num_slots,  # L (sparse mode)
    rows_per_sel,  # G: query heads that share one index row (num_heads // S)
    q_per_kv,  # num_heads // num_kv_heads
    # -- strides -------------------------------------------------------------------
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_bts, stride_btn,  # stride_bts = 0: one table shared by the request's heads
    stride_slb, stride_sls,
    stride_ib, stride_is, stride_il,
    stride_ob, stride_oh, stride_od,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh, stride_ms,
    # -- meta ----------------------------------------------------------------------
    BLOCK_SIZE: tl.constexpr,  # KV block size (tokens)
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_pow2(HEAD_SIZE)
    BLOCK_G: tl.constexpr,  # padded rows per program (>= 16 when USE_DOT, else 1)
    TILE_N: tl.constexpr,  # slots per loop step
    NUM_SPLITS: tl.constexpr,
    USE_INDICES: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 right after loads (interpreter: bf16 math is broken there)
    IEEE: tl.constexpr,  # fp32 dot without tf32
    HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    sel = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    g = tl.arange(0, BLOCK_G)
    g_mask = g < rows_per_sel
    heads = sel * rows_per_sel + g  # [BLOCK_G] query heads of this program
    kvh = (sel * rows_per_sel) // q_per_kv
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_SIZE

    # q: [BLOCK_G, BLOCK_D]
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST or not USE_DOT:
        q = q.to(tl.float32)

    # Contiguous range of slots this split covers: of [first, length), first > 0 only with a window.
    if USE_INDICES:
        length = num_slots
        first = 0
    else:
        length = tl.load(seq_lens_ptr + b * stride_slb + sel * stride_sls).to(tl.int32)
        first = tl.maximum(length - tl.where(window > 0, window, length), 0)
    split_len = tl.cdiv(length - first, NUM_SPLITS)
    start = first + split * split_len
    end = tl.minimum(length, start + split_len)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if HAS_SINKS:  # one term per head in the whole softmax: the first split's
        m_i, l_i = start_with_sinks(m_i, l_i, sinks_ptr, heads, g_mask, split == 0)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n_off = tl.arange(0, TILE_N)
    for t in range(start, end, TILE_N):
        slot = t + n_off
        in_range = slot < end
        if USE_INDICES:
            pos = tl.load(idx_ptr + b * stride_ib + sel * stride_is + slot * stride_il, mask=in_range, other=-1)
            pos = pos.to(tl.int64)
            valid = in_range & (pos >= 0)
        else:
            pos = slot.to(tl.int64)
            valid = in_range
        # k, v: [TILE_N, BLOCK_D]
        blk, off = paged_slots(block_table_ptr + sel * stride_bts, b, stride_btb, stride_btn, pos, valid,
                                BLOCK_SIZE)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = load_rows(k_ptr, blk, off, kvh, d, kv_mask, stride_kb, stride_kt, stride_kh, stride_kd)
        v = load_rows(v_ptr, blk, off, kvh, d, kv_mask, stride_vb, stride_vt, stride_vh, stride_vd)
        if UPCAST or not USE_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # s: [BLOCK_G, TILE_N] logits in log2 units
        if USE_DOT:
            s = dot(q, tl.trans(k), IEEE)
        else:
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = s * scale_log2e
        if HAS_SOFTCAP:
            s = soft_cap(s, softcap_log2e)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, v, IEEE, USE_DOT)

    row_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        o = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=row_mask,
        )
    else:
        tl.store(
            acc_ptr + b * stride_ab + heads[:, None] * stride_ah + split * stride_as + d[None, :],
            acc,
            mask=row_mask,
        )
        ml = ml_ptr + b * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(ml, m_i, mask=g_mask)
        tl.store(ml + 1, l_i, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    # -- pointers ------------------------------------------------------------------
    acc_ptr,  # [B, num_heads, NUM_SPLITS, head_size] fp32
    ml_ptr,  # [B, num_heads, NUM_SPLITS, 2] fp32
    out_ptr,  # [B, num_heads, head_size]
    # -- sizes ---------------------------------------------------------------------
    num_heads,
    # -- strides -------------------------------------------------------------------
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh, stride_ms,
    stride_ob, stride_oh, stride_od,
    # -- meta ----------------------------------------------------------------------
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h < num_heads
    sp = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    hs_mask = h_mask[:, None] & (sp[None, :] < NUM_SPLITS)
    ml = ml_ptr + b * stride_mb + h[:, None] * stride_mh + sp[None, :] * stride_ms
    m = tl.load(ml, mask=hs_mask, other=float("-inf"))  # [BLOCK_H, BLOCK_SPLITS]
    l = tl.load(ml + 1, mask=hs_mask, other=0.0)
    m_max = tl.max(m, axis=1)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe[:, None])  # 0 for empty splits
    denom = tl.sum(w * l, axis=1)  # [BLOCK_H]
    acc = tl.load(
        acc_ptr + b * stride_ab + h[:, None, None] * stride_ah + sp[None, :, None] * stride_as + d[None, None, :],
        mask=hs_mask[:, :, None] & (d[None, None, :] < HEAD_SIZE),
        other=0.0,
    )  # [BLOCK_H, BLOCK_SPLITS, BLOCK_D]
    num = tl.sum(w[:, :, None] * acc, axis=1)  # [BLOCK_H, BLOCK_D]
    o = tl.where(denom[:, None] > 0, num / tl.where(denom > 0, denom, 1.0)[:, None], 0.0)
    tl.store(
        out_ptr + b * stride_ob + h[:, None] * stride_oh + d[None, :] * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=h_mask[:, None] & (d[None, :] < HEAD_SIZE),
    )


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
def _tile_n(fp32_dot: bool = False) -> int:
    # Interpreter cost grows with programs x ops: few, large tiles there. fp32 dots run on
    # FMA units (no tf32) and need more registers: smaller tiles.
    if INTERPRET:
        return 128
    return 32 if fp32_dot else 64


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    index = index if index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_num_splits(rows: int, length: int, device: torch.device, tile_n: int | None = None) -> int:
    """Splits per (request, head-row) so that ``rows * splits`` programs fill the device.

    Args:
        rows: programs without splitting (``B * S``).
        length: slot-axis length (index capacity, or the max context for dense decode).
    Host-only arithmetic on static sizes, so a captured graph keeps its split count.
    """
    tile_n = tile_n or _tile_n()
    if INTERPRET or device.type != "cuda":
        return 1
    want = triton.cdiv(2 * _sm_count(device.index), max(rows, 1))
    # at least two tiles per split, at most 64 splits
    return int(max(1, min(want, triton.cdiv(max(length, 1), 2 * tile_n), 64)))


def _launch(
    query, cache, block_table, scale, out, num_splits, *, indices=None, seq_lens=None, length: int,
    window: int = -1, softcap: float = 0.0, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    b, num_heads, d = query.shape
    check_sinks(sinks, num_heads)
    hkv = cache.num_kv_heads
    per_head = block_table.dim() == 3  # [B, S, max_blocks]: every selection head has its own table
    s = indices.shape[1] if indices is not None else block_table.shape[1] if per_head else hkv
    rows_per_sel = num_heads // s
    q_per_kv = num_heads // hkv
    upcast, ieee = math_mode(query, cache)
    tile_n = _tile_n(ieee)
    if num_splits is None:
        num_splits = decode_num_splits(b * s, length, query.device, tile_n)
    num_splits = max(1, int(num_splits))
    if out is None:
        out = torch.empty_like(query)
    if b == 0:
        return out
    use_dot = rows_per_sel > 1
    block_g = max(16, triton.next_power_of_2(rows_per_sel)) if use_dot else 1
    block_d = triton.next_power_of_2(d)
    if num_splits > 1:
        acc = torch.empty((b, num_heads, num_splits, d), dtype=torch.float32, device=query.device)
        ml = torch.empty((b, num_heads, num_splits, 2), dtype=torch.float32, device=query.device)
    else:  # unused
        acc = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=query.device)
        ml = torch.empty((1, 1, 1, 2), dtype=torch.float32, device=query.device)
    idx = indices if indices is not None else block_table  # dummy pointer in dense mode
    sl = seq_lens if seq_lens is not None else block_table
    bt_strides = block_table.stride() if per_head else (block_table.stride(0), 0, block_table.stride(1))
    sl_strides = (0, 0) if seq_lens is None else (*seq_lens.stride(), 0)[:2]
    kc, vc = cache.key_cache, cache.value_cache
    _split_decode_kernel[(b, s, num_splits)](
        query, kc, vc, block_table, idx, sl, sinks if sinks is not None else query, out, acc, ml,
        scale * LOG2E, float(softcap or 0.0) * LOG2E, int(window), length, rows_per_sel, q_per_kv,
        *query.stride(), *kc.stride(), *vc.stride(), *bt_strides, *sl_strides,
        *(idx.stride() if indices is not None else (0, 0, 0)),
        *out.stride(), *acc.stride()[:3], *ml.stride()[:3],
        BLOCK_SIZE=cache.block_size, HEAD_SIZE=d, BLOCK_D=block_d, BLOCK_G=block_g, TILE_N=tile_n,
        NUM_SPLITS=num_splits, USE_INDICES=indices is not None, USE_DOT=use_dot,
        UPCAST=upcast, IEEE=ieee, HAS_SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None,
        num_warps=4,
    )
    if num_splits > 1:
        block_h = triton.next_power_of_2(num_heads) if INTERPRET else 1
        _merge_splits_kernel[(b, triton.cdiv(num_heads, block_h))](
            acc, ml, out, num_heads,
            *acc.stride()[:3], *ml.stride()[:3], *out.stride(),
            HEAD_SIZE=d, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_H=block_h,
            num_warps=4,
        )
    return out


def sparse_attention_triton(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of one query per request over ``indices`` (see :func:`.reference.sparse_attention`).

    Args:
        query: ``[B, num_heads, head_size]``.
        block_table: ``[B, max_blocks]`` int32/int64.
        indices: ``[B, S, L]`` int32/int64 positions, ``-1`` = skip, any order;
            ``S = num_kv_heads`` or ``S = num_heads``.
        out: optional ``[B, num_heads, head_size]`` output (any float dtype, any strides).
        num_splits: split-K factor (``None``: fill the device).
        softcap: the layer's logit soft cap (``0``: none).
        sinks: optional ``[num_heads]`` per-head sink logits (any float dtype).
    Returns:
        ``out``: ``[B, num_heads, head_size]``. Graph-safe given static shapes and ``num_splits``.
    """
    b, num_heads, _ = check_query(query, cache)
    if indices.dim() != 3 or indices.shape[0] != b or indices.shape[1] not in (cache.num_kv_heads, num_heads):
        raise ValueError(
            f"indices must be [B={b}, S, L] with S in (num_kv_heads={cache.num_kv_heads}, "
            f"num_heads={num_heads}); got {tuple(indices.shape)}"
        )
    return _launch(query, cache, block_table, scale, out, num_splits, indices=indices, length=indices.shape[2],
                   softcap=softcap, sinks=sinks)


def dense_decode_triton(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense decode over positions ``0..seq_lens[b]-1`` (see :func:`.reference.dense_decode`).

    Args:
        query: ``[B, num_heads, head_size]`` (the query at position ``seq_lens[b] - 1``).
        seq_lens: ``[B]`` int context lengths (≥ 1).
        out: optional ``[>= B, num_heads, head_size]`` output; rows ``:B`` are written.
        max_seq_len: host upper bound of ``seq_lens`` used only to choose ``num_splits``
            (``None``: read from ``seq_lens``, a device sync).
        window: attend only the last ``window`` positions (the query's own included); ``-1``: all.
            Only those are read (blocks behind the window may be freed).
        softcap, sinks: as :func:`sparse_attention_triton`.
    """
    b, _, _ = check_query(query, cache)
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max()) if b else 1
        length = min(max_seq_len, window) if window > 0 else max_seq_len
        num_splits = decode_num_splits(b * cache.num_kv_heads, length, query.device,
                                       _tile_n(math_mode(query, cache)[1]))
    kw = dict(seq_lens=seq_lens, length=0, window=window, softcap=softcap, sinks=sinks)
    if out is not None:
        _launch(query, cache, block_table, scale, out[:b], num_splits, **kw)
        return out
    return _launch(query, cache, block_table, scale, None, num_splits, **kw)


def table_decode_triton(
    query: torch.Tensor,
    cache: PagedKVCache,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_len: int | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode where each (request, selection head) attends positions ``0 .. lens[b, s] - 1`` of its own
    block table ``tables[b, s]`` (see :func:`.reference.table_decode`): whole-page sparse decode over
    the compacted tables of :func:`.selection.compact_pages`. The dense kernel, one table per head.

    Args:
        query: ``[B, num_heads, head_size]``.
        tables: ``[B, S, W]`` int32/int64 block ids, ``S = num_kv_heads`` or ``num_heads``; entries
            past a row's length are never read.
        lens: ``[B, S]`` int tokens each row attends (all its blocks whole but the last).
        out: optional ``[B, num_heads, head_size]`` output.
        max_len: host bound ``>= max(lens)`` for the split count (``None``: ``W * block_size``).
        softcap, sinks: as :func:`sparse_attention_triton`.
    Returns:
        ``out``. Graph-safe given static shapes and ``num_splits``.
    """
    b, num_heads, _ = check_query(query, cache)
    if tables.dim() != 3 or tables.shape[0] != b or tables.shape[1] not in (cache.num_kv_heads, num_heads):
        raise ValueError(f"tables must be [B={b}, S, W] with S in (num_kv_heads={cache.num_kv_heads}, "
                         f"num_heads={num_heads}); got {tuple(tables.shape)}")
    if tuple(lens.shape) != tuple(tables.shape[:2]):
        raise ValueError(f"lens must be [B, S] = {tuple(tables.shape[:2])}; got {tuple(lens.shape)}")
    if num_splits is None:
        length = max_len if max_len is not None else tables.shape[2] * cache.block_size
        num_splits = decode_num_splits(b * tables.shape[1], length, query.device,
                                       _tile_n(math_mode(query, cache)[1]))
    return _launch(query, cache, tables, scale, out, num_splits, seq_lens=lens, length=0, softcap=softcap,
                   sinks=sinks)
