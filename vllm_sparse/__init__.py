"""vllm-sparse: adaptive k·n^α sparse attention for vLLM, as a plugin.

Importing this package never imports vLLM; the vLLM glue (backend, plugin registration,
CLI) is imported lazily by vLLM's plugin loader or the ``vllm-sparse`` command.
"""

__version__ = "0.1.0"
