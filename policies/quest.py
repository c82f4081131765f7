"""``quest``: whole pages ranked by an upper bound of ``q·k`` from each page's key min/max.

Paper: Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"
(ICML 2024). Score of a page: ``Σ_e max(q_e·min_e, q_e·max_e)`` (:func:`vllm_sparse.kernels.ranking.quest_bound`),
maxed over the query group;
the budget is rounded up to whole pages. Reads no key to select. Selection only: frees nothing.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from vllm_sparse.kernels.ranking import quest_bound

from .policy import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    name: ClassVar[str] = "quest"
    selection: ClassVar[str | None] = "quest"
    needs: ClassVar[tuple[str, ...]] = ("query",)

    def page_bounds(self, state: TokenState) -> torch.Tensor:
        """``[H, pages]`` Quest's bound of every page (the last one partial)."""
        n, h, d = state.keys.shape
        ps = state.page_size
        pages = -(-n // ps)
        k = torch.full((pages * ps, h, d), float("nan"))
        k[:n] = state.keys.float()
        k = k.view(pages, ps, h, d)
        kmin = torch.nan_to_num(k, nan=float("inf")).amin(1)  # [P, H, d]
        kmax = torch.nan_to_num(k, nan=float("-inf")).amax(1)
        q = state.query.float().view(h, -1, d)  # [H, G, d]
        return quest_bound(q, kmin.permute(1, 2, 0), kmax.permute(1, 2, 0)).amax(1)  # [H, G, P] -> [H, P]

    def score(self, state: TokenState) -> torch.Tensor:
        """Every token scores its page's bound (so pages are kept whole)."""
        return self.page_bounds(state).repeat_interleave(state.page_size, dim=1)[:, : state.n]

    def keep(self, state: TokenState) -> torch.Tensor:
        """Whole pages: the forced ones, then the best bounds up to ``ceil(count / page_size)`` pages."""
        n, h, ps = state.n, state.num_kv_heads, state.page_size
        count = self.count(n)
        if count >= n:
            return torch.ones(h, n, dtype=torch.bool)
        pages = -(-n // ps)
        page_of = torch.arange(n) // ps
        forced = torch.zeros(h, pages, dtype=torch.bool)  # pages holding a sink or window token
        forced[:, page_of[self.forced(n, 1)[0]].unique()] = True
        want = max(-(-count // ps), int(forced[0].sum()))
        ub = self.page_bounds(state).masked_fill(forced, float("inf"))
        order = torch.sort(ub, dim=1, descending=True, stable=True).indices[:, :want]
        kept_pages = torch.zeros(h, pages, dtype=torch.bool).scatter_(1, order, True)
        return kept_pages[:, page_of]
