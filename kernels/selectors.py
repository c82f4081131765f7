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

The settings travel as one frozen :class:`SelectParams` (the selector already resolved), and a
step's tensors as :class:`SelectInputs`.

Built in: ``token`` (every page a candidate: exact top-k of all keys), ``page`` (Quest's bound
ranks ``candidate_factor ×`` the pages the budget needs, then exact token top-k), ``quest``
(Quest: the best pages by bound, whole), ``exact_pages`` (the default: Quest's page count,
chosen among ``candidate_factor ×`` as many bound-ranked pages by their exact max ``q·k``),
``recent`` and ``dense`` (every page), in :mod:`.builtin_selectors`. A policy names its selector in its ``selection`` class
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
from .selection import GRANULARITIES, forced_page_mask, index_capacity, page_counts, topk_rows

__all__ = [
    "SelectParams",
    "SelectInputs",
    "Selector",
    "register_selector",
    "get_selector",
    "available_selectors",
]


@dataclasses.dataclass(frozen=True)
class SelectParams:
    """How a sparse decode step selects: one frozen object, built once (from ``SparseConfig``,
    ``vllm_sparse.config``, or :meth:`create`) and passed down every path in place of loose settings.

    Attributes:
        selector: the registered :class:`Selector`, already resolved (no path looks one up by name).
        per_query_head: one selected set per query head (``granularity="query_head"``) instead of
            one per KV head shared by its query group (``"kv_head"``, the score being the group's max).
        sink_tokens: the first positions, always attended.
        local_window: the most recent positions, always attended.
        candidate_factor: candidate pages per budget page for the selectors that rescore (``page``,
            ``exact_pages``).
        rescore_dims: ``exact_pages`` rescores with the ``q·k`` of this many dims (``0``: all).
    """

    selector: "Selector"
    per_query_head: bool = False
    sink_tokens: int = 0
    local_window: int = 0
    candidate_factor: float = 4.0
    rescore_dims: int = 0

    @classmethod
    def create(cls, selection: str = "token", granularity: str = "kv_head", sink_tokens: int = 0,
               local_window: int = 0, candidate_factor: float = 4.0, rescore_dims: int = 0) -> "SelectParams":
        """From the settings' names (``selection``: a registered selector; ``granularity``: one of
        :data:`GRANULARITIES`); ``ValueError`` naming the allowed values otherwise."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"vllm_sparse granularity={granularity!r}; allowed: {list(GRANULARITIES)}")
        return cls(get_selector(selection), granularity == "query_head", sink_tokens, local_window,
                   float(candidate_factor), rescore_dims)

    @property
    def granularity(self) -> str:
        return "query_head" if self.per_query_head else "kv_head"

    def num_rows(self, num_heads: int, num_kv_heads: int) -> int:
        """Selection heads ``S``: one selected set each."""
        return num_heads if self.per_query_head else num_kv_heads

    def heads(self, num_heads: int, num_kv_heads: int, device=None) -> torch.Tensor:
        """``[S]`` the KV head each selection head reads (query head ``h`` reads KV head
        ``h // (num_heads // num_kv_heads)``)."""
        if self.per_query_head:
            return torch.arange(num_heads, device=device) // (num_heads // num_kv_heads)
        return torch.arange(num_kv_heads, device=device)

    def index_capacity(self, max_count: int, page_size: int) -> int:
        """Host-side width of an index row that holds any selection of at most ``max_count`` tokens
        (:func:`.selection.index_capacity`)."""
        return index_capacity(self.selector.whole_pages, max_count, page_size, self.sink_tokens, self.local_window)


@dataclasses.dataclass(frozen=True)
class SelectInputs:
    """What a selector may read in one decode step (device tensors; host ints for shapes).

    Attributes:
        query: ``[B, num_heads, head_size]``, the step's query (position ``seq_lens[b] - 1``).
        cache, block_table: the paged cache and ``[B, max_blocks]`` block table.
        seq_lens: ``[B]`` int context lengths.
        count: ``[B]`` int64 tokens each head keeps, ``min(attended, seq_lens)``.
        scale: the softmax scale.
        params: the step's :class:`SelectParams`.
        heads: ``[S]`` the KV head each selection head reads (:meth:`SelectParams.heads`).
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
    params: SelectParams
    heads: torch.Tensor
    max_seq_len: int
    capacity: int

    @classmethod
    def build(cls, query: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
              attended: torch.Tensor, scale: float, params: SelectParams, max_seq_len: int | None = None,
              capacity: int | None = None) -> "SelectInputs":
        """The step's inputs; ``max_seq_len`` / ``capacity`` ``None``: read from the tensors (a sync on CUDA)."""
        seq_lens = seq_lens.long()
        count = torch.minimum(attended.long(), seq_lens)
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
        if capacity is None:
            capacity = params.index_capacity(int(count.max()) if count.numel() else 0, cache.page_size)
        heads = params.heads(query.shape[1], cache.num_kv_heads, query.device)
        return cls(query, cache, block_table, seq_lens, count, scale, params, heads, max(max_seq_len, 1), capacity)

    # the settings, for selectors' convenience
    @property
    def sink_tokens(self) -> int:
        return self.params.sink_tokens

    @property
    def local_window(self) -> int:
        return self.params.local_window

    @property
    def candidate_factor(self) -> float:
        return self.params.candidate_factor

    @property
    def rescore_dims(self) -> int:
        return self.params.rescore_dims

    @property
    def num_pages(self) -> int:
        """Host bound of the pages of any request of the step."""
        return -(-self.max_seq_len // self.cache.page_size)

    @property
    def max_pages(self) -> int:
        """Pages a whole-page row may hold: the index width in pages (at least one)."""
        return max(1, min(self.num_pages, self.capacity // self.cache.page_size))

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

    def page_scores_triton(self, x: SelectInputs) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Whole-page selectors whose last stage keeps the best-scored pages (:meth:`SelectInputs.best_pages`'
        rule) may return those scores here, ``(scores [B, S, C], pages [B, S, C] or None)`` (``None``:
        column ``c`` is page ``c``; ``+inf`` forced, ``-inf`` no page). The Triton path then cuts each row
        and builds its compacted block table in one launch. ``None`` (the default): it takes
        :meth:`pages_triton`."""
        return None

    def positions(self, x: SelectInputs, width: int) -> torch.Tensor:
        """``by_position`` selectors: ``[B, S, width]`` ascending positions, ``-1`` padded."""
        raise NotImplementedError

    def cpu_candidate_factor(self, candidate_factor: float) -> float:
        """The fused CPU kernel's candidate factor for this selector (1 = Quest's rule)."""
        raise NotImplementedError(f"selector {self.name!r} has no fused CPU path")

    def __repr__(self) -> str:
        return f"<selector {self.name!r}>"


def _check_selector(cls: type[Selector]) -> None:
    if cls.whole_pages and cls.by_position:
        raise TypeError(f"selector {cls.name!r}: whole_pages and by_position exclude each other")


_REGISTRY: Registry[Selector] = Registry("vllm_sparse.selectors", Selector, "selector", "selection",
                                         make=lambda cls: cls(), check=_check_selector)


def register_selector(cls: type[Selector]) -> type[Selector]:
    """Register a :class:`Selector` subclass under ``cls.name`` (usable as a decorator)."""
    return _REGISTRY.register(cls)


def available_selectors() -> list[str]:
    """Every registered selector name: built-in and installed third-party."""
    return _REGISTRY.names()


def get_selector(name: str) -> Selector:
    """The registered selector called ``name``; ``ValueError`` naming the allowed ones otherwise."""
    return _REGISTRY.get(name)
