"""The paged KV layout this plugin owns.

It is vLLM's own per-layer cache view ``[num_blocks, num_kv_heads, block_size + pages_per_block,
2 * head_size]`` (vLLM's logical ``[B, H, N, C]`` page with head-major block interiors,
``KVCacheLayout.LBHNC``): each KV head of each block owns one contiguous *head slot* of
``(block_size + pages_per_block) * 2 * head_size`` elements, laid out as

* ``[0, block_size * head_size)`` — the keys, ``[block_size, head_size]`` row-major, or, with
  ``key_transposed=True``, ``[head_size, block_size]`` (keys transposed — the layout of vLLM's
  own CPU attention kernels, ``cpu_attn_reshape_and_cache`` with ISA ``vec``/``vec16``);
* ``[block_size * head_size, 2 * block_size * head_size)`` — the values, ``[block_size, head_size]``;
* or, with ``amx=True`` (bf16, ``block_size % 32 == 0``), keys and values packed the way vLLM's
  AMX CPU kernel (ISA ``amx``) reads them (:func:`amx_pack`, :func:`amx_unpack`): keys in groups
  of 16 tokens, each ``[head_size / 2, 16, 2]`` (dim pairs outermost), values in groups of 16
  dims, each ``[block_size / 2, 16, 2]`` (token pairs innermost). No strided ``[block_size,
  head_size]`` view exists, so ``key_cache``/``value_cache`` are ``None`` and only the fused CPU
  path (vLLM's op + ``kernels/cpu_select.cpp``) reads such a cache;
* the last ``pages_per_block * 2 * head_size`` elements — the per-page **selection metadata**:
  for every page of ``page_size`` tokens the element-wise key min and max (Quest's page
  summary), one row ``[key min | key max]`` per page.

The backend asks vLLM for ``block_size + pages_per_block`` states per head slot instead of
``block_size`` (``AttentionSpec.tokens_per_state = block_size / (block_size + pages_per_block)``,
see ``vllm_sparse.backend``), so the metadata lives in vLLM's paged blocks, is freed and reused
with them, and costs exactly ``1 / page_size`` of the K/V bytes, for any number of KV heads.
Because every head slot has the same size, the cache can also be viewed as
``[num_blocks * num_kv_heads]`` single-head blocks: block ``b``'s head ``h`` is block
``b * num_kv_heads + h`` of that view, which is how a selection of pages becomes a compacted
block table for vLLM's own paged-attention op (``vllm_sparse.cpu_attention``).

:class:`PagedKVCache` exposes the four parts as strided views::

    key_cache, value_cache  [num_blocks, block_size, num_kv_heads, head_size]
    key_min, key_max        [num_blocks, pages_per_block, num_kv_heads, head_size]

Every op in this package takes the views and their strides and never assumes contiguity.

Metadata invariant (maintained by ``write_kv``): for every page that has been written,
``key_min``/``key_max`` equal the min/max over the page's rows ``[0, last written
offset]``. Rows past a sequence's length are never read by any op; the summary of a page
covers exactly its valid tokens because pages fill in order.

A token's *slot* is ``block_id * block_size + offset`` (vLLM's ``slot_mapping``); its
*position* inside its request is the index into the request's ``block_table`` row times
``block_size`` plus the offset. ``-1`` slots are padding and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

__all__ = ["PagedKVCache", "summary_states", "score_states", "amx_pack", "amx_unpack"]


def summary_states(block_size: int, page_size: int) -> int:
    """Extra states (rows of ``2 * head_size``) a head slot needs for its pages' key min/max."""
    _check_page_size(block_size, page_size)
    return block_size // page_size


def score_states(block_size: int, head_size: int, dtype: torch.dtype) -> int:
    """Extra states (rows of ``2 * head_size`` elements of ``dtype``) that hold one float32 score per
    token of a head slot — H2O's accumulated attention (``PagedKVCache.token_scores``)."""
    row_bytes = 2 * head_size * torch.tensor([], dtype=dtype).element_size()
    return -(-(4 * block_size) // row_bytes)


def amx_pack(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head slots' K and V in vLLM's AMX layout (the torch oracle of ``cpu_attn_reshape_and_cache``, ISA ``amx``).

    Args:
        keys, values: ``[..., block_size, head_size]`` (a block's tokens of one KV head).
    Returns:
        ``[..., block_size * head_size]`` each: key ``(t, e)`` at ``(t // 16) * 16 * head_size +
        (e // 2) * 32 + (t % 16) * 2 + e % 2``; value ``(t, e)`` at ``(e // 16) * 16 * block_size +
        (t // 2) * 32 + (e % 16) * 2 + t % 2``.
    """
    *lead, bs, d = keys.shape
    if bs % 16 or d % 16:
        raise ValueError(f"the AMX layout needs block_size and head_size multiples of 16; got {bs}, {d}")
    n = len(lead)
    k = keys.unflatten(-1, (d // 2, 2)).unflatten(-3, (bs // 16, 16))  # [..., G, 16, D/2, 2]
    k = k.permute(*range(n), n, n + 2, n + 1, n + 3)  # [..., G, D/2, 16, 2]
    v = values.unflatten(-1, (d // 16, 16)).unflatten(-3, (bs // 2, 2))  # [..., BS/2, 2, D/16, 16]
    v = v.permute(*range(n), n + 2, n, n + 3, n + 1)  # [..., D/16, BS/2, 16, 2]
    return k.reshape(*lead, bs * d), v.reshape(*lead, bs * d)


def amx_unpack(keys: torch.Tensor, values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`amx_pack`: ``[..., block_size * head_size]`` -> ``[..., block_size, head_size]`` copies."""
    *lead, size = keys.shape
    bs, n = block_size, len(lead)
    d = size // bs
    k = keys.unflatten(-1, (bs // 16, d // 2, 16, 2)).permute(*range(n), n, n + 2, n + 1, n + 3)
    v = values.unflatten(-1, (d // 16, bs // 2, 16, 2)).permute(*range(n), n + 1, n + 3, n, n + 2)
    return k.reshape(*lead, bs, d), v.reshape(*lead, bs, d)


def _check_page_size(block_size: int, page_size: int) -> None:
    if page_size < 1 or block_size % page_size:
        raise ValueError(
            f"page_size={page_size} must be a positive divisor of the KV block size "
            f"block_size={block_size}"
        )


@dataclass(frozen=True)
class PagedKVCache:
    """Strided views over one layer's paged KV cache.

    Attributes:
        key_cache:   ``[num_blocks, block_size, num_kv_heads, head_size]``
        value_cache: ``[num_blocks, block_size, num_kv_heads, head_size]``
        key_min:     ``[num_blocks, pages_per_block, num_kv_heads, head_size]``
        key_max:     ``[num_blocks, pages_per_block, num_kv_heads, head_size]``
        page_size:   tokens summarised by one ``key_min``/``key_max`` row.
        key_transposed: keys stored ``[head_size, block_size]`` per head slot (vLLM's CPU layout).
        amx: K/V packed for vLLM's AMX kernel (:func:`amx_pack`); ``key_cache``/``value_cache`` are then None.
    All tensors share one dtype and device; their strides are arbitrary.
    """

    key_cache: torch.Tensor | None
    value_cache: torch.Tensor | None
    key_min: torch.Tensor
    key_max: torch.Tensor
    page_size: int
    key_transposed: bool = False
    amx: bool = False
    #: ``[num_blocks, num_kv_heads, slot_size]`` the raw head slots (a view; None for views built by hand)
    slots: torch.Tensor | None = field(default=None, compare=False, repr=False)
    #: ``[num_blocks, num_kv_heads, block_size]`` float32 per-token scores in the head slots' extra
    #: rows (H2O's accumulated attention), or None when the cache has none
    token_scores: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        nb, ppb, h, d = self.key_min.shape
        assert self.key_max.shape == (nb, ppb, h, d), self.key_max.shape
        bs = ppb * self.page_size
        if self.amx:
            assert self.key_cache is None and self.value_cache is None and self.slots is not None
            return
        assert self.key_cache.shape == (nb, bs, h, d), (self.key_cache.shape, self.key_min.shape)
        assert self.value_cache.shape == (nb, bs, h, d), self.value_cache.shape
        _check_page_size(bs, self.page_size)

    # -- shape helpers -------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.key_min.shape[0]

    @property
    def block_size(self) -> int:
        return self.key_min.shape[1] * self.page_size

    @property
    def num_kv_heads(self) -> int:
        return self.key_min.shape[2]

    @property
    def head_size(self) -> int:
        return self.key_min.shape[3]

    @property
    def pages_per_block(self) -> int:
        return self.key_min.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.key_min.dtype

    @property
    def device(self) -> torch.device:
        return self.key_min.device

    def _token_views(self, what: str) -> None:
        if self.amx:
            raise ValueError(f"{what} reads keys/values as [block_size, head_size] rows, which the AMX-packed "
                             "cache (amx=True) does not have; only the fused CPU path reads it")

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_raw(cls, raw: torch.Tensor, num_kv_heads: int, page_size: int,
                 key_transposed: bool = False, score_rows: int = 0, amx: bool = False) -> "PagedKVCache":
        """Views over a ``[num_blocks, num_kv_heads, block_size + block_size // page_size (+ score_rows), 2 * head_size]`` cache.

        ``raw`` may be any strided tensor (e.g. vLLM's per-layer view, possibly with other
        layers between its blocks) as long as each head slot is contiguous. ``score_rows`` extra
        rows at the end of each head slot hold float32 per-token scores (:func:`score_states`).
        ``amx``: K/V packed for vLLM's AMX kernel (bf16, ``block_size % 32 == 0``; no K/V views).
        """
        if raw.dim() != 4 or raw.shape[3] % 2:
            raise ValueError(f"cache must be [num_blocks, num_kv_heads, states, 2*head_size]; got {tuple(raw.shape)}")
        nb, slots, states, c = raw.shape
        states -= score_rows
        if slots != num_kv_heads:
            raise ValueError(f"cache has {slots} head slots; expected num_kv_heads={num_kv_heads}")
        bs = states * page_size // (page_size + 1) if page_size >= 1 else 0
        if page_size < 1 or bs < 1 or bs + bs // page_size != states or bs % page_size:
            raise ValueError(
                f"cache has {states} states per head slot, which is no block_size + block_size / page_size "
                f"for page_size={page_size}"
            )
        d, ppb = c // 2, bs // page_size
        size = (states + score_rows) * c
        if raw.stride(3) != 1 or raw.stride(2) != c or (slots > 1 and raw.stride(1) != size):
            raise ValueError(f"cache head slots must be contiguous (KVCacheLayout.LBHNC); strides {raw.stride()}")
        slot = raw.flatten(2)  # [NB, H, size]
        if amx and (raw.dtype != torch.bfloat16 or bs % 32 or d % 32 or key_transposed):
            raise ValueError(f"the AMX layout needs a bfloat16 cache, block_size and head_size multiples of 32 "
                             f"and no key_transposed; got {raw.dtype}, block_size={bs}, head_size={d}")
        if amx:
            keys = values = None
        elif key_transposed:  # element (t, e) of a block's keys at e * bs + t
            keys = slot[..., : bs * d].unflatten(-1, (d, bs)).permute(0, 3, 1, 2)
        else:
            keys = slot[..., : bs * d].unflatten(-1, (bs, d)).transpose(1, 2)
        if not amx:
            values = slot[..., bs * d : 2 * bs * d].unflatten(-1, (bs, d)).transpose(1, 2)
        meta = slot[..., 2 * bs * d : states * c].unflatten(-1, (ppb, c)).transpose(1, 2)  # [NB, ppb, H, 2D]
        scores = slot[..., states * c :].view(torch.float32)[..., :bs] if score_rows else None
        return cls(
            key_cache=keys,
            value_cache=values,
            key_min=meta[..., :d],
            key_max=meta[..., d:],
            page_size=page_size,
            key_transposed=key_transposed,
            amx=amx,
            slots=slot,
            token_scores=scores,
        )

    @staticmethod
    def raw_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, page_size: int) -> tuple:
        """Shape of the whole per-layer cache tensor."""
        return (num_blocks, num_kv_heads, block_size + summary_states(block_size, page_size), 2 * head_size)

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        page_size: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        fill: float = float("nan"),
        key_transposed: bool = False,
        amx: bool = False,
    ) -> "PagedKVCache":
        """Allocate a cache (NaN-poisoned by default so reads of unwritten rows show up)."""
        shape = cls.raw_shape(num_blocks, block_size, num_kv_heads, head_size, page_size)
        raw = torch.full(shape, fill, dtype=dtype, device=device)
        return cls.from_raw(raw, num_kv_heads, page_size, key_transposed, amx=amx)

    @cached_property
    def slot_rows(self) -> torch.Tensor | None:
        """``[num_blocks * num_kv_heads, slot_size]`` whole head slots when they are evenly spaced
        (a contiguous cache), else None: lets the CPU path gather pages and summaries with one
        ``index_select`` (memcpy) instead of strided copies."""
        s = self.slots
        if s is None or s.stride(0) != s.shape[1] * s.shape[2]:
            return None
        return s.view(s.shape[0] * s.shape[1], s.shape[2])

    # -- single-KV-head block views (vLLM's paged-attention op over compacted block tables) ----
    @cached_property
    def head_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_cache, value_cache)`` viewed as ``num_blocks * num_kv_heads`` one-head blocks.

        Shapes ``[num_blocks * num_kv_heads, 1, block_size, head_size]`` in vLLM's
        ``[blocks, heads, tokens, dims]`` kernel order (keys: the raw ``[head_size, block_size]``
        memory when ``key_transposed``, as vLLM's CPU kernels expect). Needs a contiguous cache.
        """
        if self.slot_rows is None:
            raise ValueError("head_blocks needs a contiguous cache")
        bs, d = self.block_size, self.head_size
        rows = self.slot_rows[:, None]  # [NB*H, 1, size]
        return rows[..., : bs * d].unflatten(-1, (bs, d)), rows[..., bs * d : 2 * bs * d].unflatten(-1, (bs, d))

    @cached_property
    def kernel_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_cache, value_cache)`` as ``[num_blocks, num_kv_heads, block_size, head_size]`` views of
        the raw memory (vLLM's paged-attention argument order; keys in their stored order)."""
        bs, d = self.block_size, self.head_size
        return self.slots[..., : bs * d].unflatten(-1, (bs, d)), self.slots[..., bs * d : 2 * bs * d].unflatten(-1, (bs, d))

    # -- gathers used by the reference ops -------------------------------------------
    def gather(self, block_table: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``num_tokens`` positions of each row of ``block_table``.

        Args:
            block_table: ``[B, max_blocks]`` int block ids (only the first
                ``ceil(num_tokens / block_size)`` columns are read).
        Returns:
            ``(k, v)``, each ``[B, num_tokens, num_kv_heads, head_size]`` (copies).
            Positions past a request's own length hold whatever the block holds: mask them.
        """
        self._token_views("gather")
        nblk = -(-num_tokens // self.block_size)
        ids = block_table[:, :nblk].long().clamp_min(0)
        b = ids.shape[0]
        k = self.key_cache[ids].reshape(b, nblk * self.block_size, self.num_kv_heads, self.head_size)
        v = self.value_cache[ids].reshape(b, nblk * self.block_size, self.num_kv_heads, self.head_size)
        return k[:, :num_tokens], v[:, :num_tokens]

    def gather_page_summaries(self, block_table: torch.Tensor, num_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Page min/max of the first ``num_pages`` pages of each request: ``[B, num_pages, H, D]`` each."""
        nblk = -(-num_pages // self.pages_per_block)
        ids = block_table[:, :nblk].long().clamp_min(0)
        b = ids.shape[0]
        shape = (b, nblk * self.pages_per_block, self.num_kv_heads, self.head_size)
        return self.key_min[ids].reshape(shape)[:, :num_pages], self.key_max[ids].reshape(shape)[:, :num_pages]

    def gather_pages(self, block_table: torch.Tensor, pages: torch.Tensor,
                     kv_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole pages.

        Args:
            block_table: ``[B, max_blocks]`` int.
            pages: ``[B, S, C]`` request-local page numbers (``-1`` allowed: reads page 0 of
                block 0; mask those rows).
            kv_head: ``[S]`` the KV head each of the ``S`` selection heads reads.
        Returns:
            ``(k, v)``, each ``[B, S, C * page_size, head_size]`` in the cache dtype (views
            into one gathered copy on the fast path).
        """
        self._token_views("gather_pages")
        b, s, c = pages.shape
        ppb, ps, d = self.pages_per_block, self.page_size, self.head_size
        pg = pages.clamp_min(0)
        blk = block_table.long().gather(1, (pg // ppb).view(b, s * c)).view(b, s, c).clamp_min(0)
        heads = kv_head.view(1, s, 1).expand(b, s, c)
        rows_view = self.slot_rows
        if rows_view is not None and ppb == 1:  # a page is a whole head slot: one row gather
            kv = rows_view.index_select(0, (blk * self.num_kv_heads + heads).flatten()).view(b, s, c, -1)
            k = kv[..., : ps * d].unflatten(-1, (d, ps) if self.key_transposed else (ps, d))
            if self.key_transposed:
                k = k.transpose(-1, -2)
            v = kv[..., ps * d : 2 * ps * d].unflatten(-1, (ps, d))
            return k.flatten(2, 3), v.flatten(2, 3)
        k = self.key_cache.unflatten(1, (ppb, ps))[blk, pg % ppb, :, heads].flatten(2, 3)
        v = self.value_cache.unflatten(1, (ppb, ps))[blk, pg % ppb, :, heads].flatten(2, 3)
        return k, v

    def gather_page_bounds(self, block_table: torch.Tensor, num_pages: int,
                           kv_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Page key min/max of the first ``num_pages`` pages: ``[B, S, num_pages, head_size]`` each."""
        rows = self.gather_page_summary_rows(block_table, num_pages, kv_head)
        if rows is None:
            kmin, kmax = self.gather_page_summaries(block_table, num_pages)  # [B, P, H, D]
            return kmin[:, :, kv_head].transpose(1, 2), kmax[:, :, kv_head].transpose(1, 2)
        return rows[..., : self.head_size], rows[..., self.head_size :]

    def gather_page_summary_rows(self, block_table: torch.Tensor, num_pages: int,
                                 kv_head: torch.Tensor) -> torch.Tensor | None:
        """Rows ``[key min | key max]`` of the first ``num_pages`` pages, ``[B, S, num_pages, 2 * head_size]``
        (one contiguous copy; ``None`` when the cache is not contiguous)."""
        rows_view = self.slot_rows
        if rows_view is None:
            return None
        ppb, h, d, bs = self.pages_per_block, self.num_kv_heads, self.head_size, self.block_size
        nblk = -(-num_pages // ppb)
        ids = block_table[:, :nblk].long().clamp_min(0)
        b, s = ids.shape[0], kv_head.numel()
        rows = (ids[:, None, :] * h + kv_head.view(1, s, 1)).flatten()  # [B*S*nblk]
        return rows_view[:, 2 * bs * d :].index_select(0, rows).view(b, s, nblk * ppb, 2 * d)[:, :, :num_pages]
