"""Tensor parallelism on the CPU build: TP=2 with the sparse backend gives TP=1's greedy tokens.

vLLM's Ray executor refuses the CPU platform, so TP=2 runs on the ``mp`` executor: two worker
processes (gloo + vLLM's shared-memory all-reduce), one core each through
``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (its default "auto" binds one rank per NUMA node, and these
machines have one). The engine itself may stay in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
the executor spawns the workers either way. It runs in a subprocess so that neither that
environment nor the spawned workers touch the test process.

tiny-llama has 6 query / 2 KV heads, so each rank holds 3 query heads and 1 KV head (SmolLM2's 3
KV heads cannot be split two ways). The settings force the sparse path with a budget of ~10% of
the context, so the page selection runs per rank on that rank's KV head and really drops tokens.
float32 on both sides: TP=2 sums the row-parallel projections in another order.
"""

import json
import os
import subprocess
import sys

import pytest

from llm_utils import generate_once
from vllm_sparse.assets.data import essays_text

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# sparse decode at every length (force_sparse), budget max(68, ceil(√n)): far below the context
SPARSE = {"dense_below": 0, "min_budget": 68, "k": 1.0, "alpha": 0.5, "force_sparse": True}
# the same plus eviction by key norm keeping 256 tokens: the scheduler frees blocks (one decision
# for all ranks, from positions only) and each rank merges its own KV head's best tokens into the
# kept region (per head, so a rank's choice is TP=1's choice for that head)
EVICTING = {**SPARSE, "evict": "knorm", "evict_args": {"keep": 256}}
MAX_TOKENS = 16
# prefill chunk, the same on both sides: vLLM's CPU default differs by TP (4096 at TP=1, 8192 at
# TP=2), and with eviction the chunking decides what later chunks see
CHUNK = 1024

# Run by a fresh interpreter: greedy tokens at TP=2 plus what each rank's attention layers hold.
_TP_SCRIPT = r'''
import json, sys

from vllm import LLM, SamplingParams


def rank_state(worker):
    """On each worker: its attention layers' impl class and head counts, and its sparsity totals."""
    from vllm.model_executor.layers.attention import Attention
    from vllm_sparse import stats

    layers = [(type(m.impl).__name__, m.impl.num_heads, m.impl.num_kv_heads)
              for m in worker.model_runner.model.modules() if isinstance(m, Attention)]
    return {"layers": layers, "stats": stats.snapshot()}


def main():
    cfg = json.load(open(sys.argv[1]))
    llm = LLM(model=cfg["model"], tensor_parallel_size=2, distributed_executor_backend="mp", dtype="float32",
              enforce_eager=True, max_model_len=8192, seed=0, attention_backend="CUSTOM",
              additional_config={"vllm_sparse": cfg["sparse"]}, enable_prefix_caching=False,
              max_num_batched_tokens=cfg["chunk"])
    outs = llm.generate(cfg["prompts"], SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0),
                        use_tqdm=False)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "ranks": llm.collective_rpc(rank_state)}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # the mp executor spawns its workers: they must not re-run this
    main()
'''


def _prompts():
    text = essays_text()
    # ~80, ~350, ~900 and ~2700 tokens
    return ["hello world " * 40, text[:1500], text[3000:7000], text[10000:22000]]


def test_tp2_matches_tp1_on_the_sparse_path_with_eviction(tiny_llama_dir, tmp_path):
    """One TP=2 run with sparse selection and knorm eviction both on; TP=1 runs show that each
    of the two changes the tokens (so the match checks both, per rank)."""
    sparse = EVICTING
    prompts = _prompts()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dict(model=str(tiny_llama_dir), sparse=sparse, prompts=prompts, max_tokens=MAX_TOKENS,
                                   chunk=CHUNK)))
    script, result = tmp_path / "tp2.py", tmp_path / "tp2.json"
    script.write_text(_TP_SCRIPT)
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE="1")
    run = subprocess.run([sys.executable, str(script), str(cfg), str(result)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    tp2 = json.loads(result.read_text())

    # each rank built the sparse backend on its own share of the heads: 3 query heads, 1 KV head
    assert len(tp2["ranks"]) == 2
    for rank in tp2["ranks"]:
        assert rank["layers"] == [["SparseAttentionImpl", 3, 1]] * 2
        # every rank planned each decode step of every request (all but the first token of each)
        # and attended well under the context
        assert rank["stats"]["requests"] == sum(len(t) - 1 for t in tp2["tokens"])
        assert 0 < rank["stats"]["attended_fraction"] < 0.25

    tp1 = [list(o.token_ids) for o in generate_once(tiny_llama_dir, prompts, sparse=sparse, max_tokens=MAX_TOKENS,
                                                      dtype="float32", enable_prefix_caching=False,
                                                      max_num_batched_tokens=CHUNK)]
    assert tp2["tokens"] == tp1
    # eviction changed what was attended (the same selection without it answers otherwise) ...
    selecting = [list(o.token_ids) for o in generate_once(tiny_llama_dir, prompts, sparse=SPARSE, max_tokens=MAX_TOKENS,
                                                          dtype="float32", max_num_batched_tokens=CHUNK)]
    assert selecting != tp1
    # ... and the selection matters on these prompts (dense attention answers otherwise), so the
    # match checks each rank's page selection, not attention that happens to cover what matters
    dense = [list(o.token_ids) for o in generate_once(tiny_llama_dir, prompts, backend="stock", max_tokens=MAX_TOKENS,
                                                       dtype="float32", max_num_batched_tokens=CHUNK)]
    assert dense != selecting
