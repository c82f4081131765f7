"""The budget rules: how many KV tokens a decode step attends to.

This is the one place the k·n^α rule (and its fixed-k baseline) is computed; every
other module — the reference, the kernels' planner, the vLLM backend, the benchmarks —
calls :func:`n_alpha_budget` / :func:`fixed_budget` instead of re-deriving it.

**Budget semantics (precise).** ``budget(n)`` is the *total* number of tokens a KV head
attends to at context length ``n``, **sinks and local window included**:

    attended(n) = min(n, max(budget(n), sink_tokens + local_window))

The first ``sink_tokens`` and the last ``local_window`` positions are always attended;
the remaining ``budget(n) - sink_tokens - local_window`` slots go to the highest-scoring
tokens of the middle. When ``budget(n) >= n`` the step is exactly dense.
:class:`vllm_sparse.config.SparseConfig` rejects ``min_budget < sink_tokens + local_window``,
so with a validated config ``max(...)`` never changes the budget.
"""

from __future__ import annotations

import math
from typing import overload

import torch

__all__ = ["n_alpha_budget", "fixed_budget", "attended_tokens"]


@overload
def n_alpha_budget(n: int, k: float, alpha: float, min_budget: int = ..., max_budget: int | None = ...) -> int: ...
@overload
def n_alpha_budget(n: torch.Tensor, k: float, alpha: float, min_budget: int = ..., max_budget: int | None = ...) -> torch.Tensor: ...


def n_alpha_budget(n, k, alpha, min_budget=1, max_budget=None):
    """``clamp(ceil(k · n^α), min_budget, max_budget)`` — the adaptive budget of the n^C paper.

    Args:
        n: current sequence length(s); ``int`` or an integer tensor of any shape.
        k: coefficient, > 0.
        alpha: exponent, 0 < α ≤ 1.
        min_budget: lower clamp (≥ 1).
        max_budget: upper clamp, or ``None`` for no upper clamp.

    Returns:
        The budget with the same type/shape as ``n`` (``int64`` for tensors).
        The budget is *not* clamped to ``n``; use :func:`attended_tokens` for that.
    """
    if isinstance(n, torch.Tensor):
        # float64 keeps ceil exact for every realistic n (< 2^53).
        b = torch.ceil(k * n.to(torch.float64).clamp_min(0) ** alpha).to(torch.int64)
        b = b.clamp_min(min_budget)
        return b if max_budget is None else b.clamp_max(max_budget)
    b = max(min_budget, math.ceil(k * max(n, 0) ** alpha))
    return b if max_budget is None else min(b, max_budget)


def fixed_budget(n, budget: int):
    """The fixed top-k baseline: the same ``budget`` at every length (same type/shape as ``n``)."""
    if isinstance(n, torch.Tensor):
        return torch.full_like(n, budget, dtype=torch.int64)
    return budget


def attended_tokens(n, budget, sink_tokens: int = 0, local_window: int = 0):
    """Tokens actually attended: ``min(n, max(budget, sink_tokens + local_window))``."""
    if isinstance(n, torch.Tensor):
        b = torch.as_tensor(budget, dtype=torch.int64, device=n.device)
        return torch.minimum(n.to(torch.int64), b.clamp_min(sink_tokens + local_window))
    return min(n, max(budget, sink_tokens + local_window))
