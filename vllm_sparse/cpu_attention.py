"""The fused CPU path: vLLM's own paged-attention op over compacted block tables.

On the CPU platform the backend stores keys the way vLLM's CPU kernels do (``key_transposed``
layout of :mod:`vllm_sparse.kernels.layout`, written by ``cpu_attn_reshape_and_cache`` with the
``vec``/``vec16`` ISA) and runs every attention through ``cpu_attention_with_kv_cache``:

* **prefill** (and decode steps where every request attends its whole context): the op over
  the requests' own block tables — the stock backend's kernel, at its speed;
* **sparse decode**: every (request, KV head) becomes one single-KV-head sequence over the
  cache viewed as ``num_blocks * num_kv_heads`` one-head blocks
  (:meth:`~vllm_sparse.kernels.PagedKVCache.head_blocks`). A page is one KV block; the pages
  are ranked by Quest's upper bound ``q⁺·max + q⁻·min`` from the page summaries (no key is
  read to select), the best ``count`` pages of each head — sink and window pages always —
  form that head's compacted block table, ascending, so the request's last (partial) page
  comes last and the op's causal length arithmetic holds.

*Plan* (:func:`plan_step`, once per step in the metadata builder, shared by all layers): page
counts from the budget rule, the compacted sequence lengths, the forced/invalid page bias,
and the op's scheduler metadata — all of which depend only on the sequence lengths. *Run*
(:func:`sparse_decode`, per layer): 2 matmuls + top-k + sort + one gather build the table,
then the op. No Python loop over requests, heads or layers.

The pure-torch oracle of the decode is :func:`vllm_sparse.kernels.reference.sparse_decode`
with ``selection="quest"`` and ``page_size == block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm import _custom_ops as vllm_ops
from vllm import envs

from vllm_sparse.kernels import PagedKVCache
from vllm_sparse.kernels import reference
from vllm_sparse.kernels.selection import page_counts

__all__ = ["cpu_isa", "DecodePlan", "plan_decode", "scheduler_metadata", "write_kv", "attention", "sparse_decode"]


def cpu_isa(block_size: int) -> str:
    """The vLLM CPU attention ISA whose key layout is :mod:`~vllm_sparse.kernels.layout`'s ``key_transposed``.

    ``vec`` (blocks of 32k tokens) and ``vec16`` both store a block's keys as ``[head_size,
    block_size]``; the AMX kernel packs keys differently, so it is not used.
    """
    return "vec" if block_size % 32 == 0 else "vec16"


def scheduler_metadata(seq_lens: torch.Tensor, query_start_loc: torch.Tensor, num_heads: int, num_kv_heads: int,
                       head_size: int, dtype: torch.dtype, isa: str) -> torch.Tensor:
    """vLLM's CPU attention work split for one batch (built once per step)."""
    return vllm_ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.shape[0], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=query_start_loc, causal=True, sliding_window_size=-1,
        isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
    )


@dataclass
class DecodePlan:
    """One step's sparse-decode plan for ``B`` decode requests, shared by every layer.

    Attributes:
        block_table: ``[B, P]`` int64 block ids of each request's first ``P`` pages (``P`` = max pages).
        bias: ``[B, 1, P]`` cache dtype: ``+inf`` on forced (sink/window) pages, ``-inf`` past a
            request's pages, 0 elsewhere — added to the page scores.
        keep: ``[B, 1, width]`` bool, rank ``< count[b]``: the top-``count`` pages of each row.
        seq_lens: ``[B * num_kv_heads]`` int32 tokens each (request, KV head) sequence attends
            (its pages, the last one partial).
        query_start_loc: ``[B * num_kv_heads + 1]`` int32 (one query per sequence).
        metadata: the op's scheduler metadata for those sequences.
        attended_tokens: tokens attended per KV head, summed over the batch (what the op reads).
    """

    block_table: torch.Tensor
    bias: torch.Tensor
    keep: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    metadata: torch.Tensor
    attended_tokens: int

    @property
    def width(self) -> int:
        return self.keep.shape[-1]


def plan_decode(seq_lens: torch.Tensor, attended: torch.Tensor, block_table: torch.Tensor, *, block_size: int,
                sink_tokens: int, local_window: int, num_heads: int, num_kv_heads: int, head_size: int,
                dtype: torch.dtype, isa: str) -> DecodePlan:
    """Plan a sparse decode step: which pages count, and the compacted sequences' lengths.

    Args:
        seq_lens: ``[B]`` context lengths (including this step's token).
        attended: ``[B]`` tokens to attend per KV head (budget rule, sinks and window included);
            Quest rounds it up to whole pages (:func:`~vllm_sparse.kernels.selection.page_counts`).
        block_table: ``[B, max_blocks]`` int.
    """
    seq = seq_lens.long()
    bs = block_size
    num_pages = (seq + bs - 1) // bs
    count = page_counts(seq, torch.minimum(attended.long(), seq), bs, sink_tokens, local_window, 1.0, quest=True)
    p_max, width = int(num_pages.max()), int(count.max())
    page = torch.arange(p_max)[None, :]
    forced = (page < -(-sink_tokens // bs)) | (page >= (seq[:, None] - local_window).clamp_min(0) // bs)
    bias = torch.zeros(seq.shape[0], 1, p_max, dtype=dtype)
    bias.masked_fill_(forced[:, None] & (page < num_pages[:, None])[:, None], float("inf"))
    bias.masked_fill_((page >= num_pages[:, None])[:, None], float("-inf"))
    # each head attends its `count` pages; all are whole but the request's last
    lens = (seq - (num_pages - count) * bs).to(torch.int32)
    lens = lens.repeat_interleave(num_kv_heads)
    qsl = torch.arange(lens.shape[0] + 1, dtype=torch.int32)
    return DecodePlan(
        block_table=block_table[:, :p_max].long().clamp_min(0),
        bias=bias,
        keep=(torch.arange(width)[None, None, :] < count[:, None, None]),
        seq_lens=lens,
        query_start_loc=qsl,
        metadata=scheduler_metadata(lens, qsl, num_heads // num_kv_heads, 1, head_size, dtype, isa),
        attended_tokens=int(lens.sum()) // num_kv_heads,
    )


def write_kv(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, cache: PagedKVCache,
             isa: str) -> None:
    """Append K/V with vLLM's CPU ``reshape_and_cache`` and fold the keys into the page summaries.

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_size]``; slot_mapping: ``[num_tokens]`` (``< 0`` skipped).
    """
    assert cache.key_transposed, "the fused CPU path needs the key_transposed layout"
    key_cache, value_cache = cache.kernel_blocks()
    vllm_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa)
    reference.update_page_summaries(key, slot_mapping, cache)


def attention(query: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
              query_start_loc: torch.Tensor, metadata: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Dense causal paged attention (prefill, chunked prefill, dense decode) with vLLM's CPU op.

    Args:
        query, out: ``[num_tokens, num_heads, head_size]``; the rest as vLLM's ``CommonAttentionMetadata``.
    """
    key_cache, value_cache = cache.kernel_blocks()
    vllm_ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=query_start_loc,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=block_table, softcap=0.0, scheduler_metadata=metadata, s_aux=None,
    )


def select_pages(query: torch.Tensor, cache: PagedKVCache, plan: DecodePlan) -> torch.Tensor:
    """Compacted one-head block table of the chosen pages: ``[B * num_kv_heads, width]`` int32.

    Row ``b * num_kv_heads + h`` lists, ascending, the one-head blocks (``block * num_kv_heads +
    h``) of the ``count[b]`` best pages of request ``b``, KV head ``h``; entries past ``count[b]``
    are never read (the op stops at ``plan.seq_lens``).

    Args:
        query: ``[B, num_heads, head_size]`` in the cache dtype.
    """
    b, num_heads, d = query.shape
    h = cache.num_kv_heads
    heads = torch.arange(h)
    kmin, kmax = cache.gather_page_bounds(plan.block_table, plan.block_table.shape[1], heads)  # [B, H, P, D]
    q = query.view(b, h, num_heads // h, d)  # [B, H, G, D]
    # upper bound of q·k over a page: q⁺·max + q⁻·min (cache dtype, fp32 accumulation in the matmul)
    ub = torch.matmul(q.clamp_min(0), kmax.transpose(-1, -2))
    ub += torch.matmul(q.clamp_max(0), kmin.transpose(-1, -2))  # [B, H, G, P]
    score = ub.amax(2) + plan.bias  # [B, H, P]
    top = score.topk(plan.width, dim=-1, sorted=True).indices  # best first
    top = top.masked_fill(~plan.keep, torch.iinfo(top.dtype).max).sort(dim=-1).values.clamp_max(score.shape[-1] - 1)
    blocks = plan.block_table.gather(1, top.view(b, -1)).view(b, h, -1)
    return (blocks * h + heads.view(1, h, 1)).view(b * h, -1).to(torch.int32)


def sparse_decode(query: torch.Tensor, cache: PagedKVCache, plan: DecodePlan, scale: float,
                  out: torch.Tensor) -> None:
    """Quest-selected sparse decode through vLLM's CPU op; writes ``out`` ``[B, num_heads, head_size]``."""
    b, num_heads, d = query.shape
    h = cache.num_kv_heads
    table = select_pages(query, cache, plan)
    key_cache, value_cache = cache.head_blocks()
    g = num_heads // h
    vllm_ops.cpu_attention_with_kv_cache(
        query=query.reshape(b * h, g, d), key_cache=key_cache, value_cache=value_cache,
        output=out.view(b * h, g, d), query_start_loc=plan.query_start_loc, seq_lens=plan.seq_lens, scale=scale,
        causal=True, alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
        scheduler_metadata=plan.metadata, s_aux=None,
    )
