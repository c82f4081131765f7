"""The paged KV layout this plugin owns.

One vLLM KV block of ``block_size`` tokens holds, for every KV head:

* ``block_size`` key rows and ``block_size`` value rows, and
* per-page selection metadata: the element-wise **min and max of the keys** of each
  page of ``page_size`` tokens (Quest's page summary). ``pages_per_block =
  block_size // page_size``.

In memory a block is one contiguous record of ``rows = 2 * block_size + 2 *
pages_per_block`` rows of ``[num_kv_heads, head_size]`` elements, in the model dtype::

    rows [0, bs)                    keys      key_cache[blk, t]
    rows [bs, 2 bs)                 values    value_cache[blk, t]
    rows [2 bs, 2 bs + ppb)         key min   key_min[blk, p]
    rows [2 bs + ppb, 2 bs + 2 ppb) key max   key_max[blk, p]

so the whole per-layer cache is a ``[num_blocks, rows, num_kv_heads, head_size]`` tensor
and the four named tensors are strided views into it. Every op in this package takes the
views and their strides, never assumes contiguity, and so also works on other layouts
(for example the views the vLLM backend builds over vLLM's own allocation).

Metadata invariant (maintained by ``write_kv``): for every page that has been written,
``key_min``/``key_max`` equal the min/max over the page's rows ``[0, last written
offset]``. Rows past a sequence's length are never read by any op; the summary of a page
covers exactly its valid tokens because pages fill in order.

A token's *slot* is ``block_id * block_size + offset`` (vLLM's ``slot_mapping``); its
*position* inside its request is the index into the request's ``block_table`` row times
``block_size`` plus the offset. ``-1`` slots are padding and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PagedKVCache", "cache_rows_per_block"]


def cache_rows_per_block(block_size: int, page_size: int) -> int:
    """Rows of ``[num_kv_heads, head_size]`` one block record occupies."""
    _check_page_size(block_size, page_size)
    return 2 * block_size + 2 * (block_size // page_size)


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
    def from_raw(cls, raw: torch.Tensor, block_size: int, page_size: int) -> "PagedKVCache":
        """Views over a ``[num_blocks, rows, num_kv_heads, head_size]`` block-record tensor."""
        rows = cache_rows_per_block(block_size, page_size)
        if raw.dim() != 4 or raw.shape[1] != rows:
            raise ValueError(
                f"raw cache must be [num_blocks, {rows}, num_kv_heads, head_size] for "
                f"block_size={block_size}, page_size={page_size}; got {tuple(raw.shape)}"
            )
        bs, ppb = block_size, block_size // page_size
        return cls(
            key_cache=raw[:, :bs],
            value_cache=raw[:, bs : 2 * bs],
            key_min=raw[:, 2 * bs : 2 * bs + ppb],
            key_max=raw[:, 2 * bs + ppb :],
            page_size=page_size,
        )

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
        """Allocate a cache (NaN-poisoned by default so unwritten reads show up)."""
        rows = cache_rows_per_block(block_size, page_size)
        raw = torch.full((num_blocks, rows, num_kv_heads, head_size), fill, dtype=dtype, device=device)
        return cls.from_raw(raw, block_size, page_size)

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
