"""``snapkv``: keep the prompt tokens the last prompt queries attend to.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2024). The
last ``window`` prompt queries (the observation window, always kept) vote: their softmax
attention over the earlier tokens, summed over the window and the KV head's query group, then
average-pooled along the sequence (``kernel`` tokens) so neighbours of a hit survive with it.
Schedule ``prefill_end``: the prompt is scored once, by its own last queries; generated tokens
are all kept.

**Frees KV blocks** (``evict: "snapkv"``, ``evict_args: {"keep": N, "window": 32, "kernel": 7}``),
chunk-wise: a prompt longer than the KV pool cannot wait for its end to be scored, so after every
prefill chunk the chunk's last ``window`` queries re-vote over the request's resident tokens and
the votes replace the per-token state kept in the tokens' own KV blocks; blocks leaving the recent
window then compete with the kept region by those votes (:mod:`vllm_sparse.eviction`). After the
last chunk this is SnapKV's rule over what is still resident (exactly SnapKV when the prompt is
one chunk). Decode steps do not vote; generated tokens start at ``+inf``, so they are kept, as
SnapKV keeps them, and displace the lowest-voted prompt tokens from the region once they leave the
window.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from .policy import Policy
from .state import AttentionStep, TokenState


@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
    name: ClassVar[str] = "snapkv"
    schedule: ClassVar[str] = "prefill_end"
    frees_blocks: ClassVar[bool] = True
    evicts_by_score: ClassVar[bool] = True
    keeps_token_state: ClassVar[bool] = True  # the latest observation window's pooled votes
    new_token_state: ClassVar[float] = float("inf")
    needs: ClassVar[tuple[str, ...]] = ("window_queries",)

    #: observation window: the last prompt queries that vote (SnapKV's default 32)
    window: int = 32
    #: average-pooling width along the sequence (odd; SnapKV's default 7)
    kernel: int = 7

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"vllm_sparse policy_args.kernel={self.kernel!r}; allowed: an odd integer >= 1")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"vllm_sparse policy_args.window={self.window!r}; allowed: an integer >= 1")

    def votes(self, step: AttentionStep, window: int) -> torch.Tensor:
        """``[R, H, N]`` pooled votes of each request's last ``window`` queries (causal); the
        observation window itself gets ``+inf``. Exact where ``N`` is the request's length (the
        workers pass each prefill chunk alone): the pooling reads zero votes past a length."""
        votes = step.attention(last=window).sum((2, 3))  # [R, H, N]
        r, h, n = votes.shape
        pooled = F.avg_pool1d(votes.reshape(r * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2,
                              count_include_pad=False).view(r, h, n)
        observed = step.positions(window)[:, :1]  # [R, 1] the window's first position
        in_window = torch.arange(n, device=votes.device)[None, :] >= observed  # [R, N]
        return pooled.masked_fill(in_window[:, None], float("inf"))  # the observation window itself is kept

    def update_state(self, stored: torch.Tensor | None, step: AttentionStep) -> torch.Tensor | None:
        """After a prefill chunk (more than one query): the votes of its last ``window`` queries
        replace the state. Decode steps do not vote (``None``: the state stays)."""
        if step.num_queries < 2:
            return None
        return self.votes(step, self.window)

    def score(self, state: TokenState) -> torch.Tensor:
        if state.stored is not None:  # the workers' stored votes (eviction)
            return state.stored.float()
        state.require(self.name, "window_queries")
        wq = state.window_queries
        return self.votes(state.step(wq), wq.shape[0])[0]
