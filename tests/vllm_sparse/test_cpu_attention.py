"""The fused CPU path (vLLM's CPU paged-attention op over compacted block tables) against the torch reference."""

import math

import pytest
import torch

from vllm_sparse.kernels import PagedKVCache
from vllm_sparse.kernels import ranking
from vllm_sparse.kernels import reference as R
from vllm_sparse.kernels.selectors import SelectParams

C = pytest.importorskip("vllm_sparse.cpu_attention")
P = SelectParams.create  # the selection settings by name

RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SINK, WINDOW = 4, 16
AMX = torch.cpu._is_amx_tile_supported()
needs_amx = pytest.mark.skipif(not AMX, reason="vLLM's AMX kernel needs a CPU with AMX tiles (Intel Sapphire Rapids+)")


def make_cache(lens, num_kv_heads, head_size, block_size, dtype, key_scale=None):
    """Requests of ``lens`` tokens written by the fused path into shuffled blocks; spare blocks stay NaN.
    ``key_scale`` (``[head_size]``) multiplies the keys per dim (real keys' dims differ in spread).

    vLLM zero-fills its caches and the op reads a partial last block's tail (masked), so the
    requests' own blocks start at zero; every block no request owns is NaN-poisoned, so a read
    outside the selection shows up.
    """
    nblk = [-(-n // block_size) for n in lens]
    nb = sum(nblk) + 5
    cache = PagedKVCache.allocate(nb, block_size, num_kv_heads, head_size, block_size, dtype, key_transposed=True)
    perm = torch.randperm(nb)
    bt = torch.full((len(lens), max(nblk) + 2), -1, dtype=torch.int32)
    used = 0
    for b, m in enumerate(nblk):
        bt[b, :m] = perm[used: used + m]
        used += m
    keys, values = [], []
    for b, n in enumerate(lens):
        pos = torch.arange(nblk[b] * block_size)
        slots = bt[b, pos // block_size].long() * block_size + pos % block_size
        zeros = torch.zeros(len(pos), num_kv_heads, head_size, dtype=dtype)
        C.write_kv(zeros, zeros, slots, cache)
        k, v = (torch.randn(n, num_kv_heads, head_size) for _ in range(2))
        k, v = (k if key_scale is None else k * key_scale).to(dtype), v.to(dtype)
        half = n // 2  # two writes: the second continues a half-filled page
        for lo, hi in ((0, half), (half, n)):
            C.write_kv(k[lo:hi], v[lo:hi], slots[lo:hi], cache)
        keys.append(k)
        values.append(v)
    return cache, bt, keys, values


def plan(cache, bt, seq, attended, num_heads):
    return C.plan_decode(seq, attended, bt, P("quest", sink_tokens=SINK, local_window=WINDOW), block_size=cache.block_size, num_heads=num_heads, num_kv_heads=cache.num_kv_heads, head_size=cache.head_size, dtype=cache.dtype, isa=C.cpu_isa(cache.block_size))


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def naive_pages_attention(q, keys, values, table, lens, num_kv_heads, block_of, scale):
    """float64 attention of each (request, KV head) over the positions of its chosen pages."""
    b, num_heads, d = q.shape
    g = num_heads // num_kv_heads
    out = torch.empty(b, num_heads, d, dtype=torch.float64)
    for r in range(b):
        for h in range(num_kv_heads):
            row = table[r * num_kv_heads + h]
            n_pages = -(-int(lens[r * num_kv_heads + h]) // block_of.block_size)
            pos = torch.cat([block_of.positions(r, int(x) // num_kv_heads) for x in row[:n_pages]])
            k, v = keys[r][pos, h].double(), values[r][pos, h].double()
            p = torch.softmax(q[r, h * g:(h + 1) * g].double() @ k.T * scale, -1)
            out[r, h * g:(h + 1) * g] = p @ v
    return out


class BlockPositions:
    def __init__(self, bt, lens, block_size):
        self.bt, self.lens, self.block_size = bt, lens, block_size

    def positions(self, r, block):
        j = (self.bt[r] == block).nonzero()[0, 0].item()
        return torch.arange(j * self.block_size, min((j + 1) * self.block_size, self.lens[r]))


@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_fused_quest_decode_equals_reference_float32(group, head_size):
    torch.manual_seed(torch.seed() % 2**31)
    lens, hkv, bs = [1000, 37, 513, 260, 16, 17], 2, 16
    cache, bt, keys, values = make_cache(lens, hkv, head_size, bs, torch.float32)
    seq = torch.tensor(lens)
    attended = torch.tensor([200, 37, 100, 260, 16, 20])  # sparse, and budget >= context
    q = torch.randn(len(lens), hkv * group, head_size)
    scale = head_size ** -0.5
    p = plan(cache, bt, seq, attended, hkv * group)
    out = torch.full_like(q, float("nan"))
    C.sparse_decode(q, cache, p, scale, out)
    ref = R.sparse_decode(q, cache, bt, seq, attended, scale, P(sink_tokens=SINK, local_window=WINDOW, selection="quest"))
    assert rel_err(out, ref) < RTOL[torch.float32]
    # and the set really is the reference's: whole best pages, as many as Quest's rule says
    table = C.select_pages(q, cache, p)
    idx = R.select_topk(q, cache, bt, seq, attended, scale, P(sink_tokens=SINK, local_window=WINDOW, selection="quest"))
    for r in range(len(lens)):
        for h in range(hkv):
            n_pages = -(-int(p.seq_lens[r * hkv + h]) // bs)
            blocks = sorted(int(x) // hkv for x in table[r * hkv + h, :n_pages])
            want = idx[r, h][idx[r, h] >= 0]
            assert blocks == sorted({int(bt[r, int(x) // bs]) for x in want})
    # stats count what the op reads: whole pages, never past the context
    assert p.attended_tokens == int(p.seq_lens.view(-1, hkv)[:, 0].sum()) <= int(seq.sum())


@pytest.mark.parametrize("group", [1, 3])
def test_fused_quest_decode_bfloat16_attends_its_pages_exactly(group):
    lens, hkv, bs, d = [700, 300, 90], 3, 16, 64
    cache, bt, keys, values = make_cache(lens, hkv, d, bs, torch.bfloat16)
    seq = torch.tensor(lens)
    q = torch.randn(len(lens), hkv * group, d).bfloat16()
    p = plan(cache, bt, seq, torch.tensor([150, 120, 90]), hkv * group)
    out = torch.empty_like(q)
    C.sparse_decode(q, cache, p, 0.125, out)
    table = C.select_pages(q, cache, p)
    ref = naive_pages_attention(q, keys, values, table, p.seq_lens, hkv, BlockPositions(bt, lens, bs), 0.125)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < RTOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_budget_through_the_sparse_path_equals_dense(dtype):
    lens, hkv, g, d, bs = [333, 48, 1024], 2, 4, 128, 32
    cache, bt, keys, values = make_cache(lens, hkv, d, bs, dtype)
    seq = torch.tensor(lens)
    q = torch.randn(len(lens), hkv * g, d).to(dtype)
    p = plan(cache, bt, seq, seq.clone(), hkv * g)
    assert p.attended_tokens == sum(lens)
    out = torch.empty_like(q)
    C.sparse_decode(q, cache, p, d ** -0.5, out)
    dense = torch.empty_like(q)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    md = C.scheduler_metadata(seq.int(), qsl, hkv * g, hkv, d, dtype, C.cpu_isa(bs))
    C.attention(q, cache, bt, seq.int(), qsl, md, d ** -0.5, dense)
    ref = R.dense_decode(q, cache, bt, seq, d ** -0.5)
    assert rel_err(out, ref) < RTOL[dtype] and rel_err(dense, ref) < RTOL[dtype]


def test_prefill_through_vllm_op_equals_reference():
    lens, hkv, g, d, bs = [300, 77, 129], 2, 3, 64, 16
    cache, bt, keys, values = make_cache(lens, hkv, d, bs, torch.float32)
    q_lens = [50, 77, 1]  # chunked prefill: the last q_len tokens of each request
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hkv * g, d)
    seq = torch.tensor(lens, dtype=torch.int32)
    out = torch.empty_like(q)
    md = C.scheduler_metadata(seq, qsl, hkv * g, hkv, d, torch.float32, C.cpu_isa(bs))
    C.attention(q, cache, bt, seq, qsl, md, 0.125, out)
    assert rel_err(out, R.paged_attention(q, cache, bt, seq, qsl, 0.125)) < RTOL[torch.float32]


def test_write_keeps_page_summaries_exact():
    """Summaries folded from the incoming keys equal the min/max over each page's stored keys."""
    lens, hkv, d, bs = [70, 33], 2, 64, 16
    cache, bt, keys, _ = make_cache(lens, hkv, d, bs, torch.bfloat16)
    for r, n in enumerate(lens):
        for p in range(-(-n // bs)):
            blk = int(bt[r, p])
            rows = keys[r][p * bs: min((p + 1) * bs, n)]  # [t, H, D]
            assert torch.equal(cache.key_min[blk, 0], rows.amin(0)) and torch.equal(cache.key_max[blk, 0], rows.amax(0))
            # and the keys vLLM's op wrote read back through the layout's views
            assert torch.equal(cache.key_cache[blk, : rows.shape[0]], rows)


def test_isa_matches_the_layout():
    assert C.cpu_isa(16) == "vec16" and C.cpu_isa(32) == "vec" and C.cpu_isa(128) == "vec"
    # AMX only where the caller allows it (fused path alone), bf16, blocks of 32k, head_size of 32k
    assert C.cpu_isa(32, torch.bfloat16, 64, amx_ok=True) == ("amx" if AMX else "vec")
    assert C.cpu_isa(32, torch.bfloat16, 64) == "vec" and C.cpu_isa(16, torch.bfloat16, 64, amx_ok=True) == "vec16"
    assert C.cpu_isa(32, torch.float32, 64, amx_ok=True) == "vec"
    assert math.isclose(1 / 16, (PagedKVCache.raw_shape(1, 16, 3, 64, 16)[2] - 16) / 16)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_exact_pages_fused_equals_reference_float32(group):
    """exact_pages: bound-ranked candidates rescored by their exact max q·k — same pages, same output."""
    lens, hkv, d, bs = [1200, 500, 40], 2, 64, 16
    cache, bt, _, _ = make_cache(lens, hkv, d, bs, torch.float32)
    seq = torch.tensor(lens)
    attended = torch.tensor([160, 100, 40])
    q = torch.randn(len(lens), hkv * group, d)
    p = C.plan_decode(seq, attended, bt, P("exact_pages", sink_tokens=SINK, local_window=WINDOW, candidate_factor=3.0), block_size=bs, num_heads=hkv * group, num_kv_heads=hkv, head_size=d, dtype=torch.float32, isa=C.cpu_isa(bs))
    assert bool((p.candidates >= p.count).all()) and int(p.candidates[0]) == 3 * int(p.count[0])
    out = torch.empty_like(q)
    C.sparse_decode(q, cache, p, 0.125, out)
    ref = R.sparse_decode(q, cache, bt, seq, attended, 0.125, P(sink_tokens=SINK, local_window=WINDOW, selection="exact_pages", candidate_factor=3.0))
    assert rel_err(out, ref) < RTOL[torch.float32]
    # rescoring changes the choice: not the plain Quest set (on random keys the bound is loose)
    quest = R.select_topk(q, cache, bt, seq, attended, 0.125, P(sink_tokens=SINK, local_window=WINDOW, selection="quest"))
    exact = R.select_topk(q, cache, bt, seq, attended, 0.125, P(sink_tokens=SINK, local_window=WINDOW, selection="exact_pages", candidate_factor=3.0))
    assert not torch.equal(quest, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
def test_rescore_dims_fused_equals_reference(dtype, group):
    """rescore_dims: candidates rescored over the dims of largest |q| × key range only (SparQ's
    approximation, range-weighted) — the C++ kernel picks the reference's pages; the approximate
    choice differs from the exact one."""
    lens, hkv, d, bs = [1500, 700], 2, 64, 32
    # dims of unequal spread, so that |q| x key range picks other dims than |q| would
    cache, bt, _, _ = make_cache(lens, hkv, d, bs, dtype, key_scale=torch.rand(d) * 4 + 0.05)
    seq = torch.tensor(lens)
    attended = torch.tensor([256, 160])
    q = torch.randn(len(lens), hkv * group, d).to(dtype)
    kw = dict(sink_tokens=SINK, local_window=WINDOW, candidate_factor=4.0)
    for r in (8, 16, d):
        params = P("exact_pages", rescore_dims=r, **kw)
        p = C.plan_decode(seq, attended, bt, params, block_size=bs, num_heads=hkv * group, num_kv_heads=hkv,
                          head_size=d, dtype=dtype, isa=C.cpu_isa(bs))
        table = C.select_pages(q, cache, p)
        ref = R.select_topk(q, cache, bt, seq, attended, 0.125, params)
        # the reference's pages as one-head block ids, per (request, head)
        for b in range(len(lens)):
            for h in range(hkv):
                pages = ref[b, h][ref[b, h] >= 0].div(bs, rounding_mode="floor").unique()
                want = bt[b, pages].long() * hkv + h  # in page order, as the table lists them
                got = table[b * hkv + h, : int(p.count[b])].long()
                assert torch.equal(got, want), (r, b, h)
    exact = R.select_topk(q, cache, bt, seq, attended, 0.125, P("exact_pages", **kw))
    approx = R.select_topk(q, cache, bt, seq, attended, 0.125, P("exact_pages", rescore_dims=8, **kw))
    assert not torch.equal(exact, approx)


def table_pages(table, bt, num_kv_heads, count):
    """Page indices ``[B, H, max(count)]`` (-1 padded) of a compacted one-head table's first ``count[b]`` entries."""
    b = bt.shape[0]
    out = torch.full((b, num_kv_heads, int(count.max())), -1, dtype=torch.long)
    for r in range(b * num_kv_heads):
        page_of = {int(x): p for p, x in enumerate(bt[r // num_kv_heads].tolist())}
        ids = table[r, : int(count[r // num_kv_heads])].long() // num_kv_heads
        out[r // num_kv_heads, r % num_kv_heads, : len(ids)] = torch.tensor([page_of[int(i)] for i in ids])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
def test_refresh_rescores_kept_pages_with_a_few_bound_ranked_ones(dtype, group):
    """A row that refreshes its kept pages (``prior``: ``reselect_candidate_factor``) picks the best
    pages among ``plan.refresh`` bound-ranked candidates plus the pages in its table row: the
    reference's choice (:func:`ranking.refresh_pages`); the other rows select afresh or keep theirs.
    Refreshing with the query that chose the pages keeps them even with one candidate per page,
    where the bound alone (Quest) picks others."""
    lens, hkv, d, bs = [1500, 700, 900], 2, 64, 32
    cache, bt, _, _ = make_cache(lens, hkv, d, bs, dtype, key_scale=torch.rand(d) * 4 + 0.05)
    seq, attended = torch.tensor(lens), torch.tensor([256, 160, 200])
    q0 = torch.randn(len(lens), hkv * group, d).to(dtype)
    q1 = torch.randn(len(lens), hkv * group, d).to(dtype)

    def mk(cf, refresh):
        return C.plan_decode(seq, attended, bt, P("exact_pages", sink_tokens=SINK, local_window=WINDOW, candidate_factor=cf, rescore_dims=12), block_size=bs, num_heads=hkv * group, num_kv_heads=hkv, head_size=d, dtype=dtype, isa=C.cpu_isa(bs), refresh_factor=refresh)

    p = mk(8.0, 1.5)
    assert torch.equal(p.refresh, torch.ceil(p.count * 1.5).long().minimum(p.num_pages))
    t0 = C.select_pages(q0, cache, p)
    rows = hkv * len(lens)
    prior = torch.zeros(rows, dtype=torch.bool)
    prior[[0, 3, 5]] = True
    keep = torch.zeros(rows, dtype=torch.bool)
    keep[1] = True
    t1 = C.select_pages(q1, cache, p, t0.clone(), keep, prior)
    fresh = C.select_pages(q1, cache, p)
    ref = ranking.refresh_pages(q1, cache, bt, seq, attended, table_pages(t0, bt, hkv, p.count),
                                P("exact_pages", sink_tokens=SINK, local_window=WINDOW, candidate_factor=1.5, rescore_dims=12))
    for r in range(rows):
        b, h = divmod(r, hkv)
        n = int(p.count[b])
        if keep[r]:
            assert torch.equal(t1[r], t0[r]), r
        elif prior[r]:
            pages = ref[b, h][ref[b, h] >= 0].sort().values
            assert pages.numel() == n and torch.equal(t1[r, :n].long(), bt[b, pages].long() * hkv + h), r
        else:
            assert torch.equal(t1[r], fresh[r]), r
    # same query, one candidate per budget page: the kept pages stay; without them the bound picks others
    same = C.select_pages(q0, cache, mk(8.0, 1.0), t0.clone(), None, torch.ones(rows, dtype=torch.bool))
    assert torch.equal(same, t0)
    assert not torch.equal(C.select_pages(q0, cache, mk(1.0, None)), t0)


def test_window_of_one_token_keeps_the_partial_page_last():
    """``local_window=0`` is run as 1 for whole pages (``SparseConfig.select_params``): the page being
    written is always attended, so each compacted table ends with the request's partial page and the
    op's lengths hold. ``plan_decode`` refuses 0, where a head could skip that page and the op would
    cut its last full page short."""
    from vllm_sparse.config import SparseConfig

    assert SparseConfig(local_window=0).select_params.local_window == 1
    assert SparseConfig(local_window=0, selection="token").select_params.local_window == 0
    lens, hkv, g, d, bs = [1000, 513, 260], 2, 2, 64, 16
    cache, bt, _, _ = make_cache(lens, hkv, d, bs, torch.float32)
    seq, attended = torch.tensor(lens), torch.tensor([200, 100, 64])
    q = torch.randn(len(lens), hkv * g, d)
    kw = dict(block_size=bs, num_heads=hkv * g, num_kv_heads=hkv, head_size=d, dtype=torch.float32,
              isa=C.cpu_isa(bs))
    with pytest.raises(ValueError, match="local_window >= 1"):
        C.plan_decode(seq, attended, bt, P("quest", sink_tokens=SINK, local_window=0), **kw)
    p = C.plan_decode(seq, attended, bt, P("quest", sink_tokens=SINK, local_window=1), **kw)
    out = torch.empty_like(q)
    C.sparse_decode(q, cache, p, 0.125, out)
    ref = R.sparse_decode(q, cache, bt, seq, attended, 0.125, P(sink_tokens=SINK, local_window=1, selection="quest"))
    assert rel_err(out, ref) < RTOL[torch.float32]


def amx_copy(cache):
    """The same K/V and page summaries, packed in vLLM's AMX layout by the torch oracle (amx_pack)."""
    from vllm_sparse.kernels.layout import amx_pack

    bs, d, h = cache.block_size, cache.head_size, cache.num_kv_heads
    raw = cache.slots.clone()  # [NB, H, slot size]
    raw[..., : bs * d], raw[..., bs * d: 2 * bs * d] = amx_pack(cache.key_cache.permute(0, 2, 1, 3),
                                                             cache.value_cache.permute(0, 2, 1, 3))
    return PagedKVCache.from_raw(raw.view(cache.num_blocks, h, -1, 2 * d), h, cache.page_size, amx=True)


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("head_size", [64, 128])
def test_cpp_selection_reads_the_amx_packing(group, head_size):
    """The C++ page ranking + rescoring picks the same pages from an AMX-packed cache as from the
    [head_size, block_size] one (rescored dims read through the packing); runs on any CPU."""
    lens, hkv, bs = [1500, 700, 70], 2, 32
    cache, bt, _, _ = make_cache(lens, hkv, head_size, bs, torch.bfloat16,
                                 key_scale=torch.rand(head_size) * 4 + 0.05)
    packed = amx_copy(cache)
    seq, attended = torch.tensor(lens), torch.tensor([256, 160, 70])
    q = torch.randn(len(lens), hkv * group, head_size).bfloat16()
    for r in (8, 13, head_size):
        p = C.plan_decode(seq, attended, bt, P("exact_pages", sink_tokens=SINK, local_window=WINDOW, candidate_factor=4.0, rescore_dims=r), block_size=bs, num_heads=hkv * group, num_kv_heads=hkv, head_size=head_size, dtype=torch.bfloat16, isa="vec")
        assert torch.equal(C.select_pages(q, packed, p), C.select_pages(q, cache, p)), r


@needs_amx
def test_amx_full_budget_sums_like_stock_only_without_kv_split(monkeypatch):
    """Why bf16 equality with stock needs ``VLLM_CPU_ATTN_SPLIT_KV=0``: every page through the
    compacted one-head tables gives stock's bits when vLLM's op sums each sequence in one piece,
    and may differ by bf16 rounding when it splits long sequences across threads (its split
    depends on the work it is given: ``B * H`` one-head sequences vs ``B`` requests of ``H`` heads)."""
    from vllm import envs

    lens, hkv, group, d, bs = [4000, 2100, 700], 3, 3, 64, 32
    cache, bt, _, _ = make_cache(lens, hkv, d, bs, torch.bfloat16)
    packed = amx_copy(cache)
    seq = torch.tensor(lens)
    q = torch.randn(len(lens), hkv * group, d).bfloat16()
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    outs = {}
    for split in (False, True):
        monkeypatch.setattr(envs, "VLLM_CPU_ATTN_SPLIT_KV", split)
        p = C.plan_decode(seq, seq.clone(), bt, P("quest", sink_tokens=SINK, local_window=WINDOW), block_size=bs, num_heads=hkv * group, num_kv_heads=hkv, head_size=d, dtype=torch.bfloat16, isa="amx")
        sparse, dense = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
        C.sparse_decode(q, packed, p, 0.125, sparse)
        md = C.scheduler_metadata(seq.int(), qsl, hkv * group, hkv, d, torch.bfloat16, "amx")
        C.attention(q, packed, bt, seq.int(), qsl, md, 0.125, dense)
        outs[split] = (sparse, dense)
    assert torch.equal(*outs[False])
    assert rel_err(*outs[True]) < 1e-2  # split: the same attention up to bf16 rounding


@needs_amx
def test_amx_write_matches_the_packing_oracle():
    """vLLM's reshape_and_cache (ISA amx) writes what amx_pack says; the page summaries stay exact."""
    lens, hkv, d, bs = [100, 64], 3, 64, 32
    cache, bt, keys, values = make_cache(lens, hkv, d, bs, torch.bfloat16)
    packed = PagedKVCache.allocate(cache.num_blocks, bs, hkv, d, bs, torch.bfloat16, fill=0.0, amx=True)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = bt[b, pos // bs].long() * bs + pos % bs
        C.write_kv(keys[b][:60], values[b][:60], slots[:60], packed)
        C.write_kv(keys[b][60:], values[b][60:], slots[60:], packed)
    want = amx_copy(cache)
    for b, n in enumerate(lens):
        blocks = bt[b, : -(-n // bs)].long()
        full = blocks[: n // bs]  # whole blocks: every byte written
        assert torch.equal(packed.slots[full], want.slots[full])
        assert torch.equal(packed.key_min[blocks], cache.key_min[blocks])
        assert torch.equal(packed.key_max[blocks], cache.key_max[blocks])


@needs_amx
@pytest.mark.parametrize("group", [1, 3, 8])
def test_amx_fused_decode_and_prefill_equal_reference(group):
    """Sparse decode (exact_pages + rescored dims) and chunked prefill through vLLM's AMX kernel
    against float64 attention over the same pages / the torch reference over the vec cache."""
    lens, hkv, d, bs = [1500, 333, 64], 2, 64, 32
    cache, bt, keys, values = make_cache(lens, hkv, d, bs, torch.bfloat16)
    packed = amx_copy(cache)
    seq = torch.tensor(lens)
    q = torch.randn(len(lens), hkv * group, d).bfloat16()
    p = C.plan_decode(seq, torch.tensor([256, 333, 40]), bt, P("exact_pages", sink_tokens=SINK, local_window=WINDOW, candidate_factor=4.0, rescore_dims=12), block_size=bs, num_heads=hkv * group, num_kv_heads=hkv, head_size=d, dtype=torch.bfloat16, isa="amx")
    out = torch.full_like(q, float("nan"))
    C.sparse_decode(q, packed, p, 0.125, out)
    table = C.select_pages(q, packed, p)
    ref = naive_pages_attention(q, keys, values, table, p.seq_lens, hkv, BlockPositions(bt, lens, bs), 0.125)
    assert rel_err(out, ref) < RTOL[torch.bfloat16]
    q_lens = [40, 333, 1]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    qp = torch.randn(int(qsl[-1]), hkv * group, d).bfloat16()
    md = C.scheduler_metadata(seq.int(), qsl, hkv * group, hkv, d, torch.bfloat16, "amx")
    outp = torch.empty_like(qp)
    C.attention(qp, packed, bt, seq.int(), qsl, md, 0.125, outp)
    assert rel_err(outp, R.paged_attention(qp, cache, bt, seq, qsl, 0.125)) < RTOL[torch.bfloat16]


def test_backend_uses_amx_only_where_the_fused_path_alone_reads_the_cache():
    from vllm_sparse.backend import _cpu_isa
    from vllm_sparse.config import SparseConfig

    default = "amx" if AMX else "vec"
    assert _cpu_isa(SparseConfig(), 32, torch.bfloat16, 64) == default
    assert _cpu_isa(SparseConfig(), 32, torch.float32, 64) == "vec"
    for torch_path in (dict(selection="token"), dict(granularity="query_head"), dict(evict="streaming")):
        assert _cpu_isa(SparseConfig(**torch_path), 32, torch.bfloat16, 64) == "vec", torch_path


def test_reselect_every_keeps_each_requests_pages_until_it_must_select():
    """``reselect_every``: a request attends the pages it chose until ``every`` steps have passed, it
    gains a second new page or its budget grows; a first new page is attended on top of the kept
    ones; requests are matched across steps by their blocks, in any order."""
    lens, hkv, g, d, bs = [1001, 530, 261], 2, 3, 64, 16
    cache, bt, keys, values = make_cache(lens, hkv, d, bs, torch.float32)
    attended = torch.tensor([200, 100, 64])

    def step(seq, order, prev_state, prev_table, every=3, q=None, similarity=0.0, budget=attended):
        p = plan(cache, bt[order], seq[order], budget[order], hkv * g)
        state = C.plan_reuse(p, prev_state, every)
        q = torch.randn(len(order), hkv * g, d) if q is None else q
        out = torch.empty_like(q)
        kept = C.sparse_decode(q, cache, p, 0.125, out, prev_table, similarity)
        fresh = C.select_pages(q, cache, p)
        ref = naive_pages_attention(q, [keys[i] for i in order], [values[i] for i in order], kept.table, p.seq_lens, hkv,
                                    BlockPositions(bt[order], seq[order].tolist(), bs), 0.125)
        assert rel_err(out, ref) < RTOL[torch.float32]  # it attends exactly the table it returns
        return p, state, kept, fresh

    seq = torch.tensor([999, 512, 259])
    p0, s0, t0, f0 = step(seq, [0, 1, 2], None, None)
    assert p0.reuse is None and torch.equal(t0.table, f0)  # first step: everyone selects
    # next step, batch reordered; request 1 (512 -> 513 tokens) starts a new page: its heads keep
    # their pages and attend the new one as well, one page beyond the budget
    seq1 = seq + 1
    p1, s1, t1, f1 = step(seq1, [2, 0, 1], s0, t0)
    r1 = p1.reuse
    assert r1.src.tolist() == [2, 0, 1] and r1.prev_uid == p0.uid
    assert r1.rows.tolist() == [4, 5, 0, 1, 2, 3] and r1.keep.all()
    assert r1.grown.mask.any(1).tolist() == [False] * 4 + [True] * 2 and p1.extra.tolist() == [0, 0, 1]
    n0 = int(p0.count[1])
    assert int(p1.count[2]) == n0 + 1 and p1.width == max(p0.width, n0 + 1)
    assert int(p1.seq_lens[4]) == int(p0.seq_lens[2]) + 1 and p1.attended_tokens == int(p1.seq_lens.sum()) // hkv
    rows = lambda t, i: t.view(-1, hkv, t.shape[1])[i]  # noqa: E731
    assert torch.equal(rows(t1.table, 0)[:, : p0.width], rows(t0.table, 2)) and torch.equal(rows(t1.table, 1)[:, : p0.width],
                                                                                      rows(t0.table, 0))
    new_page = bt[1, 32].item() * hkv + torch.arange(hkv)
    assert torch.equal(rows(t1.table, 2)[:, :n0], rows(t0.table, 1)[:, :n0])
    assert (rows(t1.table, 2)[:, n0:] == new_page[:, None]).all()
    assert not torch.equal(t1.table, f1)  # the kept rows are not what these queries would pick
    # a table of another step is never reused
    p_stale, _, t_stale, f_stale = step(seq1, [2, 0, 1], s0, C.KeptSelection(t0.uid - 1, t0.table, None))
    assert torch.equal(t_stale.table, f_stale)
    # third step: with every=3 everyone keeps, request 1 its grown selection (no page added again)
    p2, s2, t2, f2 = step(seq1 + 1, [2, 0, 1], s1, t1)
    assert p2.reuse.src.tolist() == [0, 1, 2] and s2.age.tolist() == [2, 2, 2] and p2.extra.tolist() == [0, 0, 1]
    assert p2.reuse.grown is None and torch.equal(t2.table, t1.table[:, : p2.width])
    # with every=2 instead everyone selects again, request 1 back at its budget's count
    p2b, s2b, t2b, f2b = step(seq1 + 1, [2, 0, 1], s1, t1, every=2)
    assert p2b.reuse is None and p2b.extra is None and torch.equal(t2b.table, f2b)
    assert s2b.age.tolist() == [0, 0, 0] and s2b.extra.tolist() == [0, 0, 0] and int(p2b.count[2]) == n0
    # instead: request 1 gains a second new page (513 -> 529 tokens) and request 2's budget grows:
    # both select afresh, the grown request back at its budget's count
    grow_budget = attended + torch.tensor([0, 0, 64])
    p3, s3, t3, f3 = step(torch.tensor([1000, 529, 260]), [2, 0, 1], s1, t1, budget=grow_budget)
    assert p3.reuse.src.tolist() == [-1, 1, -1] and p3.extra is None and s3.extra.tolist() == [0, 0, 0]
    assert torch.equal(rows(t3.table, 2), rows(f3, 2)) and torch.equal(rows(t3.table, 0), rows(f3, 0))
    assert torch.equal(rows(t3.table, 1)[:, : p0.width], rows(t0.table, 0))


def test_reselect_similarity_reselects_the_heads_whose_query_moved():
    """``reselect_similarity``: within ``reselect_every`` a (request, KV head) keeps its pages only
    while its query stays close (cosine) to the query it selected them with; the reference query
    is the selecting one, not the last kept one, so a slow drift also ends the reuse."""
    lens, hkv, g, d, bs = [1001, 700], 2, 3, 64, 16
    cache, bt, keys, values = make_cache(lens, hkv, d, bs, torch.float32)
    attended, seq = torch.tensor([200, 100]), torch.tensor(lens) - 2  # no new page in the next steps
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    q0 = torch.randn(2, hkv * g, d)
    flat0 = q0.view(2 * hkv, g * d)
    u = torch.randn(g * d)  # a direction to turn row 0 towards, orthogonal to it
    u = unit(u - (u @ unit(flat0[0])) * unit(flat0[0]))

    def turned(deg):  # row 0's query turned by `deg` degrees away from q0's, same norm
        t = torch.tensor(deg * torch.pi / 180)
        return (torch.cos(t) * unit(flat0[0]) + torch.sin(t) * u) * flat0[0].norm()

    def step(seq_, q, state, prev, similarity=0.9):
        p = plan(cache, bt, seq_, attended, hkv * g)
        new_state = C.plan_reuse(p, state, 4)
        out = torch.empty_like(q)
        kept = C.sparse_decode(q, cache, p, 0.125, out, prev, similarity)
        return p, new_state, kept, out, C.select_pages(q, cache, p)

    p0, s0, k0, _, f0 = step(seq, q0, None, None)
    assert torch.equal(k0.table, f0) and torch.allclose(k0.ref_queries, unit(flat0))
    # step 1: row 0 turns 20 degrees (cos 0.94: kept); rows 1 and 2 turn to unrelated queries
    q1 = q0 + 0.01 * torch.randn_like(q0)
    flat1 = q1.view(2 * hkv, g * d)
    flat1[0] = turned(20)
    flat1[1], flat1[2] = torch.randn(g * d), torch.randn(g * d)
    p1, s1, k1, out1, f1 = step(seq + 1, q1, s0, k0)
    moved = [False, True, True, False]
    for r in range(4):
        assert torch.equal(k1.table[r], f1[r] if moved[r] else k0.table[r]), r
        assert torch.allclose(k1.ref_queries[r], unit(flat1[r]) if moved[r] else k0.ref_queries[r]), r
    assert any(not torch.equal(k0.table[r], f1[r]) for r in (1, 2))  # the moved heads really choose anew
    ref = naive_pages_attention(q1, keys, values, k1.table, p1.seq_lens, hkv, BlockPositions(bt, (seq + 1).tolist(), bs),
                                0.125)
    assert rel_err(out1, ref) < RTOL[torch.float32]
    # without the gate every row keeps its pages
    k1_all = C.sparse_decode(q1, cache, p1, 0.125, torch.empty_like(q1), k0, 0.0)
    assert torch.equal(k1_all.table, k0.table) and k1_all.ref_queries is None
    # step 2: row 0 turns on to 40 degrees: 20 from step 1's query, 40 from the one it selected with
    q2 = q1.clone()
    q2.view(2 * hkv, g * d)[0] = turned(40)
    _, _, k2, _, f2 = step(seq + 2, q2, s1, k1)
    assert torch.equal(k2.table[0], f2[0]) and torch.equal(k2.table[3], k0.table[3])


def naive_softmax_attention(q, k, v, scale, positions, qpos, window=-1, softcap=0.0, sinks=None):
    """float64 attention of one query head over ``positions`` of its keys, with a sliding window
    (the last ``window`` positions up to ``qpos``), a logit soft cap and a sink logit."""
    pos = positions[(positions <= qpos) & ((window < 0) | (positions > qpos - window))]
    logits = (k[pos].double() @ q.double()) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if sinks is not None:
        logits = torch.cat([logits, sinks.double().view(1)])
    p = torch.softmax(logits, 0)
    return p[: len(pos)] @ v[pos].double()


@pytest.mark.parametrize("hkv, group", [(1, 4), (2, 3), (3, 1)])
def test_soft_cap_and_sinks_in_the_fused_decode_equal_the_reference(hkv, group):
    """The sparse decode with a layer's soft cap and sinks (one op call per KV head when there are
    sinks and several KV heads) equals the reference; at full budget both equal plain float64 attention."""
    lens, d, bs = [700, 90, 333], 64, 16
    cache, bt, keys, values = make_cache(lens, hkv, d, bs, torch.float32)
    seq, nh = torch.tensor(lens), hkv * group
    q = 3 * torch.randn(len(lens), nh, d)  # logits of several units: the cap bends them
    softcap, sinks = 2.5, torch.randn(nh)
    softmax = C.Softmax(softcap=softcap, sinks=sinks)
    for attended in (torch.tensor([150, 90, 100]), seq.clone()):
        p = plan(cache, bt, seq, attended, nh)
        out = torch.full_like(q, float("nan"))
        C.sparse_decode(q, cache, p, 0.125, out, softmax=softmax)
        params = P(sink_tokens=SINK, local_window=WINDOW, selection="quest")
        ref = R.sparse_decode(q, cache, bt, seq, attended, 0.125, params, softcap, sinks)
        assert rel_err(out, ref) < RTOL[torch.float32]
        plain = R.sparse_decode(q, cache, bt, seq, attended, 0.125, params)
        assert rel_err(plain, ref) > 100 * RTOL[torch.float32]  # the cap and sinks do change the result
    naive = torch.stack([torch.stack([naive_softmax_attention(q[r, h], keys[r][:, h // group], values[r][:, h // group],
                                                               0.125, torch.arange(n), n - 1, softcap=softcap,
                                                               sinks=sinks[h]) for h in range(nh)])
                         for r, n in enumerate(lens)])
    assert rel_err(out, naive) < RTOL[torch.float32]


@pytest.mark.parametrize("window", [1, 40, 64])
def test_sliding_window_soft_cap_and_sinks_in_dense_attention(window):
    """vLLM's op through the plugin's attention() with a layer's window, cap and sinks: chunked
    prefill and decode rows equal float64 attention over the last ``window`` positions."""
    lens, hkv, g, d, bs = [300, 77, 129], 2, 3, 64, 16
    cache, bt, keys, values = make_cache(lens, hkv, d, bs, torch.float32)
    q_lens = [50, 77, 1]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = 3 * torch.randn(int(qsl[-1]), hkv * g, d)
    seq = torch.tensor(lens, dtype=torch.int32)
    sinks = torch.randn(hkv * g)
    softmax = C.Softmax(window=window, softcap=4.0, sinks=sinks)
    md = C.scheduler_metadata(seq, qsl, hkv * g, hkv, d, torch.float32, C.cpu_isa(bs), window)
    out = torch.empty_like(q)
    C.attention(q, cache, bt, seq, qsl, md, 0.125, out, softmax)
    for r, n in enumerate(lens):
        for i in range(q_lens[r]):
            row, qpos = int(qsl[r]) + i, n - q_lens[r] + i
            want = torch.stack([naive_softmax_attention(q[row, h], keys[r][:, h // g], values[r][:, h // g], 0.125,
                                                        torch.arange(n), qpos, window, 4.0, sinks[h])
                                for h in range(hkv * g)])
            assert rel_err(out[row], want) < 1e-4, (r, i)
    ref = R.paged_attention(q, cache, bt, seq, qsl, 0.125, window, 4.0, sinks)  # the oracle has them too
    assert rel_err(out, ref) < RTOL[torch.float32]
    assert rel_err(R.paged_attention(q, cache, bt, seq, qsl, 0.125), ref) > 100 * RTOL[torch.float32]


def test_reference_dense_decode_with_window_soft_cap_and_sinks():
    """The oracle's decode with a layer's window, cap and sinks equals vLLM's op and float64 attention."""
    lens, hkv, g, d, bs = [300, 77, 129], 2, 3, 64, 16
    cache, bt, keys, values = make_cache(lens, hkv, d, bs, torch.float32)
    q = 3 * torch.randn(len(lens), hkv * g, d)
    seq, sinks = torch.tensor(lens, dtype=torch.int32), torch.randn(hkv * g)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    out = torch.empty_like(q)
    md = C.scheduler_metadata(seq, qsl, hkv * g, hkv, d, torch.float32, C.cpu_isa(bs), 40)
    C.attention(q, cache, bt, seq, qsl, md, 0.125, out, C.Softmax(40, 4.0, sinks))
    ref = R.dense_decode(q, cache, bt, seq, 0.125, window=40, softcap=4.0, sinks=sinks)
    naive = torch.stack([torch.stack([naive_softmax_attention(q[r, h], keys[r][:, h // g], values[r][:, h // g], 0.125,
                                                               torch.arange(n), n - 1, 40, 4.0, sinks[h])
                                      for h in range(hkv * g)]) for r, n in enumerate(lens)])
    assert rel_err(ref, naive) < RTOL[torch.float32] and rel_err(out, naive) < 1e-4
