"""Offline batch on Ray Data (examples/ray_batch.py): a real local Ray instance, a real vLLM engine.

The example runs as a user would run it (a subprocess); its completions must equal greedy
``LLM.generate`` with the same model, dtype and sparse settings, text for text.

dtype float32 on purpose: Ray's engine receives the prompts one by one, so its steps batch and
chunk the prefills differently from one ``LLM.generate`` call. In bf16 that moves logits by a
rounding step: the longest prompt below (~1.2k tokens) has ``"\\n"`` and ``" cycle"`` 0.125 apart at
its 8th token inside the batch and exactly tied when generated alone, and Ray's run picks the
other one. In float32 the two runs agree.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from llm_utils import generate_once  # noqa: E402
from vllm_sparse.assets.data import essays_text  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "ray_batch.py"
# dense below 256 tokens: the essay prompts (~470-1200 tokens) decode sparsely (budget 8·√n ≈ 170-280)
SPARSE = {"dense_below": 256}
MAX_TOKENS = 8


def _records():
    text = essays_text()
    return [
        {"id": "capital", "prompt": "The capital of France is"},
        {"id": 2, "prompt": "def fibonacci(n):", "meta": {"tags": ["code"], "n": 1}},
        {"id": "essay-2k", "prompt": text[:2000]},
        {"id": "essay-3k", "prompt": text[5000:8000]},
        {"id": "story", "prompt": "Once upon a time"},
        {"id": "essay-5k", "prompt": text[20000:25000]},
    ]


def _run(args, timeout, **env_extra):
    # no VLLM_ENABLE_V1_MULTIPROCESSING=0 here: the engine runs as a normal AsyncLLM in its Ray actor
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "RAY_ADDRESS")}
    env.update(env_extra)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.vllm
@pytest.mark.slow
def test_ray_batch_matches_llm_generate(smollm2_dir, tmp_path):
    records = _records()
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "completions.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = _run(["--model", str(smollm2_dir), "--input", str(src), "--output", str(dst), "--max-tokens",
                str(MAX_TOKENS), "--sparse", json.dumps(SPARSE), "--dtype", "float32", "--batch-size", "4",
                "--kv-cache-space-gib", "1"],
               timeout=600, VLLM_SPARSE_LOG_INTERVAL="0")  # log the sparsity figures at every decode step
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]

    out = [json.loads(line) for line in dst.read_text().splitlines()]
    # input order, every input field carried unchanged, plus the completion and its token counts
    assert [{k: o[k] for k in r} for o, r in zip(out, records)] == records
    assert len(out) == len(records)
    assert all(o["completion_tokens"] == MAX_TOKENS for o in out)
    assert all(o["prompt_tokens"] > 0 for o in out)

    # the sparse path ran inside Ray's engine: decode steps attended less than their whole context
    fractions = [float(x) for x in re.findall(r"vllm-sparse: \d+ decode steps .*? attended ([\d.]+)% of context", log)]
    assert fractions, log[-4000:]
    assert min(fractions) < 100.0

    ref = generate_once(smollm2_dir, [r["prompt"] for r in records], sparse=SPARSE, max_tokens=MAX_TOKENS,
                        dtype="float32")
    assert [o["completion"] for o in out] == [r.text for r in ref]
    assert [o["completion_tokens"] for o in out] == [len(r.token_ids) for r in ref]
    assert max(o["prompt_tokens"] for o in out) > 1000  # the long prompts really are long


def test_bad_sparse_setting_stops_before_ray_starts(tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"prompt": "hello"}) + "\n")
    run = _run(["--model", "unused", "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                "--sparse", json.dumps({"dense_below": 256, "alpah": 0.5})], timeout=120)
    assert run.returncode != 0
    assert "alpah" in run.stderr  # the message names the bad setting
    assert "Ray instance" not in run.stdout + run.stderr  # stopped before ray.init
    assert not (tmp_path / "out.jsonl").exists()

    run = _run(["--model", "unused", "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                "--sparse", json.dumps({"alpha": 0})], timeout=120)
    assert run.returncode != 0
    assert "alpha=0" in run.stderr


@pytest.mark.parametrize("settings", [
    {},
    {"dense_below": 256, "policy": "quest", "page_size": 16},
    {"policy": "topk", "policy_args": {"budget_tokens": 300}, "evict": "h2o", "evict_args": {"keep": 512}},
])
def test_settings_survive_ray_serialization(settings):
    """Ray ships engine_kwargs (a plain dict) to its actors with cloudpickle; each engine rebuilds the
    same SparseConfig from it. A SparseConfig captured in a Ray task round-trips whole, derived state too."""
    import torch
    from ray import cloudpickle

    from vllm_sparse.config import SparseConfig

    engine_kwargs = {"attention_backend": "CUSTOM", "additional_config": {"vllm_sparse": settings}}
    shipped = cloudpickle.loads(cloudpickle.dumps(engine_kwargs))
    assert shipped == engine_kwargs
    config = SparseConfig.from_dict(settings)
    assert SparseConfig.from_additional_config(shipped["additional_config"]) == config

    copy = cloudpickle.loads(cloudpickle.dumps(config))
    lengths = torch.tensor([100, 1000, 5000])
    assert copy == config and copy.policy_object == config.policy_object
    assert torch.equal(copy.attended(lengths), config.attended(lengths))
    assert copy.eviction_rule() == config.eviction_rule()
