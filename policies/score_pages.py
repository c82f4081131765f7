"""The decode selector of a policy that ranks pages by its own score: what runs is what is registered.

A policy that sets ``pages_by_score`` (:class:`~.policy.Policy`) needs no selector of its own: when
it is registered (:mod:`.registry`), :func:`score_pages_selector` builds one from the policy class
and registers it under the policy's ``selection`` (its name) in ``vllm_sparse.kernels.selectors``.
Each decode step, per request, the selector reads the keys of every page of each selection head,
scores them with the policy's :meth:`~.policy.Policy.score` (one :class:`~.state.TokenState` whose
heads are the selection heads, each with its query group), ranks every page by its best token's
score and attends the best pages whole: as many as Quest's rule gives the budget, the sink and
window pages always in (:meth:`SelectInputs.best_pages`).

It is a torch reference: it reads every key of the request each step, on any device; not a fast
path (the built-in ``exact_pages``/``quest`` have fused C++ and Triton paths).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vllm_sparse.kernels.selectors import SelectInputs, Selector

from .policy import Policy
from .state import TokenState

__all__ = ["ScorePages", "score_pages_selector"]


class ScorePages(Selector):
    """Whole pages ranked by their best token's :meth:`Policy.score` (see the module docstring).

    Subclasses (made by :func:`score_pages_selector`) set ``name`` and ``policy_class``; the
    selector scores with ``policy_class()``, the policy's default settings.
    """

    whole_pages = True
    policy_class: ClassVar[type[Policy]]

    def __init__(self) -> None:
        self.policy = self.policy_class()

    def pages(self, x: SelectInputs) -> torch.Tensor:
        pages = x.all_pages()  # [B, S, P]
        b, s, p = pages.shape
        ps = x.cache.page_size
        k, _ = x.cache.gather_pages(x.block_table, pages, x.heads)  # [B, S, P * ps, D]
        scores = torch.full((b, s, p * ps), float("-inf"), device=k.device)  # rows past a length: never best
        for i, n in enumerate(x.seq_lens.tolist()):
            # the selection heads are the state's heads; query heads [s·G, (s+1)·G) form head s's group
            state = TokenState(keys=k[i, :, :n].transpose(0, 1).float(), query=x.query[i], scale=x.scale,
                               page_size=ps)
            scores[i, :, :n] = self.policy.score(state).float()  # [S, n]
        return x.best_pages(pages, scores.view(b, s, p, ps).amax(-1))


def score_pages_selector(policy_class: type[Policy]) -> type[ScorePages]:
    """The :class:`ScorePages` selector of ``policy_class``, named ``policy_class.selection``."""
    return type(f"{policy_class.__name__}Pages", (ScorePages,), {
        "name": policy_class.selection,
        "policy_class": policy_class,
        "__module__": policy_class.__module__,
        "__doc__": f"Whole pages ranked by their best token's {policy_class.__name__}.score.",
    })
