"""``topk``: the fixed top-k baseline — the same exact ``q·k`` score as ``ntopk`` with a budget that
does not grow with ``n`` (``policy_args: {"budget_tokens": N}``, default 1024). Selection only."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from .base import BudgetPolicy, FixedKPolicy
from .ntopk import NTopK


@dataclasses.dataclass(frozen=True)
class TopK(NTopK):
    name: ClassVar[str] = "topk"

    budget: BudgetPolicy = dataclasses.field(default_factory=FixedKPolicy)

    @classmethod
    def default_budget(cls, settings):
        return FixedKPolicy()
