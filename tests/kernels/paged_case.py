"""Random paged-cache batches for the kernel tests (not a test module)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_sparse.kernels import PagedKVCache
from vllm_sparse.kernels import reference as R

# relative error of a low-precision result against the float64 oracle
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass
class PagedCase:
    cache: PagedKVCache
    block_table: torch.Tensor  # [B, max_blocks] int32, -1 padded
    seq_lens: torch.Tensor  # [B] int64
    keys: list[torch.Tensor]  # per request [n, Hkv, D], cache dtype
    values: list[torch.Tensor]
    num_heads: int

    @property
    def num_kv_heads(self) -> int:
        return self.cache.num_kv_heads


def make_case(lens, num_heads, num_kv_heads, head_size, block_size, page_size, dtype,
              chunks=2, device="cpu", spare_blocks=3) -> PagedCase:
    """Sequences of ``lens`` written through ``write_kv`` in ``chunks`` steps into shuffled blocks.

    The cache is NaN-poisoned first, so any read of an unwritten row shows up as NaN.
    """
    lens = [int(n) for n in lens]
    nblk = [-(-n // block_size) for n in lens]
    num_blocks = sum(nblk) + spare_blocks
    cache = PagedKVCache.allocate(num_blocks, block_size, num_kv_heads, head_size, page_size, dtype, device)
    perm = torch.randperm(num_blocks, device=device)
    bt = torch.full((len(lens), max(nblk) + 1), -1, dtype=torch.int32, device=device)
    used = 0
    for b, m in enumerate(nblk):
        bt[b, :m] = perm[used : used + m]
        used += m
    keys = [torch.randn(n, num_kv_heads, head_size, device=device).to(dtype) for n in lens]
    values = [torch.randn(n, num_kv_heads, head_size, device=device).to(dtype) for n in lens]
    bounds = [[n * c // chunks for c in range(chunks + 1)] for n in lens]
    for c in range(chunks):  # each step writes the next chunk of every request, plus padding
        k, v, slots = [], [], []
        for b, n in enumerate(lens):
            pos = torch.arange(bounds[b][c], bounds[b][c + 1], device=device)
            slots.append(bt[b, pos // block_size].long() * block_size + pos % block_size)
            k.append(keys[b][pos])
            v.append(values[b][pos])
        pad = 3
        slots.append(torch.full((pad,), -1, dtype=torch.long, device=device))
        k.append(torch.randn(pad, num_kv_heads, head_size, device=device).to(dtype))
        v.append(torch.randn(pad, num_kv_heads, head_size, device=device).to(dtype))
        R.write_kv(torch.cat(k), torch.cat(v), torch.cat(slots), cache)
    return PagedCase(cache, bt, torch.tensor(lens, device=device), keys, values, num_heads)


def random_indices(lens, s, width, device="cpu") -> torch.Tensor:
    """``[B, S, width]`` random distinct positions of each request, ``-1`` scattered anywhere (not sorted);
    a short request gets every position (a budget >= its context)."""
    idx = torch.full((len(lens), s, width), -1, dtype=torch.long)
    for b, n in enumerate(lens):
        m = min(n, width - 3)
        for h in range(s):
            idx[b, h, torch.randperm(width)[:m]] = torch.randperm(n)[:m]
    return idx.to(device)


def random_pages(lens, s, page_size, device="cpu") -> torch.Tensor:
    """``[B, S, max_pages]`` a random non-empty set of each request's pages per row, in random order,
    ``-1`` padded (the partial last page among the candidates)."""
    num_pages = [-(-n // page_size) for n in lens]
    pages = torch.full((len(lens), s, max(num_pages)), -1, dtype=torch.long)
    for b, m in enumerate(num_pages):
        for h in range(s):
            chosen = torch.randperm(m)[: torch.randint(1, m + 1, ()).item()]
            pages[b, h, : len(chosen)] = chosen
    return pages.to(device)


def naive_attention(q, k, v, q_pos, scale):
    """Unpaged float64 attention of rows ``q`` [T, H, D] at positions ``q_pos`` over ``k``/``v`` [n, Hkv, D] (causal)."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    logits = torch.einsum("thd,nhd->htn", q.double(), k) * scale
    mask = torch.arange(k.shape[0], device=q.device)[None, :] > q_pos[:, None]
    p = torch.softmax(logits.masked_fill(mask[None], float("-inf")), -1)
    return torch.einsum("htn,nhd->thd", p, v)


def naive_subset_attention(q, k, v, idx, scale):
    """float64 attention of one query [H, D] over positions ``idx`` [S, L] (−1 skipped) of ``k``/``v`` [n, Hkv, D]."""
    h, s = q.shape[0], idx.shape[0]
    out = torch.empty(h, q.shape[1], dtype=torch.float64, device=q.device)
    for head in range(h):
        sel = idx[head // (h // s)]
        sel = sel[sel >= 0]
        kv = head // (h // k.shape[1])
        p = torch.softmax(k[sel, kv].double() @ q[head].double() * scale, 0)
        out[head] = p @ v[sel, kv].double()
    return out


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()
