"""Import ``vllm_sparse.kernels`` / ``.policies`` from an uninstalled checkout.

Installed, ``package-dir`` in pyproject.toml maps the top-level ``kernels/`` and ``policies/``
into the package. On the GPU machine the repository arrives as a plain checkout (vLLM cannot
be installed there), so the kernel tests and benchmarks map the two directories themselves.
Importing this module imports neither vLLM nor torch.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def use_checkout_packages(root: Path) -> None:
    """Make ``vllm_sparse.kernels`` and ``vllm_sparse.policies`` importable from ``root`` if they are not."""
    try:
        import vllm_sparse.kernels  # noqa: F401
        import vllm_sparse.policies  # noqa: F401
        return
    except ImportError:
        pass
    import vllm_sparse

    for sub in ("kernels", "policies"):
        name = f"vllm_sparse.{sub}"
        spec = importlib.util.spec_from_file_location(name, root / sub / "__init__.py",
                                                      submodule_search_locations=[str(root / sub)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(vllm_sparse, sub, mod)
