"""KV append by ``slot_mapping`` plus the per-page key min/max refresh (see :func:`.reference.write_kv`).

Two launches:

1. :func:`_write_kv_kernel` copies each token's ``[num_kv_heads, head_size]`` key and value
   rows to its slot (``slot < 0`` skipped), casting to the cache dtype.
2. :func:`_page_summary_kernel` recomputes ``key_min``/``key_max`` of every touched page over
   its rows ``[0, last offset written by this call]``. The slots are sorted first
   (``torch.sort``: no host sync), so the last token of each page run in the sorted order
   is that page's only writer — deterministic, no atomics, no scratch buffer.

Min/max are exact, so the result equals the reference bit for bit.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .layout import PagedKVCache
from .triton_common import INTERPRET

__all__ = ["write_kv_triton"]



@triton.jit
def _write_kv_kernel(
    # -- pointers ------------------------------------------------------------------
    key_ptr,  # [num_tokens, num_kv_heads, head_size]
    value_ptr,  # [num_tokens, num_kv_heads, head_size]
    slot_ptr,  # [num_tokens] int, < 0 = skip
    kc_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    vc_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    # -- sizes ---------------------------------------------------------------------
    num_tokens,
    # -- strides -------------------------------------------------------------------
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_ct, stride_ch, stride_cd,
    stride_wb, stride_wt, stride_wh, stride_wd,
    # -- meta ----------------------------------------------------------------------
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_HD: tl.constexpr,  # (head, dim) elements per program
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=t_mask, other=-1).to(tl.int64)
    valid = t_mask & (slot >= 0)
    slot = tl.where(valid, slot, 0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    j = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
    h = j // HEAD_SIZE
    d = j % HEAD_SIZE
    mask = valid[:, None] & (j < NUM_KV_HEADS * HEAD_SIZE)[None, :]
    t64 = t.to(tl.int64)[:, None]
    k = tl.load(key_ptr + t64 * stride_kt + h[None, :] * stride_kh + d[None, :] * stride_kd, mask=mask)
    v = tl.load(value_ptr + t64 * stride_vt + h[None, :] * stride_vh + d[None, :] * stride_vd, mask=mask)
    tl.store(
        kc_ptr + blk[:, None] * stride_cb + off[:, None] * stride_ct + h[None, :] * stride_ch + d[None, :] * stride_cd,
        k.to(kc_ptr.dtype.element_ty), mask=mask,
    )
    tl.store(
        vc_ptr + blk[:, None] * stride_wb + off[:, None] * stride_wt + h[None, :] * stride_wh + d[None, :] * stride_wd,
        v.to(vc_ptr.dtype.element_ty), mask=mask,
    )


@triton.jit
def _page_summary_kernel(
    # -- pointers ------------------------------------------------------------------
    sorted_slot_ptr,  # [num_tokens] int64, ascending (skipped slots < 0 first)
    kc_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    kmin_ptr,  # [num_blocks, pages_per_block, num_kv_heads, head_size]
    kmax_ptr,  # [num_blocks, pages_per_block, num_kv_heads, head_size]
    # -- sizes ---------------------------------------------------------------------
    num_tokens,
    # -- strides -------------------------------------------------------------------
    stride_cb, stride_ct, stride_ch, stride_cd,
    stride_nb, stride_np, stride_nh, stride_nd,
    stride_xb, stride_xp, stride_xh, stride_xd,
    # -- meta ----------------------------------------------------------------------
    BLOCK_SIZE: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,  # next_pow2(PAGE_SIZE)
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    i = tl.program_id(0)
    slot = tl.load(sorted_slot_ptr + i)
    nxt = tl.load(sorted_slot_ptr + i + 1, mask=i + 1 < num_tokens, other=-1)
    # the page's writer: last of its run in sorted order
    owner = (slot >= 0) & ((nxt < 0) | (nxt // PAGE_SIZE != slot // PAGE_SIZE))
    if owner:
        blk = slot // BLOCK_SIZE
        page = (slot % BLOCK_SIZE) // PAGE_SIZE
        last = slot % PAGE_SIZE
        r = tl.arange(0, BLOCK_P)
        r_mask = r <= last
        j = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
        h = j // HEAD_SIZE
        d = j % HEAD_SIZE
        j_mask = j < NUM_KV_HEADS * HEAD_SIZE
        rows = tl.load(
            kc_ptr + blk * stride_cb + (page * PAGE_SIZE + r)[:, None] * stride_ct
            + h[None, :] * stride_ch + d[None, :] * stride_cd,
            mask=r_mask[:, None] & j_mask[None, :], other=0.0,
        ).to(tl.float32)  # [BLOCK_P, BLOCK_HD]
        kmin = tl.min(tl.where(r_mask[:, None], rows, float("inf")), axis=0)
        kmax = tl.max(tl.where(r_mask[:, None], rows, float("-inf")), axis=0)
        tl.store(kmin_ptr + blk * stride_nb + page * stride_np + h * stride_nh + d * stride_nd,
                 kmin.to(kmin_ptr.dtype.element_ty), mask=j_mask)
        tl.store(kmax_ptr + blk * stride_xb + page * stride_xp + h * stride_xh + d * stride_xd,
                 kmax.to(kmax_ptr.dtype.element_ty), mask=j_mask)


def write_kv_triton(
    key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, cache: PagedKVCache
) -> None:
    """Write ``key``/``value`` rows by ``slot_mapping`` and refresh the touched pages' min/max.

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_size]``, any strides, cache dtype or castable.
        slot_mapping: ``[>= num_tokens]`` int32/int64 (``block_id * block_size + offset``;
            ``< 0`` skipped). Only the first ``min(len(key), len(slot_mapping))`` are used.
        cache: updated in place.
    Graph-safe (no host sync); duplicate slots in one call are undefined, as in the reference.
    """
    if key.dim() != 3 or key.shape[1:] != (cache.num_kv_heads, cache.head_size):
        raise ValueError(
            f"key must be [num_tokens, num_kv_heads={cache.num_kv_heads}, head_size={cache.head_size}]; "
            f"got {tuple(key.shape)}"
        )
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
    n = min(key.shape[0], slot_mapping.shape[0])
    if n == 0:
        return
    slots = slot_mapping[:n]
    hd = cache.num_kv_heads * cache.head_size
    kc, vc, kmin, kmax = cache.key_cache, cache.value_cache, cache.key_min, cache.key_max
    if INTERPRET:
        block_t, block_hd = 64, triton.next_power_of_2(hd)
    else:
        block_hd = min(triton.next_power_of_2(hd), 1024)
        block_t = max(1, 2048 // block_hd)
    _write_kv_kernel[(triton.cdiv(n, block_t), triton.cdiv(hd, block_hd))](
        key, value, slots, kc, vc, n,
        *key.stride(), *value.stride(), *kc.stride(), *vc.stride(),
        BLOCK_SIZE=cache.block_size, NUM_KV_HEADS=cache.num_kv_heads, HEAD_SIZE=cache.head_size,
        BLOCK_T=block_t, BLOCK_HD=block_hd, num_warps=4,
    )
    sorted_slots = torch.sort(slots.long()).values
    block_p = triton.next_power_of_2(cache.page_size)
    if INTERPRET:
        block_hd = triton.next_power_of_2(hd)
    else:
        block_hd = min(triton.next_power_of_2(hd), max(128, 4096 // block_p))
    _page_summary_kernel[(n, triton.cdiv(hd, block_hd))](
        sorted_slots, kc, kmin, kmax, n,
        *kc.stride(), *kmin.stride(), *kmax.stride(),
        BLOCK_SIZE=cache.block_size, PAGE_SIZE=cache.page_size, BLOCK_P=block_p,
        NUM_KV_HEADS=cache.num_kv_heads, HEAD_SIZE=cache.head_size, BLOCK_HD=block_hd, num_warps=4,
    )
