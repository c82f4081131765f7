"""Page ranking in torch: Quest's bound, the bound-ranked candidate pages and their exact rescoring.

The torch definitions of the rules every decode path shares (the Triton kernels in
:mod:`.triton_ranking` and the C++ kernel ``kernels/cpu_select.cpp`` are checked against them):

* :func:`quest_bound` — Quest's upper bound of a page's ``q·k`` from its key min/max;
* :func:`candidate_pages` — the best pages by that bound, sink and window pages always in;
* :func:`exact_pages` — ``exact_pages``' rule: Quest's page count, chosen among ``candidate_factor ×``
  as many candidates by each page's exact ``max q·k`` (or over ``rescore_dims`` dims:
  :func:`.selection.rescore_dims_mask`);
* :func:`refresh_pages` — the same, with pages chosen before joining the candidates.

Each takes the step's :class:`~.selectors.SelectInputs`; all arithmetic is float32.
"""

from __future__ import annotations

import math

import torch

from .selection import forced_page_mask, page_counts, page_positions, rescore_dims_mask, scored_key_range, topk_rows
from .selectors import SelectInputs, SelectParams

__all__ = ["quest_bound", "candidate_pages", "exact_pages", "refresh_pages"]

_NEG_INF = float("-inf")


def quest_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's bound (Tang et al., ICML 2024) of ``q·k`` over a page's keys, per query and page.

    ``max_{k in page} q·k <= Σ_d max(q_d·min_d, q_d·max_d) = q⁺·max + q⁻·min``.

    Args:
        q: ``[..., G, D]`` float32 queries; kmin, kmax: ``[..., D, P]`` float32 page key bounds.
    Returns:
        ``[..., G, P]`` float32 (unscaled).
    """
    return torch.matmul(q.clamp_min(0), kmax) + torch.matmul(q.clamp_max(0), kmin)


def candidate_pages(x: SelectInputs, quest: bool = False, n_cand: torch.Tensor | None = None,
                    with_key_range: bool = False):
    """The best pages by :func:`quest_bound` (maxed over the query group), ``[B, S, C]``, −1 padded.

    Sink and window pages always count. ``n_cand`` (``[B]``) sets how many pages each row keeps
    (default: :func:`.selection.page_counts` — ``candidate_factor ×`` the budget's pages, or with
    ``quest`` Quest's page count). ``with_key_range`` also returns :func:`.selection.scored_key_range`
    of the bounds read (``[B, S, D]``): ``(pages, key_range)``."""
    q, cache, seq_lens, p = x.query.float(), x.cache, x.seq_lens, x.params
    b, num_heads, d = q.shape
    s, ps = x.heads.numel(), cache.page_size
    num_pages = (seq_lens + ps - 1) // ps  # [B]
    p_max = int(num_pages.max())
    bounds = cache.gather_page_bounds(x.block_table, p_max, x.heads)  # [B, S, P, D] each
    kmin, kmax = (t.float().transpose(-1, -2) for t in bounds)  # [B, S, D, P]
    ub = quest_bound(q.view(b, s, num_heads // s, d), kmin, kmax).amax(2) * x.scale  # [B, S, P]
    page = torch.arange(p_max, device=q.device).expand(b, -1)
    valid = page < num_pages[:, None]
    forced = forced_page_mask(page, seq_lens, ps, p.sink_tokens, p.local_window)
    ub = ub.masked_fill(~valid[:, None, :], _NEG_INF).masked_fill(forced[:, None, :], math.inf)
    if n_cand is None:
        n_cand = page_counts(seq_lens, x.count, ps, p.sink_tokens, p.local_window, p.candidate_factor, quest)
    top, keep = topk_rows(ub, n_cand, int(n_cand.max()))
    pages = torch.where(keep, top, -1)
    if with_key_range:
        return pages, scored_key_range(*bounds, seq_lens, ps, p.sink_tokens, p.local_window)
    return pages


def exact_pages(x: SelectInputs, prior: torch.Tensor | None = None) -> torch.Tensor:
    """``"exact_pages"``: Quest's page count, chosen among ``ceil(candidate_factor ×)`` as many
    candidates (by the bound) by each page's exact ``max q·k`` (over its tokens and the query group).

    ``0 < rescore_dims < head_size`` scores with only the ``rescore_dims`` dimensions where the
    group's ``Σ|q|`` times the key range is largest (SparQ's approximation, Ribar et al. 2023, with
    the dims weighted by how much the keys vary: :func:`.selection.rescore_dims_mask`); ``q`` is
    zero elsewhere.

    ``prior`` (``[B, S, M]`` page ids, −1 padded) joins the candidates: a refresh of pages chosen
    before (:func:`refresh_pages`).

    Returns ``[B, S, C]`` page ids, −1 padded; sink/window pages always in.
    """
    query, cache, seq_lens, p = x.query, x.cache, x.seq_lens, x.params
    b, num_heads, d = query.shape
    s, ps = x.heads.numel(), cache.page_size
    num_pages = (seq_lens + ps - 1) // ps
    n_pages = x.whole_page_count()
    n_cand = torch.minimum(torch.ceil(n_pages.double() * p.candidate_factor).long(), num_pages)
    cand, key_range = candidate_pages(x, n_cand=n_cand, with_key_range=True)  # [B, S, C], [B, S, D]
    if prior is not None:  # the prior pages not already candidates join them
        prior = prior.long()
        dup = (prior[..., :, None] == cand[..., None, :]).any(-1) | (prior < 0)
        cand = torch.cat([cand, torch.where(dup, -1, prior)], -1)
    pos = page_positions(cand, ps)  # [B, S, C * ps]
    n = seq_lens[:, None, None]
    k, _ = cache.gather_pages(x.block_table, cand, x.heads)
    q = query.float().view(b, s, num_heads // s, d)
    if 0 < p.rescore_dims < d:
        q = q * rescore_dims_mask(q, key_range, p.rescore_dims)[:, :, None, :]
    logits = torch.matmul(q, k.float().transpose(-1, -2)).amax(2)
    logits = logits.masked_fill((pos < 0) | (pos >= n), _NEG_INF)
    score = logits.view(b, s, cand.shape[-1], ps).amax(-1)  # [B, S, C]
    return x.best_pages(cand, score)


def refresh_pages(query: torch.Tensor, cache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  attended: torch.Tensor, prior: torch.Tensor, params: SelectParams) -> torch.Tensor:
    """:func:`exact_pages` (one set per KV head) whose candidates are the ``candidate_factor ×`` best
    pages by the bound *plus* the ``prior`` pages (``[B, num_kv_heads, M]``, −1 padded): how a
    (request, KV head) refreshes a kept selection whose query moved (``reselect_candidate_factor``;
    the oracle of the C++ ``quest_select``'s ``prior`` rows). Returns ``[B, num_kv_heads, C]`` page
    ids, −1 padded."""
    if params.per_query_head:
        raise ValueError("refresh_pages selects one set per KV head (granularity='kv_head')")
    return exact_pages(SelectInputs.build(query, cache, block_table, seq_lens, attended, 1.0, params), prior=prior)
