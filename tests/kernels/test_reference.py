"""The pure-torch reference on the paged layout, against naive unpaged float64 attention."""

import math

import pytest
import torch

from paged_case import RTOL, make_case, naive_attention, naive_subset_attention, rel_err
from vllm_sparse.kernels import reference as R
from vllm_sparse.kernels.selectors import SelectParams

P = SelectParams.create  # the selection settings by name

GQA = [(4, 4), (6, 2), (8, 2), (16, 2)]  # group sizes 1, 3, 4, 8
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("block_size, page_size", [(16, 16), (16, 4), (128, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_stores_rows_and_exact_page_min_max(block_size, page_size, dtype):
    case = make_case([1, 37, 130, 16], 4, 2, 64, block_size, page_size, dtype, chunks=3)
    c, ps = case.cache, page_size
    for b, n in enumerate(case.seq_lens.tolist()):
        pos = torch.arange(n)
        blk = case.block_table[b, pos // block_size].long()
        assert torch.equal(c.key_cache[blk, pos % block_size], case.keys[b])
        assert torch.equal(c.value_cache[blk, pos % block_size], case.values[b])
        for p in range(-(-n // ps)):
            rows = case.keys[b][p * ps : min(n, (p + 1) * ps)]
            blk_p = case.block_table[b, p * ps // block_size]
            page_in_blk = (p * ps % block_size) // ps
            assert torch.equal(c.key_min[blk_p, page_in_blk], rows.amin(0))
            assert torch.equal(c.key_max[blk_p, page_in_blk], rows.amax(0))


def test_write_kv_ignores_negative_slots():
    case = make_case([20], 2, 2, 64, 16, 16, torch.float32, spare_blocks=2)
    before = case.cache.key_cache.clone()
    R.write_kv(torch.randn(4, 2, 64), torch.randn(4, 2, 64), torch.tensor([-1, -1, -5, -1]), case.cache)
    assert torch.equal(before.nan_to_num(7.0), case.cache.key_cache.nan_to_num(7.0))


@pytest.mark.parametrize("num_heads, num_kv_heads", GQA)
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 128])
def test_paged_attention_matches_naive_unpaged(num_heads, num_kv_heads, head_size, dtype, block_size):
    lens = [1, 45, 17, 300]
    q_lens = [1, 45, 5, 64]  # decode, full prefill, chunked prefill chunks
    case = make_case(lens, num_heads, num_kv_heads, head_size, block_size, 16, dtype)
    qsl = torch.tensor([0] + q_lens).cumsum(0)
    query = torch.randn(int(qsl[-1]), num_heads, head_size).to(dtype)
    scale = head_size**-0.5
    out = R.paged_attention(query, case.cache, case.block_table, case.seq_lens, qsl, scale)
    assert out.dtype == dtype and bool(out.isfinite().all())
    for b, (n, ql) in enumerate(zip(lens, q_lens)):
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        ref = naive_attention(query[rows], case.keys[b], case.values[b], torch.arange(n - ql, n), scale)
        assert rel_err(out[rows], ref) < RTOL[dtype]


@pytest.mark.parametrize("num_heads, num_kv_heads", GQA)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_decode_matches_naive(num_heads, num_kv_heads, dtype):
    lens = [33, 1, 200, 129]
    case = make_case(lens, num_heads, num_kv_heads, 64, 16, 8, dtype)
    q = torch.randn(len(lens), num_heads, 64).to(dtype)
    out = R.dense_decode(q, case.cache, case.block_table, case.seq_lens, 0.125)
    for b, n in enumerate(lens):
        ref = naive_attention(q[b : b + 1], case.keys[b], case.values[b], torch.tensor([n - 1]), 0.125)[0]
        assert rel_err(out[b], ref) < RTOL[dtype]


SELECT = [("token", "kv_head"), ("token", "query_head"), ("page", "kv_head"), ("page", "query_head"),
          ("quest", "kv_head"), ("quest", "query_head")]


@pytest.mark.parametrize("selection, granularity", SELECT)
@pytest.mark.parametrize("num_heads, num_kv_heads", GQA)
@pytest.mark.parametrize("block_size, page_size", [(16, 16), (16, 8), (128, 16)])
def test_sparse_decode_equals_dense_when_budget_covers_context(selection, granularity, num_heads, num_kv_heads,
                                                               block_size, page_size):
    lens = [1, 70, 250, 33]
    case = make_case(lens, num_heads, num_kv_heads, 64, block_size, page_size, torch.float32)
    q = torch.randn(len(lens), num_heads, 64)
    dense = R.dense_decode(q, case.cache, case.block_table, case.seq_lens, 0.125)
    attended = case.seq_lens + torch.tensor([0, 5, 1000, 0])  # budget >= context
    sparse = R.sparse_decode(q, case.cache, case.block_table, case.seq_lens, attended, 0.125, P(sink_tokens=4, local_window=8, selection=selection, granularity=granularity))
    assert rel_err(sparse, dense) < 1e-5


def _scores(case, q, b, scale, granularity):
    """float64 selection scores of request b: [S, n] (max over the query group for kv_head)."""
    k = case.keys[b].double()  # [n, Hkv, D]
    g = case.num_heads // case.num_kv_heads
    logits = torch.einsum("hd,nhd->hn", q[b].double(), k.repeat_interleave(g, 1)) * scale
    return logits.view(case.num_kv_heads, g, -1).amax(1) if granularity == "kv_head" else logits


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
@pytest.mark.parametrize("num_heads, num_kv_heads", GQA)
def test_token_selection_is_sinks_window_and_exact_top_scores(granularity, num_heads, num_kv_heads):
    lens = [500, 77, 300]
    sink, window = 4, 16
    case = make_case(lens, num_heads, num_kv_heads, 64, 16, 16, torch.float32)
    q = torch.randn(len(lens), num_heads, 64)
    attended = torch.tensor([100, 77, 40])
    idx = R.select_topk(q, case.cache, case.block_table, case.seq_lens, attended, 0.125, P(sink_tokens=sink, local_window=window, selection="token", granularity=granularity))
    assert idx.shape == (3, num_kv_heads if granularity == "kv_head" else num_heads, 100)
    for b, n in enumerate(lens):
        scores = _scores(case, q, b, 0.125, granularity)
        for s in range(idx.shape[1]):
            row = idx[b, s]
            sel = row[row >= 0]
            assert sel.numel() == min(attended[b].item(), n) and bool((row[sel.numel():] == -1).all())
            assert bool((sel[1:] > sel[:-1]).all()) and int(sel.max()) < n
            forced = set(range(sink)) | set(range(n - window, n))
            assert forced <= set(sel.tolist())  # sinks and window always kept
            middle = torch.tensor(sorted(set(range(n)) - forced), dtype=torch.long)
            chosen = torch.tensor(sorted(set(sel.tolist()) - forced), dtype=torch.long)
            if chosen.numel() and chosen.numel() < middle.numel():
                rest = middle[~torch.isin(middle, chosen)]
                assert scores[s, chosen].min() >= scores[s, rest].max()  # exactly the top scores


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_sparse_attention_is_attention_over_the_selected_set(granularity):
    lens = [400, 150]
    case = make_case(lens, 12, 4, 64, 16, 16, torch.float16)
    q = torch.randn(2, 12, 64).to(torch.float16)
    attended = torch.tensor([64, 100])
    idx = R.select_topk(q, case.cache, case.block_table, case.seq_lens, attended, 0.125, P(sink_tokens=4, local_window=16, selection="token", granularity=granularity))
    out = R.sparse_attention(q, case.cache, case.block_table, idx, 0.125)
    for b in range(2):
        ref = naive_subset_attention(q[b], case.keys[b], case.values[b], idx[b], 0.125)
        assert rel_err(out[b], ref) < RTOL[torch.float16]


def test_page_selection_keeps_whole_pages_worth_of_candidates_and_matches_token_mode_when_all_pages_fit():
    lens = [640, 200]
    case = make_case(lens, 8, 2, 64, 16, 16, torch.float32)
    q = torch.randn(2, 8, 64)
    attended = torch.tensor([80, 80])
    tok = R.select_topk(q, case.cache, case.block_table, case.seq_lens, attended, 0.125, P(sink_tokens=4, local_window=16, selection="token"))
    # enough candidates to cover every page: the two-stage result is the exact top-k
    page_all = R.select_topk(q, case.cache, case.block_table, case.seq_lens, attended, 0.125, P(sink_tokens=4, local_window=16, selection="page", candidate_factor=64.0))
    assert torch.equal(tok, page_all)
    # the page upper bound really bounds every token score in its page
    kmin, kmax = case.cache.gather_page_summaries(case.block_table, 40)  # [B, P, Hkv, D]
    qg = q[0].view(2, 4, 64)  # [Hkv, G, D]
    exact = torch.einsum("hgd,nhd->hgn", qg, case.keys[0]).view(2, 4, 40, 16)
    ub = torch.maximum(torch.einsum("hgd,phd->hgpd", qg, kmin[0]), torch.einsum("hgd,phd->hgpd", qg, kmax[0])).sum(-1)
    assert bool((exact <= ub[..., None] + 1e-4).all())
    # with few candidates: every selected token lies in one of the best pages (or sink/window pages)
    few = R.select_topk(q, case.cache, case.block_table, case.seq_lens, attended, 0.125, P(sink_tokens=4, local_window=16, selection="page", candidate_factor=1.0))
    assert (few[0] >= 0).sum(-1).tolist() == [80, 80]
    n_cand = math.ceil(80 / 16) + 1 + 1  # budget pages + sink page + window page
    for s in range(2):
        pages = set((few[0, s][few[0, s] >= 0] // 16).tolist())
        assert len(pages) <= n_cand


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(6, 2), (8, 2)])
def test_quest_selection_is_every_token_of_the_best_pages(granularity, num_heads, num_kv_heads):
    lens = [700, 130, 45]
    ps, sink, window = 16, 4, 20
    case = make_case(lens, num_heads, num_kv_heads, 64, 16, ps, torch.float32)
    q = torch.randn(len(lens), num_heads, 64)
    attended = torch.tensor([100, 40, 45])  # request 1: forced pages (sink + window) exceed the budget
    idx = R.select_topk(q, case.cache, case.block_table, case.seq_lens, attended, 0.125, P(sink_tokens=sink, local_window=window, selection="quest", granularity=granularity))
    assert idx.shape[-1] <= P(selection="quest", sink_tokens=sink, local_window=window).index_capacity(100, ps)
    g = num_heads // num_kv_heads
    for b, n in enumerate(lens):
        n_pages = -(-n // ps)
        forced = {0} | set(range(max(n - window, 0) // ps, n_pages))
        n_sel = min(n_pages, max(-(-int(attended[b]) // ps), len(forced)))
        # float64 page upper bound of every page: the max over the page's exact min/max per dimension
        keys = torch.nn.functional.pad(case.keys[b].double(), (0, 0, 0, 0, 0, n_pages * ps - n), value=float("nan"))
        pages = keys.view(n_pages, ps, num_kv_heads, 64)
        kmin, kmax = pages.nan_to_num(float("inf")).amin(1), pages.nan_to_num(float("-inf")).amax(1)  # [P, Hkv, D]
        qh = q[b].double().view(num_kv_heads, g, 64)
        ub = (qh.clamp_min(0) @ kmax.permute(1, 2, 0) + qh.clamp_max(0) @ kmin.permute(1, 2, 0)) * 0.125  # [Hkv,G,P]
        ub = ub.amax(1) if granularity == "kv_head" else ub.flatten(0, 1)
        for s in range(idx.shape[1]):
            row = idx[b, s]
            sel = row[row >= 0]
            assert bool((sel[1:] > sel[:-1]).all()) and bool((row[sel.numel():] == -1).all())
            chosen = set((sel // ps).tolist())
            assert sel.tolist() == [t for t in range(n) if t // ps in chosen]  # whole pages, nothing past n
            assert forced <= chosen and len(chosen) == n_sel
            free = sorted(set(range(n_pages)) - chosen)
            picked = sorted(chosen - forced)
            if picked and free:
                assert ub[s, picked].min() >= ub[s, free].max() - 1e-9  # exactly the best pages
    out = R.sparse_decode(q, case.cache, case.block_table, case.seq_lens, attended, 0.125, P(sink_tokens=sink, local_window=window, selection="quest", granularity=granularity))
    for b in range(len(lens)):
        ref = naive_subset_attention(q[b], case.keys[b], case.values[b], idx[b], 0.125)
        assert rel_err(out[b], ref) < RTOL[torch.float32]


def test_mixed_length_batch_equals_one_request_at_a_time():
    lens = [1000, 3, 257, 64, 130]
    case = make_case(lens, 9, 3, 64, 16, 16, torch.float32)
    q = torch.randn(len(lens), 9, 64)
    attended = torch.tensor([128, 128, 100, 128, 50])
    for sel in ("token", "page", "quest"):
        batched = R.sparse_decode(q, case.cache, case.block_table, case.seq_lens, attended, 0.125, P(sink_tokens=4, local_window=16, selection=sel))
        for b in range(len(lens)):
            one = R.sparse_decode(q[b : b + 1], case.cache, case.block_table[b : b + 1], case.seq_lens[b : b + 1], attended[b : b + 1], 0.125, P(sink_tokens=4, local_window=16, selection=sel))
            assert rel_err(batched[b], one[0]) < 1e-5


def test_query_head_granularity_with_group_one_equals_kv_head():
    case = make_case([300, 90], 4, 4, 128, 16, 16, torch.float32)
    q = torch.randn(2, 4, 128)
    att = torch.tensor([50, 50])
    a = R.select_topk(q, case.cache, case.block_table, case.seq_lens, att, 0.1, P(sink_tokens=2, local_window=8, selection="token", granularity="kv_head"))
    b = R.select_topk(q, case.cache, case.block_table, case.seq_lens, att, 0.1, P(sink_tokens=2, local_window=8, selection="token", granularity="query_head"))
    assert torch.equal(a, b)


def test_sparse_error_is_small_when_attention_concentrates():
    """Not a tautology check: a real top-k subset of a peaked distribution approximates dense attention."""
    case = make_case([2000], 8, 2, 64, 16, 16, torch.float32)
    keys = case.keys[0]
    q = 4.0 * keys[1234].repeat_interleave(4, 0)[None] + 0.1 * torch.randn(1, 8, 64)  # peaked on one key
    dense = R.dense_decode(q, case.cache, case.block_table, case.seq_lens, 0.125)
    sparse = R.sparse_decode(q, case.cache, case.block_table, case.seq_lens, torch.tensor([64]), 0.125, P(sink_tokens=4, local_window=16))
    window_only = R.sparse_decode(q, case.cache, case.block_table, case.seq_lens, torch.tensor([20]), 0.125, P(sink_tokens=4, local_window=16))
    assert rel_err(sparse, dense) < 0.05 < rel_err(window_only, dense)


def test_recent_selection_is_sinks_plus_most_recent_tokens():
    case = make_case([300, 50], 8, 2, 64, 16, 16, torch.float32)
    q = torch.randn(2, 8, 64)
    idx = R.select_topk(q, case.cache, case.block_table, case.seq_lens, torch.tensor([40, 100]), 0.125, P(sink_tokens=4, local_window=16, selection="recent"))
    assert idx[0, 0].tolist() == list(range(4)) + list(range(264, 300)) + [-1] * 10
    assert idx[1, 1, :50].tolist() == list(range(50)) and bool((idx[1, :, 50:] == -1).all())


@pytest.mark.parametrize("selection", ["token", "page", "quest"])
def test_strided_cache_takes_the_general_path_and_agrees(selection):
    """A layer-interleaved (non-contiguous) cache has no page_rows fast path; results must not change."""
    from vllm_sparse.kernels import PagedKVCache

    case = make_case([300, 77], 6, 2, 64, 16, 16, torch.float32)
    raw = case.cache.slots.unflatten(2, (-1, 128))  # [NB, H, N, 2D]
    assert case.cache.slot_rows is not None
    interleaved = torch.full((raw.shape[0], 2, *raw.shape[1:]), float("nan"))
    interleaved[:, 1] = raw
    strided = PagedKVCache.from_raw(interleaved[:, 1], 2, 16)
    assert strided.slot_rows is None
    q = torch.randn(2, 6, 64)
    att = torch.tensor([64, 40])
    args = (case.block_table, case.seq_lens, att, 0.125)
    kw = dict(params=P(sink_tokens=4, local_window=16, selection=selection, candidate_factor=2.0))
    assert torch.equal(R.select_topk(q, case.cache, *args, **kw), R.select_topk(q, strided, *args, **kw))
    assert rel_err(R.sparse_decode(q, strided, *args, **kw), R.sparse_decode(q, case.cache, *args, **kw)) < 1e-6
    assert rel_err(R.dense_decode(q, strided, case.block_table, case.seq_lens, 0.125),
                   R.dense_decode(q, case.cache, case.block_table, case.seq_lens, 0.125)) < 1e-6
