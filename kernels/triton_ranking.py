"""Triton page ranking for sparse decode: the kernels of the selectors' stages (Quest's names).

1. *page scores* — :func:`page_scores_triton`: Quest's bound (:func:`.ranking.quest_bound`) of
   ``scale · q·k`` for every page, ``+inf`` for the forced sink/window pages, ``-inf`` past the
   sequence; optionally the key range ``rescore_dims`` weighs by, from the same loads.
2. *token scores* — :func:`token_scores_triton`: exact ``scale · q·k`` for every position, or for every
   token of candidate pages, ``+inf`` for sinks/window and ``-inf`` for invalid slots.
3. *ranked pages* — :func:`ranked_pages_triton`: a top-k row of page scores cut to the request's page
   count, as page ids or as a compacted block table, in one launch.

``exact_pages`` (:func:`exact_page_scores`): stage 1 keeps ``ceil(candidate_factor ×)`` Quest's page
count as candidates, stage 2 scores their tokens exactly (with ``rescore_dims``, by a query zeroed
outside the group's dims of largest ``Σ|q|`` × key range, :func:`rescore_query_triton`), and each page
scores its best token — the torch reference is :func:`.ranking.exact_pages`.

GQA: one scoring program reads a KV head's keys (or page summaries) once for its whole query group
(padded to a power of two, ≥ 16 rows for ``tl.dot``); with one set per KV head the score is the max
over the group, with one per query head (``SelectParams.per_query_head``) every query head gets its
own row. Everything is device-side and sync-free given the host sizes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import PagedKVCache
from .selection import rescore_dims_mask
from .selectors import SelectInputs, SelectParams
from .triton_common import INTERPRET, check_query, dot, load_rows, math_mode, paged_slots

__all__ = [
    "page_scores_triton",
    "token_scores_triton",
    "ranked_pages_triton",
    "rescore_query",
    "rescore_query_triton",
    "exact_page_scores",
]



@triton.jit
def _store_key_range(klo_ptr, khi_ptr, kmin, kmax, scored, d, b, kvh, BLOCK_D: tl.constexpr):
    """This tile's per-dim ``min kmin`` / ``max kmax`` over its ``scored`` pages (valid, neither
    sink nor window): ``rescore_dims``' key range (:func:`.selection.scored_key_range`) from the
    bounds the page scores already read; the host reduces the tiles."""
    scored = scored[:, None]
    lo = tl.min(tl.where(scored, kmin.to(tl.float32), float("inf")), axis=0)  # [BLOCK_D]
    hi = tl.max(tl.where(scored, kmax.to(tl.float32), float("-inf")), axis=0)
    row = ((b * tl.num_programs(1) + kvh) * tl.num_programs(2) + tl.program_id(2)) * BLOCK_D
    tl.store(klo_ptr + row + d, lo)
    tl.store(khi_ptr + row + d, hi)


@triton.jit
def _page_score_kernel(
    # -- pointers ------------------------------------------------------------------
    q_ptr,  # [B, num_heads, head_size]
    kmin_ptr,  # [num_blocks, pages_per_block, num_kv_heads, head_size]
    kmax_ptr,  # [num_blocks, pages_per_block, num_kv_heads, head_size]
    block_table_ptr,  # [B, max_blocks] int
    seq_lens_ptr,  # [B] int
    ub_ptr,  # [B, S, num_page_slots] fp32 out
    klo_ptr,  # [B, num_kv_heads, num_tiles, BLOCK_D] fp32 out (STORE_RANGE): min kmin over scored pages
    khi_ptr,  # same shape: max kmax over scored pages
    # -- sizes / scalars -----------------------------------------------------------
    scale,
    sink_pages,  # ceil(sink_tokens / page_size)
    local_window,
    num_page_slots,  # P: page axis of ub
    q_per_kv,
    # -- strides -------------------------------------------------------------------
    stride_qb, stride_qh, stride_qd,
    stride_nb, stride_np, stride_nh, stride_nd,
    stride_xb, stride_xp, stride_xh, stride_xd,
    stride_btb, stride_btn,
    stride_ub, stride_us, stride_up,
    # -- meta ----------------------------------------------------------------------
    PAGE_SIZE: tl.constexpr,
    PAGES_PER_BLOCK: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= max(16, q_per_kv), power of two
    TILE_P: tl.constexpr,
    PER_ROW_OUT: tl.constexpr,  # granularity == "query_head"
    STORE_RANGE: tl.constexpr,  # also write this tile's per-dim key min/max over scored pages
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    p = tl.program_id(2) * TILE_P + tl.arange(0, TILE_P)
    n = tl.load(seq_lens_ptr + b).to(tl.int32)
    num_pages = tl.cdiv(n, PAGE_SIZE)
    in_range = p < num_page_slots
    valid = in_range & (p < num_pages)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_SIZE
    # kmin, kmax: [TILE_P, BLOCK_D]; the summaries are paged like the keys, one row per page
    blk, off = paged_slots(block_table_ptr, b, stride_btb, stride_btn, p, valid, PAGES_PER_BLOCK)
    kv_mask = valid[:, None] & d_mask[None, :]
    kmin = load_rows(kmin_ptr, blk, off, kvh, d, kv_mask, stride_nb, stride_np, stride_nh, stride_nd)
    kmax = load_rows(kmax_ptr, blk, off, kvh, d, kv_mask, stride_xb, stride_xp, stride_xh, stride_xd)
    first_window_page = tl.maximum(n - local_window, 0) // PAGE_SIZE  # selection.forced_page_range's rule
    forced = valid & ((p < sink_pages) | ((p >= first_window_page) & (local_window > 0)))
    if STORE_RANGE and not IEEE:  # before the tensor-core dots: fewer registers live (sm_90: 127 vs 216)
        _store_key_range(klo_ptr, khi_ptr, kmin, kmax, valid & (forced == 0), d, b, kvh, BLOCK_D)
    g = tl.arange(0, BLOCK_G)
    g_mask = g < q_per_kv
    heads = kvh * q_per_kv + g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    if UPCAST:
        kmin = kmin.to(tl.float32)
        kmax = kmax.to(tl.float32)
        q = q.to(tl.float32)
    # Quest's bound (ranking.quest_bound): sum_d max(q_d·min_d, q_d·max_d) = q⁺·max + q⁻·min
    q_pos = tl.maximum(q, 0.0).to(q.dtype)
    q_neg = tl.minimum(q, 0.0).to(q.dtype)
    ub = (dot(q_pos, tl.trans(kmax), IEEE) + dot(q_neg, tl.trans(kmin), IEEE)) * scale  # [BLOCK_G, TILE_P]
    if STORE_RANGE and IEEE:  # after the FMA dots: the fp32 tiles then stay in shared memory (no spills)
        _store_key_range(klo_ptr, khi_ptr, kmin, kmax, valid & (forced == 0), d, b, kvh, BLOCK_D)

    if PER_ROW_OUT:
        ub = tl.where(valid[None, :], ub, float("-inf"))
        ub = tl.where(forced[None, :], float("inf"), ub)
        tl.store(
            ub_ptr + b * stride_ub + heads[:, None] * stride_us + p[None, :] * stride_up,
            ub, mask=g_mask[:, None] & in_range[None, :],
        )
    else:
        ub_max = tl.max(tl.where(g_mask[:, None], ub, float("-inf")), axis=0)  # [TILE_P]
        ub_max = tl.where(valid, ub_max, float("-inf"))
        ub_max = tl.where(forced, float("inf"), ub_max)
        tl.store(ub_ptr + b * stride_ub + kvh * stride_us + p * stride_up, ub_max, mask=in_range)


@triton.jit
def _token_score_kernel(
    # -- pointers ------------------------------------------------------------------
    q_ptr,  # [B, num_heads, head_size]
    k_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_table_ptr,  # [B, max_blocks] int
    seq_lens_ptr,  # [B] int
    cand_ptr,  # [B, S, C] int candidate pages, -1 = none (USE_CAND)
    score_ptr,  # [B, S, num_slots] fp32 out
    pos_ptr,  # [B, S, num_slots] int out: position of each slot (USE_CAND)
    # -- sizes / scalars -----------------------------------------------------------
    scale,
    sink_tokens,
    local_window,
    num_slots,
    rows_per_prog,  # query heads scored by one program
    q_per_kv,
    # -- strides -------------------------------------------------------------------
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_btb, stride_btn,
    stride_cb, stride_cs, stride_cc,
    stride_sb, stride_ss, stride_sn,
    stride_pb, stride_ps, stride_pn,
    # -- meta ----------------------------------------------------------------------
    BLOCK_SIZE: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= max(16, rows_per_prog) when USE_DOT, else 1
    TILE_N: tl.constexpr,
    USE_CAND: tl.constexpr,  # page selection: slots are tokens of candidate pages
    PER_ROW_OUT: tl.constexpr,  # one score row per query head (token mode, query_head)
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ph = tl.program_id(1).to(tl.int64)  # KV head (token mode) or selection head (page mode)
    slot = tl.program_id(2) * TILE_N + tl.arange(0, TILE_N)
    n = tl.load(seq_lens_ptr + b).to(tl.int32)
    in_range = slot < num_slots
    g = tl.arange(0, BLOCK_G)
    g_mask = g < rows_per_prog
    heads = ph * rows_per_prog + g
    kvh = (ph * rows_per_prog) // q_per_kv

    if USE_CAND:
        page = tl.load(cand_ptr + b * stride_cb + ph * stride_cs + (slot // PAGE_SIZE) * stride_cc,
                       mask=in_range, other=-1).to(tl.int64)
        pos = tl.where(page >= 0, page * PAGE_SIZE + slot % PAGE_SIZE, -1)
        tl.store(pos_ptr + b * stride_pb + ph * stride_ps + slot * stride_pn,
                 pos.to(pos_ptr.dtype.element_ty), mask=in_range)
    else:
        pos = slot.to(tl.int64)
    valid = in_range & (pos >= 0) & (pos < n)
    forced = valid & ((pos < sink_tokens) | (pos >= n - local_window))

    if PER_ROW_OUT:
        out_ptrs = score_ptr + b * stride_sb + heads[:, None] * stride_ss + slot[None, :] * stride_sn
        out_mask = g_mask[:, None] & in_range[None, :]
    else:
        out_ptrs = score_ptr + b * stride_sb + ph * stride_ss + slot * stride_sn
        out_mask = in_range

    if tl.max(valid.to(tl.int32), axis=0) == 0:
        # nothing to score in this tile (past the sequence or no candidate page)
        if PER_ROW_OUT:
            tl.store(out_ptrs, tl.full([BLOCK_G, TILE_N], float("-inf"), tl.float32), mask=out_mask)
        else:
            tl.store(out_ptrs, tl.full([TILE_N], float("-inf"), tl.float32), mask=out_mask)
        return

    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_SIZE
    blk, off = paged_slots(block_table_ptr, b, stride_btb, stride_btn, pos, valid, BLOCK_SIZE)
    kv_mask = valid[:, None] & d_mask[None, :]
    # k: [TILE_N, BLOCK_D]
    k = load_rows(k_ptr, blk, off, kvh, d, kv_mask, stride_kb, stride_kt, stride_kh, stride_kd)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    if UPCAST or not USE_DOT:
        k = k.to(tl.float32)
        q = q.to(tl.float32)
    if USE_DOT:
        s = dot(q, tl.trans(k), IEEE) * scale  # [BLOCK_G, TILE_N]
    else:
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
    if PER_ROW_OUT:
        s = tl.where(valid[None, :], s, float("-inf"))
        s = tl.where(forced[None, :], float("inf"), s)
        tl.store(out_ptrs, s, mask=out_mask)
    else:
        s = tl.max(tl.where(g_mask[:, None], s, float("-inf")), axis=0)  # [TILE_N]
        s = tl.where(valid, s, float("-inf"))
        s = tl.where(forced, float("inf"), s)
        tl.store(out_ptrs, s, mask=out_mask)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
@triton.jit
def _ranked_pages_kernel(
    val_ptr,  # [B, S, W] fp32 top-k values, best first
    idx_ptr,  # [B, S, W] top-k indices: page ids, or positions in ``cand`` rows (USE_CAND)
    cand_ptr,  # [B, S, C] page ids (-1 padded) when USE_CAND
    seq_ptr,  # [B] context lengths
    att_ptr,  # [B] tokens kept per head (before rounding to pages)
    factor_ptr,  # [1] float64 candidate factor when USE_FACTOR
    bt_ptr,  # [B, max_blocks] block table (COMPACT)
    out_ptr,  # COMPACT: [B, S, W] int32 block ids; else [B, S, W] int64 page ids (-1 padded)
    len_ptr,  # COMPACT: [B, S] int32 tokens per row
    sink_pages, local_window, W,
    stride_vb, stride_vs, stride_ib, stride_is, stride_cb, stride_cs, stride_btb, stride_ob, stride_os,
    stride_lb, stride_ls,
    PAGE_SIZE: tl.constexpr, BLOCK_W: tl.constexpr, USE_CAND: tl.constexpr, USE_FACTOR: tl.constexpr,
    COMPACT: tl.constexpr,
):
    """One program per (request, selection head): keep the first ``n`` of a top-k row and either write
    them as page ids in rank order (``-1`` padded) or, ``COMPACT``, as the row's compacted block
    table (ascending pages) and its token count — :func:`.selection.candidate_pages` /
    :func:`.selection.topk_rows` + :func:`.selection.compact_pages` in one launch.

    ``n`` is Quest's page count (:func:`.selection.page_counts` with ``quest=True``), or with
    ``USE_FACTOR`` ``min(ceil(n · factor), pages)`` (``exact_pages``' candidates); computed here from
    ``seq_lens`` and ``attended``, so no per-step tensor is needed. An entry is kept when its rank
    is below ``n``, its value above ``-inf`` and its page valid."""
    b = tl.program_id(0)
    s = tl.program_id(1)
    seq = tl.load(seq_ptr + b).to(tl.int64)
    count = tl.minimum(tl.load(att_ptr + b).to(tl.int64), seq)
    num_pages = (seq + PAGE_SIZE - 1) // PAGE_SIZE
    lo = tl.minimum(num_pages * 0 + sink_pages, num_pages)
    if local_window > 0:
        hi = tl.maximum(seq - local_window, 0) // PAGE_SIZE
    else:
        hi = num_pages
    n_forced = lo + (num_pages - hi) - tl.maximum(lo - hi, 0)  # selection.page_counts' rule
    n = tl.minimum(tl.maximum((count + PAGE_SIZE - 1) // PAGE_SIZE, n_forced), num_pages)
    if USE_FACTOR:
        f = tl.load(factor_ptr)
        n = tl.minimum(tl.ceil(n.to(tl.float64) * f).to(tl.int64), num_pages)
    r = tl.arange(0, BLOCK_W)
    in_row = r < W
    val = tl.load(val_ptr + b * stride_vb + s * stride_vs + r, mask=in_row, other=float("-inf"))
    idx = tl.load(idx_ptr + b * stride_ib + s * stride_is + r, mask=in_row, other=0).to(tl.int64)
    if USE_CAND:
        page = tl.load(cand_ptr + b * stride_cb + s * stride_cs + idx, mask=in_row, other=-1).to(tl.int64)
    else:
        page = idx
    keep = in_row & (r < n) & (val > float("-inf")) & (page >= 0)
    if COMPACT:
        big = 2147483647
        key = tl.sort(tl.where(keep, page, big))  # kept pages ascending, the rest last
        valid = key != big
        safe = tl.where(valid, key, 0)  # past the row: the request's first block, never read
        blk = tl.load(bt_ptr + b * stride_btb + safe, mask=in_row, other=0)
        tl.store(out_ptr + b * stride_ob + s * stride_os + r, blk.to(tl.int32), mask=in_row)
        last = num_pages - 1  # the partial page, if chosen, counts only its tokens
        has_last = tl.sum((valid & (key == last)).to(tl.int32), axis=0) > 0
        short = tl.where(has_last, (last + 1) * PAGE_SIZE - seq, 0)
        n_valid = tl.sum(valid.to(tl.int64), axis=0)
        tl.store(len_ptr + b * stride_lb + s * stride_ls, (n_valid * PAGE_SIZE - short).to(tl.int32))
    else:
        tl.store(out_ptr + b * stride_ob + s * stride_os + r, tl.where(keep, page, -1), mask=in_row)


_FACTORS: dict = {}


def ranked_pages_triton(val: torch.Tensor, idx: torch.Tensor, seq_lens: torch.Tensor, attended: torch.Tensor,
                        page_size: int, params: SelectParams, *, cand: torch.Tensor | None = None,
                        candidate_factor: float | None = None, block_table: torch.Tensor | None = None):
    """Cut a top-k ``(val, idx)`` ``[B, S, W]`` of page scores to each request's page count, in one launch.

    Without ``block_table``: ``[B, S, W]`` int64 page ids in rank order, ``-1`` padded — Quest's count
    (:func:`.selection.candidate_pages` with ``quest=True``), or ``min(ceil(count · candidate_factor),
    pages)``. With ``block_table``: the kept pages as :func:`.selection.compact_pages` tables, ``(tables
    [B, S, W] int32, lens [B, S] int32)``. ``cand``: ``idx`` indexes these ``[B, S, C]`` page rows.
    Device-side, no sync.
    """
    b, s, w = val.shape
    dev = val.device
    compact = block_table is not None
    if candidate_factor is not None:
        key = (float(candidate_factor), dev)
        if key not in _FACTORS:  # one tiny host->device copy per factor and device, then cached
            _FACTORS[key] = torch.tensor([float(candidate_factor)], dtype=torch.float64, device=dev)
        factor = _FACTORS[key]
    else:
        factor = val
    if compact:
        out = torch.empty((b, s, w), dtype=torch.int32, device=dev)
        lens = torch.empty((b, s), dtype=torch.int32, device=dev)
        bt, bt_stride, l_strides = block_table, block_table.stride(0), lens.stride()
    else:
        out = torch.empty((b, s, w), dtype=torch.int64, device=dev)
        lens, bt, bt_stride, l_strides = out, out, 0, (0, 0)
    c = cand if cand is not None else idx
    if compact and bt.stride(1) != 1:
        bt = bt.contiguous()
        bt_stride = bt.stride(0)
    if b * s and w:
        _ranked_pages_kernel[(b, s)](
            val, idx, c, seq_lens, attended, factor, bt, out, lens,
            -(-params.sink_tokens // page_size), params.local_window, w,
            val.stride(0), val.stride(1), idx.stride(0), idx.stride(1), c.stride(0), c.stride(1), bt_stride,
            out.stride(0), out.stride(1), *l_strides,
            PAGE_SIZE=page_size, BLOCK_W=triton.next_power_of_2(w), USE_CAND=cand is not None,
            USE_FACTOR=candidate_factor is not None, COMPACT=compact, num_warps=1 if w <= 256 else 4,
        )
    return (out, lens) if compact else out


def _tile(fp32_dot: bool) -> int:
    # interpreter: few, large tiles; fp32 (FMA dot): smaller tiles keep registers in check
    if INTERPRET:
        return 256
    return 32 if fp32_dot else 64


def page_scores_triton(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    params: SelectParams,
    num_pages: int,
    with_key_range: bool = False,
    range_tiles: bool = False,
):
    """Stage 1 scores: ``[B, S, num_pages]`` fp32 page upper bounds (``+inf`` forced, ``-inf`` invalid).

    ``num_pages``: static page-axis length, ``>= ceil(max(seq_lens) / page_size)``.
    ``with_key_range``: also return :func:`.selection.scored_key_range` of the bounds read
    (``[B, S, head_size]``), computed in the same pass: ``(scores, key_range)``; with
    ``range_tiles`` unreduced, per page tile, ``(scores, (klo, khi))`` (for :func:`rescore_query_triton`).
    """
    b, num_heads, d = query.shape
    hkv, ps = cache.num_kv_heads, cache.page_size
    s_heads = params.num_rows(num_heads, hkv)
    q_per_kv = num_heads // hkv
    ub = torch.empty((b, s_heads, num_pages), dtype=torch.float32, device=query.device)
    upcast, ieee = math_mode(query, cache)
    tile_p = _tile(ieee)
    n_tiles, block_d = triton.cdiv(num_pages, tile_p), triton.next_power_of_2(d)
    if with_key_range:
        klo = torch.empty((b, hkv, n_tiles, block_d), dtype=torch.float32, device=query.device)
        khi = torch.empty_like(klo)
    else:
        klo = khi = ub  # not written
    _page_score_kernel[(b, hkv, n_tiles)](
        query, cache.key_min, cache.key_max, block_table, seq_lens, ub, klo, khi,
        scale, -(-params.sink_tokens // ps), params.local_window, num_pages, q_per_kv,
        *query.stride(), *cache.key_min.stride(), *cache.key_max.stride(), *block_table.stride(), *ub.stride(),
        PAGE_SIZE=ps, PAGES_PER_BLOCK=cache.pages_per_block, HEAD_SIZE=d, BLOCK_D=block_d,
        BLOCK_G=max(16, triton.next_power_of_2(q_per_kv)), TILE_P=tile_p,
        PER_ROW_OUT=params.per_query_head, STORE_RANGE=with_key_range, UPCAST=upcast, IEEE=ieee,
        num_warps=8 if ieee else 4,  # two FMA dots: spread the registers
    )
    if not with_key_range:
        return ub
    if range_tiles:
        return ub, (klo, khi)
    lo, hi = klo.amin(2)[..., :d], khi.amax(2)[..., :d]  # [B, Hkv, D]
    key_range = torch.where(hi[..., :1] > float("-inf"), hi - lo, 1.0)  # no scored page: |q| alone
    if s_heads != hkv:  # one set per query head: each takes its KV head's range
        key_range = key_range.repeat_interleave(q_per_kv, dim=1)
    return ub, key_range


def token_scores_triton(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    params: SelectParams,
    num_slots: int | None = None,
    cand: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stage 2 scores: exact ``scale · q·k`` (``+inf`` sinks/window, ``-inf`` invalid).

    Token mode (``cand`` None): ``num_slots`` positions ``>= max(seq_lens)``; returns
    ``(scores [B, S, num_slots], None)``. Page mode: the tokens of ``cand`` ``[B, S, C]``
    pages; returns ``(scores, positions)``, both ``[B, S, C * page_size]``.
    """
    b, num_heads, d = query.shape
    hkv, ps, dev = cache.num_kv_heads, cache.page_size, query.device
    s_heads = params.num_rows(num_heads, hkv)
    q_per_kv = num_heads // hkv
    upcast, ieee = math_mode(query, cache)
    tile = _tile(ieee)
    kc = cache.key_cache
    common = dict(BLOCK_SIZE=cache.block_size, PAGE_SIZE=ps, HEAD_SIZE=d, BLOCK_D=triton.next_power_of_2(d),
                  TILE_N=tile, UPCAST=upcast, IEEE=ieee, num_warps=4)
    if cand is None:
        scores = torch.empty((b, s_heads, num_slots), dtype=torch.float32, device=dev)
        # one program per KV head scores its whole query group
        _token_score_kernel[(b, hkv, triton.cdiv(num_slots, tile))](
            query, kc, block_table, seq_lens, block_table, scores, scores,
            scale, params.sink_tokens, params.local_window, num_slots, q_per_kv, q_per_kv,
            *query.stride(), *kc.stride(), *block_table.stride(), 0, 0, 0, *scores.stride(), 0, 0, 0,
            BLOCK_G=max(16, triton.next_power_of_2(q_per_kv)), USE_CAND=False,
            PER_ROW_OUT=params.per_query_head, USE_DOT=True, **common,
        )
        return scores, None
    n_slots = cand.shape[2] * ps
    scores = torch.empty((b, s_heads, n_slots), dtype=torch.float32, device=dev)
    pos = torch.empty((b, s_heads, n_slots), dtype=torch.int64, device=dev)
    rows = num_heads // s_heads  # query heads sharing one candidate list
    use_dot = rows > 1
    _token_score_kernel[(b, s_heads, triton.cdiv(n_slots, tile))](
        query, kc, block_table, seq_lens, cand, scores, pos,
        scale, params.sink_tokens, params.local_window, n_slots, rows, q_per_kv,
        *query.stride(), *kc.stride(), *block_table.stride(), *cand.stride(), *scores.stride(), *pos.stride(),
        BLOCK_G=max(16, triton.next_power_of_2(rows)) if use_dot else 1,
        USE_CAND=True, PER_ROW_OUT=False, USE_DOT=use_dot, **common,
    )
    return scores, pos


def rescore_query(query: torch.Tensor, key_range: torch.Tensor, s_heads: int, rescore_dims: int) -> torch.Tensor:
    """``query`` zeroed outside each selection head's ``rescore_dims`` dims of largest ``Σ|q|`` ×
    ``key_range`` (:func:`.selection.rescore_dims_mask`: the reference's rule and tie order);
    unchanged for 0 or ``>= head_size``. In torch ops: the oracle of :func:`rescore_query_triton`,
    which the decode step runs."""
    b, num_heads, d = query.shape
    if not 0 < rescore_dims < d:
        return query
    q = query.view(b, s_heads, num_heads // s_heads, d)
    keep = rescore_dims_mask(q.float(), key_range, rescore_dims)
    return (q * keep[:, :, None, :].to(q.dtype)).view(b, num_heads, d)


@triton.jit
def _rescore_query_kernel(
    q_ptr,  # [B, num_heads, head_size]
    klo_ptr,  # [B, num_kv_heads, num_tiles, BLOCK_D] fp32: per page tile, min kmin over scored pages
    khi_ptr,  # same shape: max kmax
    out_ptr,  # [B, num_heads, head_size], the query's dtype
    n_tiles, rescore_dims, num_kv_heads, rows_per_kv,  # rows_per_kv: selection heads per KV head (1, or the group)
    stride_qb, stride_qh, stride_ob, stride_oh,
    HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """One program per (request, selection head): the key range from the page tiles' bounds
    (:func:`.selection.scored_key_range`), each dim's weight ``Σ_group |q_e| × range_e``, and the
    group's query zeroed outside the ``rescore_dims`` heaviest dims, ties to the lower dim
    (:func:`.selection.rescore_dims_mask`) — :func:`rescore_query`'s dozen torch ops in one launch."""
    b = tl.program_id(0)
    sh = tl.program_id(1)
    kvh = sh // rows_per_kv
    d = tl.arange(0, BLOCK_D)
    lo = tl.full((BLOCK_D,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    base = (b * num_kv_heads + kvh) * n_tiles * BLOCK_D
    for t in range(0, n_tiles):
        lo = tl.minimum(lo, tl.load(klo_ptr + base + t * BLOCK_D + d))
        hi = tl.maximum(hi, tl.load(khi_ptr + base + t * BLOCK_D + d))
    scored = tl.max(tl.where(d == 0, hi, float("-inf")), axis=0) > float("-inf")  # any scored page
    key_range = tl.where(scored, hi - lo, 1.0)
    g = tl.arange(0, BLOCK_G)
    heads = sh * GROUP + g
    in_d = d < HEAD_SIZE
    m = (g < GROUP)[:, None] & in_d[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=m, other=0.0)
    w = tl.sum(tl.abs(q.to(tl.float32)), axis=0) * key_range  # >= 0: its bits order like its values
    key = (w.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_D - 1 - d).to(tl.int64)
    key = tl.where(in_d, key, -1)
    kth = tl.sum(tl.where(d == rescore_dims - 1, tl.sort(key, descending=True), 0), axis=0)
    keep = (key >= kth) & in_d
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             tl.where(keep[None, :], q, tl.zeros_like(q)), mask=m)


def rescore_query_triton(query: torch.Tensor, klo: torch.Tensor, khi: torch.Tensor, s_heads: int,
                         rescore_dims: int) -> torch.Tensor:
    """:func:`rescore_query` from the page-score kernel's unreduced key-range tiles
    (``page_scores_triton(..., with_key_range=True, range_tiles=True)``), in one launch; the same
    query (zeroed dims are +0). Unchanged for ``rescore_dims`` 0 or ``>= head_size``."""
    b, num_heads, d = query.shape
    if not 0 < rescore_dims < d:
        return query
    hkv, n_tiles, block_d = klo.shape[1], klo.shape[2], klo.shape[3]
    group = num_heads // s_heads
    query = query if query.stride(-1) == 1 else query.contiguous()
    out = torch.empty_like(query)
    _rescore_query_kernel[(b, s_heads)](
        query, klo, khi, out, n_tiles, rescore_dims, hkv, s_heads // hkv,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        HEAD_SIZE=d, BLOCK_D=block_d, GROUP=group, BLOCK_G=triton.next_power_of_2(group), num_warps=4,
    )
    return out


def exact_page_scores(x: SelectInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``exact_pages`` up to the final top-k (:func:`.ranking.exact_pages`): ``(page_score, cand)``, both
    ``[B, S, C]`` — each candidate page's exact max ``q·k`` (``+inf`` forced, ``-inf`` no page) and the
    candidates' page ids. Device-side, no sync."""
    query, cache, p = x.query, x.cache, x.params
    ps = cache.page_size
    s_heads = p.num_rows(query.shape[1], cache.num_kv_heads)
    n_pages = x.num_pages
    rescore = 0 < p.rescore_dims < query.shape[-1]
    stage1 = page_scores_triton(query, cache, x.block_table, x.seq_lens, x.scale, p, num_pages=n_pages,
                                with_key_range=rescore, range_tiles=True)
    ub, tiles = stage1 if rescore else (stage1, None)
    # candidates: min(ceil(Quest's page count × factor), pages) bound-ranked pages per row
    c_cap = max(1, min(n_pages, math.ceil(x.max_pages * p.candidate_factor)))
    val, top = ub.topk(min(c_cap, ub.shape[-1]), dim=-1)
    cand = ranked_pages_triton(val, top, x.seq_lens, x.count, ps, p, candidate_factor=p.candidate_factor)  # [B, S, C]
    # unscaled q·k (scale 1): the reference ranks pages by max q·k, and a scale could merge near-ties
    rq = rescore_query_triton(query, *tiles, s_heads, p.rescore_dims) if rescore else query
    scores, _ = token_scores_triton(rq, cache, x.block_table, x.seq_lens, 1.0, p, cand=cand)
    return scores.view(*cand.shape, ps).amax(-1), cand  # forced tokens are +inf: so are their pages
