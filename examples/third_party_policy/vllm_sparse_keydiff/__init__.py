"""``keydiff``: keep the tokens whose keys are least similar to the request's average key.

Paper: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments" (2025). Query-free: score = −cos(k, mean k).

An example of a third-party selection policy, complete in this one file and registered through
the ``vllm_sparse.policies`` entry point in this package's ``pyproject.toml``. It writes only its
score: ``pages_by_score`` makes vllm-sparse build its decode selector from that score and register
it with the policy (each decode step attends the whole pages whose best token scores highest, as
many pages as Quest's rule gives the budget, sink and window pages always in). That selector reads
every key of the request each step (a torch reference, no kernel): an example, not a fast path.

With the package installed, ``--additional-config '{"vllm_sparse": {"policy": "keydiff"}}'``
serves with it. The same package's :mod:`.scissorhands` is a third-party *eviction* policy.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from vllm_sparse.policies import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class KeyDiff(Policy):
    name: ClassVar[str] = "keydiff"
    pages_by_score: ClassVar[bool] = True

    def score(self, state: TokenState) -> torch.Tensor:
        k = state.keys.float()  # [n, H, d]
        anchor = k.mean(0, keepdim=True)
        return -torch.nn.functional.cosine_similarity(k, anchor, dim=-1).T  # [H, n]
