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

from .policy import Policy
from .state import AttentionStep, TokenState


@dataclasses.dataclass(frozen=True)
class TOVA(Policy):
    name: ClassVar[str] = "tova"
    frees_blocks: ClassVar[bool] = True
    evicts_by_score: ClassVar[bool] = True
    keeps_token_state: ClassVar[bool] = True  # the latest query's attention
    needs: ClassVar[tuple[str, ...]] = ()  # the query, or the stored last attention

    def score(self, state: TokenState) -> torch.Tensor:
        if state.stored is not None:  # kept by the workers at the last step
            return state.stored.float()
        state.require(self.name, "query")
        return self.update_state(None, state.step(state.query[None]))[0]

    def update_state(self, stored: torch.Tensor | None, step: AttentionStep) -> torch.Tensor:
        """The step's last query's softmax attention, averaged over each KV head's group, ``[R, H, N]``
        (it replaces the state)."""
        return step.attention(last=1)[:, :, :, 0].mean(2)
