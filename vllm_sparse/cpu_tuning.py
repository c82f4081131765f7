"""CPU-path allocator tuning (glibc only), applied when the sparse backend runs on the CPU platform.

The torch CPU path allocates temporaries of a few MB to ~30 MB per layer and step. With
glibc's defaults, blocks that large come from fresh ``mmap`` calls and are returned on free,
so every step pays page faults on all of them: measured here, a 17 MB ``index_select`` took
7.2 ms with a fresh output and 1.7 ms into reused memory. Raising glibc's mmap threshold to
its maximum (32 MiB) and its trim threshold keeps those blocks in the heap for reuse — the
same effect vLLM's CPU docs get by preloading tcmalloc. ``VLLM_SPARSE_MALLOC_TUNING=0`` turns
it off.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger("vllm.sparse")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc() -> bool:
    """Apply the tuning once per process; returns whether it is in effect."""
    global _done
    if _done:
        return True
    if os.environ.get("VLLM_SPARSE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc
        return False
    _done = bool(ok)
    if _done:
        logger.info("vllm-sparse: glibc mmap threshold raised to 32 MiB for the CPU attention path")
    return _done
