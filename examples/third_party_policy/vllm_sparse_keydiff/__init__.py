"""``keydiff``: keep the tokens whose keys are least similar to the request's average key.

Paper: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments" (2025). Query-free: score = −cos(k, mean k).

An example of a third-party policy, complete in this one file and registered through the
``vllm_sparse.policies`` entry point in this package's ``pyproject.toml``:

* :class:`KeyDiff` — the policy: its reference scorer (``policy.keep(TokenState(...))``, the
  oracle) and the name of the selector that runs it inside vLLM;
* :class:`KeyDiffPages` — that selector (registered when this module is imported, which the
  entry point does): each decode step attends the whole pages whose best token scores highest,
  as many pages as Quest's rule gives the budget, sink and window pages always in. It reads
  every key of the request (a torch reference, no kernel): an example, not a fast path.

With the package installed, ``--additional-config '{"vllm_sparse": {"policy": "keydiff"}}'``
serves with it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from vllm_sparse.kernels.selection import page_positions
from vllm_sparse.kernels.selectors import SelectInputs, Selector, register_selector
from vllm_sparse.policies import Policy, TokenState


@register_selector
class KeyDiffPages(Selector):
    name = "keydiff"
    whole_pages = True

    def pages(self, x: SelectInputs) -> torch.Tensor:
        pages = x.all_pages()  # [B, S, P]
        b, s, p = pages.shape
        pos = page_positions(pages, x.cache.page_size)
        valid = (pos >= 0) & (pos < x.seq_lens.long()[:, None, None])
        k, _ = x.cache.gather_pages(x.block_table, pages, x.heads)  # [B, S, P * page_size, D]
        k = torch.where(valid[..., None], k.float(), 0.0)  # rows past the length may hold anything
        anchor = k.sum(2, keepdim=True) / valid.sum(-1).clamp_min(1)[:, :, None, None]
        score = -torch.nn.functional.cosine_similarity(k, anchor, dim=-1).masked_fill(~valid, float("-inf"))
        return x.best_pages(pages, score.view(b, s, p, -1).amax(-1))


@dataclasses.dataclass(frozen=True)
class KeyDiff(Policy):
    name: ClassVar[str] = "keydiff"
    selection: ClassVar[str | None] = KeyDiffPages.name

    def score(self, state: TokenState) -> torch.Tensor:
        k = state.keys.float()  # [n, H, d]
        anchor = k.mean(0, keepdim=True)
        return -torch.nn.functional.cosine_similarity(k, anchor, dim=-1).T  # [H, n]
