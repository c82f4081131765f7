"""Helpers for tests that run real vLLM (not a test module)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from vllm_sparse.cpu_tuning import model_dtype

# SmolLM2 is a bf16 model; a CPU without bf16 arithmetic (AVX2 only) runs bf16 ~100x slower than
# float32 (vllm_sparse.cpu_tuning), so the tests run it in float32 there.
DTYPE = model_dtype()


@contextlib.contextmanager
def make_llm(model, backend="CUSTOM", sparse=None, **kwargs):
    """An in-process ``vllm.LLM`` (dtype ``DTYPE`` unless given); ``backend="stock"`` leaves vLLM's default backend."""
    from vllm import LLM

    kw = dict(model=str(model), enforce_eager=True, max_model_len=8192, dtype=DTYPE, seed=0)
    if backend != "stock":
        kw["attention_backend"] = backend
    if sparse is not None:
        kw["additional_config"] = {"vllm_sparse": sparse}
    kw.update(kwargs)
    llm = LLM(**kw)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def generate_once(model, prompts, backend="CUSTOM", sparse=None, max_tokens=16, with_llm=None, logprobs=None,
                  **kwargs):
    """Build an LLM, greedy-generate, tear it down before returning (no handle outlives the call).

    ``with_llm(llm)``, if given, runs after generation and its result is returned as well.
    """
    with make_llm(model, backend=backend, sparse=sparse, **kwargs) as llm:
        outs = greedy(llm, prompts, max_tokens, logprobs)
        extra = with_llm(llm) if with_llm else None
        del llm
    gc.collect()
    return (outs, extra) if with_llm else outs


def greedy(llm, prompts, max_tokens=16, logprobs=None):
    """Greedy outputs (``logprobs``: that many top log-probabilities per generated token)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def preemptions(llm) -> int:
    """Total preemptions the engine counted (from vLLM's own stats; needs ``disable_log_stats=False``)."""
    return int(sum(getattr(m, "value", 0) for m in llm.get_metrics() if "preempt" in m.name))


def essay_ids(model, n, start=0) -> list[int]:
    """``n`` token ids of the bundled essays from token ``start`` on, with ``model``'s tokenizer."""
    from transformers import AutoTokenizer

    from vllm_sparse.assets import data

    ids = AutoTokenizer.from_pretrained(str(model)).encode(data.essays_text(), add_special_tokens=False)
    return ids[start:start + n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model, *args, timeout=240, log_path=None):
    """``vllm-sparse serve MODEL ARGS`` (``--dtype DTYPE`` unless given) on 127.0.0.1; yields
    ``(base_url, process)``; SIGTERM on exit."""
    port = free_port()
    if "--dtype" not in args:
        args = (*args, "--dtype", DTYPE)
    exe = Path(sys.executable).with_name("vllm-sparse")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen([str(exe), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError(f"server not ready in {timeout} s")
        yield base, proc
    finally:
        proc.needed_kill = False  # clean shutdown: SIGTERM alone stops the server within 30 s
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.needed_kill = True
                proc.kill()
                proc.wait()
        log.close()


def sparse_json(**settings) -> str:
    return json.dumps({"vllm_sparse": settings})
