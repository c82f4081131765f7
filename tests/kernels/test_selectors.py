"""Selectors by name: the registry, its errors, and a third-party selector on every decode path."""

import os

import pytest
import torch

from paged_case import make_case, naive_subset_attention, rel_err
from vllm_sparse.kernels import ops
from vllm_sparse.kernels import reference as R
from vllm_sparse.kernels import selectors as S
from vllm_sparse.kernels.builtin_selectors import BUILTIN_SELECTORS
from vllm_sparse.kernels.selectors import (SelectParams, Selector, available_selectors, get_selector,
                                           register_selector)

P = SelectParams.create  # the selection settings by name

DEV = "cuda" if torch.cuda.is_available() else "cpu"
#: CPU tensors take the Triton kernels through the interpreter (tests/kernels/conftest.py)
TRITON = dict(force_triton=True) if DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else None


@pytest.fixture
def registered():
    """Register selector classes for one test; the registry is restored afterwards."""
    added = []

    def add(cls):
        register_selector(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        S._REGISTRY.unregister(name)


class OldestPages(Selector):
    """Whole pages, oldest first (after the forced sink/window pages): easy to check by hand."""

    name = "oldest_pages_for_test"
    whole_pages = True

    def pages(self, x):
        pages = x.all_pages()
        return x.best_pages(pages, -pages.float())


class EvenPageTokens(Selector):
    """Token-level: the even pages (and the forced ones) are candidates, then exact top-k of their tokens."""

    name = "even_page_tokens_for_test"

    def pages(self, x):
        pages = x.all_pages()
        return torch.where((pages % 2 == 0) | x.forced_pages(pages), pages, -1)


def test_builtin_selectors_are_registered_by_name():
    names = available_selectors()
    assert {"token", "page", "quest", "exact_pages", "recent", "dense"} <= set(names)
    assert [get_selector(c.name).name for c in BUILTIN_SELECTORS] == [c.name for c in BUILTIN_SELECTORS]
    assert get_selector("quest").whole_pages and get_selector("quest").cpu_fused
    assert get_selector("recent").by_position and not get_selector("token").whole_pages


def test_unknown_or_malformed_selectors_are_refused_by_name():
    with pytest.raises(ValueError, match=r"selection='block'; allowed: \[.*'exact_pages'.*'token'"):
        get_selector("block")
    with pytest.raises(TypeError, match="Selector subclass"):
        register_selector(int)

    class Nameless(Selector):
        pass

    with pytest.raises(TypeError, match="non-empty `name`"):
        register_selector(Nameless)

    class Both(Selector):
        name = "both_for_test"
        whole_pages = by_position = True

    with pytest.raises(TypeError, match="exclude each other"):
        register_selector(Both)
    assert "both_for_test" not in available_selectors()


def test_select_params_refuse_bad_settings_by_name():
    with pytest.raises(ValueError, match=r"selection='block'; allowed: \[.*'token'"):
        P(selection="block")
    with pytest.raises(ValueError, match=r"granularity='layer'; allowed: \['kv_head', 'query_head'\]"):
        P(granularity="layer")
    params = P("exact_pages", "query_head", sink_tokens=4, local_window=8, candidate_factor=3, rescore_dims=12)
    assert params.selector is get_selector("exact_pages") and params.per_query_head
    assert params.granularity == "query_head" and params.candidate_factor == 3.0
    assert params.heads(6, 2).tolist() == [0, 0, 0, 1, 1, 1] and params.num_rows(6, 2) == 6
    assert P().heads(6, 2).tolist() == [0, 1] and P().num_rows(6, 2) == 2
    assert params.index_capacity(100, 16) == 112 and P().index_capacity(100, 16) == 100


def _case():
    # 16-token pages; request 0: 100 tokens = pages 0..6 (6 partial); request 1: 40 tokens
    c = make_case([100, 40], 4, 2, 32, 16, 16, torch.float32, device=DEV)
    q = torch.randn(2, 4, 32, device=DEV)
    return c, q


def test_third_party_whole_page_selector_keeps_the_pages_it_chooses(registered):
    """sink 4 → page 0 forced; window 8 at n=100 → pages 5, 6 forced; budget 80 → 5 pages: the
    two oldest others (1, 2). Request 1 (n=40, budget 40): every token."""
    registered(OldestPages)
    c, q = _case()
    attended = torch.tensor([80, 40], device=DEV)
    kw = dict(params=P(sink_tokens=4, local_window=8, selection=OldestPages.name))
    want = list(range(0, 48)) + list(range(80, 100))
    paths = {"reference": R.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.2, **kw)}
    if TRITON is not None:
        paths["triton"] = ops.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.2, **kw,
                                          capacity=P(selection=OldestPages.name, sink_tokens=4, local_window=8).index_capacity(80, 16), **TRITON)
    for path, idx in paths.items():
        for h in range(2):
            row0, row1 = idx[0, h], idx[1, h]
            assert row0[row0 >= 0].tolist() == want, path
            assert row1[row1 >= 0].tolist() == list(range(40)), path
    # the fused decode of the reference = attention over exactly that set (float64 oracle)
    out = R.sparse_decode(q, c.cache, c.block_table, c.seq_lens, attended, 0.2, **kw)
    ref = naive_subset_attention(q[0], c.keys[0], c.values[0], paths["reference"][0], 0.2)
    assert rel_err(out[0], ref) < 1e-5


def test_third_party_token_selector_takes_exact_top_k_among_its_candidates(registered):
    registered(EvenPageTokens)
    c, q = _case()
    attended = torch.tensor([30, 12], device=DEV)
    kw = dict(params=P(sink_tokens=4, local_window=8, selection=EvenPageTokens.name))
    idx = R.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.2, **kw)
    for b, n in enumerate((100, 40)):
        k = c.keys[b].float()  # [n, Hkv, D]
        for h in range(2):
            row = idx[b, h][idx[b, h] >= 0]
            assert len(row) == int(attended[b])
            forced = [p for p in range(n) if p < 4 or p >= n - 8]
            assert set(forced) <= set(row.tolist())
            forced_pages = {p // 16 for p in forced}
            cand = [p for p in range(n) if ((p // 16) % 2 == 0 or p // 16 in forced_pages) and p not in forced]
            score = (q[b, 2 * h : 2 * h + 2].float() @ k[cand, h].T).amax(0)  # max over the GQA group
            best = [cand[i] for i in score.topk(int(attended[b]) - len(forced)).indices.tolist()]
            assert sorted(set(row.tolist()) - set(forced)) == sorted(best)
    if TRITON is not None:
        ours = ops.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.2, **kw, capacity=64, **TRITON)
        for b in range(2):
            for h in range(2):
                assert set(ours[b, h][ours[b, h] >= 0].tolist()) == set(idx[b, h][idx[b, h] >= 0].tolist())
