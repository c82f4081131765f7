"""``ntopk`` (the default): each KV head keeps the top ``k·n^α`` tokens by the current query's ``q·k``.

Paper: Deng, Song, Xiong, Yang, "How Sparse Attention Approximates Exact Attention? Your
Attention is Naturally n^C-Sparse" (the adaptive budget); the score is the exact attention
logit, maxed over the KV head's query group. Selection only (a new set every step): it frees
nothing, because a token dropped now may be the one the next query needs. Inside vLLM it runs
as the configured ``selection`` (default ``exact_pages``: whole pages, see the README).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .policy import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class NTopK(Policy):
    name: ClassVar[str] = "ntopk"
    selection: ClassVar[str | None] = None  # the configured `selection` kernel
    needs: ClassVar[tuple[str, ...]] = ("query",)

    def score(self, state: TokenState) -> torch.Tensor:
        return state.logits(state.query[None])[:, :, 0].amax(1)  # [H, n]
