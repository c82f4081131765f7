"""The fused CPU kernels (``kernels/cpu_select.cpp``, built by ``kernels/cpu_ext.py``) against their
torch twins (``kernels/cpu_select.py``, ``kernels/reference.py``). No vLLM: the cache is written by the
reference in vLLM's CPU key layout (``key_transposed``), the plan is built from the selection rules."""

from types import SimpleNamespace

import pytest
import torch

from vllm_sparse.kernels import PagedKVCache, cpu_ext
from vllm_sparse.kernels import reference as R
from vllm_sparse.kernels.cpu_select import reuse_rows_reference, select_pages_reference
from vllm_sparse.kernels.selection import forced_page_range, page_counts

SINK, WINDOW = 4, 16


@pytest.fixture(scope="module")
def ext():
    try:
        return cpu_ext.load()
    except RuntimeError as e:  # no C++ toolchain here (it comes with the cpu extra's vLLM)
        pytest.skip(str(e))


def written_cache(lens, num_kv_heads, head_size, block_size, dtype):
    """Requests of ``lens`` tokens in shuffled blocks of a ``key_transposed`` cache, written by the reference."""
    nblk = [-(-n // block_size) for n in lens]
    nb = sum(nblk) + 5
    cache = PagedKVCache.allocate(nb, block_size, num_kv_heads, head_size, block_size, dtype, key_transposed=True)
    perm = torch.randperm(nb)
    bt = torch.full((len(lens), max(nblk) + 2), -1, dtype=torch.int32)
    used = 0
    for b, (n, m) in enumerate(zip(lens, nblk)):
        bt[b, :m] = perm[used: used + m]
        used += m
        pos = torch.arange(n)
        slots = bt[b, pos // block_size].long() * block_size + pos % block_size
        k, v = (torch.randn(n, num_kv_heads, head_size).to(dtype) for _ in range(2))
        R.write_kv(k, v, slots, cache)
    return cache, bt


def quest_plan(seq, attended, bt, block_size):
    """The fields ``quest_select`` reads, for plain Quest (``vllm_sparse.cpu_attention.plan_decode``'s rules)."""
    num_pages = (seq + block_size - 1) // block_size
    count = page_counts(seq, torch.minimum(attended, seq), block_size, SINK, WINDOW, 1.0, quest=True)
    lo, hi = forced_page_range(seq, block_size, SINK, WINDOW)
    return SimpleNamespace(block_table=bt[:, : int(num_pages.max())].long().clamp_min(0).contiguous(), seq=seq,
                           num_pages=num_pages, count=count, candidates=count, forced_lo=lo, forced_hi=hi,
                           width=int(count.max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_cpp_page_selection_equals_its_torch_twin(ext, dtype, group):
    lens, hkv, d, bs = [900, 17, 450, 1600], 3, 64, 16
    cache, bt = written_cache(lens, hkv, d, bs, dtype)
    seq = torch.tensor(lens)
    q = torch.randn(len(lens), hkv * group, d).to(dtype)
    p = quest_plan(seq, torch.tensor([160, 17, 300, 200]), bt, bs)
    got = torch.empty(len(lens) * hkv, p.width, dtype=torch.int32)
    ext.quest_select(q, cache.slot_rows, 2 * bs * d, p.block_table, p.seq, p.count, p.candidates, p.forced_lo,
                     p.forced_hi, bs, 0, False, got, None, None, None)
    want = select_pages_reference(q, cache, p)
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:  # bf16 inputs, fp32 sums in another order: near-ties may swap, nothing else
        rows = p.count.repeat_interleave(hkv)
        same = sum(len(set(a[:n].tolist()) & set(b[:n].tolist())) for a, b, n in zip(got, want, rows.tolist()))
        assert same >= 0.95 * int(rows.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpp_summary_update_equals_reference(ext, dtype):
    hkv, d, bs, ps = 2, 64, 32, 16  # two pages per block: the kernel handles any page size
    ours = PagedKVCache.allocate(12, bs, hkv, d, ps, dtype)
    ref = PagedKVCache.allocate(12, bs, hkv, d, ps, dtype)
    order = torch.randperm(12)
    for lo, hi in ((0, 37), (37, 38), (38, 200), (200, 201)):  # chunks across page and block edges, then decode
        pos = torch.arange(lo, hi)
        slots = torch.cat([order[pos // bs] * bs + pos % bs, torch.full((3,), -1)])  # padding slots: skipped
        k = torch.randn(hi - lo + 3, hkv, d).to(dtype)
        ext.update_page_summaries(k, slots.contiguous(), ours.slot_rows, 2 * bs * d, bs, ps)
        R.update_page_summaries(k, slots, ref)
        touched = order[: -(-hi // bs)]  # pages not yet written stay NaN in both
        for a, b in ((ours.key_min, ref.key_min), (ours.key_max, ref.key_max)):
            torch.testing.assert_close(a[touched], b[touched], rtol=0, atol=0, equal_nan=True)
        assert not ours.key_min[order[0]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prev_width, width, grown, gate, refresh",
                         [(7, 12, True, True, True), (12, 7, False, True, False), (9, 9, True, False, False),
                          (9, 9, False, True, True)])
def test_cpp_reuse_rows_equals_its_torch_twin(ext, dtype, prev_width, width, grown, gate, refresh):
    """The C++ ``reuse_rows`` (one call per layer) against its torch twin:
    last step's rows gathered and padded to the width (repeating their last entry) or cut to it,
    the grown rows' new page, the ``reselect_similarity`` gate with its refresh marks and the kept
    rows' reference queries. Rows within float rounding of the threshold may go either way."""
    b, h, g, d, thr = 6, 3, 3, 64, 0.9
    n = b * h
    q = torch.randn(b, h * g, d).to(dtype)
    q_wide = torch.randn(b, h * g, 2 * d).to(dtype)[..., :d]  # strided heads, as a view of a qkv split would be
    q_wide.copy_(q)
    prev_table = torch.randint(0, 1000, (n + 3, prev_width), dtype=torch.int32)
    rows = torch.randint(0, n + 3, (n,))
    keep = torch.rand(n) < 0.7
    at = torch.rand(n, width) < 0.2 if grown else None
    new = torch.randint(0, 1000, (n,), dtype=torch.int32) if grown else None
    unit = lambda x: torch.nn.functional.normalize(x, dim=1)  # noqa: E731
    flat = unit(q.float().reshape(n, g * d))
    rows = torch.randperm(n + 3)[:n]  # distinct: each row's reference at a chosen cosine to its query
    cos = torch.empty(n).uniform_(0.6, 1.0)  # both sides of the 0.9 threshold
    other = unit(torch.randn(n, g * d))
    other = unit(other - (other * flat).sum(1, keepdim=True) * flat)
    prev_ref = unit(torch.randn(n + 3, g * d))
    prev_ref[rows] = cos[:, None] * flat + (1 - cos[:, None] ** 2).sqrt() * other
    sim = thr if gate else 0.0
    want = reuse_rows_reference(q, h, prev_table, rows, keep, width, at, new, prev_ref, sim, refresh)
    for query in (q, q_wide):
        got = ext.reuse_rows(query, h, prev_table, rows, keep, width, at, new, prev_ref, sim, refresh)
        assert torch.equal(got[0], want[0])
        if not gate:
            assert torch.equal(got[1], keep) and got[2].numel() == 0 and got[3].numel() == 0 and want[3] is None
            continue
        dots = (flat * prev_ref[rows]).sum(1)
        sure = (dots - thr).abs() > 1e-5
        assert torch.equal(got[1][sure], want[1][sure]) and bool((want[1] != keep).any())  # the gate bites
        if refresh:
            assert torch.equal(got[2][sure], want[2][sure]) and bool(want[2].any())
        else:
            assert got[2].numel() == 0 and want[2] is None
        torch.testing.assert_close(got[3][sure], want[3][sure], rtol=1e-6, atol=1e-6)
