"""``scissorhands``: evict the tokens that have seldom been important; a third-party eviction policy.

After Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV
Cache Compression at Test Time" (NeurIPS 2023): a token that drew a large share of attention once
tends to draw it again. Each token keeps one number, the count of queries that paid it at least a
uniform share of their attention (``1 / tokens the query sees``, the query's attention averaged
over the KV head's group); tokens with the lowest counts are evicted first.

Complete in this one file and registered through the package's ``vllm_sparse.policies`` entry
point. With ``--additional-config '{"vllm_sparse": {"evict": "scissorhands", "evict_args":
{"keep": 1024}}}'`` vLLM's workers keep the count of every resident token in the request's own KV
blocks (``keeps_token_state``), update it every step with :meth:`Scissorhands.update_state`, and,
before a block leaves the recent window, keep the tokens with the highest counts (:meth:`score`)
in a fixed region of blocks; the other blocks go back to vLLM's pool while the request runs.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from vllm_sparse.policies import AttentionStep, Policy, TokenState


@dataclasses.dataclass(frozen=True)
class Scissorhands(Policy):
    name: ClassVar[str] = "scissorhands"
    frees_blocks: ClassVar[bool] = True
    evicts_by_score: ClassVar[bool] = True
    keeps_token_state: ClassVar[bool] = True  # per token: how many queries found it important
    new_token_state: ClassVar[float] = 0.0
    needs: ClassVar[tuple[str, ...]] = ("stored",)

    def score(self, state: TokenState) -> torch.Tensor:
        return state.stored.float()  # [H, n]

    def update_state(self, stored: torch.Tensor | None, step: AttentionStep) -> torch.Tensor:
        attn = step.attention().mean(2)  # [R, H, m, N] each query's attention, averaged over the group
        seen = (step.positions() + 1).float()  # [R, m] tokens each query sees
        important = (attn >= 1.0 / seen[:, None, :, None]).sum(2).float()  # [R, H, N]
        return important if stored is None else stored + important
