"""Models with sliding-window layers through the backend in real vLLM (CPU build): Gemma 3's hybrid
pattern, Gemma 2's alternation with its attention logit soft cap, and a Mistral-style model whose
every layer has a window. The windowed layers attend exactly their window (vLLM's CPU op); the
full-attention layers decode sparsely."""

import pytest

from llm_utils import essay_ids, make_llm, preemptions
from vllm_sparse import stats

pytestmark = pytest.mark.vllm

#: (start, length) in the essays: one prompt inside the 64-token window, two far beyond it
SPANS = ((0, 5), (1000, 300), (5000, 1500))
FULL = {"alpha": 1.0, "k": 1.0, "dense_below": 0}  # the budget covers the context
SMALL = {"dense_below": 0, "min_budget": 68, "k": 1.0, "alpha": 0.5}  # ~13% of the long prompts


def prompts(model, spans=SPANS):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=essay_ids(model, n, start)) for start, n in spans]


def generate(llm, model, max_tokens=16, spans=SPANS):
    """Greedy tokens and the log-probability of each."""
    from vllm import SamplingParams

    outs = llm.generate(prompts(model, spans), SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0),
                        use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[d[t].logprob for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return tokens, logprobs


def run(model, backend="CUSTOM", sparse=None, **kwargs):
    with make_llm(model, backend=backend, sparse=sparse, max_model_len=4096, dtype="float32", **kwargs) as llm:
        return generate(llm, model)


def builder_groups(worker) -> list:
    """Per KV-cache group of the plugin: (its layers have a window, the window, it records the step's sparsity)."""
    from vllm_sparse.backend import SparseMetadataBuilder

    return sorted((b.windowed, b.window, b.records_stats) for groups in worker.model_runner.attn_groups
                  for g in groups for b in g.metadata_builders if isinstance(b, SparseMetadataBuilder))


@pytest.fixture(scope="module")
def stock(tiny_gemma3_dir, tiny_gemma2_dir):
    return {"gemma3": run(tiny_gemma3_dir, backend="stock"), "gemma2": run(tiny_gemma2_dir, backend="stock")}


def assert_same(got, want):
    tokens, logprobs = got
    assert tokens == want[0]
    for a, b in zip(logprobs, want[1]):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("arch, selection, force_sparse", [
    ("gemma3", "exact_pages", False),  # the dense shortcut
    ("gemma3", "exact_pages", True),  # the fused sparse decode at full budget
    ("gemma3", "token", True),  # the torch-reference sparse decode
    ("gemma2", "exact_pages", True),  # ... with the logit soft cap
    ("gemma2", "token", True),
])
def test_full_budget_equals_stock(request, stock, arch, selection, force_sparse):
    """Budget = context: the plugin's tokens and log-probabilities are stock's (float32). Stock's
    CPU backend attends each layer's window and caps its logits, so a window or a cap the plugin
    dropped would show (it changes the long prompts' tokens)."""
    model = request.getfixturevalue(f"tiny_{arch}_dir")
    assert_same(run(model, sparse={**FULL, "selection": selection, "force_sparse": force_sparse}), stock[arch])


def test_full_layers_decode_sparsely_and_windowed_layers_attend_their_window(tiny_gemma3_dir):
    """vLLM's hybrid KV-cache manager gives the windowed layers their own groups: the plugin serves
    them all (one page size), plans sparse decode for the full-attention group only, and counts
    each step's sparsity once."""
    before = stats.snapshot()
    with make_llm(tiny_gemma3_dir, sparse=SMALL, max_model_len=4096, dtype="float32") as llm:
        tokens, _ = generate(llm, tiny_gemma3_dir)
        groups = llm.collective_rpc(builder_groups)[0]
        del llm
    after = stats.snapshot()
    # 6 layers: 2 full-attention ones in one group, 4 windowed ones in two groups of 2
    assert groups == [(False, -1, True), (True, 64, False), (True, 64, False)]
    assert all(len(t) == 16 for t in tokens)
    assert after["decode_steps"] - before["decode_steps"] == 15  # one record per step, not per group
    attended = after["attended_tokens"] - before["attended_tokens"]
    assert 0 < attended < 0.5 * (after["context_tokens"] - before["context_tokens"])


def test_chunked_prefill_and_preemption_on_a_hybrid_model(tiny_gemma3_dir, stock):
    """Prompts prefilled in 128-token chunks give stock's tokens; a KV pool too small for the batch
    preempts (recompute) and still gives the same tokens."""
    common = dict(max_num_batched_tokens=128, enable_chunked_prefill=True, max_model_len=2048, dtype="float32")
    spans = [(i * 3000, n) for i, n in enumerate((100, 300, 600))] * 3
    settings = {**FULL, "force_sparse": True}
    with make_llm(tiny_gemma3_dir, sparse=settings, **common) as llm:
        assert_same(generate(llm, tiny_gemma3_dir), stock["gemma3"])
        free = generate(llm, tiny_gemma3_dir, max_tokens=64, spans=spans)[0]
        del llm  # no handle may outlive its engine: the next one would lose its process groups to it
    # 90 blocks for the three KV-cache groups (one full-attention, two windowed): a 2k-token request
    # fits (~80 blocks), the nine of 164-664 tokens (~110 full-attention blocks alone) do not
    with make_llm(tiny_gemma3_dir, sparse=settings, num_gpu_blocks_override=90, disable_log_stats=False,
                  **common) as llm:
        tight = generate(llm, tiny_gemma3_dir, max_tokens=64, spans=spans)[0]
        preempted = preemptions(llm)
        del llm
    assert preempted > 0
    assert tight == free


def layer_impls(worker) -> list:
    from vllm.model_executor.layers.attention import Attention

    return [(type(m.impl).__name__, m.impl.sliding_window) for m in worker.model_runner.model.modules()
            if isinstance(m, Attention)]


def test_backend_per_kind_keeps_the_windowed_layers_on_vllms_backend(tiny_gemma3_dir, stock):
    """``AttentionConfig.backend_per_kind`` with vLLM's CPU backend for the sliding-window groups: the
    plugin serves the full-attention layers only (its page padded onto theirs), stock's tokens at
    full budget."""
    per_kind = {"backend_per_kind": {"sliding_window": "CPU_ATTN"}}
    with make_llm(tiny_gemma3_dir, sparse={**FULL, "force_sparse": True}, max_model_len=4096, dtype="float32",
                  attention_config=per_kind) as llm:
        impls = llm.collective_rpc(layer_impls)[0]
        got = generate(llm, tiny_gemma3_dir)
        del llm
    assert [name for name, _ in impls] == ["CPUAttentionBackendImpl"] * 2 + ["SparseAttentionImpl"] + \
        ["CPUAttentionBackendImpl"] * 2 + ["SparseAttentionImpl"]
    assert_same(got, stock["gemma3"])


def test_a_model_whose_every_layer_has_a_window(tiny_llama_dir, tmp_path):
    """A Mistral-style config (one window for every layer): served, stock's tokens, no sparse decode."""
    import json
    import shutil

    swa = tmp_path / "swa"
    shutil.copytree(tiny_llama_dir, swa)
    cfg = json.loads((swa / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    (swa / "config.json").write_text(json.dumps(cfg))
    want = run(swa, backend="stock")
    before = stats.snapshot()["decode_steps"]
    assert_same(run(swa, sparse=SMALL), want)
    assert stats.snapshot()["decode_steps"] == before  # nothing to make sparse


def test_eviction_on_a_model_with_windowed_layers_is_refused_at_start_up(tiny_gemma3_dir):
    with pytest.raises(ValueError, match="evict='streaming'.*sliding-window"):
        with make_llm(tiny_gemma3_dir, sparse={"evict": "streaming"}, enable_prefix_caching=False):
            pass


@pytest.mark.slow
def test_gemma3_270m_decodes_sparsely_and_finds_needles_past_the_window(model_cache_dir):
    """The real hybrid model (15 of 18 layers with a 512-token window, 1 KV head of 256 dims): its 3
    full-attention layers decode at ~1/4 of a 2k context with the defaults, and the base model finds
    needles ~2k tokens back at three depths, as with dense attention. With a fixed 12 rescored dims
    (of 256) it found 1 of the 3; the default scales them with the head (48 here)."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_sparse.assets import data, models

    model = models.prepare_model("gemma3-270m", model_cache_dir)
    needles = data.needle_prompts(AutoTokenizer.from_pretrained(str(model)), (2048,), (0.2, 0.5, 0.8))
    before = stats.snapshot()
    with make_llm(model, sparse={"dense_below": 0}, max_model_len=4096) as llm:
        groups = llm.collective_rpc(builder_groups)[0]
        rescore = llm.collective_rpc(lambda worker: sorted({b.params.rescore_dims for groups in
                                                             worker.model_runner.attn_groups for g in groups
                                                             for b in g.metadata_builders}))[0]
        outs = llm.generate([n.prompt for n in needles], SamplingParams(max_tokens=8, temperature=0.0),
                            use_tqdm=False)
        del llm
    after = stats.snapshot()
    assert groups == [(False, -1, True)] + [(True, 512, False)] * 5  # 3 full layers: 1 group; 15 windowed: 5
    assert rescore == [48]
    attended = after["attended_tokens"] - before["attended_tokens"]
    assert 0 < attended < 0.35 * (after["context_tokens"] - before["context_tokens"])
    for needle, out in zip(needles, outs):
        assert data.retrieved(needle, out.outputs[0].text), (needle.answer, out.outputs[0].text)
