"""Budgets: the *budget* component of a policy (:mod:`.policy`).

A budget answers one question per decode step: how many KV tokens does each request keep at
its current length ``n``? The shared machinery — sinks and local window, the dense-below
threshold — lives once, in :meth:`BudgetPolicy.attended`; a budget implements only
:meth:`budget`. ``n_alpha`` (k·n^α), ``fixed_k`` (the baseline) and ``dense``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from .budget import attended_tokens, fixed_budget, n_alpha_budget

__all__ = ["BudgetPolicy", "NAlphaPolicy", "FixedKPolicy", "DensePolicy"]


@dataclasses.dataclass(frozen=True)
class BudgetPolicy:
    """Base class: subclasses are frozen dataclasses that set ``name`` and implement ``budget``.

    ``from_settings`` builds one from the validated top-level settings (a mapping with
    ``alpha``, ``k``, ``min_budget``, ``max_budget``, …) plus the user's ``policy_args``;
    unknown ``policy_args`` keys raise ``ValueError``.
    """

    name: ClassVar[str] = ""
    #: fields filled from the config's top-level settings instead of ``policy_args``
    settings_keys: ClassVar[tuple[str, ...]] = ()

    def budget(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Total tokens to attend at each length (sinks/window included), ``[B]`` int64."""
        raise NotImplementedError

    def attended(self, seq_lens: torch.Tensor, sink_tokens: int, local_window: int, dense_below: int) -> torch.Tensor:
        """Tokens actually attended per request: the budget clamped to ``n``; all of ``n`` below ``dense_below``."""
        n = seq_lens.to(torch.int64)
        att = attended_tokens(n, self.budget(n), sink_tokens, local_window)
        return torch.where(n < dense_below, n, att)

    @classmethod
    def from_settings(cls, settings: dict[str, Any], policy_args: dict[str, Any]) -> "BudgetPolicy":
        allowed = sorted({f.name for f in dataclasses.fields(cls)} - set(cls.settings_keys))
        unknown = sorted(set(policy_args) - set(allowed))
        if unknown:
            raise ValueError(
                f"vllm_sparse policy_args {unknown} not understood by policy {cls.name!r}; "
                f"allowed: {allowed or 'none'}"
            )
        return cls(**{k: settings[k] for k in cls.settings_keys}, **policy_args)


@dataclasses.dataclass(frozen=True)
class NAlphaPolicy(BudgetPolicy):
    """Adaptive top-k of the n^C paper: ``budget(n) = clamp(ceil(k·n^α), min_budget, max_budget)``.

    Paper: Deng et al., "How Sparse Attention Approximates Exact Attention? Your Attention
    is Naturally n^C-Sparse". Settings ``k``, ``alpha``, ``min_budget``, ``max_budget`` are
    the config's top-level keys.
    """

    name: ClassVar[str] = "n_alpha"
    settings_keys: ClassVar[tuple[str, ...]] = ("k", "alpha", "min_budget", "max_budget")
    k: float = 12.0
    alpha: float = 0.5
    min_budget: int = 128
    max_budget: int | None = None

    def budget(self, seq_lens):
        return n_alpha_budget(seq_lens, self.k, self.alpha, self.min_budget, self.max_budget)


@dataclasses.dataclass(frozen=True)
class FixedKPolicy(BudgetPolicy):
    """The fixed top-k baseline: ``budget(n) = budget`` at every length (``policy_args={"budget": N}``)."""

    name: ClassVar[str] = "fixed_k"
    budget_tokens: int = 1024

    def __post_init__(self):
        if isinstance(self.budget_tokens, bool) or not isinstance(self.budget_tokens, int) or self.budget_tokens < 1:
            raise ValueError(f"vllm_sparse policy_args.budget_tokens={self.budget_tokens!r}; allowed: an integer >= 1")

    def budget(self, seq_lens):
        return fixed_budget(seq_lens, self.budget_tokens)


@dataclasses.dataclass(frozen=True)
class DensePolicy(BudgetPolicy):
    """Attend to every token (the exact baseline, through the same backend)."""

    name: ClassVar[str] = "dense"

    def budget(self, seq_lens):
        return seq_lens.to(torch.int64)

    def attended(self, seq_lens, sink_tokens, local_window, dense_below):
        return seq_lens.to(torch.int64)


