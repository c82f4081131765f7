"""KV selection policies and the budget rule. Installed as ``vllm_sparse.policies``; never imports vLLM."""

from .base import (
    BudgetPolicy,
    DensePolicy,
    FixedKPolicy,
    NAlphaPolicy,
    available_policies,
    get_policy_class,
    register_policy,
)
from .budget import attended_tokens, fixed_budget, n_alpha_budget

__all__ = [
    "BudgetPolicy",
    "DensePolicy",
    "FixedKPolicy",
    "NAlphaPolicy",
    "attended_tokens",
    "available_policies",
    "fixed_budget",
    "get_policy_class",
    "n_alpha_budget",
    "register_policy",
]
