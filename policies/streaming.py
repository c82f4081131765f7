"""``streaming``: the attention sinks plus the most recent tokens (StreamingLLM).

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024).
No score but position. **Frees KV blocks** (``evict: "streaming"``): everything between the
sink block and the recent tail returns to vLLM's pool while the request runs
(:mod:`vllm_sparse.eviction`). Positions are not re-assigned inside the cache (the original
keeps RoPE positions within the cache); a mid-context needle is lost by design.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .policy import Policy, TokenState


@dataclasses.dataclass(frozen=True)
class Streaming(Policy):
    name: ClassVar[str] = "streaming"
    selection: ClassVar[str | None] = "recent"
    frees_blocks: ClassVar[bool] = True

    def score(self, state: TokenState) -> torch.Tensor:
        return torch.arange(state.n, dtype=torch.float32).expand(state.num_kv_heads, -1)
