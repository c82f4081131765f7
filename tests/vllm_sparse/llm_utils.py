"""Helpers for tests that run real vLLM (not a test module)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

from vllm_sparse.cpu_tuning import model_dtype

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_scripts import load_script  # noqa: E402

#: benchmarks/serve_load.py: the server under load and faults (its small sizes run in test_server.py)
serve_load = load_script("serve_load")
free_port = serve_load.free_port

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


@contextlib.contextmanager
def serve(model, *args, timeout=240, log_path=None):
    """``vllm-sparse serve MODEL ARGS`` (``--dtype DTYPE`` unless given; 2 GiB of KV cache unless
    ``VLLM_CPU_KVCACHE_SPACE`` says) on 127.0.0.1, by ``benchmarks/serve_load.py``'s ``serve``; yields
    ``(base_url, process)``; SIGTERM on exit unless the test stopped it."""
    if "--dtype" not in args:
        args = (*args, "--dtype", DTYPE)
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "server.log"
        with serve_load.serve(str(model), list(args), Path(log_path), timeout=timeout, env=env) as (base, proc):
            yield base, proc


def sparse_json(**settings) -> str:
    return json.dumps({"vllm_sparse": settings})
