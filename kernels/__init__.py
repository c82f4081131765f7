"""Paged sparse-attention ops: layout, pure-torch reference (CPU path and oracle), Triton kernels.

Installed as ``vllm_sparse.kernels``. Never imports vLLM: it runs on GPU machines where vLLM
is not installed. Importing it registers the built-in selectors (:mod:`.builtin_selectors`).
"""

from . import builtin_selectors  # noqa: F401  (registers the built-in selectors)
from .layout import PagedKVCache, summary_states
from .selectors import SelectParams

__all__ = ["PagedKVCache", "summary_states", "SelectParams"]
