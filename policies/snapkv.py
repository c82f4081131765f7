"""``snapkv``: at the end of the prompt, keep the prefix tokens the last prompt queries attend to.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2024). The
last ``window`` prompt queries (the observation window, always kept) vote: their softmax
attention over the earlier tokens, summed over the window and the KV head's query group, then
average-pooled along the sequence (``kernel`` tokens) so neighbours of a hit survive with it.
Schedule ``prefill_end``: chosen once, then kept for the whole generation (an eviction policy:
the plugin does not free blocks with it yet — compaction of scored tokens is future work).
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
    needs: ClassVar[tuple[str, ...]] = ("window_queries",)

    kernel: int = 7

    def __post_init__(self):
        super().__post_init__()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"vllm_sparse policy_args.kernel={self.kernel!r}; allowed: an odd integer >= 1")

    def score(self, state: TokenState) -> torch.Tensor:
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
