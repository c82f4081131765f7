"""Every Triton kernel, through the :mod:`vllm_sparse.kernels.ops` dispatch, against :mod:`.reference`.

With a GPU the kernels run natively on CUDA tensors; without one they run on CPU tensors
under the Triton interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py`` and again
here before the kernels are imported). Interpreted cost grows with programs × ops, so the
shapes are small; the ``gpu`` tests at the end use realistic ones.

Inputs are fresh random draws every run, caches and outputs NaN-poisoned, errors relative
to the float32 reference, top-k compared as sets (both sides are sorted, ``-1`` padded).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from paged_case import make_case, random_indices, random_pages  # noqa: E402
from vllm_sparse.kernels import PagedKVCache, ops  # noqa: E402
from vllm_sparse.kernels import reference as R  # noqa: E402
from vllm_sparse.kernels.selection import compact_pages, page_positions, quest_attended  # noqa: E402
from vllm_sparse.kernels.selectors import SelectParams  # noqa: E402

P = SelectParams.create  # the selection settings by name

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # vs the float32 reference
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FORCE = dict(force_triton=True)  # CPU tensors -> interpreted kernels (CUDA tensors take them anyway)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern (NaN payloads included) for exact comparisons."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def case(lens, num_heads, num_kv_heads, head_size, block_size, page_size, dtype, **kw):
    return make_case(lens, num_heads, num_kv_heads, head_size, block_size, page_size, dtype, device=DEV, **kw)


# --------------------------------------------------------------------------------------
# write_kv
# --------------------------------------------------------------------------------------
INTERPRETED = not CUDA
bf16_cast = pytest.mark.skipif(INTERPRETED, reason="the Triton interpreter truncates fp32->bf16 casts (GPU: RNE)")


@pytest.mark.parametrize(
    "dtype, block_size, page_size, key_dtype, head_size",
    [(F16, 16, 4, F16, 64), (F16, 32, 32, F16, 64), (F16, 16, 1, F16, 64), (F32, 32, 8, F32, 128),
     (BF16, 16, 16, BF16, 128),
     (F16, 16, 8, F32, 64),  # fp32 rows cast into an fp16 cache
     pytest.param(BF16, 32, 16, F32, 64, marks=bf16_cast)],
)
def test_write_kv_is_bit_exact(dtype, block_size, page_size, key_dtype, head_size):
    hkv, d, nb = 3, head_size, 24  # H*D = 3*64: not a power of two
    raw_ref = torch.full(PagedKVCache.raw_shape(nb, block_size, hkv, d, page_size), float("nan"), dtype=dtype,
                         device=DEV)
    raw_tri = raw_ref.clone()
    c_ref = PagedKVCache.from_raw(raw_ref, hkv, page_size)
    c_tri = PagedKVCache.from_raw(raw_tri, hkv, page_size)
    steps = [[1, 20, 33, 16], [0, 17, 30, 0], [0, 0, 7, 0], [1, 1, 1, 1], [1, 1, 1, 1]]  # prefill, chunks, decodes
    per_req = -(-max(map(sum, zip(*steps))) // block_size) + 1
    bt = torch.randperm(nb, device=DEV)[: 4 * per_req].view(4, per_req)
    cur = [0, 0, 0, 0]
    for i, step in enumerate(steps):
        slots = []
        for b, a in enumerate(step):
            pos = torch.arange(cur[b], cur[b] + a, device=DEV)
            cur[b] += a
            slots.append(bt[b, pos // block_size] * block_size + pos % block_size)
        slots.append(torch.full((2,), -1, device=DEV, dtype=torch.long))  # padding
        slots = torch.cat(slots)
        slots = slots[torch.randperm(slots.numel(), device=DEV)]  # pages are not written in order
        slots = slots.to(torch.int32 if i % 2 else torch.int64)
        t = slots.numel()
        kv = torch.randn(t, 2 * hkv, 2 * d, device=DEV).to(key_dtype)
        key, value = kv[:, :hkv, :d], kv[:, hkv:, d:]  # strided views, like slices of a fused qkv
        R.write_kv(key, value, slots, c_ref)
        ops.write_kv(key, value, slots, c_tri, **FORCE)
        assert torch.equal(bits(raw_tri), bits(raw_ref)), f"step {i}"


def test_write_kv_all_slots_negative_changes_nothing():
    c = PagedKVCache.allocate(4, 16, 2, 64, 8, F16, DEV)
    raw = c.key_cache.clone(), c.key_min.clone()
    ops.write_kv(torch.randn(3, 2, 64, device=DEV).half(), torch.randn(3, 2, 64, device=DEV).half(),
                 torch.tensor([-1, -1, -1], device=DEV), c, **FORCE)
    assert torch.equal(bits(c.key_cache), bits(raw[0])) and torch.equal(bits(c.key_min), bits(raw[1]))


# --------------------------------------------------------------------------------------
# dense attention: prefill / chunked prefill / decode
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_size, dtype, block_size",
    [(4, 4, 64, F32, 16), (6, 2, 128, F16, 32), (8, 2, 64, BF16, 16), (16, 2, 128, F32, 32), (24, 8, 64, F16, 16)],
)
def test_paged_attention_prefill_and_chunks(num_heads, num_kv_heads, head_size, dtype, block_size):
    lens = [1, 45, 17, 130, 33]
    q_lens = [1, 45, 5, 64, 0]  # decode, full prefill, chunks, empty
    c = case(lens, num_heads, num_kv_heads, head_size, block_size, 16 if block_size == 16 else 8, dtype)
    qsl = torch.tensor([0] + q_lens, device=DEV).cumsum(0)
    q = torch.randn(int(qsl[-1]) + 2, num_heads, head_size, device=DEV).to(dtype)  # 2 padding rows
    scale = head_size**-0.5
    out = ops.paged_attention(q, c.cache, c.block_table, c.seq_lens, qsl, scale,
                              out=nan_like(q.shape, dtype), **FORCE)
    ref = R.paged_attention(q.float(), c.cache, c.block_table, c.seq_lens, qsl, scale)
    rows = int(qsl[-1])
    assert bool(out[:rows].isfinite().all()) and bool(out[rows:].isnan().all())
    assert rel_err(out[:rows], ref[:rows]) < TOL[dtype]


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_size, dtype, num_splits",
    [(4, 4, 64, F16, 1), (6, 2, 64, F32, 3), (8, 2, 128, BF16, 2), (16, 2, 64, F16, 4)],
)
def test_dense_decode(num_heads, num_kv_heads, head_size, dtype, num_splits):
    lens = [33, 1, 200, 129]
    c = case(lens, num_heads, num_kv_heads, head_size, 16, 8, dtype)
    q = torch.randn(len(lens), num_heads, head_size, device=DEV).to(dtype)
    out = nan_like((len(lens) + 1, num_heads, head_size), dtype)  # one spare row stays untouched
    ops.dense_decode(q, c.cache, c.block_table, c.seq_lens, 0.125, out=out, num_splits=num_splits, **FORCE)
    ref = R.dense_decode(q.float(), c.cache, c.block_table, c.seq_lens, 0.125)
    assert bool(out[:-1].isfinite().all()) and bool(out[-1].isnan().all())
    assert rel_err(out[:-1], ref) < TOL[dtype]


def test_paged_attention_all_decode_batch():
    lens = [70, 1, 33]
    c = case(lens, 12, 4, 64, 16, 4, F16)
    qsl = torch.arange(4, device=DEV)
    q = torch.randn(3, 12, 64, device=DEV).half()
    out = ops.paged_attention(q, c.cache, c.block_table, c.seq_lens, qsl, 0.125, **FORCE)
    ref = R.paged_attention(q.float(), c.cache, c.block_table, c.seq_lens, qsl, 0.125)
    assert rel_err(out, ref) < TOL[F16]


# --------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------
GQA = [(4, 4), (6, 2), (8, 2), (16, 2)]  # group sizes 1, 3, 4, 8
LAYOUTS = [(16, 4), (32, 8), (16, 16), (32, 32)]  # (block_size, page_size)


def _assert_same_sets(ours: torch.Tensor, ref: torch.Tensor) -> None:
    w = ref.shape[-1]
    assert ours.shape[:2] == ref.shape[:2] and ours.shape[-1] >= w
    assert torch.equal(ours[..., :w].long(), ref), "selected sets differ"
    assert bool((ours[..., w:] == -1).all())


@pytest.mark.parametrize("selection", ["token", "page", "quest"])
@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
@pytest.mark.parametrize("gqa", range(len(GQA)))
def test_select_topk_matches_reference_sets(selection, granularity, gqa):
    num_heads, num_kv_heads = GQA[gqa]
    dtype = (F32, F16, BF16, F16)[gqa]
    head_size = (64, 128)[gqa % 2]
    block_size, page_size = LAYOUTS[gqa]
    lens = [1, 70, 250, 33]
    c = case(lens, num_heads, num_kv_heads, head_size, block_size, page_size, dtype)
    q = torch.randn(len(lens), num_heads, head_size, device=DEV).to(dtype)
    attended = torch.tensor([8, 40, 60, 1000], device=DEV)  # budget >= context for requests 0 and 3
    kw = dict(params=P(sink_tokens=4, local_window=8, selection=selection, granularity=granularity, candidate_factor=2.0))
    ref = R.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.1, **kw)
    s = num_kv_heads if granularity == "kv_head" else num_heads
    width = max(72, P(selection=selection, sink_tokens=4, local_window=8).index_capacity(60, page_size))  # > max(min(attended, seq_lens))
    buf = torch.full((len(lens), s, width), -7, dtype=torch.int32, device=DEV)
    ours = ops.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.1, **kw, out=buf,
                           max_seq_len=256, **FORCE)
    assert ours is buf
    _assert_same_sets(ours, ref)


@pytest.mark.parametrize("rescore_dims", [0, 16])
@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
@pytest.mark.parametrize("gqa", range(len(GQA)))
def test_exact_pages_matches_reference_sets(rescore_dims, granularity, gqa):
    """``exact_pages`` (candidates by the page bound, rescored by exact — or SparQ's ``rescore_dims`` —
    ``max q·k``, Quest's page count attended): the reference's page set, every GQA group and layout."""
    num_heads, num_kv_heads = GQA[gqa]
    dtype = (F32, BF16, F16, F32)[gqa]
    head_size = (64, 128)[gqa % 2]
    block_size, page_size = LAYOUTS[gqa]
    lens = [1, 70, 250, 33, 190]
    c = case(lens, num_heads, num_kv_heads, head_size, block_size, page_size, dtype)
    q = torch.randn(len(lens), num_heads, head_size, device=DEV).to(dtype)
    attended = torch.tensor([8, 40, 60, 1000, 50], device=DEV)
    kw = dict(params=P(sink_tokens=4, local_window=8, selection="exact_pages", granularity=granularity, candidate_factor=3.0, rescore_dims=rescore_dims))
    ref = R.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.1, **kw)
    s = num_kv_heads if granularity == "kv_head" else num_heads
    width = P(selection="exact_pages", sink_tokens=4, local_window=8).index_capacity(60, page_size)
    ours = ops.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.1, **kw, capacity=width,
                           max_seq_len=256, **FORCE)
    assert ours.shape == (len(lens), s, width)
    _assert_same_sets(ours, ref)


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_page_scores_emit_the_scored_key_range(granularity):
    """Stage 1 also returns ``rescore_dims``' key range from the bounds it reads (no second read):
    equal to :func:`selection.scored_key_range` of the gathered bounds, over several page tiles,
    and 1 in a row whose pages are all sinks or window (the ``|q|`` fallback)."""
    from vllm_sparse.kernels.selection import scored_key_range
    from vllm_sparse.kernels.triton_ranking import page_scores_triton

    lens = [1100, 70, 9]  # 1100 tokens at page size 4: 275 pages, more than one tile even interpreted
    c = case(lens, 6, 2, 64, 16, 4, BF16)
    q = torch.randn(len(lens), 6, 64, device=DEV).bfloat16()
    n_pages = -(-max(lens) // 4)
    ub, key_range = page_scores_triton(q, c.cache, c.block_table, c.seq_lens, 0.1, P(sink_tokens=4, local_window=8, granularity=granularity), num_pages=n_pages, with_key_range=True)
    heads = torch.arange(2, device=DEV) if granularity == "kv_head" else torch.arange(6, device=DEV) // 3
    kmin, kmax = c.cache.gather_page_bounds(c.block_table, n_pages, heads)
    want = scored_key_range(kmin, kmax, c.seq_lens, 4, 4, 8)
    assert torch.equal(key_range, want)
    assert torch.equal(key_range[2], torch.ones_like(key_range[2])) and (key_range[:2] != 1).all()
    assert torch.equal(ub, page_scores_triton(q, c.cache, c.block_table, c.seq_lens, 0.1, P(sink_tokens=4, local_window=8, granularity=granularity), num_pages=n_pages))


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_size, dtype, rescore_dims",
                         [(6, 2, 64, BF16, 12), (32, 8, 128, BF16, 16), (8, 1, 64, F32, 5), (4, 4, 128, F16, 127)])
def test_rescore_query_kernel_is_the_torch_ops(granularity, num_heads, num_kv_heads, head_size, dtype, rescore_dims):
    """:func:`rescore_query_triton` (one launch, from the page kernel's unreduced tiles) gives the query
    :func:`rescore_query` builds from the reduced key range: same dims kept (ties to the lower dim:
    planted equal weights), same values, the ``|q|`` fallback in a row with no scored page."""
    from vllm_sparse.kernels.triton_ranking import page_scores_triton, rescore_query, rescore_query_triton

    lens = [1100, 70, 9, 300]  # 9 tokens at page size 4 with sink 4 + window 8: no scored page
    c = case(lens, num_heads, num_kv_heads, head_size, 16, 4, dtype)
    q = torch.randn(len(lens), num_heads, head_size, device=DEV).to(dtype)
    q[2, :, 1::2] = -q[2, :, 0::2]  # no scored page (range 1): pairs of dims tie on Σ|q|
    n_pages = -(-max(lens) // 4)
    args = (q, c.cache, c.block_table, c.seq_lens, 0.1, P(sink_tokens=4, local_window=8, granularity=granularity))
    _, key_range = page_scores_triton(*args, num_pages=n_pages, with_key_range=True)
    _, (klo, khi) = page_scores_triton(*args, num_pages=n_pages, with_key_range=True, range_tiles=True)
    assert klo.shape[2] > 1 or INTERPRETED  # several page tiles to reduce (natively)
    s = num_kv_heads if granularity == "kv_head" else num_heads
    want = rescore_query(q, key_range, s, rescore_dims)
    got = rescore_query_triton(q, klo, khi, s, rescore_dims)
    assert torch.equal(got, want)
    assert int((got != 0).sum(-1).max()) <= rescore_dims
    if rescore_dims % 2:  # an odd count splits one tied pair: its lower dim is kept
        kept = (got[2, 0] != 0).view(-1, 2)
        assert int(kept.sum()) == rescore_dims
        assert not bool((kept[:, 1] & ~kept[:, 0]).any()) and int((kept[:, 0] & ~kept[:, 1]).sum()) == 1
    assert rescore_query_triton(q, klo, khi, s, head_size) is q


@pytest.mark.parametrize("candidate_factor", [0.5, 8.0])
def test_page_selection_candidate_counts(candidate_factor):
    """Few candidates (fewer tokens than the budget) and candidates covering every page."""
    lens = [300, 97, 5]
    c = case(lens, 6, 2, 64, 16, 8, F32)
    q = torch.randn(3, 6, 64, device=DEV)
    attended = torch.tensor([64, 64, 64], device=DEV)
    kw = dict(params=P(sink_tokens=3, local_window=5, selection="page", candidate_factor=candidate_factor))
    ref = R.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.125, **kw)
    ours = ops.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.125, **kw, **FORCE)
    _assert_same_sets(ours, ref)


def test_select_topk_page_size_one_and_reference_width():
    """One-token pages (the page bound is the exact score) and the default, reference-sized output."""
    c = case([90, 33], 8, 2, 64, 16, 1, F16)
    q = torch.randn(2, 8, 64, device=DEV).half()
    attended = torch.tensor([20, 50], device=DEV)
    for selection in ("token", "page", "quest"):
        kw = dict(params=P(sink_tokens=1, local_window=3, selection=selection, candidate_factor=1.5))
        ref = R.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.125, **kw)
        ours = ops.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.125, **kw, **FORCE)
        assert ours.shape == ref.shape and torch.equal(ours, ref)


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_recent_selection_is_sinks_plus_most_recent(granularity):
    c = case([1, 30, 200], 6, 2, 64, 16, 8, F16)
    q = torch.randn(3, 6, 64, device=DEV).half()
    attended = torch.tensor([10, 6, 50], device=DEV)  # 6 < sinks + window: sinks, then the newest
    kw = dict(params=P(sink_tokens=4, local_window=8, selection="recent", granularity=granularity))
    ref = R.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.125, **kw)
    ours = ops.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, 0.125, **kw, capacity=64, **FORCE)
    # request 0 has 1 token < sink_tokens: the reference (as of this writing) also keeps the
    # "sinks" 1..3 past the sequence; the contract is positions < seq_lens only
    assert bool((ours[0, :, 0] == 0).all()) and bool((ours[0, :, 1:] == -1).all())
    _assert_same_sets(ours[1:], ref[1:])


# --------------------------------------------------------------------------------------
# sparse attention
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("window, factor", [(0, None), (20, None), (20, 2.5), (0, 3.3), (37, 1.0)])
def test_ranked_pages_kernel_is_the_torch_cut_and_compaction(window, factor):
    """:func:`ranked_pages_triton` (one launch) against the torch ops it replaces on the whole-page
    route: the same top-k cut to Quest's page count (or ``ceil(count × factor)``: 3.3 is not exact
    in float32, the count is taken in float64 as in the torch code), through a candidate map, and
    compacted into block tables — bit-equal. Forced (+inf) and past-the-end (-inf) pages, partial
    last pages, budgets above the context."""
    from vllm_sparse.kernels.selection import candidate_pages, page_counts, topk_rows
    from vllm_sparse.kernels.triton_ranking import ranked_pages_triton

    ps, sink, b, s = 16, 5, 6, 3
    params = P("quest", sink_tokens=sink, local_window=window)
    seq = torch.tensor([1, 15, 16, 300, 777, 1024], device=DEV)
    att = torch.tensor([64, 64, 1, 80, 2000, 333], device=DEV)
    n_pages = -(-1024 // ps)
    bt = torch.randperm(b * n_pages, device=DEV).view(b, n_pages).to(torch.int32)
    ub = torch.randn(b, s, n_pages, device=DEV)
    page = torch.arange(n_pages, device=DEV)
    num = (seq + ps - 1) // ps
    from vllm_sparse.kernels.selection import forced_page_mask

    ub = ub.masked_fill(forced_page_mask(page.expand(b, s, -1), seq, ps, sink, window), float("inf"))
    ub = ub.masked_fill(page >= num[:, None, None], float("-inf"))
    count = torch.minimum(att, seq)
    width = 24
    val, top = ub.topk(width, dim=-1)
    if factor is None:  # Quest's pages: the candidate_pages + compact_pages route
        want = candidate_pages(ub, seq, count, ps, sink, window, 1.0, width, quest=True)
    else:  # exact_pages' candidates: min(ceil(quest count × factor), pages)
        attend = page_counts(seq, count, ps, sink, window, 1.0, quest=True)
        n_cand = torch.minimum(torch.ceil(attend.double() * factor).long(), num)
        t, keep = topk_rows(ub, n_cand, width)
        want = torch.where(keep, t, -1)
    got = ranked_pages_triton(val, top, seq, att, ps, params, candidate_factor=factor)
    assert torch.equal(got, want)
    tables, lens = ranked_pages_triton(val, top, seq, att, ps, params, candidate_factor=factor, block_table=bt)
    want_t, want_l = compact_pages(want, bt, seq, ps)
    valid = torch.arange(width, device=DEV) < (want >= 0).sum(-1, keepdim=True)
    assert torch.equal(lens, want_l) and torch.equal(tables[valid], want_t[valid])
    # through a candidate map (exact_pages' final cut): idx indexes the candidates' page ids
    cand = torch.where(torch.rand(b, s, width, device=DEV) < 0.2, -1, torch.randint(0, n_pages, (b, s, width),
                                                                                        device=DEV))
    cand = torch.minimum(cand, num[:, None, None] - 1)
    score = torch.randn(b, s, width, device=DEV).masked_fill(cand < 0, float("-inf"))
    v2, t2 = score.topk(9, dim=-1)
    attend = page_counts(seq, count, ps, sink, window, 1.0, quest=True)
    t, keep = topk_rows(score, attend, 9)
    assert torch.equal(ranked_pages_triton(v2, t2, seq, att, ps, params, cand=cand),
                       torch.where(keep, cand.gather(-1, t), -1))


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_size, dtype, shared, num_splits",
    [(4, 4, 64, F32, True, 1), (6, 2, 128, F16, True, 3), (8, 2, 64, BF16, False, 2), (16, 2, 64, F16, True, 1),
     (16, 2, 128, F32, False, 3), (6, 2, 64, BF16, False, 1)],
)
def test_sparse_attention(num_heads, num_kv_heads, head_size, dtype, shared, num_splits):
    lens = [1, 45, 130]
    c = case(lens, num_heads, num_kv_heads, head_size, 16, 8, dtype)
    s = num_kv_heads if shared else num_heads
    idx = random_indices(lens, s, 48, DEV)
    q = torch.randn(len(lens), num_heads, head_size, device=DEV).to(dtype)
    out = ops.sparse_attention(q, c.cache, c.block_table, idx.to(torch.int32), 0.125,
                               out=nan_like(q.shape, dtype), num_splits=num_splits, **FORCE)
    ref = R.sparse_attention(q.float(), c.cache, c.block_table, idx, 0.125)
    assert bool(out.isfinite().all())
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, dtype, selection, granularity",
    [(8, 2, BF16, "token", "kv_head"), (6, 2, F16, "page", "query_head"), (4, 4, F32, "page", "kv_head"),
     (8, 2, F16, "quest", "kv_head"), (6, 2, BF16, "quest", "query_head")],
)
def test_sparse_decode_pipeline_with_static_buffers(num_heads, num_kv_heads, dtype, selection, granularity):
    lens = [150, 1, 64]
    c = case(lens, num_heads, num_kv_heads, 64, 16, 8, dtype)
    q = torch.randn(3, num_heads, 64, device=DEV).to(dtype)
    attended = torch.tensor([40, 40, 200], device=DEV)
    kw = dict(params=P(sink_tokens=2, local_window=8, selection=selection, granularity=granularity))
    s = num_kv_heads if granularity == "kv_head" else num_heads
    idx_buf = torch.full((3, s, 80), -7, dtype=torch.int64, device=DEV)
    # the query as vLLM passes it: a view into a fused qkv tensor; an int64 block table
    qkv = torch.randn(3, num_heads + 2 * num_kv_heads, 64, device=DEV).to(dtype)
    qkv[:, :num_heads] = q
    out = ops.sparse_decode(qkv[:, :num_heads], c.cache, c.block_table.long(), c.seq_lens, attended, 0.125,
                            out=nan_like(q.shape, dtype), indices_out=idx_buf, max_seq_len=160, **kw, **FORCE)
    ref = R.sparse_decode(q.float(), c.cache, c.block_table, c.seq_lens, attended, 0.125, **kw)
    assert bool((idx_buf != -7).all()) and bool(out.isfinite().all())
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_size, dtype, shared, num_splits",
    [(4, 4, 64, F32, True, 1), (6, 2, 128, F16, True, 3), (8, 2, 64, BF16, False, 2), (16, 2, 64, F32, True, 2)],
)
def test_table_decode(num_heads, num_kv_heads, head_size, dtype, shared, num_splits):
    """Each (request, selection head) walks its own table: random page sets, the partial page among them."""
    lens, bs = [1, 45, 130], 16
    c = case(lens, num_heads, num_kv_heads, head_size, bs, bs, dtype)
    s = num_kv_heads if shared else num_heads
    pages = random_pages(lens, s, bs, DEV)
    tables, tlens = compact_pages(pages, c.block_table, c.seq_lens, bs)
    q = torch.randn(len(lens), num_heads, head_size, device=DEV).to(dtype)
    out = ops.table_decode(q, c.cache, tables, tlens, 0.125, out=nan_like(q.shape, dtype), num_splits=num_splits,
                           **FORCE)
    ref = R.table_decode(q.float(), c.cache, tables, tlens, 0.125)
    # the reference over the tables = the reference over those pages' positions
    pos = page_positions(pages, bs)
    pos = torch.where(pos < c.seq_lens[:, None, None], pos, -1)
    torch.testing.assert_close(ref, R.sparse_attention(q.float(), c.cache, c.block_table, pos, 0.125))
    assert bool(out.isfinite().all())
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_size, dtype, selection, granularity, window",
    [(3, 1, 64, F32, "exact_pages", "kv_head", 8), (6, 2, 128, BF16, "quest", "kv_head", 8),
     (8, 2, 64, F16, "exact_pages", "kv_head", 1), (16, 2, 64, F32, "quest", "query_head", 8),
     (4, 4, 128, F16, "exact_pages", "query_head", 0)],
)
def test_sparse_decode_over_compacted_tables(num_heads, num_kv_heads, head_size, dtype, selection, granularity,
                                             window):
    """Whole-page selection with one page per block takes the compacted route: the reference's
    output, mixed lengths, GQA groups 1/3/4/8, budgets below and above the context; with a window
    the tables' lengths are what the stats count (:func:`quest_attended`)."""
    lens, bs = [300, 1, 77, 160], 16
    c = case(lens, num_heads, num_kv_heads, head_size, bs, bs, dtype)
    assert ops.compacted_route(P(selection), c.cache)
    q = torch.randn(len(lens), num_heads, head_size, device=DEV).to(dtype)
    attended = torch.tensor([64, 64, 40, 400], device=DEV)  # the last: budget >= context
    kw = dict(params=P(sink_tokens=2, local_window=window, selection=selection, granularity=granularity, candidate_factor=2.0))
    out = ops.sparse_decode(q, c.cache, c.block_table, c.seq_lens, attended, 0.125, out=nan_like(q.shape, dtype),
                            max_seq_len=300, **kw, **FORCE)
    ref = R.sparse_decode(q.float(), c.cache, c.block_table, c.seq_lens, attended, 0.125, **kw)
    assert bool(out.isfinite().all())
    assert rel_err(out, ref) < TOL[dtype]
    # the index route (an index buffer asked for) gives the same output
    s = num_kv_heads if granularity == "kv_head" else num_heads
    idx = torch.empty((len(lens), s, P(selection=selection, sink_tokens=2, local_window=window).index_capacity(160, bs)), dtype=torch.long, device=DEV)
    by_index = ops.sparse_decode(q, c.cache, c.block_table, c.seq_lens, attended, 0.125, indices_out=idx,
                                 max_seq_len=300, **kw, **FORCE)
    assert rel_err(out, by_index) < TOL[dtype]
    if window:
        from vllm_sparse.kernels.triton_select import select_pages_triton

        pages = select_pages_triton(q, c.cache, c.block_table, c.seq_lens, attended, 0.125, **kw,
                                    capacity=idx.shape[-1], max_seq_len=300)
        _, tlens = compact_pages(pages, c.block_table, c.seq_lens, bs)
        want = quest_attended(c.seq_lens, attended, bs, 2, window)
        assert torch.equal(tlens.long(), want[:, None].expand_as(tlens))



class _InPlaceBatch:
    """Decode inputs for the fixed-size (graph-replay) tests: a first batch with the case's rows 0 and 1
    swapped, and :meth:`write` putting another batch (the case's own table) into the same buffers."""

    def __init__(self, c, num_heads: int, head_size: int, dtype, seq_lens, attended):
        self.c, self.shape, self.dtype = c, (len(seq_lens), num_heads, head_size), dtype
        self.q = torch.randn(self.shape, device=DEV).to(dtype)
        self.bt = c.block_table[[1, 0, *range(2, len(seq_lens))]].clone()
        self.seq_lens = torch.tensor(seq_lens, device=DEV)
        self.attended = torch.tensor(attended, device=DEV)
        self.out = nan_like(self.shape, dtype)

    def write(self, seq_lens, attended) -> None:
        self.q.copy_(torch.randn(self.shape, device=DEV).to(self.dtype))
        self.bt.copy_(self.c.block_table)
        self.seq_lens.copy_(torch.tensor(seq_lens, device=DEV))
        self.attended.copy_(torch.tensor(attended, device=DEV))
        self.out.fill_(float("nan"))

    def run(self, scale: float, **kw) -> torch.Tensor:
        return ops.sparse_decode(self.q, self.c.cache, self.bt, self.seq_lens, self.attended, scale, out=self.out,
                                 **kw)

    def reference(self, scale: float, **kw) -> torch.Tensor:
        return R.sparse_decode(self.q.float(), self.c.cache, self.bt, self.seq_lens, self.attended, scale, **kw)


# --------------------------------------------------------------------------------------
# realistic shapes, GPU only
# --------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("selection", ["token", "page", "quest", "exact_pages"])
def test_gpu_decode_step_at_realistic_shapes(selection):
    lens = [4000, 8191, 1, 2049]
    num_heads, hkv, d, dtype = 32, 8, 128, BF16
    c = case(lens, num_heads, hkv, d, 16, 16, dtype)
    q = torch.randn(4, num_heads, d, device=DEV).to(dtype)
    attended = torch.tensor([512, 724, 256, 9000], device=DEV)
    kw = dict(params=P(sink_tokens=4, local_window=64, selection=selection))
    ref_idx = R.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, d**-0.5, **kw)
    idx = ops.select_topk(q, c.cache, c.block_table, c.seq_lens, attended, d**-0.5, **kw, capacity=2304,
                          max_seq_len=8192)
    _assert_same_sets(idx, ref_idx)
    out = ops.sparse_attention(q, c.cache, c.block_table, idx, d**-0.5)
    assert rel_err(out, R.sparse_attention(q.float(), c.cache, c.block_table, ref_idx, d**-0.5)) < TOL[dtype]
    dense = ops.dense_decode(q, c.cache, c.block_table, c.seq_lens, d**-0.5)
    assert rel_err(dense, R.dense_decode(q.float(), c.cache, c.block_table, c.seq_lens, d**-0.5)) < TOL[dtype]
    if ops.compacted_route(P(selection), c.cache):  # whole pages through compacted block tables
        fused = ops.sparse_decode(q, c.cache, c.block_table, c.seq_lens, attended, d**-0.5, **kw, capacity=2304,
                                  max_seq_len=8192)
        assert rel_err(fused, R.sparse_decode(q.float(), c.cache, c.block_table, c.seq_lens, attended, d**-0.5,
                                              **kw)) < TOL[dtype]


@pytest.mark.gpu
@gpu
def test_gpu_prefill_write_and_graph_capture():
    num_heads, hkv, d, dtype, bs, ps = 32, 8, 128, BF16, 16, 16
    lens, q_lens = [3000, 700, 1], [512, 700, 1]
    c = case(lens, num_heads, hkv, d, bs, ps, dtype)
    qsl = torch.tensor([0] + q_lens, device=DEV).cumsum(0)
    q = torch.randn(int(qsl[-1]), num_heads, d, device=DEV).to(dtype)
    out = ops.paged_attention(q, c.cache, c.block_table, c.seq_lens, qsl, d**-0.5)
    ref = R.paged_attention(q.float(), c.cache, c.block_table, c.seq_lens, qsl, d**-0.5)
    assert rel_err(out, ref) < TOL[dtype]

    # write_kv: a big shuffled prefill into a fresh cache, bit-exact
    raw = torch.full(PagedKVCache.raw_shape(600, bs, hkv, d, ps), float("nan"), dtype=dtype, device=DEV)
    raw2 = raw.clone()
    blocks = torch.randperm(600, device=DEV)[:320]  # whole blocks: pages fill in order
    slots = (blocks[:, None] * bs + torch.arange(bs, device=DEV)).flatten()[:5000]
    slots = slots[torch.randperm(5000, device=DEV)]
    k, v = torch.randn(2, 5000, hkv, d, device=DEV).to(dtype)
    R.write_kv(k, v, slots, PagedKVCache.from_raw(raw, hkv, ps))
    ops.write_kv(k, v, slots, PagedKVCache.from_raw(raw2, hkv, ps))
    assert torch.equal(bits(raw), bits(raw2))

    # the decode step with static buffers replays from a CUDA graph
    qd = torch.randn(3, num_heads, d, device=DEV).to(dtype)
    attended = torch.tensor([300, 300, 300], device=DEV)
    idx = torch.empty((3, hkv, 320), dtype=torch.int32, device=DEV)
    o = torch.empty_like(qd)

    def replays_as_eager(step):
        step()
        eager = o.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        o.zero_()
        graph.replay()
        torch.cuda.synchronize()
        return torch.equal(o, eager)

    assert replays_as_eager(lambda: ops.sparse_decode(qd, c.cache, c.block_table, c.seq_lens, attended, d**-0.5, P(sink_tokens=4, local_window=64, selection="page"), out=o, indices_out=idx, max_seq_len=3072, num_splits=4))
    # and the compacted route (exact_pages, no index buffer)
    assert replays_as_eager(lambda: ops.sparse_decode(qd, c.cache, c.block_table, c.seq_lens, attended, d**-0.5, P(sink_tokens=4, local_window=64, selection="exact_pages"), out=o, capacity=P(selection="exact_pages", sink_tokens=4, local_window=64).index_capacity(300, ps), max_seq_len=3072, num_splits=4))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("selection, rescore_dims", [("exact_pages", 0), ("exact_pages", 12), ("quest", 0)])
def test_gpu_compacted_decode_graph_replays_new_inputs(selection, rescore_dims):
    """What serving from a full CUDA graph needs: the whole-page step captured once, at fixed sizes
    (capacity, max_seq_len, num_splits), then replayed after the batch's query, block table, lengths
    and budgets change in place, gives the reference's answer for the new batch and exactly the eager
    step's output."""
    num_heads, hkv, d, dtype, bs = 32, 8, 128, BF16, 16
    c = case([3000, 700, 1], num_heads, hkv, d, bs, bs, dtype)
    kw = dict(params=P(sink_tokens=4, local_window=64, selection=selection, rescore_dims=rescore_dims))
    static = dict(capacity=P(selection=selection, sink_tokens=4, local_window=64).index_capacity(512, bs), max_seq_len=3072, num_splits=4)
    # state A, captured: rows 0 and 1 swapped, shorter lengths, a small budget
    b = _InPlaceBatch(c, num_heads, d, dtype, [700, 2500, 1], [128, 128, 128])
    b.run(d**-0.5, **kw, **static)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        b.run(d**-0.5, **kw, **static)
    # state B, replayed: the case's own table, other lengths and budgets, a fresh query
    b.write([3000, 650, 1], [512, 200, 64])
    graph.replay()
    torch.cuda.synchronize()
    replayed = b.out.clone()
    assert rel_err(replayed, b.reference(d**-0.5, **kw)) < TOL[dtype]
    b.out.fill_(float("nan"))
    b.run(d**-0.5, **kw, **static)
    assert torch.equal(replayed, b.out)
