"""The arithmetic of benchmarks/adakv_cost.py (Ada-KV's memory cost in a one-block-for-all-heads layout)."""

from __future__ import annotations

import torch
from bench_scripts import load_script


def test_equal_heads_cost_nothing_and_a_dominant_head_costs_up_to_h():
    mod = load_script("adakv_cost")
    n, h = 600, 3
    flat = torch.rand(1, n).expand(h, n).contiguous()  # identical heads: Ada-KV splits evenly
    res = mod.costs([flat], [128])[128]
    assert abs(res["memory_ratio"] - 1.0) < 0.05 and sum(res["counts_per_layer"][0]) == h * 128
    # head 0 concentrated on 10 (unforced) tokens, heads 1-2 spread: past each head's floor the spread
    # heads take the pool. Budget 256 of 600: 68 forced + 38 floor each; of the 450-token pool head 0
    # takes its 10, heads 1-2 about 220 each -> max count ~ 326 = 1.27 x 256
    peaked = torch.full((h, n), 1e-3)
    peaked[0, 10:20] = 10.0
    peaked[1:] += torch.rand(2, n)
    res = mod.costs([peaked, flat], [256])[256]
    r_peaked, r_flat = res["ratio_per_layer"]
    assert r_peaked > 1.2 and abs(r_flat - 1.0) < 0.05
    assert res["memory_ratio"] == (max(res["counts_per_layer"][0]) + max(res["counts_per_layer"][1])) / (2 * 256)
    # SnapKV's observation window is +inf in the stored votes: it must not break the allocation
    inf_tail = flat.clone()
    inf_tail[:, -32:] = float("inf")
    assert mod.costs([inf_tail], [128])[128]["max_ratio"] < 1.1
