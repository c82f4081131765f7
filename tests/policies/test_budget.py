"""The budget rule: clamp(ceil(k·n^α), min, max), its fixed-k baseline, and the attended count."""

import math

import pytest
import torch

from vllm_sparse.policies.budget import attended_tokens, fixed_budget, n_alpha_budget


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("k", [0.5, 1.0, 8.0])
def test_n_alpha_matches_formula_int_and_tensor(alpha, k):
    n = torch.randint(1, 200_000, (64,))
    got = n_alpha_budget(n, k, alpha, min_budget=16, max_budget=5000)
    for ni, gi in zip(n.tolist(), got.tolist()):
        want = min(5000, max(16, math.ceil(k * ni**alpha)))
        assert gi == want == n_alpha_budget(ni, k, alpha, 16, 5000)
    assert got.dtype == torch.int64


def test_n_alpha_is_monotone_and_sublinear():
    n = torch.arange(1, 50_000)
    b = n_alpha_budget(n, 8.0, 0.5)
    assert bool((b[1:] >= b[:-1]).all())
    assert n_alpha_budget(40_000, 8.0, 0.5) == 1600  # 8 * 200
    assert n_alpha_budget(10_000, 1.0, 1.0) == 10_000  # alpha = 1, k = 1 is dense


def test_exact_powers_do_not_round_up():
    # ceil must not turn 8*sqrt(4096)=512 into 513 through float error
    assert n_alpha_budget(4096, 8.0, 0.5) == 512
    assert n_alpha_budget(torch.tensor([4096]), 8.0, 0.5).item() == 512


def test_no_max_clamp_when_none():
    assert n_alpha_budget(10**8, 1.0, 1.0, 1, None) == 10**8


def test_fixed_budget():
    assert fixed_budget(123, 64) == 64
    assert fixed_budget(torch.tensor([5, 5000]), 64).tolist() == [64, 64]


def test_attended_counts_sinks_and_window_inside_the_budget():
    n = torch.tensor([10, 100, 1000])
    # budget 50 with 4 sinks + 16 window: 30 top-k slots; never more than n
    assert attended_tokens(n, 50, 4, 16).tolist() == [10, 50, 50]
    # a budget below sinks+window is raised to sinks+window
    assert attended_tokens(n, 5, 4, 16).tolist() == [10, 20, 20]
    assert attended_tokens(1000, 5, 4, 16) == 20
