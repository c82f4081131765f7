"""KV selection policies and the budget rule. Installed as ``vllm_sparse.policies``; never imports vLLM."""

from .budget import attended_tokens, fixed_budget, n_alpha_budget

__all__ = ["attended_tokens", "fixed_budget", "n_alpha_budget"]
