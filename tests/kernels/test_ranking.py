"""The torch page ranking (``kernels/ranking.py``): Quest's bound, the bound-ranked candidates, and
``exact_pages``' rescoring, checked against direct computations over the gathered keys."""

import math

import torch

from paged_case import make_case
from vllm_sparse.kernels import ranking
from vllm_sparse.kernels.selectors import SelectInputs, SelectParams


def test_quest_bound_bounds_every_key_of_its_page_and_is_reached_by_a_corner():
    g, d, p, ps = 3, 16, 5, 8
    q = torch.randn(2, g, d, dtype=torch.float64)
    keys = torch.randn(2, p, ps, d, dtype=torch.float64)
    kmin, kmax = keys.amin(2).transpose(-1, -2), keys.amax(2).transpose(-1, -2)  # [2, D, P]
    ub = ranking.quest_bound(q, kmin, kmax)  # [2, G, P]
    exact = torch.einsum("bgd,bptd->bgpt", q, keys).amax(-1)
    assert bool((exact <= ub + 1e-12).all())
    corner = torch.where(q[..., None] >= 0, kmax[:, None], kmin[:, None])  # [2, G, D, P]: the bound's key
    assert torch.allclose((q[..., None] * corner).sum(2), ub)


def _inputs(params, lens=(700, 300), attended=(96, 64), num_heads=6, num_kv_heads=2):
    c = make_case(list(lens), num_heads, num_kv_heads, 32, 16, 16, torch.float32)
    q = torch.randn(len(lens), num_heads, 32)
    return c, SelectInputs.build(q, c.cache, c.block_table, c.seq_lens, torch.tensor(attended), 0.2, params)


def _page_max_qk(c, x):
    """[B, S, P] exact max over each page's tokens and the query group of q·k (-inf past the end)."""
    pages = x.all_pages()
    k, _ = c.cache.gather_pages(c.block_table, pages, x.heads)  # [B, S, P * ps, D]
    b, s = pages.shape[:2]
    q = x.query.float().view(b, s, -1, x.query.shape[-1])
    logits = torch.matmul(q, k.float().transpose(-1, -2)).amax(2)  # [B, S, P * ps]
    pos = torch.arange(logits.shape[-1])
    logits = logits.masked_fill(pos >= x.seq_lens[:, None, None], -math.inf)
    return logits.view(b, s, pages.shape[-1], -1).amax(-1)


def test_exact_pages_with_every_page_a_candidate_keeps_the_best_exact_pages():
    params = SelectParams.create("exact_pages", sink_tokens=4, local_window=16, candidate_factor=1000.0)
    c, x = _inputs(params)
    got = ranking.exact_pages(x)
    want = x.best_pages(x.all_pages(), _page_max_qk(c, x))
    for b in range(got.shape[0]):
        for s in range(got.shape[1]):
            assert set(got[b, s][got[b, s] >= 0].tolist()) == set(want[b, s][want[b, s] >= 0].tolist())
    n_pages = x.whole_page_count()
    assert ((got >= 0).sum(-1) == n_pages[:, None]).all()


def test_candidates_are_the_best_by_the_bound_with_sink_and_window_forced():
    params = SelectParams.create("page", sink_tokens=4, local_window=16, candidate_factor=1.0)
    c, x = _inputs(params)
    pages = ranking.candidate_pages(x, quest=True)
    heads = x.heads
    kmin, kmax = c.cache.gather_page_bounds(c.block_table, -(-int(x.seq_lens.max()) // 16), heads)
    for b, n in enumerate(x.seq_lens.tolist()):
        num = -(-n // 16)
        q = x.query[b].float().view(len(heads), -1, 32)
        ub = ranking.quest_bound(q, kmin[b, :, :num].transpose(-1, -2), kmax[b, :, :num].transpose(-1, -2)).amax(1)
        for s in range(len(heads)):
            chosen = set(pages[b, s][pages[b, s] >= 0].tolist())
            forced = {0} | set(range((n - 16) // 16, num))
            assert forced <= chosen
            free = [p for p in range(num) if p not in chosen]
            picked = sorted(chosen - forced)
            if picked and free:
                assert ub[s, picked].min() >= ub[s, free].max() - 1e-6


def test_refresh_keeps_prior_pages_in_the_running():
    params = SelectParams.create("exact_pages", sink_tokens=4, local_window=16, candidate_factor=1.0)
    c, x = _inputs(params)
    exact = _page_max_qk(c, x)
    # the prior pages: each row's best page by exact score outside the sink and window
    masked = exact.masked_fill(x.forced_pages(x.all_pages()), -math.inf)
    prior = masked.argmax(-1, keepdim=True)
    got = ranking.refresh_pages(x.query, c.cache, c.block_table, c.seq_lens, torch.tensor([96, 64]), prior,
                                params)
    assert bool((got == prior).any(-1).all())  # a prior page that is the best is kept, whatever its bound
