"""Real SmolLM2-135M-Instruct through real vLLM (CPU build) with the sparse backend."""

import pytest

from llm_utils import greedy, make_llm
from vllm_sparse import data

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LENGTHS = (100, 300, 600, 1000, 1500, 2200, 3000, 4000)


@pytest.fixture(scope="module")
def essay_prompts(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = tok.encode(data.essays_text(), add_special_tokens=False)
    # 8 prompts cut from different places of the essays, 100..4000 tokens
    return [tok.decode(ids[i * 5000 : i * 5000 + n]) for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def stock_tokens(smollm2_dir, essay_prompts):
    with make_llm(smollm2_dir, backend="stock") as llm:
        return [o.token_ids for o in greedy(llm, essay_prompts)]


def test_budget_covering_context_is_token_identical_to_stock(smollm2_dir, essay_prompts, stock_tokens):
    # alpha = 1, k = 1: budget(n) = n, every decode step attends all of its context
    with make_llm(smollm2_dir, sparse={"alpha": 1.0, "k": 1.0, "dense_below": 0}) as llm:
        ours = [o.token_ids for o in greedy(llm, essay_prompts)]
    assert ours == stock_tokens


def test_needles_at_the_default_budget(smollm2_dir, record_property):
    from transformers import AutoTokenizer

    cases = data.needle_prompts(AutoTokenizer.from_pretrained(str(smollm2_dir)))
    assert len(cases) == 12 and max(c.context_tokens for c in cases) > 6500
    scores = {}
    for name, settings in {"n_alpha (default)": {}, "sinks+window, same budget": {"selection": "recent"}}.items():
        with make_llm(smollm2_dir, sparse=settings) as llm:
            outs = greedy(llm, [c.prompt for c in cases], max_tokens=16)
        scores[name] = data.score(cases, [o.text for o in outs])[0]
    record_property("needle_scores", scores)
    print(f"needle retrieval out of 12: {scores}")
    assert scores["n_alpha (default)"] >= 11


def test_preemption_and_chunked_prefill_give_the_same_greedy_outputs(smollm2_dir, essay_prompts):
    """A KV cache too small for the batch forces preemption (recompute); long prompts prefill in chunks."""
    prompts = essay_prompts[:6] * 2  # 12 requests, up to 2.2k tokens each
    settings = {"alpha": 1.0, "k": 1.0, "dense_below": 0}
    common = dict(dtype="float32", max_num_batched_tokens=512, enable_chunked_prefill=True)
    with make_llm(smollm2_dir, sparse=settings, **common) as llm:
        free = [o.token_ids for o in greedy(llm, prompts, max_tokens=24)]
    # 2.5k tokens of cache in 16-token blocks: at most a couple of requests fit at once
    with make_llm(smollm2_dir, sparse=settings, num_gpu_blocks_override=160, block_size=16,
                  disable_log_stats=False, **common) as llm:
        tight = [o.token_ids for o in greedy(llm, prompts, max_tokens=24)]
        preempted = _preemptions(llm)
    assert preempted > 0
    assert tight == free


def _preemptions(llm) -> int:
    """Total preemptions the engine counted (from vLLM's own stats)."""
    return int(sum(getattr(m, "value", 0) for m in llm.get_metrics() if "preemption" in m.name))
