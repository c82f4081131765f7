"""``h2o``: heavy hitters — the tokens that have received the most attention so far — plus the recent window.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models" (NeurIPS 2023). Score: each token's attention probability summed over every
step so far and over the KV head's query group (``TokenState.acc_attention``). Schedule: every
step. **Frees KV blocks** (``evict: "h2o"``): the accumulated score of every resident token lives
in extra rows of its own KV block (one float32 per token and head, freed and preempted with the
block); each step adds the attention the step's queries paid to the resident tokens; before a
block leaves the recent window its tokens compete with the kept region's by that score
(:mod:`vllm_sparse.eviction`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .policy import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    name: ClassVar[str] = "h2o"
    frees_blocks: ClassVar[bool] = True
    evicts_by_score: ClassVar[bool] = True
    token_state: ClassVar[str | None] = "acc_attention"
    needs: ClassVar[tuple[str, ...]] = ("acc_attention",)

    def score(self, state: TokenState) -> torch.Tensor:
        return state.acc_attention.float()

    @staticmethod
    def accumulate(acc: torch.Tensor | None, state: TokenState) -> torch.Tensor:
        """H2O's state after one more query: ``acc + softmax(q·K)`` summed over the group, ``[H, n]``."""
        p = torch.softmax(state.logits(state.query[None])[:, :, 0], -1).sum(1)
        if acc is None:
            return p
        out = p.clone()
        out[:, : acc.shape[1]] += acc
        return out
