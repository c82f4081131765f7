"""A policy with ``pages_by_score`` is served by a selector built from its own score, registered
with it; the registry refuses policy classes that promise what they do not implement."""

import dataclasses
from typing import ClassVar

import pytest
import torch

from vllm_sparse.kernels import selectors
from vllm_sparse.kernels.layout import PagedKVCache
from vllm_sparse.kernels.selectors import SelectInputs, available_selectors, get_selector
from vllm_sparse.policies import Policy, TokenState, get_policy_class, register_policy, registry
from vllm_sparse.policies.score_pages import ScorePages, score_pages_selector


@dataclasses.dataclass(frozen=True)
class GroupMax(Policy):
    """The exact ``q·k``, maxed over the query group (what ``ntopk`` scores)."""

    name: ClassVar[str] = "group_max_pages_for_test"
    pages_by_score: ClassVar[bool] = True
    needs: ClassVar[tuple[str, ...]] = ("query",)

    def score(self, state: TokenState) -> torch.Tensor:
        return state.logits(state.query[None])[:, :, 0].amax(1)  # [H, n]


class Inputs:
    """The :class:`SelectInputs` a :class:`ScorePages` reads; ``best_pages`` hands back the page scores."""

    all_pages = SelectInputs.all_pages

    def __init__(self, query, cache, block_table, seq_lens, heads, scale):
        self.query, self.cache, self.block_table, self.seq_lens, self.heads, self.scale = (
            query, cache, block_table, seq_lens, heads, scale)

    def best_pages(self, pages, scores):
        self.page_scores = scores
        return pages


@pytest.mark.parametrize("per_query_head", [False, True])
def test_each_page_scores_its_best_tokens_policy_score(per_query_head):
    """Two requests (100 and 40 tokens, 16-token pages, shuffled blocks), 2 KV heads × 3 query heads:
    each page's score is the best ``GroupMax.score`` of its tokens, per KV head (the group's max)
    or per query head; pages past a request's length score ``-inf``."""
    torch.manual_seed(0)
    bs, hkv, g, d, lens, scale = 16, 2, 3, 8, [100, 40], 0.3
    cache = PagedKVCache.from_raw(torch.zeros(20, hkv, bs + 1, 2 * d), hkv, bs)
    perm = torch.randperm(20).int()
    table = torch.stack([perm[:7], perm[7:14]])  # request 1 uses 3 of its 7 blocks
    keys = [torch.randn(n, hkv, d) for n in lens]
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        cache.key_cache[table[b, pos // bs].long(), pos % bs] = keys[b]
    query = torch.randn(2, hkv * g, d)
    heads = torch.arange(hkv * g) // g if per_query_head else torch.arange(hkv)
    x = Inputs(query, cache, table, torch.tensor(lens), heads, scale)
    pages = score_pages_selector(GroupMax)().pages(x)
    assert pages.shape == (2, len(heads), 7)
    for b, n in enumerate(lens):
        for s, h in enumerate(heads.tolist()):
            group = query[b, s:s + 1] if per_query_head else query[b, s * g:(s + 1) * g]
            tokens = (group @ keys[b][:, h].T * scale).amax(0)  # [n]
            for p in range(7):
                got = x.page_scores[b, s, p]
                if p * bs >= n:
                    assert got == float("-inf")
                else:
                    assert torch.allclose(got, tokens[p * bs:(p + 1) * bs].max(), rtol=1e-5, atol=1e-6)


@pytest.fixture
def forget():
    """Names registered by a test (policy and selector) are removed afterwards."""
    names = []
    yield names.append
    for name in names:
        registry._REGISTRY.unregister(name)
        selectors._REGISTRY.unregister(name)


def test_registering_the_policy_registers_its_selector(forget):
    forget(GroupMax.name)
    assert GroupMax.selection == GroupMax.name  # pages_by_score: the policy's own selector
    assert GroupMax.name not in available_selectors()
    register_policy(GroupMax)
    sel = get_selector(GroupMax.name)
    assert isinstance(sel, ScorePages) and sel.whole_pages and sel.policy == GroupMax()
    assert get_policy_class(GroupMax.name) is GroupMax
    register_policy(GroupMax)  # again (entry points read twice): its own selector is replaced, no error


def test_the_registry_refuses_what_a_policy_cannot_do(forget):
    @dataclasses.dataclass(frozen=True)
    class TakesASelectorsName(GroupMax):
        name: ClassVar[str] = "takes_a_selectors_name_for_test"
        selection: ClassVar[str | None] = "exact_pages"

    @dataclasses.dataclass(frozen=True)
    class NeedsWindow(GroupMax):
        name: ClassVar[str] = "needs_window_for_test"
        needs: ClassVar[tuple[str, ...]] = ("window_queries",)

    @dataclasses.dataclass(frozen=True)
    class StatelessState(Policy):
        name: ClassVar[str] = "stateless_state_for_test"
        keeps_token_state: ClassVar[bool] = True

    @dataclasses.dataclass(frozen=True)
    class Alias(Policy):
        name: ClassVar[str] = "n_alpha"

    for cls in (TakesASelectorsName, NeedsWindow, StatelessState):
        forget(cls.name)
    with pytest.raises(TypeError, match="'takes_a_selectors_name_for_test'.*'exact_pages' is registered"):
        register_policy(TakesASelectorsName)
    assert type(get_selector("exact_pages")).__name__ == "ExactPages"  # the built-in is untouched
    with pytest.raises(TypeError, match="'needs_window_for_test'.*window_queries"):
        register_policy(NeedsWindow)
    with pytest.raises(TypeError, match="'stateless_state_for_test'.*update_state"):
        register_policy(StatelessState)
    with pytest.raises(ValueError, match="'n_alpha' is reserved"):
        register_policy(Alias)
    with pytest.raises(TypeError, match="Policy subclass"):
        register_policy(int)
    with pytest.raises(ValueError, match=r"vllm_sparse policy='nope'; allowed: \[.*'ntopk'"):
        get_policy_class("nope")
    assert get_policy_class("fixed_k") is get_policy_class("topk")
