"""The eviction rule: which KV blocks of a request are freed, as a function of its processed tokens.

vLLM's scheduler frees blocks without hearing from the workers, so what is freed must be a
deterministic, non-decreasing function of the number of tokens a request has *processed*
(tokens whose forward pass has finished), known to the scheduler and to every worker alike.
This module is that function; it never imports vLLM (the scheduler side lives in
``vllm_sparse.eviction``, the attention side in the backend's metadata builder).

A request keeps

* the **sink blocks**: the blocks holding its first ``sink_tokens`` tokens, never freed;
* the **live tail**: every block from ``free_end(p)`` on, which holds at least the last
  ``keep(p) - sink_tokens`` processed tokens plus everything still being computed.

Blocks ``[sink_blocks, free_end(p))`` are freed. ``keep(p)`` follows the budget rule
(``clamp(ceil(k·p^α), min_keep, max_keep)``, or a fixed count), so the resident set grows
like the attended set: StreamingLLM's sinks + recent window, with the window sized by the
n^α rule. ``free_end`` is non-decreasing for every such rule (see
:meth:`EvictionRule.check_monotone`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .budget import n_alpha_budget

__all__ = ["EvictionRule"]


@dataclasses.dataclass(frozen=True)
class EvictionRule:
    """Blocks a request frees after ``p`` processed tokens (see the module docstring).

    Attributes:
        block_size: tokens per KV block.
        sink_tokens: first tokens never freed (rounded up to whole blocks).
        k, alpha, min_keep, max_keep: ``keep(p) = clamp(ceil(k·p^α), min_keep, max_keep)``
            tokens kept in the sinks and the live tail; ``alpha = 0`` with ``k = N`` keeps a fixed ``N``.
        region_blocks: blocks after the sink blocks that are never freed: the *kept region* where
            a scored eviction policy (``knorm``) keeps its best tokens, compacted into it by the
            workers before the blocks they come from are freed (0 for ``streaming``).
    """

    block_size: int
    sink_tokens: int
    k: float
    alpha: float
    min_keep: int
    max_keep: int | None = None
    region_blocks: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.sink_tokens < 0 or self.min_keep < 1:
            raise ValueError(f"invalid eviction rule {self}")
        if self.min_keep < self.sink_tokens + self.block_size:
            raise ValueError(
                f"eviction keeps at least min_keep={self.min_keep} tokens, which must cover the sinks "
                f"({self.sink_tokens}) plus one block ({self.block_size})"
            )
        self.check_monotone()

    @property
    def sink_blocks(self) -> int:
        return -(-self.sink_tokens // self.block_size)

    @property
    def head_blocks(self) -> int:
        """Blocks at the front never freed: the sink blocks and the kept region."""
        return self.sink_blocks + self.region_blocks

    def keep(self, p: int) -> int:
        """Tokens kept resident after ``p`` processed tokens (an upper bound is ``p``)."""
        if self.alpha == 0:
            return max(self.min_keep, min(math.ceil(self.k), self.max_keep or math.inf))
        return n_alpha_budget(p, self.k, self.alpha, self.min_keep, self.max_keep)

    def free_end(self, p: int) -> int:
        """First block of the live tail after ``p`` processed tokens; ``[head_blocks, free_end)`` is freed.

        The tail keeps positions ``[p - (keep(p) - sink_tokens), p)``, so it starts at the block
        holding the first of them (never below the sink blocks and the kept region)."""
        return max(self.head_blocks, (p - self.keep(p) + self.sink_tokens) // self.block_size)

    def free_end_tensor(self, p: torch.Tensor) -> torch.Tensor:
        """:meth:`free_end` of every entry of an integer tensor (int64, same device)."""
        p = p.long()
        if self.alpha == 0:
            keep = torch.full_like(p, self.keep(0))
        else:
            keep = n_alpha_budget(p, self.k, self.alpha, self.min_keep, self.max_keep)
        return torch.div(p - keep + self.sink_tokens, self.block_size, rounding_mode="floor").clamp_min(self.head_blocks)

    def max_resident_blocks(self, max_len: int, in_flight_tokens: int) -> int:
        """Most blocks a request holds at once: sinks + the kept tail at ``max_len`` + the tokens
        being computed (a chunk is allocated before its blocks can be freed) + one partial block."""
        keep = self.keep(max_len)
        tail = keep - self.sink_tokens + in_flight_tokens
        return min(-(-max_len // self.block_size), self.head_blocks + -(-tail // self.block_size) + 1)

    def check_monotone(self) -> None:
        """``free_end`` never decreases (a freed block cannot come back) iff ``p - keep(p)`` never
        decreases where blocks are freed, i.e. ``keep`` grows by at most one token per token there.
        Blocks are freed only where ``keep(p) < p``; there ``d keep/dp = α·k·p^(α-1) = α·keep/p < α
        <= 1``, and clamps only flatten ``keep``: so every rule with ``α <= 1`` is monotone
        (``tests/policies/test_eviction_rule.py`` checks it exhaustively). ``α = 1, k >= 1`` keeps
        every token and is refused as a setting that evicts nothing."""
        if self.alpha >= 1 and self.k >= 1:
            raise ValueError(f"eviction with k={self.k}, alpha={self.alpha} keeps every token (k·n >= n): "
                             "nothing to evict; use alpha < 1 or k < 1")
        if self.alpha > 1:
            raise ValueError(f"eviction needs 0 <= alpha <= 1, got {self.alpha}")
