"""Kernel tests run the Triton kernels natively on a GPU, else through the Triton interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any
test module imports the kernel modules.

On a plain checkout where the package is not installed (the lent GPU machine has no vLLM
and no network), ``vllm_sparse.kernels`` / ``vllm_sparse.policies`` are mapped onto the
``kernels/`` and ``policies/`` directories, as ``pyproject.toml``'s ``package-dir`` does.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _map_package_dirs() -> None:
    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from vllm_sparse.checkout import use_checkout_packages

    use_checkout_packages(root)


_map_package_dirs()
