"""Pure-torch twins of the fused CPU kernels in ``cpu_select.cpp`` (:mod:`.cpu_ext` builds them).

The oracles the C++ ops are tested against (``tests/kernels/test_cpu_select.py``), readable first:

* ``update_page_summaries`` — :func:`.reference.update_page_summaries`;
* ``quest_select`` — :func:`select_pages_reference` for Quest's ranking (:func:`.ranking.quest_bound`);
  its ``exact_pages`` rescoring is :func:`.ranking.exact_pages` and its refresh rows
  :func:`.ranking.refresh_pages`;
* ``reuse_rows`` — :func:`reuse_rows_reference`.

Never imports vLLM; the decode plan they read is built by ``vllm_sparse.cpu_attention.plan_decode``
(any object with its fields will do).
"""

from __future__ import annotations

import torch

from .layout import PagedKVCache
from .ranking import quest_bound

__all__ = ["select_pages_reference", "reuse_rows_reference"]


def select_pages_reference(query: torch.Tensor, cache: PagedKVCache, plan) -> torch.Tensor:
    """The compacted one-head block table ``quest_select`` writes for a plain Quest plan
    (``candidates == count``): ``[B * num_kv_heads, plan.width]`` int32; float32 scores, ties to the
    lower page, entries past ``count[b]`` repeating the last one.

    Args:
        query: ``[B, num_heads, head_size]``.
        plan: the step's plan: ``block_table`` ``[B, P]``, ``num_pages``, ``count``, ``candidates``,
            ``forced_lo``, ``forced_hi`` (``[B]`` int64) and ``width``.
    """
    if bool((plan.candidates > plan.count).any()):
        raise ValueError("select_pages_reference covers plain Quest plans (candidate_factor 1) only")
    b, num_heads, d = query.shape
    h = cache.num_kv_heads
    heads = torch.arange(h)
    p_max = plan.block_table.shape[1]
    kmin, kmax = cache.gather_page_bounds(plan.block_table, p_max, heads)  # [B, H, P, D]
    q = query.float().view(b, h, num_heads // h, d)
    score = quest_bound(q, kmin.float().transpose(-1, -2), kmax.float().transpose(-1, -2)).amax(2)  # [B, H, P]
    page = torch.arange(p_max)[None, :]
    forced = (page < plan.forced_lo[:, None]) | (page >= plan.forced_hi[:, None])
    score = score.masked_fill(forced[:, None], float("inf"))
    score = score.masked_fill((page >= plan.num_pages[:, None])[:, None], float("-inf"))
    # stable descending sort: equal scores keep the lower page first
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., : plan.width]
    keep = torch.arange(plan.width)[None, None, :] < plan.count[:, None, None]
    top = torch.where(keep, order, torch.iinfo(order.dtype).max).sort(dim=-1).values
    last = top.gather(-1, (plan.count[:, None, None] - 1).expand(b, h, 1))
    top = torch.where(keep, top, last)
    blocks = plan.block_table.gather(1, top.view(b, -1)).view(b, h, -1)
    return (blocks * h + heads.view(1, h, 1)).view(b * h, -1).to(torch.int32)


def reuse_rows_reference(query: torch.Tensor, num_kv_heads: int, prev_table: torch.Tensor, rows: torch.Tensor,
                         keep: torch.Tensor, width: int, grown_mask: torch.Tensor | None,
                         grown_block: torch.Tensor | None, prev_ref: torch.Tensor | None, min_similarity: float,
                         refresh: bool):
    """The C++ ``reuse_rows``: the rows of a ``reselect_every`` step that may keep last step's pages, and
    the ``reselect_similarity`` gate. Returns ``(table, keep, prior, unit queries)``; ``prior`` is None
    without ``refresh`` or a reference, the queries None without the gate (``min_similarity <= 0``).

    Args:
        query: ``[B, num_heads, head_size]``; prev_table: last step's ``[rows', width']`` int32 table.
        rows: ``[B * num_kv_heads]`` the row of ``prev_table`` each row keeps; keep: ``[B * num_kv_heads]``
            bool, the rows allowed to keep theirs.
        grown_mask, grown_block: ``[B * num_kv_heads, width]`` bool and ``[B * num_kv_heads]`` int32: the
            entries that take their request's new page, and that page's one-head block (or both None).
        prev_ref: last step's ``[rows', group * head_size]`` float32 unit reference queries, or None.
    """
    b = query.shape[0]
    qn = None
    if min_similarity > 0:
        qn = torch.nn.functional.normalize(query.reshape(b * num_kv_heads, -1).float(), dim=1)
    table = prev_table[rows]
    if table.shape[1] < width:  # entries past a row's count repeat its last one
        table = torch.cat([table, table[:, -1:].expand(-1, width - table.shape[1])], 1)
    table = table[:, :width].contiguous()
    if grown_mask is not None:  # these rows attend their request's new (last) page too
        table = torch.where(grown_mask, grown_block.view(-1, 1), table)
    prior = None
    if qn is not None and prev_ref is not None:
        ref = prev_ref[rows]
        close = (qn * ref).sum(1) >= min_similarity
        if refresh:
            prior = keep & ~close
        keep = keep & close
        qn = torch.where(keep[:, None], ref, qn)
    return table, keep, prior, qn
