"""Every built-in policy on a tiny hand-checked case: exactly which tokens it keeps.

Common setup: 12 tokens, one KV head, sink_tokens = 1 and local_window = 2 (so positions 0, 10
and 11 are always kept), a fixed budget of ``count`` tokens per head, scale 1.
"""

import pytest
import torch

from vllm_sparse.policies import FixedKPolicy, TokenState, available_policies, get_policy_class
from vllm_sparse.policies.h2o import H2O
from vllm_sparse.policies.policy import AdaKVAllocator

N = 12
FORCED = {0, 10, 11}


def make(name, count, **kw):
    cls = get_policy_class(name)
    return cls(budget=FixedKPolicy(budget_tokens=count), sink_tokens=1, local_window=2, **kw)


def kept(policy, state):
    k = policy.keep(state)
    return [set(torch.nonzero(row).flatten().tolist()) for row in k]


def keys_along_x(x, extra_dim=0.0):
    """[n, 1, 2] keys (x_t, extra) — with q = (1, 0), q·k_t = x_t."""
    x = torch.tensor(x, dtype=torch.float32)
    return torch.stack([x, torch.full_like(x, extra_dim)], -1)[:, None, :]


X = [0, 5, 1, 9, 2, 7, 3, 0, 8, 4, 6, 1]  # the best middle tokens: 3 (9), then 8 (8), then 5 (7)


def test_the_nine_builtins_are_registered():
    assert {"dense", "ntopk", "topk", "quest", "streaming", "snapkv", "h2o", "tova", "knorm"} <= set(
        available_policies())


def test_dense_keeps_everything():
    assert kept(make("dense", 5), TokenState(keys_along_x(X))) == [set(range(N))]


@pytest.mark.parametrize("name", ["ntopk", "topk"])
def test_top_k_by_the_current_query(name):
    state = TokenState(keys_along_x(X), query=torch.tensor([[1.0, 0.0]]), scale=1.0)
    assert kept(make(name, 5), state) == [FORCED | {3, 8}]
    assert kept(make(name, 6), state) == [FORCED | {3, 8, 5}]


def test_streaming_keeps_sinks_and_the_most_recent():
    assert kept(make("streaming", 5), TokenState(keys_along_x(X))) == [{0, 8, 9, 10, 11}]


def test_quest_keeps_whole_pages_by_the_min_max_bound():
    # 16 tokens in 4 pages of 4; sink page 0 and window page 3 forced; budget 9 → 3 pages;
    # page 2 holds one large key (bound 9), page 1 only small ones (bound 3)
    x = [0, 0, 0, 0, 1, 3, 2, 1, 0, 9, 0, 0, 0, 0, 0, 0]
    state = TokenState(keys_along_x(x), query=torch.tensor([[1.0, 0.0]]), page_size=4)
    assert kept(make("quest", 9), state) == [set(range(0, 4)) | set(range(8, 16))]
    # exactly the budget's pages: 5 tokens → 2 pages → just the forced ones
    assert kept(make("quest", 5), state) == [set(range(0, 4)) | set(range(12, 16))]


def test_snapkv_keeps_what_the_observation_window_attended():
    # the last two prompt queries (positions 10, 11: the window) look along x: token 4 draws
    # nearly all their attention, token 5 the rest; pooling (kernel 3) ties 4 and 5, earlier first
    x = [0, 0, 0, 0, 10, 3, 0, 0, 0, 0, 0, 0]
    wq = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    state = TokenState(keys_along_x(x), window_queries=wq, scale=1.0)
    assert kept(make("snapkv", 5, kernel=3), state) == [FORCED | {4, 5}]
    assert kept(make("snapkv", 4, kernel=3), state) == [FORCED | {4}]
    with pytest.raises(ValueError, match="kernel"):
        make("snapkv", 4, kernel=4)


def test_h2o_keeps_the_heavy_hitters_of_the_accumulated_attention():
    acc = torch.tensor([[5.0, 0.1, 0.2, 3.0, 0.1, 0.1, 2.5, 0.1, 0.0, 0.3, 1.0, 1.0]])
    state = TokenState(keys_along_x(X), stored=acc)
    assert kept(make("h2o", 5), state) == [FORCED | {3, 6}]
    # the state grows by each new query's attention, summed over the group
    q = torch.tensor([[1.0, 0.0]])
    step = TokenState(keys_along_x(X), query=q, scale=1.0).step(q[None])
    a1 = H2O().update_state(None, step)
    assert a1.shape == (1, 1, N) and torch.allclose(a1.sum(), torch.tensor(1.0)) and a1.argmax().item() == 3
    a2 = H2O().update_state(a1, step)
    assert torch.allclose(a2, 2 * a1)


def test_tova_averages_the_groups_attention_where_ntopk_takes_the_max():
    # two query heads share the KV head: q1 = (1, 0) likes token 3 alone; q2 = (0, 1) likes token 5,
    # which q1 likes moderately too. max over the group picks 3; the mean attention picks 5.
    keys = torch.zeros(N, 1, 2)
    keys[3] = torch.tensor([9.0, 0.0])
    keys[5] = torch.tensor([6.0, 6.0])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    state = TokenState(keys, query=q, scale=1.0)
    assert kept(make("ntopk", 4), state) == [FORCED | {3}]
    assert kept(make("tova", 4), state) == [FORCED | {5}]


def test_knorm_keeps_the_lowest_key_norms():
    norms = [3, 9, 1, 8, 7, 0.5, 6, 5, 4, 2, 9, 9]
    state = TokenState(keys_along_x(norms))
    assert kept(make("knorm", 5), state) == [FORCED | {5, 2}]


def test_scorers_say_what_they_need():
    with pytest.raises(ValueError, match=r"'h2o'.*stored"):
        make("h2o", 5).keep(TokenState(keys_along_x(X)))


def test_adakv_moves_budget_between_heads_and_keeps_the_total():
    # head 0's scores are concentrated on one token, head 1's spread evenly: head 1 gets more slots
    n, count = 12, 6
    s = torch.full((2, n), 1.0)
    s[0] = 0.001
    s[0, 4] = 10.0
    keys = torch.randn(n, 2, 4)
    pol = make("h2o", count, allocator=AdaKVAllocator(floor=0.0))
    forced = pol.forced(n, 2)
    counts = pol.allocator.counts(s, forced, count)
    assert int(counts.sum()) == 2 * count
    assert counts[1] > counts[0] >= 3  # every head keeps its forced tokens
    got = pol.keep(TokenState(keys, stored=s))
    assert got.sum(1).tolist() == counts.tolist()
    assert got[0, 4] and got[0, [0, 10, 11]].all()


def test_example_package_registers_through_its_entry_point(example_package):
    """pip-install examples/third_party_policy into a folder, put it on the path: the registry finds
    `keydiff` and `scissorhands` by their entry points; keydiff's scorer keeps the keys least like
    the average key and its decode selector, built from that score, is registered with it;
    scissorhands counts, per token, the queries that paid it at least a uniform share."""
    from vllm_sparse.policies import registry

    assert "keydiff" not in available_policies()
    registry.reload_entry_points()
    assert "keydiff" in available_policies()
    cls = get_policy_class("keydiff")
    keys = torch.ones(N, 1, 2)  # every key alike but two
    keys[4] = torch.tensor([1.0, -1.0])
    keys[7] = torch.tensor([-1.0, 0.5])
    assert kept(cls(budget=FixedKPolicy(budget_tokens=5), sink_tokens=1, local_window=2),
                TokenState(keys)) == [FORCED | {4, 7}]
    from vllm_sparse.config import SparseConfig, evicting_policies
    from vllm_sparse.kernels.selectors import available_selectors, get_selector

    # registering the policy registered the selector built from its score, which runs it inside vLLM
    assert "keydiff" in available_selectors()
    assert SparseConfig(policy="keydiff").selection == "keydiff"
    assert get_selector("keydiff").policy_class is cls

    sc = get_policy_class("scissorhands")
    assert sc.frees_blocks and sc.evicts_by_score and sc.keeps_token_state
    assert "scissorhands" in evicting_policies()
    # one decode query q = (1, 0) over the 12 keys along x: tokens 3, 8 and 5 (x = 9, 8, 7) draw
    # at least 1/12 of its attention each (e^7 / Σ e^x = 0.086), the others less
    q = torch.tensor([[1.0, 0.0]])
    step = TokenState(keys_along_x(X), scale=1.0).step(q[None])
    once = sc().update_state(torch.zeros(1, 1, N), step)
    assert torch.nonzero(once[0, 0]).flatten().tolist() == [3, 5, 8]
    twice = sc().update_state(once, step)
    assert torch.equal(twice, 2 * once)
    # the count ranks them; ties keep the earlier token
    assert kept(make("scissorhands", 5), TokenState(keys_along_x(X), stored=twice[0])) == [FORCED | {3, 5}]
