"""Real SmolLM2-135M-Instruct through real vLLM (CPU build) with the sparse backend."""

import pytest
import torch

from llm_utils import generate_once
from vllm_sparse.assets import data

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LENGTHS = (100, 300, 600, 2200, 4000)
# budget(n) = n through the sparse path (page scoring, compacted tables, the fused op), not the dense shortcut
FULL_BUDGET_SPARSE_PATH = {"alpha": 1.0, "k": 1.0, "dense_below": 0, "force_sparse": True, "selection": "quest"}


@pytest.fixture(scope="module")
def essay_prompts(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = tok.encode(data.essays_text(), add_special_tokens=False)
    # 5 prompts cut from different places of the essays, 100..4000 tokens
    return [tok.decode(ids[i * 5000 : i * 5000 + n]) for i, n in enumerate(LENGTHS)]


def test_budget_covering_context_is_token_identical_to_stock(smollm2_dir, essay_prompts):
    """alpha = 1, k = 1: budget(n) = n, so every decode step attends all of its context — through
    the sparse path (``force_sparse``: page scoring, top-k, compacted per-head block tables,
    the fused CPU op), not the dense shortcut.

    float32, because in bf16 the top two logits of this model often tie *exactly* (bf16 logit
    margins of 0.0 were measured on these prompts), and then any kernel with another summation
    order flips greedy tokens; in float32 a tie needs agreement to ~1e-7.
    """
    stock = generate_once(smollm2_dir, essay_prompts, backend="stock", dtype="float32")
    ours = generate_once(smollm2_dir, essay_prompts, dtype="float32",
                         sparse=FULL_BUDGET_SPARSE_PATH)
    assert [o.token_ids for o in ours] == [o.token_ids for o in stock]
    # reselect_every: requests keep last step's tables (matched by their blocks, in whatever order
    # the batch comes) until they must select (at this budget a new page grows the budget, so they
    # select then); a row given to the wrong request would read
    # another request's blocks and change the text
    kept = generate_once(smollm2_dir, essay_prompts, dtype="float32",
                         sparse={**FULL_BUDGET_SPARSE_PATH, "reselect_every": 4})
    assert [o.token_ids for o in kept] == [o.token_ids for o in stock]
    # with the similarity gate some heads of a request keep their rows and others select
    gated = generate_once(smollm2_dir, essay_prompts, dtype="float32",
                          sparse={**FULL_BUDGET_SPARSE_PATH, "reselect_every": 4, "reselect_similarity": 0.8})
    assert [o.token_ids for o in gated] == [o.token_ids for o in stock]
    # exact_pages: the heads whose query moved refresh their kept pages (reselect_candidate_factor)
    refreshed = generate_once(smollm2_dir, essay_prompts, dtype="float32",
                              sparse={**FULL_BUDGET_SPARSE_PATH, "selection": "exact_pages", "reselect_every": 4,
                                      "reselect_similarity": 0.8, "reselect_candidate_factor": 1})
    assert [o.token_ids for o in refreshed] == [o.token_ids for o in stock]


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(),
                    reason="bf16 equality needs stock and the plugin on the same kernel: vLLM's AMX one (Intel AMX CPUs)")
def test_bf16_on_amx_full_budget_equals_stock_up_to_ties(smollm2_dir, essay_prompts, monkeypatch):
    """On an AMX CPU in bf16, stock runs vLLM's AMX kernel and so does the plugin (AMX-packed K/V,
    ``cpu_attention.cpu_isa``): the forced sparse path over compacted one-head tables sums in the
    same order as stock, so even bf16's exact logit ties resolve alike — provided vLLM's op sums
    each sequence in one piece (``VLLM_CPU_ATTN_SPLIT_KV=0``, set here for both engines). With its
    default KV split the op splits long sequences across threads by the work it is given (``B * H``
    one-head sequences here, ``B`` requests of ``H`` heads in stock), so the two can differ by bf16
    rounding (test_cpu_attention.py::test_amx_full_budget_sums_like_stock_only_without_kv_split:
    up to 2.4e-4 absolute on one 3-request batch), enough to flip a greedy token at a near-tie.
    In the full suite (not when this file runs alone) prompt 2 has flipped at token 6, with the
    split off and with or without the backend holding a layer's table between steps: something the
    earlier tests leave in the process (environment the spawned engines inherit, most likely)
    changes a summation order. The cause is unknown; hence the tie tolerance below.

    Each engine in its own process, as ``vllm serve`` and ``LLM`` run it by default. With both
    engines in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, this suite's fast mode)
    the 4000-token prompt's first token differed (in either order; stock vs stock in-process:
    equal; the plugin with the dense decode shortcut, which passes the whole batch to one op
    call as stock does: equal). With forced sparse decode the plugin runs a mixed batch's
    prefills in their own op call, and (most likely) vLLM's work split over threads (one OpenMP thread
    in-process here) depends on the batch it is given: a bf16 summation-order difference, not
    a different result. In separate processes all 5 x 32 tokens are equal (Intel Xeon, AMX)."""
    from vllm import envs

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_CPU_ATTN_SPLIT_KV", "0")  # a spawned engine reads the variable,
    monkeypatch.setattr(envs, "VLLM_CPU_ATTN_SPLIT_KV", False, raising=False)  # a forked one may have it cached
    stock = generate_once(smollm2_dir, essay_prompts, backend="stock", dtype="bfloat16", max_tokens=32,
                          logprobs=2)
    ours = generate_once(smollm2_dir, essay_prompts, dtype="bfloat16", max_tokens=32, logprobs=2,
                         sparse=FULL_BUDGET_SPARSE_PATH)
    # Token for token equal, except where stock itself had an exact bf16 tie: in the full suite
    # prompt 2 can flip at token 6 even with the split off, while alone it passes; a flip is
    # accepted only onto stock's runner-up at a margin of one bf16 step at most (asking for
    # logprobs alone can move prompts onto such ties).
    for o, s in zip(ours, stock):
        if o.token_ids == s.token_ids:
            continue
        i = next(j for j, (a, b) in enumerate(zip(o.token_ids, s.token_ids)) if a != b)
        top = sorted(s.logprobs[i].values(), key=lambda lp: -lp.logprob)[:2]
        runner_up = [t for t, lp in s.logprobs[i].items() if lp.logprob == top[1].logprob]
        assert o.token_ids[i] in runner_up and top[0].logprob - top[1].logprob <= 0.13, (i, top)


def test_needles_at_the_default_budget(smollm2_dir, record_property):
    from transformers import AutoTokenizer

    cases = data.needle_prompts(AutoTokenizer.from_pretrained(str(smollm2_dir)))
    assert len(cases) == 12 and max(c.context_tokens for c in cases) > 6500
    # the defaults only: the baselines at the same budget (sinks + window, topk, quest, evictions)
    # are compared in benchmarks/policies.py and benchmarks/quality.py, not asserted here
    outs = generate_once(smollm2_dir, [c.prompt for c in cases], sparse={}, max_tokens=16)
    score = data.score(cases, [o.text for o in outs])[0]
    record_property("needle_score", score)
    print(f"needle retrieval at the defaults: {score}/12")
    assert score >= 11
