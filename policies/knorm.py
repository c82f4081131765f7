"""``knorm``: keep the tokens whose keys have the *lowest* L2 norm; needs no attention weights.

Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(EMNLP 2024): keys with a low norm draw high attention. Query-free, so it can be scored when a
token is written. **Frees KV blocks** (``evict: "knorm"``): each request keeps its sink block, a
fixed region of the lowest-norm tokens seen so far and the recent window; before a block leaves
the window the workers merge its tokens into the region by key norm, per KV head
(:mod:`vllm_sparse.eviction`), and the scheduler frees it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .policy import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class KNorm(Policy):
    name: ClassVar[str] = "knorm"
    frees_blocks: ClassVar[bool] = True
    evicts_by_score: ClassVar[bool] = True

    def score(self, state: TokenState) -> torch.Tensor:
        return -state.keys.float().norm(dim=-1).T  # [H, n]
