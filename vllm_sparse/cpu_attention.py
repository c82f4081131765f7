"""The fused CPU path: vLLM's own paged-attention op over compacted block tables.

On the CPU platform the backend stores K/V the way vLLM's CPU kernels do (written by
``cpu_attn_reshape_and_cache``): the ``key_transposed`` layout of
:mod:`vllm_sparse.kernels.layout` for the ``vec``/``vec16`` ISA, or, where vLLM's stock backend
would run its AMX kernel (bf16 on a CPU with AMX, blocks of 32k tokens) and only this fused path
reads the cache, the AMX packing (``PagedKVCache.amx``, :func:`cpu_isa`). Every attention runs
through ``cpu_attention_with_kv_cache``:

* **prefill** (and decode steps where every request attends its whole context): the op over
  the requests' own block tables — the stock backend's kernel, at its speed;
* **sparse decode**: every (request, KV head) becomes one single-KV-head sequence over the
  cache viewed as ``num_blocks * num_kv_heads`` one-head blocks
  (:meth:`~vllm_sparse.kernels.PagedKVCache.head_blocks`). A page is one KV block; the pages
  are ranked by Quest's upper bound ``q⁺·max + q⁻·min`` from the page summaries (``quest``:
  no key is read to select; ``exact_pages``: the best ``candidate_factor × count`` are rescored
  by their exact max ``q·k``), the best ``count`` pages of each head — sink and window pages
  always — form that head's compacted block table, ascending, so the request's last (partial)
  page comes last and the op's causal length arithmetic holds.

*Plan* (:func:`plan_decode`, once per step in the metadata builder, shared by all layers): page
counts from the budget rule, the forced (sink/window) pages, the compacted sequence lengths
and the op's scheduler metadata — all of which depend only on the sequence lengths. *Run*
(per layer): :func:`write_kv` (vLLM's ``reshape_and_cache`` + one C++ call folding the keys into
the page summaries) and :func:`sparse_decode` (one C++ call ranks the pages and writes the
compacted table, then vLLM's op). Four calls per layer, no Python loop over requests, heads or
layers; the C++ kernels (``kernels/cpu_select.cpp``) are checked against their torch twins.

The pure-torch oracle of the decode is :func:`vllm_sparse.kernels.reference.sparse_decode`
with ``selection="quest"`` and ``page_size == block_size``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass

import torch
from vllm import _custom_ops as vllm_ops
from vllm import envs

from vllm_sparse.kernels import PagedKVCache, cpu_ext
from vllm_sparse.kernels.selection import forced_page_range, page_counts, quest_attended
from vllm_sparse.kernels.selectors import SelectParams

__all__ = ["cpu_isa", "cache_isa", "Softmax", "OpShape", "DecodePlan", "ReusePlan", "GrownPages", "KeptSelection", "ReuseBatch",
           "SelectionReuse", "plan_decode", "plan_reuse", "scheduler_metadata", "write_kv", "attention", "select_pages",
           "sparse_decode"]


def cpu_isa(block_size: int, dtype: torch.dtype | None = None, head_size: int = 0, amx_ok: bool = False) -> str:
    """The vLLM CPU attention ISA (and so the K/V layout) of a cache.

    ``amx`` where vLLM's stock backend picks it too (bf16, ``block_size % 32 == 0``, a CPU with AMX
    tiles) and the caller allows it (``amx_ok``: the cache is read by the fused path alone — the
    torch paths need ``[block_size, head_size]`` key rows, which AMX's packing lacks). Otherwise
    ``vec`` (blocks of 32k tokens) or ``vec16``, which both store a block's keys as ``[head_size,
    block_size]`` (``key_transposed``).
    """
    if (amx_ok and dtype == torch.bfloat16 and block_size % 32 == 0 and head_size % 32 == 0
            and torch.cpu._is_amx_tile_supported()):
        return _amx_ready()
    return "vec" if block_size % 32 == 0 else "vec16"


def _amx_ready() -> str:
    torch.cpu._init_amx()  # this process's permission to use AMX tiles (else SIGILL); idempotent
    return "amx"


def cache_isa(cache: PagedKVCache) -> str:
    """The ISA that reads and writes ``cache``'s layout."""
    if cache.amx:
        return _amx_ready()
    assert cache.key_transposed, "the fused CPU path needs the key_transposed or the AMX layout"
    return cpu_isa(cache.block_size)


def scheduler_metadata(seq_lens: torch.Tensor, query_start_loc: torch.Tensor, num_heads: int, num_kv_heads: int,
                       head_size: int, dtype: torch.dtype, isa: str, window: int = -1) -> torch.Tensor:
    """vLLM's CPU attention work split for one batch (built once per step); ``window``: the sliding
    window every layer that uses it attends (-1: none; a layer with a window may still use a split
    planned without one, only less tightly)."""
    if isa == "amx":
        _amx_ready()
    return vllm_ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.shape[0], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=query_start_loc, causal=True, sliding_window_size=window,
        isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
    )


@dataclass(frozen=True)
class OpShape:
    """What vLLM's CPU op needs to plan a step's work split (:func:`scheduler_metadata`) besides lengths."""

    heads_per_seq: int  # query heads per sequence (the GQA group: one sequence per (request, KV head))
    head_size: int
    dtype: torch.dtype
    isa: str


@dataclass(frozen=True)
class GrownPages:
    """Kept rows that attend their request's new (last) page too (:func:`plan_reuse`)."""

    mask: torch.Tensor  # [B * num_kv_heads, width] bool: the table entries that take the new page
    block: torch.Tensor  # [B * num_kv_heads, 1] int32: the new page's one-head block


@dataclass(frozen=True)
class ReusePlan:
    """Which rows of a step keep the previous step's pages (``reselect_every``, :func:`plan_reuse`)."""

    src: torch.Tensor  # [B] int64: the request of the previous batch whose rows it keeps; -1: selects afresh
    rows: torch.Tensor  # [B * num_kv_heads] int64: the previous table's row each row keeps
    keep: torch.Tensor  # [B * num_kv_heads] bool: rows allowed to keep theirs
    prev_uid: int  # the plan whose tables the rows come from
    grown: GrownPages | None  # rows that also attend their request's new page; None: no row does


@dataclass(frozen=True)
class KeptSelection:
    """A layer's selection of one step, which a later step's rows may keep (:func:`sparse_decode`'s result)."""

    uid: int  # the plan it was made under
    table: torch.Tensor  # [B * num_kv_heads, width] int32: the compacted one-head block table attended
    ref_queries: torch.Tensor | None  # [B * num_kv_heads, G * D] float32 unit queries the rows selected with


@dataclass
class DecodePlan:
    """One step's sparse-decode plan for ``B`` decode requests, shared by every layer.

    Attributes:
        block_table: ``[B, P]`` int64 block ids of each request's first ``P`` pages (``P`` = max pages).
        seq: ``[B]`` int64 context lengths.
        num_pages: ``[B]`` int64 pages of each request.
        count: ``[B]`` int64 pages each KV head attends (Quest's rule on the budget, forced pages included).
        candidates: ``[B]`` int64 pages ranked by the bound and rescored by their exact max ``q·k``
            (``== count``: no rescoring, plain Quest).
        forced_lo: ``[B]`` int64 pages ``[0, forced_lo)`` hold sinks: always attended.
        forced_hi: ``[B]`` int64 pages ``[forced_hi, num_pages)`` hold the local window: always attended.
        seq_lens: ``[B * num_kv_heads]`` int32 tokens each (request, KV head) sequence attends
            (its pages, the last one partial).
        query_start_loc: ``[B * num_kv_heads + 1]`` int32 (one query per sequence).
        metadata: the op's scheduler metadata for those sequences.
        attended_tokens: tokens attended per KV head, summed over the batch (what the op reads).
        width: columns of the compacted table (``max(count)``).
        rescore_dims: rescore with the ``q·k`` of only this many dims, those with the largest
            ``Σ|q|`` over the GQA group × key range (SparQ, range-weighted:
            ``kernels.selection.rescore_dims_mask``); ``0``: every dim, the exact ``max q·k``.
        block_size, candidate_factor, op: what re-planning the lengths needs (:func:`_add_pages`).
        refresh_factor: candidates per budget page of a row whose kept selection fails the
            ``reselect_similarity`` gate; ``None``: such a row selects as afresh.
        refresh: ``[B]`` int64 pages ranked by the bound and rescored for such a row (its kept pages
            are rescored on top); ``None`` without ``refresh_factor``.
        uid: this plan's number (unique in the process): which step a layer's kept selection is from.
        reuse: which rows keep the previous step's pages (:func:`plan_reuse`); ``None``: every request
            selects.
        extra: ``[B]`` int64 pages each head attends beyond the budget's (``0`` or ``1``: a kept
            selection that gained the request's new page, :func:`plan_reuse`); ``count`` includes them.
    """

    block_table: torch.Tensor
    seq: torch.Tensor
    num_pages: torch.Tensor
    count: torch.Tensor
    candidates: torch.Tensor
    forced_lo: torch.Tensor
    forced_hi: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    metadata: torch.Tensor
    attended_tokens: int
    width: int
    rescore_dims: int
    block_size: int
    candidate_factor: float
    op: OpShape
    refresh_factor: float | None = None
    refresh: torch.Tensor | None = None
    uid: int = dataclasses.field(default_factory=lambda: next(_PLAN_IDS))
    reuse: ReusePlan | None = None
    extra: torch.Tensor | None = None
    #: the op's work split for one KV head's sequences (a layer with sinks and several KV heads calls
    #: the op per KV head): built by the first such layer of the step, shared by the rest
    kv_head_metadata: torch.Tensor | None = None


_PLAN_IDS = itertools.count()


@dataclass
class ReuseBatch:
    """What :func:`plan_reuse` remembers of a step's decode batch (per request, in batch order)."""

    block_table: torch.Tensor  # [B, P] the requests' block ids (a request is its first block while it runs)
    num_pages: torch.Tensor
    count: torch.Tensor  # [B] the budget's pages (without `extra`)
    extra: torch.Tensor  # [B] pages its heads attend beyond them (a kept selection grown by a new page)
    age: torch.Tensor  # [B] steps since the request last selected
    uid: int  # the plan it describes


class SelectionReuse:
    """The reuse state of ``reselect_every > 1``, in one object owned by the metadata builder: the
    last decode batch (:class:`ReuseBatch`) and each layer's kept selection of that step.

    Per step the builder calls :meth:`plan` (or :meth:`reset` when the step has no fused sparse
    decode); every layer reads its previous selection with :meth:`kept` and stores the new one with
    :meth:`keep`."""

    def __init__(self, every: int):
        self.every = every
        self.batch: ReuseBatch | None = None
        self._kept: dict[str, KeptSelection] = {}

    def plan(self, plan: DecodePlan) -> None:
        """Decide which of ``plan``'s rows keep their pages (sets ``plan.reuse``, grows ``plan``)."""
        self.batch = plan_reuse(plan, self.batch, self.every)

    def reset(self) -> None:
        """Forget the batch and the layers' selections: the next step selects afresh."""
        self.batch = None
        self._kept.clear()

    def kept(self, layer: str) -> KeptSelection | None:
        return self._kept.get(layer)

    def keep(self, layer: str, selection: KeptSelection) -> None:
        self._kept[layer] = selection


def plan_reuse(plan: DecodePlan, prev: ReuseBatch | None, every: int) -> ReuseBatch:
    """Reuse each request's page selection for up to ``every`` decode steps (``reselect_every``).

    A request keeps the pages it attended in the previous step when it was in that step's batch
    (same blocks), its budget's page count (``count``) has not changed and it selected fewer than
    ``every`` steps ago. When it has started a new page since, its heads keep their pages and
    attend the new one too — one page beyond the budget (``plan.extra``) until the request
    selects again; a second new page, or a larger budget, selects afresh. Sets ``plan.reuse``
    (``None`` when every request selects), extends ``plan`` by the grown pages, and returns this
    step's batch.
    """
    bt, num_pages, count = plan.block_table, plan.num_pages, plan.count
    first = bt[:, 0]
    src = torch.full_like(first, -1)
    age, extra, grow = torch.zeros_like(first), torch.zeros_like(first), torch.zeros_like(first, dtype=torch.bool)
    if prev is not None and every > 1:
        match = first[:, None] == prev.block_table[None, :, 0]
        j = match.long().argmax(1)
        pn = prev.num_pages[j]
        w = min(bt.shape[1], prev.block_table.shape[1])
        col = torch.arange(w)[None, :]
        same = ((bt[:, :w] == prev.block_table[j, :w]) | (col >= pn[:, None])).all(1) & (pn <= w)
        ok = match.any(1) & same & (prev.count[j] == count) & (prev.age[j] + 1 < every)
        stay = ok & (pn == num_pages)
        grow = ok & (pn + 1 == num_pages) & (prev.extra[j] == 0)
        src = torch.where(stay | grow, j, src)
        age = torch.where(src >= 0, prev.age[j] + 1, 0)
        extra = torch.where(stay, prev.extra[j], grow.long())
    if bool(extra.any()):
        _add_pages(plan, extra)
    if bool((src >= 0).any()):
        h = plan.seq_lens.shape[0] // src.shape[0]
        rows = (src.clamp_min(0)[:, None] * h + torch.arange(h)[None, :]).reshape(-1)
        grown = None
        if bool(grow.any()):  # once per step: where the grown rows' new page goes (columns count - 1 on)
            last = bt.gather(1, (num_pages - 1)[:, None]).squeeze(1).repeat_interleave(h)
            new = (last * h + torch.arange(h).repeat(src.shape[0])).to(torch.int32)
            at = grow.repeat_interleave(h)[:, None] & (
                torch.arange(plan.width)[None, :] >= plan.count.repeat_interleave(h)[:, None] - 1)
            grown = GrownPages(at, new[:, None])
        plan.reuse = ReusePlan(src, rows, (src >= 0).repeat_interleave(h), prev.uid, grown)
    return ReuseBatch(bt, num_pages, count, extra, age, plan.uid)


def _add_pages(plan: DecodePlan, extra: torch.Tensor) -> None:
    """Let each head of request ``b`` attend ``extra[b]`` more pages: the counts, the op's lengths
    and work split, and the table width follow."""
    h = plan.seq_lens.shape[0] // extra.shape[0]
    plan.extra = extra
    plan.count = plan.count + extra
    plan.candidates = _candidates(plan.count, plan.candidate_factor, plan.num_pages)
    if plan.refresh_factor is not None:
        plan.refresh = _candidates(plan.count, plan.refresh_factor, plan.num_pages)
    plan.seq_lens = (plan.seq_lens + (extra * plan.block_size).to(torch.int32).repeat_interleave(h)).contiguous()
    plan.metadata = _metadata(plan.seq_lens, plan.query_start_loc, plan.op)
    plan.kv_head_metadata = None
    plan.attended_tokens = int(plan.seq_lens.sum()) // h
    plan.width = int(plan.count.max())


def _metadata(seq_lens: torch.Tensor, query_start_loc: torch.Tensor, op: OpShape) -> torch.Tensor:
    """The op's work split for one-KV-head sequences."""
    return scheduler_metadata(seq_lens, query_start_loc, op.heads_per_seq, 1, op.head_size, op.dtype, op.isa)


def _candidates(count: torch.Tensor, candidate_factor: float, num_pages: torch.Tensor) -> torch.Tensor:
    """Pages ranked by the bound and rescored per request: ``ceil(candidate_factor × count)``, at most all."""
    return torch.ceil(count.double() * candidate_factor).long().minimum(num_pages)


def plan_decode(seq_lens: torch.Tensor, attended: torch.Tensor, block_table: torch.Tensor, params: SelectParams, *,
                block_size: int, num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, isa: str,
                refresh_factor: float | None = None) -> DecodePlan:
    """Plan a sparse decode step: which pages count, and the compacted sequences' lengths.

    Args:
        seq_lens: ``[B]`` context lengths (including this step's token).
        attended: ``[B]`` tokens to attend per KV head (budget rule, sinks and window included);
            Quest rounds it up to whole pages (:func:`~vllm_sparse.kernels.selection.page_counts`).
        block_table: ``[B, max_blocks]`` int.
        params: the selection (a ``cpu_fused`` selector, one set per KV head): its sinks and window,
            its candidate factor (:meth:`~vllm_sparse.kernels.selectors.Selector.cpu_candidate_factor`:
            ``> 1`` rescores that many × the budget's pages exactly, ``exact_pages``; 1 is Quest) and
            ``rescore_dims``.
        refresh_factor: candidates per budget page of a row that fails the similarity gate
            (``reselect_candidate_factor``, :class:`DecodePlan` ``refresh``); ``None``: as afresh.
    """
    sink_tokens, local_window = params.sink_tokens, params.local_window
    if not params.selector.cpu_fused or params.per_query_head:
        raise ValueError(f"the fused CPU decode serves one set per KV head of a cpu_fused selector; got "
                         f"{params.selector.name!r}, granularity={params.granularity!r}")
    if local_window < 1:  # the lengths below assume every head attends the request's last (partial) page
        raise ValueError(f"plan_decode needs local_window >= 1 (the page being written is always attended); "
                         f"got {local_window} (SparseConfig.select_params)")
    seq = seq_lens.long()
    bs = block_size
    num_pages = (seq + bs - 1) // bs
    count = page_counts(seq, torch.minimum(attended.long(), seq), bs, sink_tokens, local_window, 1.0, quest=True)
    forced_lo, forced_hi = forced_page_range(seq, bs, sink_tokens, local_window)
    # each head attends its `count` pages; all are whole but the request's last
    lens = quest_attended(seq, attended, bs, sink_tokens, local_window).to(torch.int32).repeat_interleave(num_kv_heads)
    qsl = torch.arange(lens.shape[0] + 1, dtype=torch.int32)
    op = OpShape(num_heads // num_kv_heads, head_size, dtype, isa)
    candidate_factor = params.selector.cpu_candidate_factor(params.candidate_factor)
    return DecodePlan(
        block_table=block_table[:, : int(num_pages.max())].long().clamp_min(0).contiguous(),
        seq=seq,
        num_pages=num_pages,
        count=count,
        candidates=_candidates(count, candidate_factor, num_pages),
        forced_lo=forced_lo,
        forced_hi=forced_hi,
        seq_lens=lens,
        query_start_loc=qsl,
        metadata=_metadata(lens, qsl, op),
        attended_tokens=int(lens.sum()) // num_kv_heads,
        width=int(count.max()),
        rescore_dims=params.rescore_dims,
        block_size=bs,
        candidate_factor=candidate_factor,
        op=op,
        refresh_factor=refresh_factor,
        refresh=None if refresh_factor is None else _candidates(count, refresh_factor, num_pages),
    )


def write_kv(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, cache: PagedKVCache) -> None:
    """Append K/V with vLLM's CPU ``reshape_and_cache`` (the ISA of the cache's layout, :func:`cache_isa`)
    and fold the keys into the page summaries. Same signature as :func:`vllm_sparse.kernels.ops.write_kv`.

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_size]``; slot_mapping: ``[num_tokens]`` (``< 0`` skipped).
    """
    key_cache, value_cache = cache.kernel_blocks
    vllm_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, cache_isa(cache))
    n = min(key.shape[0], slot_mapping.shape[0])
    cpu_ext.load().update_page_summaries(key[:n], slot_mapping[:n].long().contiguous(), cache.slot_rows,
                                         _summary_offset(cache), cache.block_size, cache.page_size)


def _summary_offset(cache: PagedKVCache) -> int:
    """Where a head slot's page summaries start (elements), see :mod:`vllm_sparse.kernels.layout`."""
    return 2 * cache.block_size * cache.head_size


@dataclass(frozen=True)
class Softmax:
    """A layer's attention options besides the scale, as vLLM's CPU op takes them.

    Attributes:
        window: attend only the last ``window`` positions (the query's own included); -1: all.
        softcap: logits become ``softcap · tanh(logit / softcap)`` (Gemma 2); 0: none.
        sinks: ``[num_heads]`` float32 per-head sink logits (gpt-oss): an extra term ``exp(sink)`` in
            each softmax's denominator, attached to no value; ``None``: none.
    """

    window: int = -1
    softcap: float = 0.0
    sinks: torch.Tensor | None = None


PLAIN = Softmax()


def attention(query: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
              query_start_loc: torch.Tensor, metadata: torch.Tensor, scale: float, out: torch.Tensor,
              softmax: Softmax = PLAIN) -> None:
    """Dense causal paged attention (prefill, chunked prefill, dense decode) with vLLM's CPU op.

    Args:
        query, out: ``[num_tokens, num_heads, head_size]``; the rest as vLLM's ``CommonAttentionMetadata``.
        softmax: the layer's sliding window, logit soft cap and sinks.
    """
    key_cache, value_cache = cache.kernel_blocks
    vllm_ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=query_start_loc,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=softmax.window,
        block_table=block_table, softcap=softmax.softcap, scheduler_metadata=metadata, s_aux=softmax.sinks,
    )


def select_pages(query: torch.Tensor, cache: PagedKVCache, plan: DecodePlan, table: torch.Tensor | None = None,
                 keep: torch.Tensor | None = None, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Compacted one-head block table of the chosen pages: ``[B * num_kv_heads, width]`` int32.

    Row ``b * num_kv_heads + h`` lists, ascending, the one-head blocks (``block * num_kv_heads +
    h``) of the ``count[b]`` best pages of request ``b``, KV head ``h`` by Quest's bound
    ``q⁻·min + q⁺·max`` (maxed over the GQA group; sink and window pages first); entries past
    ``count[b]`` repeat the last one and are never read (the op stops at ``plan.seq_lens``).
    One call of the C++ kernel (fp32 accumulation); its torch twin is
    :func:`vllm_sparse.kernels.cpu_select.select_pages_reference`.

    Args:
        query: ``[B, num_heads, head_size]`` in the cache dtype.
        table: write into this ``[B * num_kv_heads, width]`` int32 table (default: a new one);
        keep: ``[B * num_kv_heads]`` bool — rows left as they are in ``table`` (not selected).
        prior: ``[B * num_kv_heads]`` bool — rows that select from the best ``plan.refresh[b]`` pages
            by the bound plus the pages already in their ``table`` row (a refresh), instead of
            ``plan.candidates[b]`` (needs ``plan.refresh``).
    """
    b = query.shape[0]
    if table is None:
        table = torch.empty(b * cache.num_kv_heads, plan.width, dtype=torch.int32)
    cpu_ext.load().quest_select(query, cache.slot_rows, _summary_offset(cache), plan.block_table, plan.seq,
                                plan.count, plan.candidates, plan.forced_lo, plan.forced_hi, cache.block_size,
                                plan.rescore_dims, cache.amx, table, keep, prior,
                                None if prior is None else plan.refresh)
    return table


def select_or_reuse(query: torch.Tensor, cache: PagedKVCache, plan: DecodePlan, prev: KeptSelection | None,
                    min_similarity: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`select_pages` for the rows (request, KV head) that select this step; the rows of this
    layer's table of the previous step (``prev``) for those that keep theirs (``plan.reuse``).
    Everyone selects when ``prev`` is not the step ``plan.reuse`` refers to.

    ``min_similarity > 0`` (``reselect_similarity``): a row keeps its pages only while the cosine
    similarity of its query (the KV head's group of query heads, concatenated) to the query it
    selected them with is at least ``min_similarity``; returns those reference queries with the table.
    A row below it refreshes (``plan.refresh``, see :func:`select_pages`' ``prior``) when the plan has
    a refresh count, else it selects as afresh.
    """
    h = cache.num_kv_heads
    reuse = plan.reuse
    if reuse is None or prev is None or prev.uid != reuse.prev_uid:
        qn = None
        if min_similarity > 0:
            qn = torch.nn.functional.normalize(query.reshape(query.shape[0] * h, -1).float(), dim=1)
        return select_pages(query, cache, plan), qn
    grown = reuse.grown
    # one C++ call for the rows' tables and the gate (kernels.cpu_select.reuse_rows_reference is its torch twin)
    table, keep, prior, qn = cpu_ext.load().reuse_rows(
        query, h, prev.table, reuse.rows, reuse.keep, plan.width, None if grown is None else grown.mask,
        None if grown is None else grown.block.reshape(-1), prev.ref_queries, min_similarity,
        plan.refresh is not None)
    return select_pages(query, cache, plan, table, keep, prior if prior.numel() else None), qn if qn.numel() else None


def sparse_decode(query: torch.Tensor, cache: PagedKVCache, plan: DecodePlan, scale: float,
                  out: torch.Tensor, prev: KeptSelection | None = None, min_similarity: float = 0.0,
                  softmax: Softmax = PLAIN) -> KeptSelection:
    """Page-selected sparse decode (``quest`` / ``exact_pages``) through vLLM's CPU op.

    Args:
        query: ``[B, num_heads, head_size]`` in the cache dtype; out: the same shape, written in place.
        prev, min_similarity: this layer's :func:`sparse_decode` result of the previous step and the
            ``reselect_similarity`` gate (``reselect_every``; see :func:`select_or_reuse`).
        softmax: the layer's logit soft cap and sinks (a windowed layer attends its window densely,
            never through here). The cap is monotonic, so the pages ranked by ``q·k`` are the pages
            ranked by the capped logits.

    Returns:
        The selection attended (:class:`KeptSelection`): the next step's ``prev``.
    """
    if softmax.window >= 0:
        raise ValueError("sparse_decode: a layer with a sliding window attends its window densely (attention())")
    b, num_heads, d = query.shape
    h = cache.num_kv_heads
    table, qref = select_or_reuse(query, cache, plan, prev, min_similarity)
    key_cache, value_cache = cache.head_blocks
    g = num_heads // h
    op = functools.partial(vllm_ops.cpu_attention_with_kv_cache, key_cache=key_cache, value_cache=value_cache,
                           scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, softcap=softmax.softcap)
    if softmax.sinks is None or h == 1:
        op(query=query.reshape(b * h, g, d), output=out.view(b * h, g, d), query_start_loc=plan.query_start_loc,
           seq_lens=plan.seq_lens, block_table=table, scheduler_metadata=plan.metadata, s_aux=softmax.sinks)
    else:  # the op takes one sink per head of a sequence: one call per KV head, with its group's sinks
        lens = plan.seq_lens[::h].contiguous()  # a request's KV heads attend as many tokens each
        qsl = plan.query_start_loc[: b + 1]
        if plan.kv_head_metadata is None:
            plan.kv_head_metadata = _metadata(lens, qsl, plan.op)
        metadata = plan.kv_head_metadata
        q, o = query.view(b, h, g, d), out.view(b, h, g, d)
        for kv in range(h):
            part = torch.empty(b, g, d, dtype=out.dtype)
            op(query=q[:, kv].contiguous(), output=part, query_start_loc=qsl, seq_lens=lens,
               block_table=table[kv::h].contiguous(), scheduler_metadata=metadata,
               s_aux=softmax.sinks[kv * g:(kv + 1) * g].contiguous())
            o[:, kv] = part
    return KeptSelection(plan.uid, table, qref)
