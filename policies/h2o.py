"""``h2o``: heavy hitters — the tokens that have received the most attention so far — plus the recent window.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models" (NeurIPS 2023). Score: each token's attention probability summed over every
step so far and over the KV head's query group (its per-token state, :meth:`H2O.update_state`).
Schedule: every step. **Frees KV blocks** (``evict: "h2o"``): the accumulated score of every resident token lives
in extra rows of its own KV block (one float32 per token and head, freed and preempted with the
block); each step adds the attention the step's queries paid to the resident tokens; before a
block leaves the recent window its tokens compete with the kept region's by that score
(:mod:`vllm_sparse.eviction`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .policy import Policy
from .state import AttentionStep, TokenState


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    name: ClassVar[str] = "h2o"
    frees_blocks: ClassVar[bool] = True
    evicts_by_score: ClassVar[bool] = True
    keeps_token_state: ClassVar[bool] = True  # the accumulated attention
    needs: ClassVar[tuple[str, ...]] = ("stored",)

    def score(self, state: TokenState) -> torch.Tensor:
        return state.stored.float()

    def update_state(self, stored: torch.Tensor | None, step: AttentionStep) -> torch.Tensor:
        """H2O's state after one more step: ``stored`` plus the attention the step's queries paid each
        token (causal), summed over the queries and each KV head's group, ``[R, H, N]``."""
        paid = step.attention().sum((2, 3))
        return paid if stored is None else stored + paid
