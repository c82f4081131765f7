"""``keydiff``: keep the tokens whose keys are least similar to the request's average key.

Paper: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments" (2025). Query-free: score = −cos(k, mean k).
An example of a third-party policy: one file, registered through the ``vllm_sparse.policies``
entry point in this package's ``pyproject.toml``. Reference scorer only (no vLLM kernel):
``vllm_sparse.policies.get_policy_class("keydiff")`` finds it once the package is installed.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from vllm_sparse.policies import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class KeyDiff(Policy):
    name: ClassVar[str] = "keydiff"

    def score(self, state: TokenState) -> torch.Tensor:
        k = state.keys.float()  # [n, H, d]
        anchor = k.mean(0, keepdim=True)
        return -torch.nn.functional.cosine_similarity(k, anchor, dim=-1).T  # [H, n]
