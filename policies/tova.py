"""``tova``: token omission via attention — drop the tokens the current query attends least.

Paper: Oren et al., "Transformers are Multi-State RNNs" (2024), TOVA. Score: the current query's
softmax attention to each token, averaged over the KV head's query group. Applied every step, a
cache at its budget drops exactly its lowest-scored token(s). An eviction policy; the plugin
does not free blocks with it yet (compaction of scored tokens is future work).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .policy import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class TOVA(Policy):
    name: ClassVar[str] = "tova"
    needs: ClassVar[tuple[str, ...]] = ("query",)

    def score(self, state: TokenState) -> torch.Tensor:
        return torch.softmax(state.logits(state.query[None])[:, :, 0], -1).mean(1)
