"""What a policy reads: one request's tokens (:class:`TokenState`, for :meth:`~.policy.Policy.score`)
and one step's queries over the resident tokens of several requests (:class:`AttentionStep`, for
:meth:`~.policy.Policy.update_state`, the per-token eviction state). Pure torch; never imports vLLM.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["TokenState", "AttentionStep"]


@dataclasses.dataclass
class TokenState:
    """What a scorer may read for one request (float32 on any device; ``G`` query heads per KV head).

    Attributes:
        keys: ``[n, H, d]`` the request's keys (after RoPE, as cached).
        query: ``[H * G, d]`` the current decode query (``None`` before decoding).
        window_queries: ``[w, H * G, d]`` the last ``w`` prompt queries (SnapKV's observation window).
        stored: ``[H, n]`` float32 the per-token state the policy keeps (what
            :meth:`~.policy.Policy.update_state` made of every step so far: H2O's accumulated
            attention, TOVA's latest attention, SnapKV's votes); the workers pass it from the tokens'
            own KV blocks when they evict.
        scale: softmax scale (``d ** -0.5`` when ``None``).
        page_size: tokens per page (page-granular policies).
    """

    keys: torch.Tensor
    query: torch.Tensor | None = None
    window_queries: torch.Tensor | None = None
    stored: torch.Tensor | None = None
    scale: float | None = None
    page_size: int = 16

    @property
    def n(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.keys.shape[-1] ** -0.5

    def logits(self, queries: torch.Tensor) -> torch.Tensor:
        """``[H, G, m, n]`` ``scale · q·k`` of ``queries`` ``[m, H*G, d]`` against every key."""
        h = self.num_kv_heads
        m, hq, d = queries.shape
        q = queries.float().view(m, h, hq // h, d).permute(1, 2, 0, 3)  # [H, G, m, d]
        k = self.keys.float().permute(1, 2, 0)  # [H, d, n]
        return torch.matmul(q, k[:, None]) * self.softmax_scale

    def step(self, queries: torch.Tensor) -> "AttentionStep":
        """This request as a one-request :class:`AttentionStep` whose ``queries`` ``[m, H*G, d]`` sit
        at its last ``m`` positions (the reference of what the workers pass to ``update_state``)."""
        lens = torch.tensor([self.n], device=self.keys.device)
        return AttentionStep(keys=self.keys[None], queries=queries[None], lens=lens, scale=self.softmax_scale)

    def require(self, policy: str, *fields: str) -> None:
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"policy {policy!r} scores from {missing}; the caller did not provide them")


@dataclasses.dataclass
class AttentionStep:
    """One forward step of ``R`` requests as a per-token state update reads it: each request's
    ``M`` queries of the step and its resident keys (the step's own tokens included, last).

    Every request of one object has the same ``M``: the workers (``vllm_sparse.eviction``) pass the
    step's decode requests together (``M = 1``) and each prefill chunk alone.

    Attributes:
        keys: ``[R, N, H, d]`` resident keys in the cache dtype (after RoPE, as cached),
            ``N = max(lens)``; rows past a request's length hold anything (never attended).
        queries: ``[R, M, H * G, d]`` the step's queries, at each request's last ``M`` positions.
        lens: ``[R]`` int64 resident tokens per request.
        scale: softmax scale.
    """

    keys: torch.Tensor
    queries: torch.Tensor
    lens: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        r, n, h, d = self.keys.shape
        assert self.queries.dim() == 4 and self.queries.shape[0] == r and self.queries.shape[2] % h == 0, \
            (tuple(self.keys.shape), tuple(self.queries.shape))

    @property
    def num_queries(self) -> int:
        """``M``: queries per request in this step (1: a decode step)."""
        return self.queries.shape[1]

    def positions(self, last: int | None = None) -> torch.Tensor:
        """``[R, m]`` int64 positions of each request's last ``m = min(last, M)`` queries."""
        m = self.num_queries if last is None else min(last, self.num_queries)
        return self.lens.long()[:, None] - m + torch.arange(m, device=self.lens.device)

    def attention(self, last: int | None = None) -> torch.Tensor:
        """``[R, H, G, m, N]`` float32 softmax attention of each request's last ``m = min(last, M)``
        queries over its resident tokens: causal, exactly 0 past each query's position."""
        r, n, h, d = self.keys.shape
        m = self.num_queries if last is None else min(last, self.num_queries)
        q = self.queries[:, self.num_queries - m:].float()  # [R, m, H*G, d]
        q = q.view(r, m, h, -1, d)  # [R, m, H, G, d]
        logits = torch.einsum("rmhgd,rnhd->rhgmn", q, self.keys.float()) * self.scale  # [R, H, G, m, N]
        # a query sees positions up to its own: this masks the rows past each length as well
        hidden = torch.arange(n, device=self.keys.device)[None, None, :] > self.positions(last)[:, :, None]  # [R, m, N]
        return torch.softmax(logits.masked_fill(hidden[:, None, None], float("-inf")), -1)
