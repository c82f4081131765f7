"""Selection bookkeeping (``kernels/selection.py``): the forced pages, page counts, index widths, compacted
tables, the selection rows' KV heads, StreamingLLM's positions and the rescored dims."""

import pytest
import torch

from vllm_sparse.kernels.selection import (compact_pages, forced_page_mask, forced_page_range, index_capacity,
                                           max_forced_pages, page_counts, quest_attended, recent_positions,
                                           rescore_dims_mask, row_kv_heads, scored_key_range)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("page_size, sink, window", [(16, 4, 64), (32, 0, 1), (16, 33, 0), (32, 4, 70)])
def test_forced_pages_are_the_sink_and_window_pages_within_their_bound(page_size, sink, window):
    seq = torch.randint(1, 3000, (200,))
    seq[:3] = torch.tensor([1, page_size, page_size + 1])
    lo, hi = forced_page_range(seq, page_size, sink, window)
    num_pages = (seq + page_size - 1) // page_size
    page = torch.arange(int(num_pages.max()))
    mask = forced_page_mask(page.expand(len(seq), -1), seq, page_size, sink, window)
    for b, n in enumerate(seq.tolist()):
        pos = torch.arange(n)
        want = set(((pos < sink) | (pos >= n - window)).nonzero().flatten().div(page_size, rounding_mode="floor")
                   .tolist())
        if window > 0:
            assert set(mask[b].nonzero().flatten().tolist()) == want
        assert int(lo[b]) == min(-(-sink // page_size), int(num_pages[b]))
    n_forced = mask.sum(1)
    assert int(n_forced.max()) <= max_forced_pages(page_size, sink, window)
    # Quest's count: at least the budget's pages and the forced ones, never more than the request has
    count = torch.randint(0, 4000, seq.shape)
    quest = page_counts(seq, torch.minimum(count, seq), page_size, sink, window, 1.0, quest=True)
    budget_pages = (torch.minimum(count, seq) + page_size - 1) // page_size
    if window > 0:
        assert bool((quest >= torch.minimum(torch.maximum(budget_pages, n_forced), num_pages)).all())
    assert bool((quest <= num_pages).all())
    # what the whole-page kernels read: its pages, the last one partial
    att = quest_attended(seq, count, page_size, sink, window)
    assert bool((att <= seq).all()) and bool((att > (quest - 1) * page_size).all())
    assert bool((att <= quest * page_size).all())


def test_index_capacity_holds_any_whole_page_row():
    ps, sink, window = 16, 4, 40
    for max_count in (0, 1, 15, 16, 17, 300):
        assert index_capacity(False, max_count, ps, sink, window) == max_count
        cap = index_capacity(True, max_count, ps, sink, window)
        assert cap % ps == 0 and cap >= max_count and cap >= ps * max_forced_pages(ps, sink, window)
        seq = torch.arange(1, 2000)
        pages = page_counts(seq, torch.full_like(seq, max_count).minimum(seq), ps, sink, window, 1.0, quest=True)
        assert int(pages.max()) * ps <= cap


def test_compact_pages_orders_pages_and_counts_the_partial_one_once():
    bt = torch.tensor([[7, 3, 9, 4], [5, 8, 1, 2]], device=DEV)
    seq = torch.tensor([100, 64], device=DEV)  # 4 pages (the last holds 4 tokens); 2 pages, both whole
    pages = torch.tensor([[[3, -1, 0], [2, 1, -1]], [[1, 0, -1], [-1, 1, -1]]], device=DEV)
    tables, lens = compact_pages(pages, bt, seq, 32)
    assert tables[0, 0, :2].tolist() == [7, 4] and tables[0, 1, :2].tolist() == [3, 9]
    assert tables[1, 0, :2].tolist() == [5, 8] and tables[1, 1, 0].item() == 8
    assert lens.tolist() == [[32 + 4, 64], [64, 32]]


def test_selection_rows_read_their_kv_heads():
    assert row_kv_heads(2, 6, 2).tolist() == [0, 1]  # one set per KV head
    assert row_kv_heads(6, 6, 2).tolist() == [0, 0, 0, 1, 1, 1]  # one per query head, GQA 3
    assert row_kv_heads(4, 4, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="expected num_kv_heads=2 or num_heads=6"):
        row_kv_heads(3, 6, 2)


def test_recent_positions_are_the_sinks_then_the_newest():
    seq, count = torch.tensor([100, 10, 30]), torch.tensor([20, 10, 3])
    pos = recent_positions(seq, count, 4, 24)
    assert pos[0].tolist() == [0, 1, 2, 3] + list(range(84, 100)) + [-1] * 4
    assert pos[1].tolist() == list(range(10)) + [-1] * 14  # budget covers the request
    assert pos[2].tolist() == [0, 1, 2] + [-1] * 21  # fewer than the sinks: the first ones


def test_rescore_dims_weigh_the_key_range_not_the_query_alone():
    """``rescore_dims`` keeps the dims of largest ``Σ|q|`` × key range over the scored pages: a dim
    where the query is huge but every key holds the same value moves no page's rank, so it is
    dropped for one where the keys differ; sink and window pages do not count toward the range,
    and a row with no other page falls back to ``|q|``."""
    b, s, g, d, p, ps = 2, 2, 3, 16, 10, 32
    q = torch.rand(b, s, g, d) + 0.5  # fresh, never zero
    q[..., 0] = 50.0  # the largest |q| ...
    kmin = torch.randn(b, s, p, d) - 2.0
    kmax = kmin + torch.rand(b, s, p, d) + 0.1
    kmin[..., 0] = kmax[..., 0] = 3.0  # ... over keys that never vary
    kmin[:, :, 0, 0], kmax[:, :, 0, 0] = -100.0, 100.0  # a sink page's spread does not count
    seq = torch.tensor([p * ps, p * ps])
    key_range = scored_key_range(kmin, kmax, seq, ps, 4, 64)
    assert torch.equal(key_range, kmax[:, :, 1:8].amax(2) - kmin[:, :, 1:8].amin(2))  # not sink, not window
    keep = rescore_dims_mask(q, key_range, 4)
    assert keep.sum(-1).eq(4).all() and not keep[..., 0].any()
    w = q.abs().sum(2) * key_range
    want = torch.zeros_like(keep).scatter_(-1, w.topk(4, dim=-1).indices, True)
    assert torch.equal(keep, want)
    # only sink and window pages: range 1, so |q| decides and dim 0 is back
    short_range = scored_key_range(kmin, kmax, torch.tensor([60, 64]), ps, 4, 64)
    assert torch.equal(short_range, torch.ones_like(short_range))
    assert rescore_dims_mask(q, short_range, 4)[..., 0].all()
    # 0 or >= head_size: every dim
    assert rescore_dims_mask(q, key_range, 0).all() and rescore_dims_mask(q, key_range, d).all()
