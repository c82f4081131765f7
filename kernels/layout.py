"""The paged KV layout this plugin owns.

It is vLLM's own per-layer cache view, ``[num_blocks, head_slots, block_size, 2 * head_size]``
(vLLM's logical ``[B, H, N, C]`` page with head-major block interiors, ``KVCacheLayout.LBHNC``),
with two uses of it:

* head slots ``[0, num_kv_heads)`` hold each KV head's ``block_size`` token rows as
  ``[key | value]`` (``C = 2 * head_size``);
* ``meta_slots = ceil(num_kv_heads / page_size)`` extra head slots hold the per-page
  **selection metadata**: the element-wise min and max of the keys of every page of
  ``page_size`` tokens (Quest's page summary), as rows ``[key min | key max]``, one row per
  (KV head, page) — row ``h * pages_per_block + p`` of the extra slots' rows.

The backend asks vLLM for ``num_kv_heads + meta_slots`` head slots per block (see
``vllm_sparse.backend``), so the metadata lives in vLLM's paged blocks and is freed and
reused with them. Overhead: ``meta_slots / num_kv_heads`` of the KV memory (1/16 for
16 KV heads with 16-token pages, 1/3 for SmolLM2's 3 KV heads).

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

import torch

__all__ = ["PagedKVCache", "meta_slots"]


def meta_slots(num_kv_heads: int, block_size: int, page_size: int) -> int:
    """Extra head slots a block needs for the page min/max of ``num_kv_heads`` heads."""
    _check_page_size(block_size, page_size)
    return -(-num_kv_heads // page_size)


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
    All four tensors share one dtype and device; their strides are arbitrary.
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    key_min: torch.Tensor
    key_max: torch.Tensor
    page_size: int
    #: ``[num_blocks * head_slots * pages_per_block, page_size * 2 * head_size]`` rows of whole
    #: pages (keys and values interleaved per token) when the raw cache is contiguous, else None:
    #: lets the CPU path gather pages with one ``index_select`` (memcpy) instead of strided copies
    page_rows: torch.Tensor | None = field(default=None, compare=False, repr=False)
    #: ``[num_blocks, num_kv_heads * pages_per_block * 2 * head_size]`` per-block metadata rows (same condition)
    meta_rows: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        nb, bs, h, d = self.key_cache.shape
        assert self.value_cache.shape == (nb, bs, h, d), self.value_cache.shape
        _check_page_size(bs, self.page_size)
        ppb = bs // self.page_size
        assert self.key_min.shape == (nb, ppb, h, d), self.key_min.shape
        assert self.key_max.shape == (nb, ppb, h, d), self.key_max.shape

    # -- shape helpers -------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.key_cache.shape[0]

    @property
    def block_size(self) -> int:
        return self.key_cache.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key_cache.shape[2]

    @property
    def head_size(self) -> int:
        return self.key_cache.shape[3]

    @property
    def pages_per_block(self) -> int:
        return self.block_size // self.page_size

    @property
    def dtype(self) -> torch.dtype:
        return self.key_cache.dtype

    @property
    def device(self) -> torch.device:
        return self.key_cache.device

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_raw(cls, raw: torch.Tensor, num_kv_heads: int, page_size: int) -> "PagedKVCache":
        """Views over a ``[num_blocks, num_kv_heads + meta_slots, block_size, 2 * head_size]`` cache.

        ``raw`` may be any strided tensor (e.g. vLLM's per-layer view) as long as the extra
        slots' (slot, token) dims merge, i.e. the block interior is head-major.
        """
        nb, slots, bs, c = raw.shape if raw.dim() == 4 else (None,) * 4
        if raw.dim() != 4 or c % 2:
            raise ValueError(f"cache must be [num_blocks, head_slots, block_size, 2*head_size]; got {tuple(raw.shape)}")
        extra = meta_slots(num_kv_heads, bs, page_size)
        if slots != num_kv_heads + extra:
            raise ValueError(
                f"cache has {slots} head slots; num_kv_heads={num_kv_heads} with block_size={bs} and "
                f"page_size={page_size} needs {num_kv_heads} + {extra}"
            )
        d, h, ppb = c // 2, num_kv_heads, bs // page_size
        try:
            meta = raw[:, h:].flatten(1, 2)  # [NB, extra * bs, 2D], a view only for head-major blocks
        except RuntimeError as e:  # pragma: no cover - depends on vLLM's resolved layout
            raise ValueError(f"cache blocks must be head-major (KVCacheLayout.LBHNC); strides {raw.stride()}") from e
        if meta.data_ptr() != raw[:, h:].data_ptr() or meta.stride(1) != raw.stride(2):
            raise ValueError(f"cache blocks must be head-major (KVCacheLayout.LBHNC); strides {raw.stride()}")
        page_rows = meta_rows = None
        if raw.is_contiguous():
            page_rows = raw.unflatten(2, (ppb, page_size)).view(nb * slots * ppb, page_size * c)
            meta_rows = meta[:, : h * ppb].flatten(1)
        meta = meta[:, : h * ppb].unflatten(1, (h, ppb)).transpose(1, 2)  # [NB, ppb, H, 2D]
        return cls(
            key_cache=raw[:, :h, :, :d].transpose(1, 2),
            value_cache=raw[:, :h, :, d:].transpose(1, 2),
            key_min=meta[..., :d],
            key_max=meta[..., d:],
            page_size=page_size,
            page_rows=page_rows,
            meta_rows=meta_rows,
        )

    @staticmethod
    def raw_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, page_size: int) -> tuple:
        """Shape of the whole per-layer cache tensor."""
        return (num_blocks, num_kv_heads + meta_slots(num_kv_heads, block_size, page_size), block_size, 2 * head_size)

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
    ) -> "PagedKVCache":
        """Allocate a cache (NaN-poisoned by default so reads of unwritten rows show up)."""
        shape = cls.raw_shape(num_blocks, block_size, num_kv_heads, head_size, page_size)
        raw = torch.full(shape, fill, dtype=dtype, device=device)
        return cls.from_raw(raw, num_kv_heads, page_size)

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
        b, s, c = pages.shape
        ppb, ps, d = self.pages_per_block, self.page_size, self.head_size
        pg = pages.clamp_min(0)
        blk = block_table.long().gather(1, (pg // ppb).view(b, s * c)).view(b, s, c).clamp_min(0)
        heads = kv_head.view(1, s, 1).expand(b, s, c)
        if self.page_rows is not None:
            slots = self.page_rows.shape[0] // (self.num_blocks * ppb)
            rows = (blk * slots + heads) * ppb + pg % ppb
            kv = self.page_rows.index_select(0, rows.flatten()).view(b, s, c * ps, 2 * d)
            return kv[..., :d], kv[..., d:]
        k = self.key_cache.unflatten(1, (ppb, ps))[blk, pg % ppb, :, heads].flatten(2, 3)
        v = self.value_cache.unflatten(1, (ppb, ps))[blk, pg % ppb, :, heads].flatten(2, 3)
        return k, v

    def gather_page_bounds(self, block_table: torch.Tensor, num_pages: int,
                           kv_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Page key min/max of the first ``num_pages`` pages: ``[B, S, num_pages, head_size]`` each."""
        if self.meta_rows is None:
            kmin, kmax = self.gather_page_summaries(block_table, num_pages)  # [B, P, H, D]
            return kmin[:, :, kv_head].transpose(1, 2), kmax[:, :, kv_head].transpose(1, 2)
        ppb, h, d = self.pages_per_block, self.num_kv_heads, self.head_size
        nblk = -(-num_pages // ppb)
        ids = block_table[:, :nblk].long().clamp_min(0)
        b = ids.shape[0]
        meta = self.meta_rows.index_select(0, ids.flatten()).view(b, nblk, h, ppb, 2 * d)
        meta = meta[:, :, kv_head].transpose(1, 2).flatten(2, 3)[:, :, :num_pages]  # [B, S, P, 2D]
        return meta[..., :d], meta[..., d:]
