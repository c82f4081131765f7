"""Selectors: how a sparse decode step chooses each head's tokens, registered by name.

Every decode path (the torch reference :func:`.reference.select_topk` /
:func:`.reference.sparse_decode`, the Triton path :func:`.triton_select.select_topk_triton`, the
fused CPU path in ``vllm_sparse.cpu_attention``) runs the same pipeline per (request, selection
head), and a selector fills in its first stage:

1. **candidates** — :meth:`Selector.pages`: which pages may hold the kept tokens (``[B, S, C]``
   page ids, ``-1`` padded). The sink and window pages are always among them.
2. then either every token of those pages is attended (``whole_pages``: Quest's rule, no key is
   scored twice), or the candidates' tokens are scored by exact ``q·k`` (max over the query
   group) and the best ``count`` are kept, sinks and window forced (shared code).

Selectors that need no scores (``by_position``, StreamingLLM's sinks + recent tokens) give the
positions directly (:meth:`Selector.positions`).

Built in: ``token`` (every page a candidate: exact top-k of all keys), ``page`` (Quest's bound
ranks ``candidate_factor ×`` the pages the budget needs, then exact token top-k), ``quest``
(Quest: the best pages by bound, whole), ``exact_pages`` (the default: Quest's page count,
chosen among ``candidate_factor ×`` as many bound-ranked pages by their exact max ``q·k``),
``recent`` and ``dense`` (every page). A policy names its selector in its ``selection`` class
attribute; the config's ``selection`` setting picks the selector of ``q·k``-scored policies
(``ntopk``, ``topk``).

Third-party selectors: subclass :class:`Selector`, implement :meth:`~Selector.pages` (a torch
reference, which also runs on CUDA tensors) and register it — with :func:`register_selector` in
the module that defines the policy using it, or through the ``vllm_sparse.selectors``
entry-point group. A new selector runs on the reference and Triton paths; the fused CPU path
serves only the whole-page selectors its C++ kernel implements (:attr:`Selector.cpu_fused`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .layout import PagedKVCache
from .registry import Registry
from .selection import forced_page_mask, page_counts, recent_positions, topk_rows

__all__ = [
    "SelectInputs",
    "Selector",
    "register_selector",
    "get_selector",
    "available_selectors",
    "BUILTIN_SELECTORS",
]


@dataclasses.dataclass(frozen=True)
class SelectInputs:
    """What a selector may read in one decode step (device tensors; host ints for shapes).

    Attributes:
        query: ``[B, num_heads, head_size]``, the step's query (position ``seq_lens[b] - 1``).
        cache, block_table: the paged cache and ``[B, max_blocks]`` block table.
        seq_lens: ``[B]`` int context lengths.
        count: ``[B]`` int64 tokens each head keeps, ``min(attended, seq_lens)``.
        heads: ``[S]`` the KV head each selection head reads (``granularity``).
        max_seq_len: host bound ``>= max(seq_lens)``.
        capacity: host width of the step's index rows (the Triton path's buffer; the reference
            passes its own bound).
    """

    query: torch.Tensor
    cache: PagedKVCache
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    count: torch.Tensor
    scale: float
    sink_tokens: int
    local_window: int
    granularity: str
    heads: torch.Tensor
    candidate_factor: float
    rescore_dims: int
    max_seq_len: int
    capacity: int

    @property
    def num_pages(self) -> int:
        """Host bound of the pages of any request of the step."""
        return -(-self.max_seq_len // self.cache.page_size)

    def whole_page_count(self) -> torch.Tensor:
        """``[B]`` pages a whole-page selector attends: ``max(ceil(count / page_size), forced pages)``."""
        return page_counts(self.seq_lens.long(), self.count, self.cache.page_size, self.sink_tokens,
                           self.local_window, 1.0, quest=True)

    def forced_pages(self, pages: torch.Tensor) -> torch.Tensor:
        """``[B, S, C]`` bool: which of ``pages`` (``-1`` padded) hold a sink or window token."""
        return forced_page_mask(pages, self.seq_lens, self.cache.page_size, self.sink_tokens, self.local_window)

    def best_pages(self, pages: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The :meth:`whole_page_count` best of ``pages`` ``[B, S, C]`` by ``scores`` (higher first,
        sink/window pages always in) -> ``[B, S, W]`` page ids, ``-1`` padded."""
        n_pages = self.whole_page_count()
        ranked = scores.float().masked_fill(self.forced_pages(pages), math.inf).masked_fill(pages < 0, -math.inf)
        top, keep = topk_rows(ranked, n_pages, int(n_pages.max()))
        return torch.where(keep, pages.gather(-1, top), -1)

    def all_pages(self) -> torch.Tensor:
        """``[B, S, P]`` every page of each request, ``-1`` past its length."""
        b, s, ps = self.seq_lens.shape[0], self.heads.numel(), self.cache.page_size
        num_pages = (self.seq_lens + ps - 1) // ps
        pages = torch.arange(int(num_pages.max()), device=self.query.device).expand(b, s, -1)
        return torch.where(pages < num_pages[:, None, None], pages, -1)


class Selector:
    """Base class of a selector; subclasses set ``name`` and implement :meth:`pages` (or
    :meth:`positions` when ``by_position``).

    Class attributes:
        name: registry name (the ``selection`` setting).
        whole_pages: attend every token of the chosen pages (no token-level top-k); the kept
            count rounds up to whole pages (:func:`.selection.quest_attended`).
        by_position: choose by position alone (no scores, no keys read).
        cpu_fused: the fused CPU decode (``vllm_sparse.cpu_attention``: page ranking + exact
            rescoring in C++, vLLM's op over the chosen pages) implements this selector; see
            :meth:`cpu_candidate_factor`. Others run the torch reference on CPU.
    """

    name: ClassVar[str] = ""
    whole_pages: ClassVar[bool] = False
    by_position: ClassVar[bool] = False
    cpu_fused: ClassVar[bool] = False

    def pages(self, x: SelectInputs) -> torch.Tensor:
        """Candidate pages, ``[B, S, C]`` page ids, ``-1`` padded (the torch reference)."""
        raise NotImplementedError(f"selector {self.name!r} implements neither pages() nor positions()")

    def pages_triton(self, x: SelectInputs) -> torch.Tensor | None:
        """The same on the Triton path; ``None``: every position is a candidate (scored in one
        pass without a page list). Defaults to :meth:`pages` (torch ops on the device)."""
        return self.pages(x)

    def positions(self, x: SelectInputs, width: int) -> torch.Tensor:
        """``by_position`` selectors: ``[B, S, width]`` ascending positions, ``-1`` padded."""
        raise NotImplementedError

    def cpu_candidate_factor(self, candidate_factor: float) -> float:
        """The fused CPU kernel's candidate factor for this selector (1 = Quest's rule)."""
        raise NotImplementedError(f"selector {self.name!r} has no fused CPU path")

    def __repr__(self) -> str:
        return f"<selector {self.name!r}>"


class Token(Selector):
    """Exact ``q·k`` of every key, top ``count`` per head (reads every key)."""

    name = "token"

    def pages(self, x):
        return x.all_pages()

    def pages_triton(self, x):
        return None


class Page(Selector):
    """Quest's bound ranks ``ceil(candidate_factor · count / page_size)`` candidate pages (plus the
    sink/window pages), then exact top-``count`` of their tokens."""

    name = "page"

    def pages(self, x):
        from .reference import _candidate_pages

        return _candidate_pages(x.query.float(), x.cache, x.block_table, x.seq_lens, x.count, x.heads, x.scale,
                                x.sink_tokens, x.local_window, x.candidate_factor)

    def pages_triton(self, x):
        from .selection import candidate_capacity, candidate_pages
        from .triton_select import page_scores_triton

        ps = x.cache.page_size
        ub = page_scores_triton(x.query, x.cache, x.block_table, x.seq_lens, x.scale, x.sink_tokens, x.local_window,
                                x.granularity, num_pages=x.num_pages)
        c_cap = candidate_capacity(x.num_pages, x.capacity, ps, x.sink_tokens, x.local_window, x.candidate_factor)
        return candidate_pages(ub, x.seq_lens, x.count, ps, x.sink_tokens, x.local_window, x.candidate_factor, c_cap)


class Quest(Selector):
    """Quest (Tang et al., ICML 2024): the best ``max(ceil(count / page_size), forced)`` pages by
    the min/max bound, attended whole. Reads no key to select."""

    name = "quest"
    whole_pages = True
    cpu_fused = True

    def pages(self, x):
        from .reference import _candidate_pages

        return _candidate_pages(x.query.float(), x.cache, x.block_table, x.seq_lens, x.count, x.heads, x.scale,
                                x.sink_tokens, x.local_window, x.candidate_factor, quest=True)

    def pages_triton(self, x):
        from .triton_select import page_scores_triton, ranked_pages_triton

        ub = page_scores_triton(x.query, x.cache, x.block_table, x.seq_lens, x.scale, x.sink_tokens, x.local_window,
                                x.granularity, num_pages=x.num_pages)
        val, top = ub.topk(min(_max_pages(x), ub.shape[-1]), dim=-1)
        return ranked_pages_triton(val, top, x.seq_lens, x.count, x.cache.page_size, x.sink_tokens, x.local_window)

    def cpu_candidate_factor(self, candidate_factor):
        return 1.0


class ExactPages(Selector):
    """Quest's page count, chosen among ``candidate_factor ×`` as many bound-ranked candidates by
    each page's exact max ``q·k`` (or over the ``rescore_dims`` dims of largest ``|q|`` × key range); whole pages."""

    name = "exact_pages"
    whole_pages = True
    cpu_fused = True

    def pages(self, x):
        from .reference import _exact_pages

        return _exact_pages(x.query, x.cache, x.block_table, x.seq_lens, x.count, x.heads, x.scale, x.sink_tokens,
                            x.local_window, x.candidate_factor, x.rescore_dims)

    def pages_triton(self, x):
        from .triton_select import exact_pages_triton

        return exact_pages_triton(x.query, x.cache, x.block_table, x.seq_lens, x.count, x.scale, x.sink_tokens,
                                  x.local_window, x.granularity, x.candidate_factor, x.rescore_dims, _max_pages(x),
                                  x.max_seq_len)

    def cpu_candidate_factor(self, candidate_factor):
        return candidate_factor


class Dense(Selector):
    """Every page, whole: exact attention through the sparse path (``policy: "dense"``)."""

    name = "dense"
    whole_pages = True

    def pages(self, x):
        return x.all_pages()


class Recent(Selector):
    """StreamingLLM's rule at the same budget: the sinks, then the most recent tokens (no scores)."""

    name = "recent"
    by_position = True

    def positions(self, x, width):
        b, s = x.seq_lens.shape[0], x.heads.numel()
        return recent_positions(x.seq_lens, x.count, x.sink_tokens, width)[:, None, :].expand(b, s, width)


def _max_pages(x: SelectInputs) -> int:
    """Pages a whole-page row may hold: the index width in pages (at least one)."""
    return max(1, min(x.num_pages, x.capacity // x.cache.page_size))


BUILTIN_SELECTORS = (Token, Page, Quest, ExactPages, Recent, Dense)


def _check_selector(cls: type[Selector]) -> None:
    if cls.whole_pages and cls.by_position:
        raise TypeError(f"selector {cls.name!r}: whole_pages and by_position exclude each other")


_REGISTRY: Registry[Selector] = Registry("vllm_sparse.selectors", Selector, "selector", "selection",
                                         make=lambda cls: cls(), check=_check_selector)


def register_selector(cls: type[Selector]) -> type[Selector]:
    """Register a :class:`Selector` subclass under ``cls.name`` (usable as a decorator)."""
    return _REGISTRY.register(cls)


for _cls in BUILTIN_SELECTORS:
    register_selector(_cls)


def available_selectors() -> list[str]:
    """Every registered selector name: built-in and installed third-party."""
    return _REGISTRY.names()


def get_selector(name: str) -> Selector:
    """The registered selector called ``name``; ``ValueError`` naming the allowed ones otherwise."""
    return _REGISTRY.get(name)
