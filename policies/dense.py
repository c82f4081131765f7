"""``dense``: keep every token — exact attention through the same backend (the baseline)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .base import BudgetPolicy, DensePolicy
from .policy import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    """Keeps all ``n`` tokens of every head. Frees nothing."""

    name: ClassVar[str] = "dense"
    selection: ClassVar[str | None] = "dense"

    budget: BudgetPolicy = dataclasses.field(default_factory=DensePolicy)

    @classmethod
    def default_budget(cls, settings):
        return DensePolicy()

    def count(self, n: int) -> int:
        return n  # whatever the budget says

    def score(self, state: TokenState) -> torch.Tensor:
        return torch.zeros(state.num_kv_heads, state.n)
