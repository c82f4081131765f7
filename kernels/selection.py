"""Selection bookkeeping shared by the reference and the Triton path: plain torch, any device.

Page counts and index-buffer widths (host-side sizes for static step shapes), top-k rows cut
to per-request counts, page → position expansion, ascending ``-1``-padded index rows. No
kernel here: :mod:`.reference` and :mod:`.triton_select` both build on these, so the two
paths agree on every count by construction.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "GRANULARITIES",
    "forced_page_range",
    "forced_page_mask",
    "page_counts",
    "max_forced_pages",
    "index_capacity",
    "quest_attended",
    "candidate_capacity",
    "candidate_pages",
    "row_kv_heads",
    "page_positions",
    "compact_pages",
    "scored_key_range",
    "rescore_dims_mask",
    "topk_rows",
    "sorted_positions",
    "recent_positions",
    "write_rows",
    "topk_into",
]

#: Allowed ``granularity`` values: one selected set per KV head or per query head.
GRANULARITIES = ("kv_head", "query_head")


def forced_page_range(seq_lens: torch.Tensor, page_size: int, sink_tokens: int,
                      local_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages every selector attends, ``(lo, hi)``, both ``[B]`` int64: pages ``[0, lo)`` hold
    the sinks, pages ``[hi, num_pages)`` the local window (``hi = num_pages`` without a window).

    The one definition of "forced" shared by the page counts, the reference, the Triton path's
    host side, the page selectors and the C++ plan (``vllm_sparse.cpu_attention.plan_decode``).
    """
    seq = seq_lens.long()
    num_pages = (seq + page_size - 1) // page_size
    lo = torch.full_like(num_pages, -(-sink_tokens // page_size)).minimum(num_pages)
    hi = (seq - local_window).clamp_min(0) // page_size if local_window > 0 else num_pages
    return lo, hi


def forced_page_mask(pages: torch.Tensor, seq_lens: torch.Tensor, page_size: int, sink_tokens: int,
                     local_window: int) -> torch.Tensor:
    """Which of ``pages`` (``[B, ...]`` page ids, ``-1`` = none) hold a sink or window token: bool,
    same shape; pages past the request's end are not forced (:func:`forced_page_range`)."""
    lo, hi = forced_page_range(seq_lens, page_size, sink_tokens, local_window)
    num_pages = (seq_lens.long() + page_size - 1) // page_size
    view = (-1,) + (1,) * (pages.dim() - 1)
    lo, hi, num_pages = lo.view(view), hi.view(view), num_pages.view(view)
    return (pages >= 0) & (pages < num_pages) & ((pages < lo) | (pages >= hi))


def page_counts(seq_lens: torch.Tensor, count: torch.Tensor, page_size: int, sink_tokens: int, local_window: int,
                candidate_factor: float, quest: bool = False) -> torch.Tensor:
    """Pages ranked in per request, ``[B]`` int64 (device-side, no sync).

    The forced pages (those holding sinks or window tokens) always count; on top of them
    ``"page"`` keeps ``ceil(candidate_factor · count / page_size)`` candidates, while
    ``"quest"`` keeps ``ceil(count / page_size)`` pages in all (or just the forced ones when
    they are more). Never more than the request's pages.
    """
    ps = page_size
    num_pages = (seq_lens.long() + ps - 1) // ps
    lo, hi = forced_page_range(seq_lens, ps, sink_tokens, local_window)
    n_forced = lo + (num_pages - hi) - (lo - hi).clamp_min(0)  # the two ranges may overlap
    if quest:
        wanted = torch.maximum((count.long() + ps - 1) // ps, n_forced)
    else:
        wanted = torch.ceil(candidate_factor * count.double() / ps).long() + n_forced
    return torch.minimum(wanted, num_pages)


def quest_attended(seq_lens: torch.Tensor, count: torch.Tensor, page_size: int, sink_tokens: int,
                   local_window: int) -> torch.Tensor:
    """Tokens ``"quest"`` really attends per head, ``[B]`` int64: its whole pages, the last one partial.

    ``count``: ``[B]`` the budget's tokens (:func:`page_counts` rounds them up to pages, forced
    pages included). What the kernels read, so what the stats count.
    """
    seq = seq_lens.long()
    num_pages = (seq + page_size - 1) // page_size
    pages = page_counts(seq, torch.minimum(count.long(), seq), page_size, sink_tokens, local_window, 1.0, quest=True)
    return seq - (num_pages - pages) * page_size


def max_forced_pages(page_size: int, sink_tokens: int, local_window: int) -> int:
    """Host bound of the forced pages of any request: the sink pages, and the window's pages plus the
    one it may straddle (:func:`forced_page_range`'s ranges at their widest)."""
    return -(-sink_tokens // page_size) + ((-(-local_window // page_size) + 1) if local_window > 0 else 0)


def index_capacity(whole_pages: bool, max_count: int, page_size: int, sink_tokens: int, local_window: int) -> int:
    """Host-side width of an index buffer that holds any row :func:`.reference.select_topk` returns.

    ``max_count``: ``max(min(attended, seq_lens))`` of the step. Whole-page selectors
    (``"quest"``, ``"exact_pages"``) round to whole pages and may exceed the budget by the forced
    sink/window pages.
    """
    if not whole_pages:
        return max_count
    return page_size * max(-(-max_count // page_size), max_forced_pages(page_size, sink_tokens, local_window))


def candidate_capacity(num_pages: int, capacity: int, page_size: int, sink_tokens: int,
                       local_window: int, candidate_factor: float) -> int:
    """Static bound of the candidate pages per row: ``>= max_b n_cand[b]`` of the reference."""
    forced = max_forced_pages(page_size, sink_tokens, local_window)
    return max(1, min(num_pages, math.ceil(candidate_factor * capacity / page_size) + forced))


def candidate_pages(
    ub: torch.Tensor,
    seq_lens: torch.Tensor,
    count: torch.Tensor,
    page_size: int,
    sink_tokens: int,
    local_window: int,
    candidate_factor: float,
    max_candidates: int,
    quest: bool = False,
) -> torch.Tensor:
    """Top ``n_cand[b]`` pages of ``ub`` ``[B, S, P]`` -> ``[B, S, max_candidates]`` page ids, ``-1`` padded.

    ``n_cand`` is :func:`page_counts` (``quest``: the pages Quest attends);
    device-side (no sync).
    """
    n_cand = page_counts(seq_lens, count, page_size, sink_tokens, local_window, candidate_factor, quest)
    top, keep = topk_rows(ub, n_cand, max_candidates)
    return torch.where(keep, top, -1)


def row_kv_heads(num_rows: int, num_heads: int, num_kv_heads: int, device=None) -> torch.Tensor:
    """``[num_rows]`` the KV head each selection row reads: rows are KV heads (``num_rows ==
    num_kv_heads``) or query heads (``num_rows == num_heads``, query head ``h`` reading KV head
    ``h // (num_heads // num_kv_heads)``)."""
    if num_rows == num_kv_heads:
        return torch.arange(num_kv_heads, device=device)
    if num_rows == num_heads:
        return torch.arange(num_heads, device=device) // (num_heads // num_kv_heads)
    raise ValueError(f"{num_rows} selection rows: expected num_kv_heads={num_kv_heads} or num_heads={num_heads}")


def page_positions(pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """``[B, S, C]`` pages (−1 padded) -> ``[B, S, C * page_size]`` positions (−1 padded)."""
    pos = pages[..., None] * page_size + torch.arange(page_size, device=pages.device)
    return torch.where(pages[..., None] < 0, -1, pos).flatten(2)


def compact_pages(pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen whole pages as one compacted block table per (request, selection head).

    With one page per KV block, the pages a head attends, in ascending order, *are* a block
    table: the row's sequence is their tokens back to back, whole pages but the request's last
    (partial) one, which sorts last. Device-side, no sync.

    Args:
        pages: ``[B, S, C]`` request-local page ids, ``-1`` padded, any order.
        block_table: ``[B, max_blocks]`` the requests' block ids (page ``p`` is block ``block_table[b, p]``).
        seq_lens: ``[B]`` context lengths.
    Returns:
        ``(tables, lens)``: ``[B, S, C]`` int32 block ids ascending by page (entries past the row's
        pages hold the request's first block and are never read) and ``[B, S]`` int32 tokens per row.
    """
    seq = seq_lens.long()[:, None]
    big = torch.iinfo(torch.int64).max
    ordered = torch.where(pages >= 0, pages.long(), big).sort(dim=-1).values
    valid = ordered != big
    safe = torch.where(valid, ordered, 0)
    tables = block_table.long().gather(1, safe.flatten(1)).view(safe.shape).to(torch.int32)
    last = (seq + page_size - 1) // page_size - 1  # [B, 1] the partial page, if chosen
    short = torch.where((ordered == last[..., None]).any(-1), (last + 1) * page_size - seq, 0)
    lens = valid.sum(-1) * page_size - short
    return tables, lens.to(torch.int32)


def scored_key_range(kmin: torch.Tensor, kmax: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                     sink_tokens: int, local_window: int) -> torch.Tensor:
    """``[B, S, D]`` float32: per dim, ``max_p kmax_pe − min_p kmin_pe`` over the pages stage 1
    scored (valid, neither sink nor window pages); ``1`` in rows without such a page, so that
    :func:`rescore_dims_mask` falls back to ``|q|`` there.

    Args:
        kmin, kmax: ``[B, S, P, D]`` page bounds (page ``p`` of row ``b`` at index ``p``).
    """
    page = torch.arange(kmin.shape[2], device=kmin.device).expand(kmin.shape[0], -1)  # [B, P]
    num_pages = (seq_lens.long() + page_size - 1) // page_size
    scored = (page < num_pages[:, None]) & ~forced_page_mask(page, seq_lens, page_size, sink_tokens, local_window)
    m = scored[:, None, :, None]
    hi = kmax.float().masked_fill(~m, float("-inf")).amax(2)
    lo = kmin.float().masked_fill(~m, float("inf")).amin(2)
    return torch.where(scored.any(-1)[:, None, None], hi - lo, 1.0)


def rescore_dims_mask(q: torch.Tensor, key_range: torch.Tensor, rescore_dims: int) -> torch.Tensor:
    """The dims ``exact_pages`` rescores with (``0 < rescore_dims < head_size``): ``[B, S, D]`` bool.

    A dim's weight is ``Σ_group |q_e| × key_range_e``, the key range over the pages stage 1 scored
    (:func:`scored_key_range`): how far dim ``e`` can move ``q·k`` between this context's keys.
    SparQ (Ribar et al. 2023) ranks by ``|q_e|`` alone; weighting by the key range drops dims whose
    keys barely vary (a near-constant offset ranks nothing) and finds the ones that separate keys —
    on SmolLM2 at 6k–7.5k tokens it recovers the needle digits 12 dims by ``|q|`` lose
    (docs/RESULTS.md, "How defaults were chosen"). Rows without such a page have range 1: ``|q|`` alone. The C++ kernel
    (``kernels/cpu_select.cpp``) computes the same in float32; ties go to the lower dim.

    Args:
        q: ``[B, S, G, D]`` float32 queries per selection head; key_range: ``[B, S, D]``.
    """
    d = q.shape[-1]
    if not 0 < rescore_dims < d:
        return torch.ones(q.shape[:2] + (d,), dtype=torch.bool, device=q.device)
    w = q.abs().sum(2) * key_range  # [B, S, D]
    order = torch.sort(w, dim=-1, descending=True, stable=True).indices[..., :rescore_dims]
    return torch.zeros_like(w, dtype=torch.bool).scatter_(-1, order, True)


def topk_rows(scores: torch.Tensor, count: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``count[b]`` entries of ``scores`` ``[B, S, L]`` (``-inf`` never kept).

    Returns ``(idx, keep)``, both ``[B, S, width]``: indices into ``L`` and whether each is kept.
    """
    width = min(width, scores.shape[-1])
    val, idx = scores.topk(width, dim=-1)
    rank = torch.arange(width, device=scores.device)
    return idx, (rank[None, None, :] < count[:, None, None]) & (val > float("-inf"))


def sorted_positions(pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Kept positions ascending, ``-1`` padded at the end."""
    big = torch.iinfo(pos.dtype).max
    pos = torch.where(keep, pos, big).sort(dim=-1).values
    return torch.where(pos == big, -1, pos)


def recent_positions(seq_lens: torch.Tensor, count: torch.Tensor, sink_tokens: int, capacity: int) -> torch.Tensor:
    """StreamingLLM selection (``selection="recent"``): the sinks, then the most recent tokens.

    Returns ``[B, capacity]`` int64 ascending positions, ``-1`` padded: ``[0, s0)`` and
    ``[n - (count - s0), n)`` with ``s0 = min(sink_tokens, count)`` — the set the reference's
    top-k of ``score = position`` (sinks ``+inf``) keeps. No scores needed, no kernel.
    """
    n = seq_lens.long()[:, None]
    count = count.long()[:, None]
    s0 = count.clamp_max(sink_tokens)
    j = torch.arange(capacity, device=seq_lens.device)[None, :]
    pos = torch.where(j < s0, j, n - count + j)  # j >= s0: n - (count - s0) + (j - s0)
    return torch.where(j < count, pos, -1)


def write_rows(pos: torch.Tensor, out: torch.Tensor) -> None:
    """``[B, S, W]`` positions (``-1`` padded) into ``out`` ``[B, S, capacity]``, ``-1`` beyond ``W``."""
    width = min(pos.shape[-1], out.shape[-1])
    out[..., :width] = pos[..., :width].to(out.dtype)
    if width < out.shape[-1]:
        out[..., width:] = -1


def topk_into(scores: torch.Tensor, pos: torch.Tensor | None, count: torch.Tensor, out: torch.Tensor) -> None:
    """Top-``count[b]`` of ``scores`` ``[B, S, L]`` as ascending positions, ``-1`` padded, into ``out``."""
    idx, keep = topk_rows(scores, count, out.shape[-1])
    p = idx if pos is None else pos.gather(-1, idx)
    write_rows(sorted_positions(p.long(), keep), out)
