"""The Triton selection path (see :func:`.reference.select_topk`): runs the step's selector through
its Triton hooks, then the shared token top-k or the whole-page expansion.

* :func:`select_topk_triton` — positions per (request, selection head), ``-1`` padded into a
  fixed-capacity ``[B, S, capacity]`` buffer: the selector's candidate pages
  (:meth:`~.selectors.Selector.pages_triton`), then for token selectors exact scores
  (:func:`.triton_ranking.token_scores_triton`) and ``torch.topk`` cut to each row's count;
  whole-page selectors attend every token of their pages; ``by_position`` selectors give positions.
* :func:`select_pages_triton` — a whole-page selector's pages.
* :func:`select_tables_triton` — those pages as each row's compacted block table; a selector that
  exposes its final page scores (:meth:`~.selectors.Selector.page_scores_triton`: ``quest``,
  ``exact_pages``) has its rows cut and compacted in one launch.

Everything after the host-side sizes is device-side and sync-free when ``out`` (or ``capacity``)
and ``max_seq_len`` are passed: the step has static shapes.
"""

from __future__ import annotations

import torch

from .layout import PagedKVCache
from .selection import compact_pages, page_positions, sorted_positions, topk_into, write_rows
from .selectors import SelectInputs, SelectParams
from .triton_common import check_query
from .triton_ranking import ranked_pages_triton, token_scores_triton

__all__ = ["select_topk_triton", "select_pages_triton", "select_tables_triton"]


def select_topk_triton(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    attended: torch.Tensor,
    scale: float,
    params: SelectParams,
    out: torch.Tensor | None = None,
    capacity: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Positions each (request, selection head) attends (see :func:`.reference.select_topk`).

    Args:
        query: ``[B, num_heads, head_size]``.
        block_table: ``[B, max_blocks]`` int32/int64.
        seq_lens: ``[B]`` int context lengths (≥ 1).
        attended: ``[B]`` int tokens kept per head (sinks and window included).
        params: the step's :class:`~.selectors.SelectParams`.
        out: optional ``[B, S, capacity]`` int32/int64 index buffer, ``S`` =
            ``params.num_rows(num_heads, num_kv_heads)``; ``capacity`` must be
            ``>= params.index_capacity(max(min(attended, seq_lens)), page_size)`` (a smaller one keeps
            the best ``capacity``, or the best ``capacity // page_size`` pages for whole-page selectors).
        capacity: width of the buffer allocated when ``out`` is None (``None``: that bound, a sync).
        max_seq_len: host bound ``>= max(seq_lens)`` sizing the score buffers (``None``: a sync).
    Returns:
        ``out``: ascending positions, ``-1`` padded; row ``b`` holds the same set as the reference's.
    """
    b, num_heads, d = check_query(query, cache)
    s_heads = params.num_rows(num_heads, cache.num_kv_heads)
    if out is not None:
        if out.dim() != 3 or out.shape[0] != b or out.shape[1] != s_heads:
            raise ValueError(f"out must be [B={b}, S={s_heads}, capacity]; got {tuple(out.shape)}")
        capacity = out.shape[2]
    x = SelectInputs.build(query, cache, block_table, seq_lens, attended, scale, params, max_seq_len, capacity)
    if out is None:
        out = torch.empty((b, s_heads, x.capacity), dtype=torch.int64, device=query.device)
    if b == 0 or x.capacity == 0:
        return out
    selector = params.selector
    if selector.by_position:
        out.copy_(selector.positions(x, x.capacity))
        return out
    cand = selector.pages_triton(x)  # [B, S, C] pages, or None: every position
    if selector.whole_pages:  # every token of the chosen pages: no token-level top-k
        pos = page_positions(cand, cache.page_size)
        keep = (pos >= 0) & (pos < x.seq_lens[:, None, None])
        write_rows(sorted_positions(pos, keep), out)
        return out
    args = (query, cache, block_table, seq_lens, scale, params)
    if cand is None:
        scores, pos = token_scores_triton(*args, num_slots=x.max_seq_len)
    else:
        scores, pos = token_scores_triton(*args, cand=cand)
    topk_into(scores, pos, x.count, out)
    return out


def select_pages_triton(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    attended: torch.Tensor,
    scale: float,
    params: SelectParams,
    capacity: int,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """The pages a whole-page selector (``quest``, ``exact_pages``, ...) attends: ``[B, S, ≤ capacity //
    page_size]`` request-local page ids, ``-1`` padded — :func:`select_topk_triton` before the
    expansion to positions (the same set). ``capacity``: the step's index width in tokens
    (:meth:`~.selectors.SelectParams.index_capacity`). Device-side, no sync given ``max_seq_len``."""
    if not params.selector.whole_pages:
        raise ValueError(f"select_pages_triton needs a whole-page selector; {params.selector.name!r} chooses tokens")
    check_query(query, cache)
    x = SelectInputs.build(query, cache, block_table, seq_lens, attended, scale, params, max_seq_len, capacity)
    return params.selector.pages_triton(x)


def select_tables_triton(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    attended: torch.Tensor,
    scale: float,
    params: SelectParams,
    capacity: int,
    max_seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_pages_triton` then :func:`.selection.compact_pages`: each (request, selection
    head)'s chosen pages as its block table, ``(tables [B, S, W] int32, lens [B, S] int32)``.

    Selectors that expose their final page scores (``quest``, ``exact_pages``) have the top-k cut and
    the tables built in one launch (:func:`.triton_ranking.ranked_pages_triton`): a decode step is
    host-bound on a GPU at small batches, and the torch ops this replaces were most of its launches.
    Same tables either way. Device-side, no sync given ``max_seq_len``."""
    check_query(query, cache)
    x = SelectInputs.build(query, cache, block_table, seq_lens, attended, scale, params, max_seq_len, capacity)
    ranked = params.selector.page_scores_triton(x) if params.selector.whole_pages else None
    if ranked is None:
        pages = select_pages_triton(query, cache, block_table, seq_lens, attended, scale, params, capacity,
                                    x.max_seq_len)
        return compact_pages(pages, block_table, seq_lens, cache.page_size)
    scores, cand = ranked
    val, top = scores.topk(min(x.max_pages, scores.shape[-1]), dim=-1)
    return ranked_pages_triton(val, top, seq_lens, attended, cache.page_size, params, cand=cand,
                               block_table=block_table)
