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

from .policy import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
    name: ClassVar[str] = "snapkv"
    schedule: ClassVar[str] = "prefill_end"
    frees_blocks: ClassVar[bool] = True
    evicts_by_score: ClassVar[bool] = True
    token_state: ClassVar[str | None] = "snap_votes"
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

    def votes(self, state: TokenState) -> torch.Tensor:
        """``[H, n]`` pooled votes of ``state.window_queries`` (the last ``w`` positions, causal);
        the observation window itself gets ``+inf``."""
        wq = state.window_queries
        w, n = wq.shape[0], state.n
        logits = state.logits(wq)  # [H, G, w, n]
        qpos = torch.arange(n - w, n)[:, None]
        logits = logits.masked_fill(torch.arange(n)[None, :] > qpos, float("-inf"))  # causal
        votes = torch.softmax(logits, -1).sum((1, 2))  # [H, n]
        pooled = F.avg_pool1d(votes[:, None], self.kernel, stride=1, padding=self.kernel // 2,
                              count_include_pad=False)[:, 0]
        pooled[:, n - w:] = float("inf")  # the observation window itself is kept
        return pooled

    def score(self, state: TokenState) -> torch.Tensor:
        if state.snap_votes is not None:  # the workers' stored votes (eviction)
            return state.snap_votes.float()
        state.require(self.name, "window_queries")
        return self.votes(state)
