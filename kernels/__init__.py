"""Paged sparse-attention ops: layout, pure-torch reference (CPU path and oracle), Triton kernels.

Installed as ``vllm_sparse.kernels``. Never imports vLLM: it runs on GPU machines where vLLM
is not installed.
"""

from .layout import PagedKVCache, summary_states

__all__ = ["PagedKVCache", "summary_states"]
