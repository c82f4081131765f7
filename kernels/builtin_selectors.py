"""The built-in selectors (:mod:`.selectors`): ``token``, ``page``, ``quest``, ``exact_pages``,
``dense`` and ``recent``, registered on import (``vllm_sparse.kernels`` imports this module).

Each implements the torch reference (:meth:`~.selectors.Selector.pages`, from :mod:`.ranking`) and
reaches its Triton kernels through the selector's hooks (:meth:`~.selectors.Selector.pages_triton`,
:meth:`~.selectors.Selector.page_scores_triton`, from :mod:`.triton_ranking`, imported on first use:
importing this module needs no Triton).
"""

from __future__ import annotations

from . import ranking
from .selection import candidate_capacity, candidate_pages, recent_positions
from .selectors import SelectInputs, Selector, register_selector

__all__ = ["Token", "Page", "Quest", "ExactPages", "Dense", "Recent", "BUILTIN_SELECTORS"]


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
        return ranking.candidate_pages(x)

    def pages_triton(self, x):
        from .triton_ranking import page_scores_triton

        p, ps = x.params, x.cache.page_size
        ub = page_scores_triton(x.query, x.cache, x.block_table, x.seq_lens, x.scale, p, num_pages=x.num_pages)
        c_cap = candidate_capacity(x.num_pages, x.capacity, ps, p.sink_tokens, p.local_window, p.candidate_factor)
        return candidate_pages(ub, x.seq_lens, x.count, ps, p.sink_tokens, p.local_window, p.candidate_factor, c_cap)


class _RankedPages(Selector):
    """Whole pages cut from per-page scores (:meth:`page_scores_triton`) on the Triton path."""

    whole_pages = True

    def pages_triton(self, x):
        from .triton_ranking import ranked_pages_triton

        scores, cand = self.page_scores_triton(x)
        val, top = scores.topk(min(x.max_pages, scores.shape[-1]), dim=-1)
        return ranked_pages_triton(val, top, x.seq_lens, x.count, x.cache.page_size, x.params, cand=cand)


class Quest(_RankedPages):
    """Quest (Tang et al., ICML 2024): the best ``max(ceil(count / page_size), forced)`` pages by
    the min/max bound (:func:`.ranking.quest_bound`), attended whole. Reads no key to select."""

    name = "quest"
    cpu_fused = True

    def pages(self, x):
        return ranking.candidate_pages(x, quest=True)

    def page_scores_triton(self, x):
        from .triton_ranking import page_scores_triton

        return page_scores_triton(x.query, x.cache, x.block_table, x.seq_lens, x.scale, x.params,
                                  num_pages=x.num_pages), None

    def cpu_candidate_factor(self, candidate_factor):
        return 1.0


class ExactPages(_RankedPages):
    """Quest's page count, chosen among ``candidate_factor ×`` as many bound-ranked candidates by
    each page's exact max ``q·k`` (or over the ``rescore_dims`` dims of largest ``|q|`` × key range);
    whole pages (:func:`.ranking.exact_pages`)."""

    name = "exact_pages"
    cpu_fused = True

    def pages(self, x):
        return ranking.exact_pages(x)

    def page_scores_triton(self, x):
        from .triton_ranking import exact_page_scores

        return exact_page_scores(x)

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

    def positions(self, x: SelectInputs, width: int):
        b, s = x.seq_lens.shape[0], x.heads.numel()
        return recent_positions(x.seq_lens, x.count, x.sink_tokens, width)[:, None, :].expand(b, s, width)


BUILTIN_SELECTORS = (Token, Page, Quest, ExactPages, Recent, Dense)

for _cls in BUILTIN_SELECTORS:
    register_selector(_cls)
