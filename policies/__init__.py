"""KV selection/eviction policies, budgets and the eviction rule. Installed as
``vllm_sparse.policies``; never imports vLLM.

* :mod:`.policy` — the interface (:class:`Policy`: scorer + budget + allocator + schedule, and the
  per-token eviction state it keeps: :meth:`Policy.update_state`);
* :mod:`.state` — what a policy reads (:class:`TokenState`: one request; :class:`AttentionStep`:
  one step's queries over several requests' resident keys);
* one file per built-in policy: ``dense``, ``ntopk`` (default), ``topk``, ``quest``,
  ``streaming``, ``snapkv``, ``h2o``, ``tova``, ``knorm``;
* :mod:`.registry` — names → classes, open to third-party packages (entry points);
* :mod:`.score_pages` — the decode selector built from a policy's score (``pages_by_score``);
* :mod:`.base`, :mod:`.budget` — the budget rules (k·n^α, fixed);
* :mod:`.eviction` — which KV blocks a request frees as it runs.
"""

from .base import BudgetPolicy, DensePolicy, FixedKPolicy, NAlphaPolicy
from .budget import attended_tokens, fixed_budget, n_alpha_budget
from .eviction import EvictionRule
from .policy import AdaKVAllocator, Policy
from .state import AttentionStep, TokenState
from .registry import available_policies, get_policy_class, register_policy, reload_entry_points

__all__ = [
    "AdaKVAllocator",
    "AttentionStep",
    "BudgetPolicy",
    "DensePolicy",
    "EvictionRule",
    "FixedKPolicy",
    "NAlphaPolicy",
    "Policy",
    "TokenState",
    "attended_tokens",
    "available_policies",
    "fixed_budget",
    "get_policy_class",
    "n_alpha_budget",
    "register_policy",
    "reload_entry_points",
]
