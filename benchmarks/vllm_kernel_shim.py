"""vLLM's Triton decode kernel without vLLM: for timing it on the lent GPU machine.

``benchmarks/kernels.py`` compares the plugin's split-K kernel with vLLM's Triton
``unified_attention`` (dense, and over the compacted per-head block tables the backend builds).
vLLM cannot be installed on the lent GPU machine (no network, and the CUDA wheel is far over
what a call may carry), but the kernel is two plain Triton source files. This copies them from
the vLLM installed here into ``OUT/vllm/...`` and adds stand-ins for the five names they import
from the rest of vLLM (``envs.VLLM_BATCH_INVARIANT``, ``init_logger``,
``current_platform.fp8_dtype`` / ``is_device_capability_family``, ``triton_utils``,
``KVQuantMode``), so ``from vllm.v1.attention.ops.triton_unified_attention import
unified_attention`` works with ``PYTHONPATH=OUT``. The kernel code itself is vLLM's, unchanged.

    python benchmarks/vllm_kernel_shim.py .gpu/vllm_shim           # here, where vLLM is installed
    PYTHONPATH=.gpu/vllm_shim bash benchmarks/gpu_check.sh         # there (carry .gpu)
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import shutil
import sys
from pathlib import Path

KERNEL_FILES = ("v1/attention/ops/triton_unified_attention.py", "v1/attention/ops/triton_attention_helpers.py")

STUBS = {
    "__init__.py": '__version__ = "{version}"\nSHIM = "kernel source only (benchmarks/vllm_kernel_shim.py)"\n',
    "envs.py": "VLLM_BATCH_INVARIANT = False  # vLLM's default\n",
    "logger.py": "import logging\n\n\ndef init_logger(name):\n    return logging.getLogger(name)\n",
    "triton_utils/__init__.py": "import triton\nimport triton.language as tl\n",
    "platforms/__init__.py": '''import torch


class _CudaPlatform:
    """What the kernel asks of vLLM's CUDA platform."""

    @staticmethod
    def fp8_dtype():
        return torch.float8_e4m3fn

    @staticmethod
    def is_device_capability_family(family: int) -> bool:
        major, minor = torch.cuda.get_device_capability()
        return (major * 10 + minor) // 10 == family // 10


current_platform = _CudaPlatform()
''',
    "v1/__init__.py": "",
    "v1/attention/__init__.py": "",
    "v1/attention/ops/__init__.py": "",
    "v1/kv_cache_interface.py": "{kv_quant_mode}",
}


def build(out: Path) -> Path:
    """Write the shim package under ``out`` (replacing an earlier one); returns ``out``."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("vllm_kernel_shim: vLLM is not installed here; run it in the project's venv (make venv)")
    src = Path(next(iter(spec.submodule_search_locations)))
    from vllm import __version__
    from vllm.v1.kv_cache_interface import KVQuantMode

    enum_src = "from enum import IntEnum\n\n\n" + inspect.getsource(KVQuantMode)
    pkg = out / "vllm"
    if pkg.exists():
        shutil.rmtree(pkg)
    for rel, text in STUBS.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel in ("__init__.py", "v1/kv_cache_interface.py"):
            text = text.format(version=__version__, kv_quant_mode=enum_src)
        path.write_text(text)
    for rel in KERNEL_FILES:
        shutil.copyfile(src / rel, pkg / rel)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=".gpu/vllm_shim", help="directory to put on PYTHONPATH")
    out = build(Path(p.parse_args(argv).out))
    print(f"vLLM's unified_attention kernel source under {out}/vllm (PYTHONPATH={out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
