"""The eviction rule (no vLLM): what is freed after p processed tokens, and that it never shrinks."""

import pytest
import torch

from vllm_sparse.policies.eviction import EvictionRule


def test_free_end_by_hand():
    r = EvictionRule(block_size=32, sink_tokens=4, k=8.0, alpha=0.5, min_keep=128)
    assert r.sink_blocks == 1
    assert r.keep(100) == 128 and r.free_end(100) == 1  # nothing freed below the budget
    # p = 7000: keep ceil(8·sqrt(7000)) = 670 → the tail holds positions >= 7000 - 666 = 6334 → block 197
    assert r.keep(7000) == 670 and r.free_end(7000) == 6334 // 32 == 197
    fixed = EvictionRule(block_size=16, sink_tokens=16, k=64, alpha=0.0, min_keep=64, max_keep=64)
    assert fixed.keep(10_000) == 64
    assert fixed.free_end(10_000) == (10_000 - 64 + 16) // 16


@pytest.mark.parametrize("rule", [
    EvictionRule(32, 4, 8.0, 0.5, 128),
    EvictionRule(16, 0, 2.0, 0.7, 64, 2048),
    EvictionRule(16, 0, 0.9, 1.0, 16),  # keeps 90% of the context
    EvictionRule(64, 100, 500, 0.0, 500, 500),
])
def test_tail_always_holds_the_kept_tokens_and_never_shrinks(rule):
    p = torch.arange(0, 20_000)
    end = rule.free_end_tensor(p)
    assert torch.equal(end, torch.tensor([rule.free_end(int(x)) for x in p]))
    assert bool((end[1:] >= end[:-1]).all())  # a freed block never comes back
    kept_tail = p - end * rule.block_size  # tokens resident in the live tail
    want = torch.minimum(p, torch.tensor([rule.keep(int(x)) for x in p]) - rule.sink_tokens)
    # once freeing, the tail keeps at least keep(p) - sinks of the latest tokens, less than one block more
    freeing = end > rule.sink_blocks
    assert bool((kept_tail[freeing] >= want[freeing]).all())
    assert bool((kept_tail[freeing] < want[freeing] + rule.block_size).all())


def test_rules_that_evict_nothing_or_break_the_sink_are_refused():
    with pytest.raises(ValueError, match="keeps every token"):
        EvictionRule(32, 4, 2.0, 1.0, 128)
    with pytest.raises(ValueError, match="min_keep"):
        EvictionRule(32, 4, 8.0, 0.5, 16)  # below sinks + one block
