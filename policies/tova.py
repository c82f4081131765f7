"""``tova``: token omission via attention — drop the tokens the current query attends least.

Paper: Oren et al., "Transformers are Multi-State RNNs" (2024), TOVA. Score: the current query's
softmax attention to each token, averaged over the KV head's query group. Applied every step, a
cache at its budget drops exactly its lowest-scored token(s). **Frees KV blocks** (``evict:
"tova"``): the latest query's attention to every resident token is kept per token in its own KV
block (like H2O's sum, but replaced each step instead of added to), and a block leaving the
recent window competes with the kept region by it (:mod:`vllm_sparse.eviction`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .policy import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class TOVA(Policy):
    name: ClassVar[str] = "tova"
    frees_blocks: ClassVar[bool] = True
    evicts_by_score: ClassVar[bool] = True
    token_state: ClassVar[str | None] = "last_attention"
    needs: ClassVar[tuple[str, ...]] = ()  # the query, or the stored last attention

    def score(self, state: TokenState) -> torch.Tensor:
        if state.last_attention is not None:  # stored by the workers at the last step
            return state.last_attention.float()
        state.require(self.name, "query")
        return self.attention(state)

    @staticmethod
    def attention(state: TokenState) -> torch.Tensor:
        """``[H, n]`` the current query's softmax attention, averaged over each KV head's group."""
        return torch.softmax(state.logits(state.query[None])[:, :, 0], -1).mean(1)
