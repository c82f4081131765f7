"""CPU memory tuning: the KV cache on 2 MiB huge pages, checked in the kernel's own accounting."""

import platform

import pytest
import torch

from llm_utils import generate_once, greedy, make_llm
from vllm_sparse import cpu_tuning

# MADV_COLLAPSE came with Linux 6.1; this project's machines run newer kernels
_KERNEL = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
needs_collapse = pytest.mark.skipif(platform.system() != "Linux" or _KERNEL < (6, 1),
                                    reason="MADV_COLLAPSE needs Linux >= 6.1")


@pytest.fixture(autouse=True)
def huge_pages_on(monkeypatch):
    """conftest.py turns the plugin's huge pages off for the rest of the suite (start-up time)."""
    monkeypatch.setenv("VLLM_SPARSE_HUGE_PAGES", "1")


def huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= address < hi
            elif found and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def first_huge_page(t: torch.Tensor) -> int:
    """Address of the first 2 MiB boundary inside ``t``'s storage (where huge pages can start)."""
    return cpu_tuning.huge_page_range(t)[0]


@needs_collapse
def test_huge_pages_backs_the_tensor_and_keeps_its_data():
    t = torch.randn((12 << 20) // 4)  # 12 MiB, touched: on 4 KiB pages under THP=madvise
    want = t.clone()
    done = cpu_tuning.huge_pages(t)
    lo = first_huge_page(t)
    assert done >= 8 << 20 and done % cpu_tuning.HUGE_PAGE == 0  # the 2 MiB-aligned interior
    assert huge_bytes_at(lo) >= done
    assert torch.equal(t, want)
    assert cpu_tuning.huge_pages(t[100:]) == done  # a view: the same storage, already huge


_FRESH_PROCESS_CHECK = """
import torch
from vllm_sparse import cpu_tuning
from test_cpu_tuning import first_huge_page, huge_bytes_at
real = torch.zeros
with cpu_tuning.huge_page_allocations():
    t = torch.zeros((40 << 20) // 4)
    small = torch.zeros(10)
assert torch.zeros is real
assert not t.any() and not small.any() and t.dtype == small.dtype == torch.float32
print(huge_bytes_at(first_huge_page(t)))
"""


@needs_collapse
def test_allocations_inside_the_context_fault_in_as_huge_pages():
    """Advised before zeroing, a fresh allocation faults in on 2 MiB pages (no collapse needed).

    In a fresh process, as vLLM's worker allocates its KV cache: in a long-lived one glibc may
    serve even 40 MiB from heap memory already faulted in on 4 KiB pages (free chunks in its bins
    come before a new mapping; seen late in a full test run), which only a collapse
    (:func:`huge_pages`, which the worker runs next) moves."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "VLLM_SPARSE_HUGE_PAGES": "1", "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CHECK], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 8 << 20


def test_huge_pages_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("VLLM_SPARSE_HUGE_PAGES", "0")
    assert cpu_tuning.huge_pages(torch.randn((6 << 20) // 4)) == 0


def test_huge_pages_skips_storage_smaller_than_a_huge_page():
    assert cpu_tuning.huge_pages(torch.randn(1000)) == 0


@pytest.mark.vllm
@needs_collapse
def test_sparse_backend_puts_vllms_kv_cache_on_huge_pages_at_start_up(tiny_llama_dir, monkeypatch):
    """In real vLLM: the plugin's CPU worker moves the KV cache onto huge pages before the first
    request (checked in /proc/self/smaps), and the tokens are those of a 4 KiB-page cache."""
    calls = []
    real = cpu_tuning.huge_pages
    import vllm_sparse.backend as backend
    import vllm_sparse.cpu_worker as cpu_worker

    def recording(t):
        calls.append((t, real(t)))
        return calls[-1][1]

    monkeypatch.setattr(cpu_worker, "huge_pages", recording)
    monkeypatch.setattr(backend, "huge_pages", recording)
    prompts = ["hello world " * 300]
    settings = {"dense_below": 0, "min_budget": 68, "k": 1.0}

    def on_huge_pages_before_any_request():
        assert calls and all(done > 0 for _, done in calls)
        for t, _ in calls:
            assert huge_bytes_at(first_huge_page(t)) > 0
        return True

    with make_llm(tiny_llama_dir, sparse=settings) as llm:
        assert on_huge_pages_before_any_request()  # the engine is built, nothing generated yet
        huge = [o.token_ids for o in greedy(llm, prompts)]
        del llm
    monkeypatch.setenv("VLLM_SPARSE_HUGE_PAGES", "0")
    plain = generate_once(tiny_llama_dir, prompts, sparse=settings)
    assert huge == [o.token_ids for o in plain]


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/cpuinfo")
def test_model_dtype_follows_the_cpus_bf16_arithmetic():
    """bf16 where the CPU has AVX512-BF16 or AMX (torch's view checked against the kernel's flags),
    float32 on an AVX2-only CPU; ``make serve`` passes the same dtype."""
    import subprocess
    from pathlib import Path

    native = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    assert cpu_tuning.native_bf16() == native
    want = "bfloat16" if native or torch.cuda.is_available() else "float32"
    assert cpu_tuning.model_dtype() == want
    root = Path(__file__).resolve().parents[2]
    make = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(root), "--eval",
                           "print-dtype:\n\t@echo $(DTYPE)", "print-dtype"], capture_output=True, text=True, check=True)
    assert make.stdout.strip() == want


@pytest.mark.vllm
def test_bf16_model_on_a_cpu_without_bf16_arithmetic_warns_at_start_up(tiny_llama_dir, monkeypatch):
    """The plugin's CPU worker tells the user, before the first request, to run in float32 where
    the CPU lacks bf16 arithmetic (simulated here on any CPU), and stays quiet in float32."""
    import logging

    import vllm_sparse.cpu_worker as cpu_worker

    monkeypatch.setenv("VLLM_SPARSE_HUGE_PAGES", "0")
    monkeypatch.setattr(cpu_worker, "native_bf16", lambda: False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.sparse")
    logger.addHandler(handler)
    warned = {}
    try:
        for dtype in ("bfloat16", "float32"):
            records.clear()
            with make_llm(tiny_llama_dir, sparse={}, dtype=dtype, max_model_len=512, load_format="dummy"):
                warned[dtype] = [r.getMessage() for r in records
                                 if r.levelno == logging.WARNING and "--dtype float32" in r.getMessage()]
    finally:
        logger.removeHandler(handler)
    assert len(warned["bfloat16"]) == 1 and "bfloat16 matmuls ~100x slower" in warned["bfloat16"][0]
    assert warned["float32"] == []
