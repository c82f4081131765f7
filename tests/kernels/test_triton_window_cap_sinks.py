"""A layer's sliding window, logit soft cap and sinks in every Triton attention kernel, against
:mod:`.reference` (the CPU route's oracle, itself tested against vLLM's op).

Run natively on a GPU, else under the Triton interpreter (set before the kernels are imported), so
the shapes are small. Inputs are fresh random draws every run: scales large enough that the cap
bends the logits, sinks of either sign, windows shorter and longer than a key tile, and each case
first checks that its option really changes the reference's output (no vacuous comparison).
With a window, the blocks wholly behind every query's window are swapped in the kernels' block
table for a never-written (NaN) block, as vLLM frees them: a kernel that read one would return NaN.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from paged_case import make_case, random_indices, random_pages, rel_err  # noqa: E402
from vllm_sparse.kernels import ops  # noqa: E402
from vllm_sparse.kernels import reference as R  # noqa: E402
from vllm_sparse.kernels.selection import compact_pages, page_positions  # noqa: E402
from vllm_sparse.kernels.selectors import SelectParams  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1e-2}  # relative error vs the float32 reference
FORCE = dict(force_triton=True)
SCALE = 0.3  # q·k of unit-normal rows of 64 dims: logits of std ~2.4, so a cap of 2-5 bends them


def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def options(num_heads: int, window: bool, softcap: bool, sinks: bool, window_len: int = 0) -> dict:
    """Random values of the options asked for: a cap in [2, 5), sinks in N(0, 2²) (of either sign)."""
    opts = {}
    if window:
        opts["window"] = window_len
    if softcap:
        opts["softcap"] = 2.0 + 3.0 * torch.rand(()).item()
    if sinks:
        opts["sinks"] = 2.0 * torch.randn(num_heads, device=DEV)
    return opts


def assert_options_matter(ref_with, ref_without) -> None:
    assert rel_err(ref_without, ref_with) > 1e-2, "the options do not change this case's output"


def freed_table(c, first_needed) -> torch.Tensor:
    """The case's block table with every block wholly before position ``first_needed[b]`` replaced by
    an unwritten (NaN-poisoned) block, as vLLM's sliding-window manager frees them."""
    used = set(c.block_table[c.block_table >= 0].tolist())
    spare = next(i for i in range(c.cache.num_blocks) if i not in used)
    bt = c.block_table.clone()
    bs = c.cache.block_size
    for b, first in enumerate(first_needed):
        bt[b, : max(int(first), 0) // bs] = spare
    return bt


COMBOS = [  # (window, softcap, sinks)
    (True, False, False), (False, True, False), (False, False, True), (True, True, False), (True, True, True),
    (False, True, True),
]


# --------------------------------------------------------------------------------------
# prefill / chunked prefill
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("combo", range(len(COMBOS)))
@pytest.mark.parametrize("num_heads, num_kv_heads, dtype, window_len", [
    (4, 1, F32, 20),  # a window shorter than a key tile
    (6, 2, F16, 1),  # every row attends itself only
    (9, 3, BF16, 150),  # longer than the block's rows' reach: the whole causal range of some
])
def test_paged_attention_prefill_and_chunks(combo, num_heads, num_kv_heads, dtype, window_len):
    window, softcap, sinks = COMBOS[combo]
    lens, q_lens = [1, 45, 17, 230, 33], [1, 45, 5, 100, 0]  # decode, prefill, chunks, empty
    head_size = 64
    c = make_case(lens, num_heads, num_kv_heads, head_size, 16, 8, dtype, device=DEV)
    qsl = torch.tensor([0] + q_lens, device=DEV).cumsum(0)
    rows = int(qsl[-1])
    q = torch.randn(rows + 2, num_heads, head_size, device=DEV).to(dtype)  # 2 padding rows
    opts = options(num_heads, window, softcap, sinks, window_len)
    ref = R.paged_attention(q.float(), c.cache, c.block_table, c.seq_lens, qsl, SCALE, **opts)
    plain = R.paged_attention(q.float(), c.cache, c.block_table, c.seq_lens, qsl, SCALE)
    assert_options_matter(ref[:rows], plain[:rows])
    bt = c.block_table
    if window:  # blocks behind the first query's window are free
        bt = freed_table(c, [n - ql - window_len + 1 for n, ql in zip(lens, q_lens)])
    out = ops.paged_attention(q, c.cache, bt, c.seq_lens, qsl, SCALE, out=nan_like(q.shape, dtype), **opts, **FORCE)
    assert bool(out[:rows].isfinite().all()) and bool(out[rows:].isnan().all())
    assert rel_err(out[:rows], ref[:rows]) < TOL[dtype]


def test_paged_attention_all_decode_batch_takes_the_window_to_the_decode_kernel():
    lens = [170, 1, 33]
    c = make_case(lens, 6, 2, 64, 16, 4, F32, device=DEV)
    qsl = torch.arange(4, device=DEV)
    q = torch.randn(3, 6, 64, device=DEV)
    opts = options(6, True, True, True, window_len=40)
    ref = R.paged_attention(q, c.cache, c.block_table, c.seq_lens, qsl, SCALE, **opts)
    bt = freed_table(c, [n - 40 for n in lens])
    out = ops.paged_attention(q, c.cache, bt, c.seq_lens, qsl, SCALE, max_query_len=1, **opts, **FORCE)
    assert rel_err(out, ref) < TOL[F32]


# --------------------------------------------------------------------------------------
# split-K decode: dense, per-token index, per-head tables
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("combo", range(len(COMBOS)))
@pytest.mark.parametrize("num_heads, num_kv_heads, dtype, num_splits, window_len", [
    (4, 1, F32, 1, 50), (6, 2, F32, 3, 130), (3, 3, F16, 2, 7), (8, 2, BF16, 4, 120),
])
def test_dense_decode(combo, num_heads, num_kv_heads, dtype, num_splits, window_len):
    """Several splits: the sinks are counted once in the merge; a window shorter than a split's share
    leaves some splits empty."""
    window, softcap, sinks = COMBOS[combo]
    lens = [33, 1, 200, 129]
    c = make_case(lens, num_heads, num_kv_heads, 64, 16, 8, dtype, device=DEV)
    q = torch.randn(len(lens), num_heads, 64, device=DEV).to(dtype)
    opts = options(num_heads, window, softcap, sinks, window_len)
    ref = R.dense_decode(q.float(), c.cache, c.block_table, c.seq_lens, SCALE, **opts)
    assert_options_matter(ref, R.dense_decode(q.float(), c.cache, c.block_table, c.seq_lens, SCALE))
    bt = freed_table(c, [n - window_len for n in lens]) if window else c.block_table
    out = nan_like((len(lens) + 1, num_heads, 64), dtype)  # one spare row stays untouched
    ops.dense_decode(q, c.cache, bt, c.seq_lens, SCALE, out=out, num_splits=num_splits, **opts, **FORCE)
    assert bool(out[:-1].isfinite().all()) and bool(out[-1].isnan().all())
    assert rel_err(out[:-1], ref) < TOL[dtype]


@pytest.mark.parametrize("softcap, sinks", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("num_heads, num_kv_heads, dtype, shared, num_splits", [
    (4, 1, F32, True, 1), (6, 2, F16, True, 3), (6, 3, F32, False, 2), (8, 2, BF16, True, 2),
])
def test_sparse_attention(softcap, sinks, num_heads, num_kv_heads, dtype, shared, num_splits):
    """A row with no position at all: zeros (with sinks the reference's answer too; without, it is NaN)."""
    lens = [1, 45, 130]
    c = make_case(lens, num_heads, num_kv_heads, 64, 16, 8, dtype, device=DEV)
    s = num_kv_heads if shared else num_heads
    idx = random_indices(lens, s, 48, DEV)
    idx[-1, 0] = -1  # the last request's first row: no position
    q = torch.randn(len(lens), num_heads, 64, device=DEV).to(dtype)
    opts = options(num_heads, False, softcap, sinks)
    ref = R.sparse_attention(q.float(), c.cache, c.block_table, idx, SCALE, **opts)
    empty = torch.arange(num_heads, device=DEV) < num_heads // s  # the heads of the empty row
    live = ~empty[None].expand(len(lens), -1).clone()
    live[:-1] = True
    plain = R.sparse_attention(q.float(), c.cache, c.block_table, idx, SCALE)
    assert_options_matter(ref[live], plain[live])
    out = ops.sparse_attention(q, c.cache, c.block_table, idx.to(torch.int32), SCALE, out=nan_like(q.shape, dtype),
                               num_splits=num_splits, **opts, **FORCE)
    assert bool(out.isfinite().all()) and bool((out[-1, empty] == 0).all())
    assert rel_err(out[live], ref[live]) < TOL[dtype]
    if sinks:
        assert bool((ref[-1, empty] == 0).all())


@pytest.mark.parametrize("softcap, sinks", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("num_heads, num_kv_heads, dtype, shared, num_splits", [
    (4, 1, F32, True, 1), (6, 2, F16, True, 3), (6, 3, F32, False, 2), (8, 2, BF16, True, 2),
])
def test_table_decode(softcap, sinks, num_heads, num_kv_heads, dtype, shared, num_splits):
    """Each (request, selection head) walks its own table of random pages, the partial page among them;
    the reference over the tables is the reference over those pages' positions."""
    lens, bs = [1, 45, 130], 16
    c = make_case(lens, num_heads, num_kv_heads, 64, bs, bs, dtype, device=DEV)
    s = num_kv_heads if shared else num_heads
    pages = random_pages(lens, s, bs, DEV)
    tables, tlens = compact_pages(pages, c.block_table, c.seq_lens, bs)
    q = torch.randn(len(lens), num_heads, 64, device=DEV).to(dtype)
    opts = options(num_heads, False, softcap, sinks)
    ref = R.table_decode(q.float(), c.cache, tables, tlens, SCALE, **opts)
    pos = page_positions(pages, bs)
    pos = torch.where(pos < c.seq_lens[:, None, None], pos, -1)
    torch.testing.assert_close(ref, R.sparse_attention(q.float(), c.cache, c.block_table, pos, SCALE, **opts))
    assert_options_matter(ref, R.table_decode(q.float(), c.cache, tables, tlens, SCALE))
    out = ops.table_decode(q, c.cache, tables, tlens, SCALE, out=nan_like(q.shape, dtype), num_splits=num_splits,
                           **opts, **FORCE)
    assert bool(out.isfinite().all())
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("num_heads, num_kv_heads, dtype, selection, granularity", [
    (3, 1, F32, "exact_pages", "kv_head"), (6, 2, BF16, "quest", "kv_head"), (6, 3, F32, "token", "query_head"),
])
def test_sparse_decode_with_soft_cap_and_sinks(num_heads, num_kv_heads, dtype, selection, granularity):
    """The whole pipeline, both Triton routes (compacted tables for whole pages, the index otherwise):
    the reference's output with the layer's cap and sinks, the same selection as without them."""
    lens, bs = [300, 1, 77, 160], 16
    c = make_case(lens, num_heads, num_kv_heads, 64, bs, bs, dtype, device=DEV)
    q = torch.randn(len(lens), num_heads, 64, device=DEV).to(dtype)
    attended = torch.tensor([64, 64, 40, 400], device=DEV)  # the last: budget >= context
    params = SelectParams.create(selection, granularity, sink_tokens=2, local_window=8, candidate_factor=2.0)
    opts = options(num_heads, False, True, True)
    args = (c.cache, c.block_table, c.seq_lens, attended, SCALE, params)
    ref = R.sparse_decode(q.float(), *args, **opts)
    assert_options_matter(ref, R.sparse_decode(q.float(), *args))
    out = ops.sparse_decode(q, *args, out=nan_like(q.shape, dtype), max_seq_len=300, **opts, **FORCE)
    assert bool(out.isfinite().all())
    assert rel_err(out, ref) < TOL[dtype]
    s = num_kv_heads if granularity == "kv_head" else num_heads
    idx = torch.empty((len(lens), s, params.index_capacity(160, bs)), dtype=torch.long, device=DEV)
    by_index = ops.sparse_decode(q, *args, indices_out=idx, max_seq_len=300, **opts, **FORCE)
    assert rel_err(by_index, ref) < TOL[dtype]


def test_sinks_of_another_shape_are_refused():
    c = make_case([20], 4, 2, 64, 16, 16, F32, device=DEV)
    q = torch.randn(1, 4, 64, device=DEV)
    with pytest.raises(ValueError, match=r"sinks must be a contiguous \[num_heads=4\]"):
        ops.dense_decode(q, c.cache, c.block_table, c.seq_lens, SCALE, sinks=torch.zeros(2, device=DEV), **FORCE)


# --------------------------------------------------------------------------------------
# realistic shapes, GPU only (benchmarks/gpu_check.sh runs them)
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("window_len, softcap, sinks", [(4096, False, True), (1024, True, False), (-1, True, True)])
def test_gpu_window_cap_sinks_at_realistic_shapes(window_len, softcap, sinks):
    """Gemma-2-like (a 4k/1k window, a cap of 50) and gpt-oss-like (sinks) layers at 8k context in bf16:
    chunked prefill, dense decode with the device's own split count, sparse decode over compacted
    tables; blocks behind the windows freed."""
    num_heads, hkv, d, dtype, bs = 32, 8, 128, BF16, 16
    lens, q_lens = [4000, 8191, 1, 2049], [512, 300, 1, 2049]
    c = make_case(lens, num_heads, hkv, d, bs, bs, dtype, device=DEV)
    opts = options(num_heads, window_len > 0, softcap, sinks, window_len)
    if softcap:
        opts["softcap"] = 50.0
    scale = 2.0 * d**-0.5
    qsl = torch.tensor([0] + q_lens, device=DEV).cumsum(0)
    q = torch.randn(int(qsl[-1]), num_heads, d, device=DEV).to(dtype)
    bt = freed_table(c, [n - ql - window_len + 1 for n, ql in zip(lens, q_lens)]) if window_len > 0 else c.block_table
    out = ops.paged_attention(q, c.cache, bt, c.seq_lens, qsl, scale, **opts)
    ref = R.paged_attention(q.float(), c.cache, c.block_table, c.seq_lens, qsl, scale, **opts)
    assert bool(out.isfinite().all()) and rel_err(out, ref) < TOL[dtype]
    qd = torch.randn(len(lens), num_heads, d, device=DEV).to(dtype)
    bt = freed_table(c, [n - window_len for n in lens]) if window_len > 0 else c.block_table
    dense = ops.dense_decode(qd, c.cache, bt, c.seq_lens, scale, **opts)
    assert rel_err(dense, R.dense_decode(qd.float(), c.cache, c.block_table, c.seq_lens, scale, **opts)) < TOL[dtype]
    if window_len < 0:  # a full-attention layer decodes sparsely
        opts.pop("window", None)
        params = SelectParams.create("exact_pages", sink_tokens=4, local_window=64)
        attended = torch.tensor([512, 724, 256, 9000], device=DEV)
        args = (c.cache, c.block_table, c.seq_lens, attended, scale, params)
        sparse = ops.sparse_decode(qd, *args, capacity=params.index_capacity(2049, bs), max_seq_len=8192, **opts)
        assert rel_err(sparse, R.sparse_decode(qd.float(), *args, **opts)) < TOL[dtype]
