"""Dispatch layer the vLLM backend calls: CPU tensors → :mod:`.reference`, CUDA tensors → Triton.

Every function has the signature of its :mod:`.reference` namesake plus keyword-only
extras: preallocated outputs (``out``, ``indices_out``) and host-side static sizes
(``capacity``, ``max_seq_len``, ``max_query_len``, ``num_splits``). Passing the sizes keeps
the CUDA path free of host syncs, so a decode step can be captured in a CUDA graph
(*plan* the sizes once per step in the metadata builder, *run* these ops in every layer).

Triton is imported lazily, on the first CUDA (or forced) call: importing this module needs
neither Triton nor a GPU. For tests without a GPU, CPU tensors take the Triton kernels
through the interpreter when a call passes ``force_triton=True`` and ``TRITON_INTERPRET=1`` was
set before the kernel modules were first imported (:func:`uses_triton` refuses it otherwise).
The vLLM backend's CUDA route passes ``force_triton=True`` to every op, so its test-only CPU
emulation (``VLLM_SPARSE_EMULATE_CUDA=1``, ``vllm_sparse.backend``) runs the same calls.
"""

from __future__ import annotations

import os
import sys

import torch

from . import reference
from .layout import PagedKVCache
from .selectors import SelectParams

__all__ = [
    "uses_triton",
    "write_kv",
    "paged_attention",
    "dense_decode",
    "table_decode",
    "select_topk",
    "sparse_attention",
    "sparse_decode",
]

def uses_triton(tensor: torch.Tensor, force_triton: bool | None = None) -> bool:
    """Whether an op on ``tensor`` runs the Triton kernels: always for CUDA tensors; for CPU tensors
    only with ``force_triton=True`` (tests), through the Triton interpreter.

    Raises:
        ValueError: ``force_triton=True`` on CPU tensors without the interpreter — ``TRITON_INTERPRET``
            is not ``1``, or the kernel modules were imported (their kernels decorated) before it was set.
    """
    if tensor.is_cuda:
        return True
    if not force_triton:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"force_triton=True on CPU tensors needs the Triton interpreter: TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET')!r}; set TRITON_INTERPRET=1 before the kernels are imported"
        )
    common = sys.modules.get(f"{__package__}.triton_common")
    if common is not None and not common.INTERPRET:
        raise ValueError(
            "force_triton=True on CPU tensors: the Triton kernels were imported before TRITON_INTERPRET=1 was "
            "set, so they were compiled for a GPU; set it before the first import of the kernel modules"
        )
    return True


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    cache: PagedKVCache,
    *,
    force_triton: bool | None = None,
) -> None:
    """Append K/V by ``slot_mapping`` and refresh the touched pages' min/max (:func:`.reference.write_kv`).

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_size]``.
        slot_mapping: ``[num_tokens]`` int32/int64, ``< 0`` skipped.
    Graph-safe on CUDA.
    """
    if uses_triton(key, force_triton):
        from .triton_kv_write import write_kv_triton

        write_kv_triton(key, value, slot_mapping, cache)
    else:
        reference.write_kv(key, value, slot_mapping, cache)


def paged_attention(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    force_triton: bool | None = None,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense causal attention of a (chunked-)prefill/decode batch (:func:`.reference.paged_attention`).

    Args:
        query: ``[num_tokens, num_heads, head_size]``.
        block_table: ``[B, max_blocks]`` int; ``seq_lens``: ``[B]`` int;
            ``query_start_loc``: ``[B + 1]`` int.
        out: optional ``[num_tokens, num_heads, head_size]`` output.
        max_query_len: host bound of the query lengths (``1`` = every request decodes one
            token); ``None`` reads it from ``query_start_loc`` (sync).
        max_seq_len: host bound of ``seq_lens`` (decode split count); ``None``: sync.
        window, softcap, sinks: the layer's sliding window (``-1``: none), logit soft cap (``0``:
            none) and ``[num_heads]`` sink logits (``None``: none), as the reference takes them.
    Returns:
        ``[num_tokens, num_heads, head_size]`` (``out`` when given).
    """
    if uses_triton(query, force_triton):
        from .triton_paged_attn import paged_attention_triton

        return paged_attention_triton(query, cache, block_table, seq_lens, query_start_loc, scale,
                                      out=out, max_query_len=max_query_len, max_seq_len=max_seq_len,
                                      window=window, softcap=softcap, sinks=sinks)
    res = reference.paged_attention(query, cache, block_table, seq_lens, query_start_loc, scale, window, softcap,
                                    sinks)
    return _into(out, res)


def dense_decode(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    force_triton: bool | None = None,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense single-token decode (:func:`.reference.dense_decode`).

    Args:
        query: ``[B, num_heads, head_size]`` at positions ``seq_lens[b] - 1``.
        out: optional ``[>= B, num_heads, head_size]``; rows ``:B`` are written.
        max_seq_len: host bound of ``seq_lens`` for the split count (``None``: sync).
        num_splits: split-K factor (``None``: fill the device).
        window, softcap, sinks: as :func:`paged_attention`.
    """
    if uses_triton(query, force_triton):
        from .triton_sparse_attn import dense_decode_triton

        return dense_decode_triton(query, cache, block_table, seq_lens, scale, out=out, num_splits=num_splits,
                                   max_seq_len=max_seq_len, window=window, softcap=softcap, sinks=sinks)
    return reference.dense_decode(query, cache, block_table, seq_lens, scale, out=out, window=window,
                                  softcap=softcap, sinks=sinks)


def table_decode(
    query: torch.Tensor,
    cache: PagedKVCache,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_len: int | None = None,
    num_splits: int | None = None,
    force_triton: bool | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode over one block table per (request, selection head) (:func:`.reference.table_decode`).

    Args:
        tables: ``[B, S, W]`` block ids; lens: ``[B, S]`` tokens per row (see
            :func:`.selection.compact_pages`).
        out: optional ``[B, num_heads, head_size]`` output.
        max_len: host bound of ``lens`` for the split count (``None``: ``W * block_size``).
        softcap, sinks: as :func:`paged_attention`.
    """
    if uses_triton(query, force_triton):
        from .triton_sparse_attn import table_decode_triton

        return table_decode_triton(query, cache, tables, lens, scale, out=out, num_splits=num_splits,
                                   max_len=max_len, softcap=softcap, sinks=sinks)
    return _into(out, reference.table_decode(query, cache, tables, lens, scale, softcap, sinks))


def select_topk(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    attended: torch.Tensor,
    scale: float,
    params: SelectParams,
    *,
    out: torch.Tensor | None = None,
    capacity: int | None = None,
    max_seq_len: int | None = None,
    force_triton: bool | None = None,
) -> torch.Tensor:
    """Positions each (request, selection head) attends (:func:`.reference.select_topk`).

    Args:
        query: ``[B, num_heads, head_size]``; ``seq_lens``, ``attended``: ``[B]`` int.
        params: the step's :class:`~.selectors.SelectParams`.
        out: optional ``[B, S, capacity]`` int32/int64 index buffer (``S`` =
            ``params.num_rows(num_heads, num_kv_heads)``); ``capacity`` must be
            ``>= params.index_capacity(max(min(attended, seq_lens)), page_size)``.
        capacity: buffer width when ``out`` is None (``None``: the reference's width, a
            sync on CUDA).
        max_seq_len: host bound ``>= max(seq_lens)`` sizing the score buffers (``None``: sync).
    Returns:
        ``[B, S, capacity]`` ascending positions, ``-1`` padded (``out`` when given); each row
        holds the reference's set.
    """
    if uses_triton(query, force_triton):
        from .triton_select import select_topk_triton

        return select_topk_triton(query, cache, block_table, seq_lens, attended, scale, params, out=out,
                                  capacity=capacity, max_seq_len=max_seq_len)
    idx = reference.select_topk(query, cache, block_table, seq_lens, attended, scale, params)
    if out is None and capacity is None:
        return idx
    if out is None:
        out = torch.empty((*idx.shape[:2], capacity), dtype=torch.int64, device=idx.device)
    width = idx.shape[-1]
    if width > out.shape[-1]:
        raise ValueError(f"index capacity={out.shape[-1]} is smaller than this step's selection width={width} "
                         "(see SelectParams.index_capacity)")
    out[..., :width] = idx.to(out.dtype)
    out[..., width:] = -1
    return out


def sparse_attention(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    force_triton: bool | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention over the selected positions only (:func:`.reference.sparse_attention`).

    Args:
        query: ``[B, num_heads, head_size]``.
        indices: ``[B, S, L]`` int positions (``-1`` = skip), ``S`` = ``num_kv_heads`` or ``num_heads``.
        out: optional ``[B, num_heads, head_size]`` output.
        num_splits: split-K factor (``None``: fill the device; static given static shapes).
        softcap, sinks: as :func:`paged_attention`.
    """
    if uses_triton(query, force_triton):
        from .triton_sparse_attn import sparse_attention_triton

        return sparse_attention_triton(query, cache, block_table, indices, scale, out=out, num_splits=num_splits,
                                       softcap=softcap, sinks=sinks)
    return _into(out, reference.sparse_attention(query, cache, block_table, indices, scale, softcap, sinks))


def sparse_decode(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    attended: torch.Tensor,
    scale: float,
    params: SelectParams,
    *,
    out: torch.Tensor | None = None,
    indices_out: torch.Tensor | None = None,
    capacity: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    force_triton: bool | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`select_topk` then :func:`sparse_attention` (:func:`.reference.sparse_decode`).

    Args: as :func:`select_topk` and :func:`sparse_attention`; ``indices_out`` is the
    ``[B, S, capacity]`` index buffer (filled on both paths when given). ``softcap``, ``sinks``: the
    layer's logit soft cap and ``[num_heads]`` sink logits; they change the softmax, not the selection
    (the cap keeps the order of the logits).

    On the Triton path, whole-page selectors with one page per KV block (the vLLM backend's
    layout) and no ``indices_out`` take the compacted route (:func:`compacted_route`): each head's
    chosen pages become its block table and :func:`table_decode` reads them whole; otherwise the
    positions go through :func:`sparse_attention`. Same set, same result.
    Returns:
        ``[B, num_heads, head_size]`` (``out`` when given).
    """
    triton_path = uses_triton(query, force_triton)
    if not triton_path and indices_out is None:
        # the reference fuses selection and attention (its selection logits are the attention logits)
        return _into(out, reference.sparse_decode(query, cache, block_table, seq_lens, attended, scale, params,
                                                  softcap, sinks))
    if triton_path and indices_out is None and compacted_route(params, cache):
        return _compacted_decode(query, cache, block_table, seq_lens, attended, scale, params, out=out,
                                 capacity=capacity, max_seq_len=max_seq_len, num_splits=num_splits,
                                 softcap=softcap, sinks=sinks)
    idx = select_topk(query, cache, block_table, seq_lens, attended, scale, params, out=indices_out,
                      capacity=capacity, max_seq_len=max_seq_len, force_triton=force_triton)
    return sparse_attention(query, cache, block_table, idx, scale, out=out, num_splits=num_splits,
                            force_triton=force_triton, softcap=softcap, sinks=sinks)


def compacted_route(params: SelectParams, cache: PagedKVCache) -> bool:
    """Whether :func:`sparse_decode` on the Triton path attends whole pages through compacted block
    tables (:func:`table_decode`) instead of a per-token index (:func:`sparse_attention`): for
    whole-page selectors when a page is a whole KV block (as in the vLLM backend)."""
    return params.selector.whole_pages and cache.page_size == cache.block_size


def _compacted_decode(query, cache, block_table, seq_lens, attended, scale, params, *, out, capacity, max_seq_len,
                      num_splits, softcap, sinks) -> torch.Tensor:
    """Whole-page sparse decode: the chosen pages, sorted, are each head's block table; the dense
    split-K kernel walks them (contiguous page rows, no position list)."""
    from .triton_select import select_tables_triton

    if capacity is None:  # a sync: the backend passes the step's host-side width
        count = torch.minimum(attended.long(), seq_lens.long())
        capacity = params.index_capacity(int(count.max()) if count.numel() else 0, cache.page_size)
    if query.shape[0] == 0 or capacity == 0:
        return out if out is not None else torch.empty_like(query)
    tables, lens = select_tables_triton(query, cache, block_table, seq_lens, attended, scale, params,
                                        capacity=capacity, max_seq_len=max_seq_len)
    return table_decode(query, cache, tables, lens, scale, out=out, max_len=tables.shape[-1] * cache.page_size,
                        num_splits=num_splits, force_triton=True, softcap=softcap, sinks=sinks)


def _into(out: torch.Tensor | None, res: torch.Tensor) -> torch.Tensor:
    if out is None:
        return res
    out[: res.shape[0]] = res.to(out.dtype)
    return out
