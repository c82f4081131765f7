"""``knorm``: keep the tokens whose keys have the *lowest* L2 norm; needs no attention weights.

Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(EMNLP 2024): keys with a low norm draw high attention. Query-free, so it can be scored when a
token is written. An eviction policy; the plugin does not free blocks with it yet (compaction of
scored tokens is future work).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .policy import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class KNorm(Policy):
    name: ClassVar[str] = "knorm"

    def score(self, state: TokenState) -> torch.Tensor:
        return -state.keys.float().norm(dim=-1).T  # [H, n]
