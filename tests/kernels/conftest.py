"""Kernel tests run the Triton kernels natively on a GPU, else through the Triton interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any
test module imports the kernel modules.

On a plain checkout where the package is not installed (the lent GPU machine has no vLLM
and no network), ``vllm_sparse.kernels`` / ``vllm_sparse.policies`` are mapped onto the
``kernels/`` and ``policies/`` directories, as ``pyproject.toml``'s ``package-dir`` does.
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _map_package_dirs() -> None:
    try:
        import vllm_sparse.kernels  # noqa: F401
        import vllm_sparse.policies  # noqa: F401
        return
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    import vllm_sparse

    for sub in ("kernels", "policies"):
        name = f"vllm_sparse.{sub}"
        spec = importlib.util.spec_from_file_location(name, root / sub / "__init__.py",
                                                      submodule_search_locations=[str(root / sub)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(vllm_sparse, sub, mod)


_map_package_dirs()
