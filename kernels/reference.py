"""Pure-torch reference of every op on the paged layout (:mod:`.layout`).

These functions are the test oracle of the Triton kernels **and** the CPU execution
path of the vLLM backend, so they are batched and vectorised (no per-token Python
loops) while staying plainly readable. All arithmetic is float32; outputs come back in
the query dtype.

The decode pipeline (Quest's named stages):

1. :func:`write_kv` — append K/V by ``slot_mapping`` and refresh the page min/max.
2. :func:`select_topk` — per (request, KV head) pick ``attended[b]`` token positions:
   sinks + local window always, the rest as the step's selector says
   (:class:`~.selectors.SelectParams`; page ranking in :mod:`.ranking`): ``token`` scores every
   key exactly, ``page`` first ranks pages by Quest's bound and scores only the tokens of the
   best pages, ``quest`` attends every token of the best pages (no token scoring).
3. :func:`sparse_attention` — softmax attention over the selected positions only.

:func:`paged_attention` is the dense causal op for prefill / chunked prefill / decode.

Score of a token for a KV head: the maximum over the GQA group's query heads of
``scale · q·k``; with ``SelectParams.per_query_head`` every query head selects its own tokens. Conventions: query head ``h`` reads KV head
``h // (num_heads // num_kv_heads)``; positions are request-local; ``-1`` pads index
buffers and slot mappings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import PagedKVCache
from .selection import page_positions, row_kv_heads, sorted_positions, topk_rows
from .selectors import SelectInputs, SelectParams

__all__ = [
    "write_kv",
    "update_page_summaries",
    "paged_attention",
    "dense_decode",
    "table_decode",
    "select_topk",
    "sparse_attention",
    "sparse_decode",
    "gather_tokens",
]



_NEG_INF = float("-inf")


def _softmax(logits: torch.Tensor, softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim of ``[B, S, G, L]`` float32 logits (``-inf`` where masked), with a
    layer's logit soft cap (``softcap · tanh(logit / softcap)``, 0: none; Gemma 2) and sinks
    (``[S * G]`` per-head logits, ``None``: none; gpt-oss): one more term in the denominator,
    attached to no value."""
    if softcap:  # masked logits stay -inf (the cap would lift them to -softcap)
        logits = torch.where(torch.isneginf(logits), logits, softcap * torch.tanh(logits / softcap))
    if sinks is None:
        return torch.softmax(logits, dim=-1)
    b, s, g, _ = logits.shape
    sink = sinks.float().view(1, s, g, 1).expand(b, s, g, 1)
    return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]


# --------------------------------------------------------------------------------------
# 1. KV write
# --------------------------------------------------------------------------------------
def write_kv(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, cache: PagedKVCache) -> None:
    """Write ``key``/``value`` rows into ``cache`` and refresh the touched pages' min/max.

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_size]``, cache dtype or castable.
        slot_mapping: ``[num_tokens]`` int, ``block_id * block_size + offset``; ``< 0`` skipped.
        cache: the layer's :class:`PagedKVCache` (updated in place).

    Page summary semantics: see :func:`update_page_summaries`.
    """
    # key: [T, H, D]
    n = min(key.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:n].long()
    keep = slots >= 0
    if not bool(keep.any()):
        return
    slots = slots[keep]
    bs = cache.block_size
    blk, off = slots // bs, slots % bs
    cache.key_cache[blk, off] = key[:n][keep].to(cache.dtype)
    cache.value_cache[blk, off] = value[:n][keep].to(cache.dtype)
    update_page_summaries(key[:n], slot_mapping[:n], cache)


def update_page_summaries(key: torch.Tensor, slot_mapping: torch.Tensor, cache: PagedKVCache) -> None:
    """Fold this call's keys into the min/max of the pages they land in.

    Args:
        key: ``[num_tokens, num_kv_heads, head_size]``, the rows just written (any dtype; cast
            to the cache dtype first, so the summary bounds exactly the stored keys).
        slot_mapping: ``[num_tokens]`` int, ``< 0`` skipped.

    A page whose offset 0 is written by this call starts afresh (its summary is the min/max of
    this call's rows in it); any other touched page keeps min/max(old summary, new rows). Pages
    fill in order, so either way the summary covers exactly the page's rows
    ``[0, last written offset]``. Reads only the incoming keys and the touched summaries, never
    the cached keys.
    """
    n = min(key.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:n].long()
    keep = slots >= 0
    slots, k = slots[keep], key[:n][keep].to(cache.dtype)  # k: [T, H, D]
    if slots.numel() == 0:
        return
    ps, ppb = cache.page_size, cache.pages_per_block
    pages, inv = torch.unique(slots // ps, return_inverse=True)  # global page = blk * ppb + page in block
    idx = inv[:, None, None].expand_as(k)
    first = torch.full((pages.numel(),), ps, dtype=torch.long, device=slots.device)
    fresh = (first.scatter_reduce(0, inv, slots % ps, reduce="amin") == 0)[:, None, None]
    new_min = torch.full((pages.numel(), *k.shape[1:]), math.inf, dtype=k.dtype, device=k.device)
    new_max = torch.full_like(new_min, -math.inf)
    new_min = new_min.scatter_reduce(0, idx, k, reduce="amin")
    new_max = new_max.scatter_reduce(0, idx, k, reduce="amax")
    pblk, pidx = pages // ppb, pages % ppb
    old_min, old_max = cache.key_min[pblk, pidx], cache.key_max[pblk, pidx]  # [U, H, D]
    cache.key_min[pblk, pidx] = torch.where(fresh, new_min, torch.minimum(old_min, new_min))
    cache.key_max[pblk, pidx] = torch.where(fresh, new_max, torch.maximum(old_max, new_max))


# --------------------------------------------------------------------------------------
# 2. Dense attention
# --------------------------------------------------------------------------------------
def paged_attention(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense causal attention of a (chunked-)prefill/decode batch over the paged cache.

    Request ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b+1]`` (``q_len``
    rows); they are the *last* ``q_len`` positions of its ``seq_lens[b]`` tokens, so row
    ``i`` sits at position ``seq_lens[b] - q_len + i`` and attends positions ``0..`` that
    one (cached context plus itself); with ``window > 0`` only the last ``window`` of them (its
    own included). ``softcap``, ``sinks``: a layer's logit soft cap and ``[num_heads]`` sink
    logits (:func:`_softmax`). The batch's K/V must already be in the cache.

    Args:
        query: ``[num_tokens, num_heads, head_size]``.
        block_table: ``[B, max_blocks]`` int.
        seq_lens: ``[B]`` int, context length including this step's tokens.
        query_start_loc: ``[B + 1]`` int, cumulative query lengths.
    Returns:
        ``[num_tokens, num_heads, head_size]`` in ``query.dtype``.
    """
    out = torch.empty_like(query)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_heads = query.shape[1]
    if all(qsl[b + 1] - qsl[b] == 1 for b in range(len(lens))):
        return dense_decode(query[: qsl[-1]], cache, block_table, seq_lens, scale, out=out, window=window,
                            softcap=softcap, sinks=sinks)
    for b, n in enumerate(lens):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0:
            continue
        k, v = cache.gather(block_table[b : b + 1], n)  # [1, n, Hkv, D]
        # SDPA layout: [1, H, T, D]
        q = query[q0:q1].float().transpose(0, 1)[None]
        k = k.float().transpose(1, 2)
        v = v.float().transpose(1, 2)
        q_len = q1 - q0
        qpos = torch.arange(n - q_len, n, device=query.device)
        kpos = torch.arange(n, device=query.device)[None, :]
        mask = kpos <= qpos[:, None]  # [q_len, n]
        if window > 0:
            mask &= kpos > qpos[:, None] - window
        if not softcap and sinks is None:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=num_heads != k.shape[1]
            )[0]
        else:  # [Hkv, G, T, n] logits through _softmax, which takes [B, S, G, L]
            hkv = k.shape[1]
            logits = torch.matmul(q[0].view(hkv, num_heads // hkv, q_len, -1), k[0].transpose(-1, -2)[:, None]) * scale
            logits = logits.masked_fill(~mask, _NEG_INF).permute(2, 0, 1, 3)  # [T, Hkv, G, n]
            p = _softmax(logits, softcap, sinks).permute(1, 2, 0, 3)  # [Hkv, G, T, n]
            o = torch.matmul(p, v[0][:, None]).reshape(num_heads, q_len, -1)
        out[q0:q1] = o.transpose(0, 1).to(query.dtype)
    return out


def dense_decode(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense single-token decode, vectorised over the batch.

    Args:
        query: ``[B, num_heads, head_size]`` (one query per request, at position
            ``seq_lens[b] - 1``).
        window, softcap, sinks: as :func:`paged_attention`.
    Returns:
        ``[B, num_heads, head_size]`` in ``query.dtype``.
    """
    b, num_heads, d = query.shape
    hkv, ps = cache.num_kv_heads, cache.page_size
    heads = torch.arange(hkv, device=query.device)
    pages = torch.arange(-(-int(seq_lens.max()) // ps), device=query.device).expand(b, hkv, -1)
    pos = page_positions(pages, ps)  # [B, Hkv, N]
    n = seq_lens.long()[:, None, None]
    invalid = pos >= n
    if window > 0:
        invalid |= pos < n - window
    invalid = invalid[:, :, None, :]  # [B, Hkv, 1, N]
    k, v = cache.gather_pages(block_table, pages, heads)  # [B, Hkv, N, D] each
    logits = torch.matmul(query.float().view(b, hkv, num_heads // hkv, d), k.float().transpose(-1, -2)) * scale
    p = _softmax(logits.masked_fill(invalid, _NEG_INF), softcap, sinks)  # [B, Hkv, G, N]
    v = v.float().masked_fill(invalid[:, :, 0, :, None], 0.0)  # rows past seq_lens may hold anything
    o = torch.matmul(p, v).reshape(b, num_heads, d)
    if out is None:
        return o.to(query.dtype)
    out[:b] = o.to(out.dtype)
    return out


def table_decode(
    query: torch.Tensor,
    cache: PagedKVCache,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-token decode where each (request, selection head) attends the first ``lens[b, s]``
    tokens of its own block table ``tables[b, s]`` — whole-page sparse decode over compacted
    tables (:func:`.selection.compact_pages`).

    Args:
        query: ``[B, num_heads, head_size]``.
        tables: ``[B, S, W]`` block ids, ``S = num_kv_heads`` (the GQA group shares the row) or
            ``num_heads``; lens: ``[B, S]`` int.
        softcap, sinks: as :func:`sparse_attention`.
    Returns:
        ``[B, num_heads, head_size]`` in ``query.dtype``.
    """
    b, num_heads, d = query.shape
    s, bs = tables.shape[1], cache.block_size
    heads = row_kv_heads(s, num_heads, cache.num_kv_heads, query.device)
    pos = torch.arange(tables.shape[2] * bs, device=query.device)  # position in the compacted sequence
    blk = tables.long()[:, :, pos // bs].clamp_min(0)  # [B, S, N]
    kv_head = heads.view(1, s, 1).expand_as(blk)
    k = cache.key_cache[blk, pos % bs, kv_head].float()  # [B, S, N, D]
    v = cache.value_cache[blk, pos % bs, kv_head].float()
    invalid = pos >= lens.long()[..., None]  # [B, S, N]
    logits = torch.einsum("bsgd,bsnd->bsgn", query.float().view(b, s, num_heads // s, d), k) * scale
    p = _softmax(logits.masked_fill(invalid[:, :, None, :], _NEG_INF), softcap, sinks)
    v = v.masked_fill(invalid[..., None], 0.0)  # rows past a row's length may hold anything
    return torch.einsum("bsgn,bsnd->bsgd", p, v).reshape(b, num_heads, d).to(query.dtype)


# --------------------------------------------------------------------------------------
# 3. Selection
# --------------------------------------------------------------------------------------
def gather_tokens(
    tensor: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor, kv_head: torch.Tensor
) -> torch.Tensor:
    """Rows of a paged ``[num_blocks, block_size, num_kv_heads, head_size]`` tensor.

    Args:
        positions: ``[B, S, L]`` request-local positions (``-1`` allowed: returns block 0 rows).
        kv_head: ``[S]`` the KV head each of the ``S`` selection heads reads.
    Returns:
        ``[B, S, L, head_size]``.
    """
    b, s, l = positions.shape
    bs = tensor.shape[1]
    pos = positions.clamp_min(0)
    blk = block_table.long().gather(1, (pos // bs).view(b, s * l)).view(b, s, l).clamp_min(0)
    return tensor[blk, pos % bs, kv_head.view(1, s, 1).expand(b, s, l)]


def _select(query, cache, block_table, seq_lens, attended, scale, params: SelectParams):
    """Shared core of :func:`select_topk` and :func:`sparse_decode`.

    Returns ``(pos, keep, logits, values)``: ``pos``/``keep`` ``[B, S, W]`` chosen positions and
    their validity; ``logits`` ``[B, S, G, W]`` float32 ``scale·q·k`` of each chosen key for each
    query head of the selection head's group and ``values`` ``[B, S, W, D]`` (cache dtype) the
    chosen values, both ``None`` for ``by_position`` selectors.
    """
    b, num_heads, d = query.shape
    dev = query.device
    x = SelectInputs.build(query, cache, block_table, seq_lens, attended, scale, params)
    heads, count, ps = x.heads, x.count, cache.page_size
    s, width = heads.numel(), int(count.max())
    n = x.seq_lens[:, None, None]
    selector = params.selector
    if selector.by_position:  # no scores, no keys read
        pos = selector.positions(x, width)
        return pos, pos >= 0, None, None
    pages = selector.pages(x)  # [B, S, C] candidate pages, -1 padded

    pos = page_positions(pages, ps)  # [B, S, L]
    k, v = cache.gather_pages(block_table, pages, heads)  # [B, S, L, D] each
    q = query.float().view(b, s, num_heads // s, d)
    logits = torch.matmul(q, k.float().transpose(-1, -2)) * scale  # [B, S, G, L]
    if selector.whole_pages:  # every token of the chosen pages
        return pos, (pos >= 0) & (pos < n), logits, v
    scores = logits.amax(2)
    scores = scores.masked_fill((pos < 0) | (pos >= n), _NEG_INF)
    forced = (pos >= 0) & (pos < n) & ((pos < params.sink_tokens) | (pos >= n - params.local_window))
    idx, keep = topk_rows(scores.masked_fill(forced, math.inf), count, width)
    chosen_logits = logits.gather(-1, idx[:, :, None, :].expand(-1, -1, logits.shape[2], -1))
    # chosen values: one row gather over the flattened [B*S*L] axis (v rows may be strided)
    length = v.shape[2]
    rows = (torch.arange(b * s, device=dev).view(b, s, 1) * length + idx).flatten()
    chosen_values = v.reshape(b * s * length, d).index_select(0, rows).view(b, s, -1, d)  # [B, S, W, D]
    return pos.gather(-1, idx), keep, chosen_logits, chosen_values


def select_topk(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    attended: torch.Tensor,
    scale: float,
    params: SelectParams,
) -> torch.Tensor:
    """Choose the positions each (request, selection head) attends in this decode step.

    Args:
        query: ``[B, num_heads, head_size]``, the step's query (position ``seq_lens[b] - 1``).
        seq_lens: ``[B]`` int context lengths (≥ 1).
        attended: ``[B]`` int tokens to keep per head — from
            :func:`vllm_sparse.policies.budget.attended_tokens`, sinks and window included.
        params: the step's :class:`~.selectors.SelectParams`: the selector (``"token"``: exact
            ``q·k`` of every key; ``"page"``: rank pages by Quest's bound, keep
            ``ceil(candidate_factor · attended / page_size)`` of them plus the sink/window pages,
            then score their tokens exactly; ``"quest"``: attend every token of the best
            ``max(ceil(attended / page_size), sink/window pages)`` pages by the bound, no token
            scoring; ``"exact_pages"``: as many whole pages as ``"quest"``, chosen among
            ``candidate_factor ×`` as many bound-ranked candidates by their exact ``max q·k``, or by
            ``q·k`` over ``rescore_dims`` dims; ``"recent"``: sinks + the most recent tokens,
            StreamingLLM's rule at the same budget), the sinks and window always kept, and one set
            per KV head (score = max over its query group) or per query head.
    Returns:
        ``[B, S, W]`` int64 positions, ascending, ``-1`` padded, where ``S`` is
        ``num_kv_heads`` or ``num_heads``. Row ``b`` holds exactly ``min(attended[b],
        seq_lens[b])`` valid positions, all ``< seq_lens[b]``; a whole-page selector's row holds
        the valid positions of its pages instead (up to ``page_size - 1`` more, or the sink/window
        pages when they alone exceed the budget). ``W <= params.index_capacity(max(min(attended,
        seq_lens)), page_size)``.
    """
    pos, keep, _, _ = _select(query, cache, block_table, seq_lens, attended, scale, params)
    return sorted_positions(pos, keep)


# --------------------------------------------------------------------------------------
# 4. Sparse attention
# --------------------------------------------------------------------------------------
def sparse_attention(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of one decode query per request over selected positions only.

    Args:
        query: ``[B, num_heads, head_size]``.
        indices: ``[B, S, L]`` positions from :func:`select_topk` (``-1`` = skip), with
            ``S = num_kv_heads`` (the group shares the set) or ``S = num_heads``.
        softcap, sinks: the layer's logit soft cap and ``[num_heads]`` sink logits (:func:`_softmax`).
    Returns:
        ``[B, num_heads, head_size]`` in ``query.dtype``.
    """
    b, num_heads, d = query.shape
    s = indices.shape[1]
    heads = row_kv_heads(s, num_heads, cache.num_kv_heads, query.device)
    k = gather_tokens(cache.key_cache, block_table, indices, heads).float()  # [B, S, L, D]
    v = gather_tokens(cache.value_cache, block_table, indices, heads).float()
    g = num_heads // s
    logits = torch.einsum("bsgd,bsld->bsgl", query.float().view(b, s, g, d), k) * scale
    logits = logits.masked_fill((indices < 0)[:, :, None, :], _NEG_INF)
    p = _softmax(logits, softcap, sinks)
    v = v.masked_fill((indices < 0)[..., None], 0.0)
    return torch.einsum("bsgl,bsld->bsgd", p, v).reshape(b, num_heads, d).to(query.dtype)


def sparse_decode(
    query: torch.Tensor,
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    attended: torch.Tensor,
    scale: float,
    params: SelectParams,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`select_topk` then :func:`sparse_attention`, fused: the scores computed for the
    selection are reused as the attention logits (before the soft cap, which keeps their order).
    ``softcap``, ``sinks``: as :func:`sparse_attention`. Returns ``[B, num_heads, head_size]``."""
    pos, keep, logits, v = _select(query, cache, block_table, seq_lens, attended, scale, params)
    if logits is None:
        return sparse_attention(query, cache, block_table, torch.where(keep, pos, -1), scale, softcap, sinks)
    b, num_heads, d = query.shape
    v = v.float().masked_fill(~keep[..., None], 0.0)
    p = _softmax(logits.masked_fill(~keep[:, :, None, :], _NEG_INF), softcap, sinks)  # [B, S, G, W]
    return torch.matmul(p, v).reshape(b, num_heads, d).to(query.dtype)
