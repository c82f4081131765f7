"""Helpers shared by the Triton kernels: tile loads from the paged layout, dots, the online-softmax
step, the math mode and argument checks. Never imports vLLM."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import PagedKVCache

__all__ = ["INTERPRET", "LOG2E", "dot", "paged_slots", "load_rows", "soft_cap", "start_with_sinks", "softmax_step",
           "math_mode", "check_query", "check_sinks"]

#: the Triton interpreter (``TRITON_INTERPRET=1``); read when the kernels are decorated, as Triton itself does
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; exact-fp32 products when ``IEEE`` (fp32 inputs)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def paged_slots(block_table_ptr, b, stride_btb, stride_btn, pos, valid, BLOCK_SIZE: tl.constexpr):
    """Physical ``(block, offset)`` of request-local positions ``pos`` (tokens, or pages with
    ``BLOCK_SIZE`` = pages per block); invalid positions map to block 0, offset 0."""
    safe = tl.where(valid, pos, 0)
    blk = tl.load(block_table_ptr + b * stride_btb + (safe // BLOCK_SIZE) * stride_btn, mask=valid, other=0)
    return blk.to(tl.int64), (safe % BLOCK_SIZE).to(tl.int64)


@triton.jit
def load_rows(ptr, blk, off, head, d, mask, stride_b, stride_t, stride_h, stride_d):
    """``[TILE, BLOCK_D]`` rows ``(blk, off, head)`` of a paged ``[num_blocks, block_size, heads,
    head_size]`` tensor, zeros where ``mask`` is false."""
    return tl.load(ptr + blk[:, None] * stride_b + off[:, None] * stride_t + head * stride_h + d[None, :] * stride_d,
                   mask=mask, other=0.0)


@triton.jit
def soft_cap(s, cap):
    """``cap · tanh(s / cap)``: a layer's logit soft cap (Gemma 2), in any unit as long as ``s`` and
    ``cap`` share it (log2 units: both times ``log2(e)``). ``tanh`` through ``exp2``: finite for
    every finite logit; ``-inf`` becomes ``-cap``, so mask after capping."""
    return cap - 2.0 * cap / (tl.exp2(s * (2.8853900817779268 / cap)) + 1.0)  # 2·log2(e) / cap


@triton.jit
def start_with_sinks(m_i, l_i, sinks_ptr, heads, mask, take):
    """The online softmax's running ``(max, sum)`` before any key, with each row's sink logit
    (``sinks[heads]``, natural units; gpt-oss) as one more term of the denominator, attached to no
    value, where ``mask & take`` (a split-K decode takes it in one split only)."""
    sink = tl.load(sinks_ptr + heads, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e)
    take = mask & take
    return tl.where(take, sink, m_i), tl.where(take, l_i + 1.0, l_i)


@triton.jit
def softmax_step(m_i, l_i, acc, s, v, IEEE: tl.constexpr, USE_DOT: tl.constexpr):
    """One online-softmax update with logits ``s`` ``[M, TILE]`` (log2 units, ``-inf`` = masked)
    and values ``v`` ``[TILE, BLOCK_D]``; returns the new ``(m_i, l_i, acc)``."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_DOT:
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    else:
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


def math_mode(query: torch.Tensor, cache: PagedKVCache) -> tuple[bool, bool]:
    """``(upcast, ieee)``: convert loads to fp32 (the interpreter, or a query dtype other than
    the cache's), and run dots as exact fp32 (no tf32) when the operands are fp32."""
    upcast = INTERPRET or query.dtype != cache.dtype
    return upcast, upcast or cache.dtype == torch.float32


def check_sinks(sinks: torch.Tensor | None, num_heads: int) -> None:
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != num_heads or sinks.stride(0) != 1):
        raise ValueError(f"sinks must be a contiguous [num_heads={num_heads}] tensor; got shape "
                         f"{tuple(sinks.shape)}, strides {sinks.stride()}")


def check_query(query: torch.Tensor, cache: PagedKVCache) -> tuple[int, int, int]:
    if query.dim() != 3:
        raise ValueError(f"query must be [B, num_heads, head_size]; got shape {tuple(query.shape)}")
    b, num_heads, d = query.shape
    if d != cache.head_size:
        raise ValueError(f"query head_size={d} does not match the cache head_size={cache.head_size}")
    if num_heads % cache.num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={cache.num_kv_heads}")
    return b, num_heads, d
