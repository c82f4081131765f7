"""The backend inside real vLLM (CPU build) on a tiny random Llama: selection, stats, refusals."""

import json
import shutil

import pytest

from llm_utils import essay_ids, generate_once, greedy, make_llm, preemptions
from vllm_sparse import stats

pytestmark = pytest.mark.vllm

PROMPTS = ["hello world " * n for n in (3, 200, 900)]


@pytest.fixture(scope="module")
def stock_outputs(tiny_llama_dir):
    with make_llm(tiny_llama_dir, backend="stock") as llm:
        return [o.token_ids for o in greedy(llm, PROMPTS)]


@pytest.mark.parametrize("selection", ["token", "quest", "exact_pages"])
def test_custom_backend_runs_sparse_decode_and_records_sparsity(tiny_llama_dir, selection):
    before = stats.snapshot()
    # budget 68..: well below the 1.8k-token prompt, so decode is really sparse
    settings = {"dense_below": 0, "min_budget": 68, "k": 1.0, "alpha": 0.5, "selection": selection}
    with make_llm(tiny_llama_dir, sparse=settings) as llm:
        outs = greedy(llm, PROMPTS)
    after = stats.snapshot()
    assert all(len(o.token_ids) == 16 for o in outs)
    steps = after["decode_steps"] - before["decode_steps"]
    attended = after["attended_tokens"] - before["attended_tokens"]
    context = after["context_tokens"] - before["context_tokens"]
    assert steps >= 15
    assert 0 < attended < 0.5 * context  # sparse: well under half of the context attended


@pytest.mark.parametrize("selection", ["token", "quest", "exact_pages"])
@pytest.mark.parametrize("force_sparse", [False, True])
def test_full_budget_matches_stock_backend(tiny_llama_dir, stock_outputs, selection, force_sparse):
    """Budget = context: the dense shortcut, and the sparse path itself (force_sparse), give stock's tokens."""
    settings = {"alpha": 1.0, "k": 1.0, "dense_below": 0, "selection": selection, "force_sparse": force_sparse}
    with make_llm(tiny_llama_dir, sparse=settings) as llm:
        outs = [o.token_ids for o in greedy(llm, PROMPTS)]
    assert outs == stock_outputs


def test_stock_backend_is_untouched_by_the_plugin(tiny_llama_dir, stock_outputs):
    before = stats.snapshot()["decode_steps"]
    with make_llm(tiny_llama_dir, backend="stock", sparse={"alpha": 0.3}) as llm:
        outs = [o.token_ids for o in greedy(llm, PROMPTS)]
    assert outs == stock_outputs
    assert stats.snapshot()["decode_steps"] == before  # our builder never ran


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"alpha": 0}, "alpha=0"),
        ({"k": -1}, "k=-1"),
        ({"policy": "nope"}, "policy='nope'"),
        ({"alpah": 0.5}, "alpah"),
    ],
)
def test_bad_settings_stop_llm_with_the_named_error(tiny_llama_dir, settings, message):
    with pytest.raises(ValueError, match=message):
        with make_llm(tiny_llama_dir, sparse=settings):
            pass


def _variant(src, dst, **config_changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _cache_tokens(llm) -> int:
    """Tokens vLLM says its KV cache holds (blocks × block size), as it logs 'KV cache size'."""
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size


@pytest.mark.parametrize("num_kv_heads, page_size", [(3, 32), (8, 32), (16, 32), (3, 16)])
def test_page_summaries_cost_one_page_size_th_of_kv_memory(tiny_llama_dir, tmp_path, num_kv_heads, page_size):
    """The plugin's cache holds page_size / (page_size + 1) of the tokens the stock backend's holds (>= 93%)."""
    model = _variant(tiny_llama_dir, tmp_path / f"kv{num_kv_heads}", num_attention_heads=48,
                     num_key_value_heads=num_kv_heads, head_dim=64)
    tokens = {}
    for backend in ("stock", "CUSTOM"):
        with make_llm(model, backend=backend, load_format="dummy", max_model_len=2048,
                      sparse={"page_size": page_size}) as llm:
            tokens[backend] = _cache_tokens(llm)
    ratio = tokens["CUSTOM"] / tokens["stock"]
    print(f"{num_kv_heads} KV heads, page {page_size}: cache tokens stock {tokens['stock']}, "
          f"vllm-sparse {tokens['CUSTOM']} ({ratio:.3f})")
    assert ratio >= 0.93 and abs(ratio - page_size / (page_size + 1)) < 0.005


def test_block_size_other_than_page_size_is_refused_at_start_up(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"block-size.*page_size"):
        with make_llm(tiny_llama_dir, sparse={"page_size": 16}, block_size=64):
            pass


def test_a_layer_kind_the_plugin_cannot_serve_is_refused_with_the_fix(tmp_path, tiny_llama_dir):
    """An encoder-only model (a tiny random BERT) stops at start-up: the error names the layer kind and
    the ``backend_per_kind`` setting that keeps that kind on vLLM's backend — and that setting serves."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=256)).save_pretrained(tmp_path)
    kw = dict(runner="pooling", max_model_len=128)
    with pytest.raises(ValueError, match=r"ENCODER_ONLY not supported.*encoder_only_attention layers.*"
                                         r'"backend_per_kind": \{"encoder_only_attention": "CPU_ATTN"\}') as err:
        with make_llm(tmp_path, **kw):
            pass
    fix = json.loads(str(err.value).split("--attention-config '")[1].split("'")[0])
    with make_llm(tmp_path, backend="stock", attention_config=fix, **kw) as llm:
        assert len(llm.embed(["hello world"])[0].outputs.embedding) == 128


def test_dense_layers_and_quest_run_in_vllm(tiny_llama_dir, stock_outputs):
    """dense_layers=2 keeps both layers of the tiny model dense: stock's tokens even at a tiny budget."""
    settings = {"dense_below": 0, "min_budget": 68, "k": 1.0, "selection": "quest", "dense_layers": 2}
    with make_llm(tiny_llama_dir, sparse=settings) as llm:
        outs = [o.token_ids for o in greedy(llm, PROMPTS)]
    assert outs == stock_outputs


def test_third_party_policy_with_its_own_selector_runs_in_vllm(tiny_llama_dir, stock_outputs, example_package):
    """examples/third_party_policy, pip-installed: `policy: "keydiff"` decodes through the selector
    its one file registers — sparsely at a small budget, and token-identical to stock when the
    budget covers the context (forced through the sparse path)."""
    from vllm_sparse.kernels.selectors import available_selectors
    from vllm_sparse.policies import registry

    registry.reload_entry_points()
    assert "keydiff" in available_selectors()
    before = stats.snapshot()
    settings = {"policy": "keydiff", "dense_below": 0, "min_budget": 68, "k": 1.0, "alpha": 0.5}
    outs = generate_once(tiny_llama_dir, PROMPTS, sparse=settings)  # no engine handle outlives it
    after = stats.snapshot()
    assert all(len(o.token_ids) == 16 for o in outs)
    attended = after["attended_tokens"] - before["attended_tokens"]
    assert 0 < attended < 0.5 * (after["context_tokens"] - before["context_tokens"])
    full = {"policy": "keydiff", "alpha": 1.0, "k": 1.0, "dense_below": 0, "force_sparse": True}
    assert [o.token_ids for o in generate_once(tiny_llama_dir, PROMPTS, sparse=full)] == stock_outputs


@pytest.mark.slow
def test_preemption_and_chunked_prefill_give_the_same_greedy_outputs(tiny_llama_dir):
    """A KV cache too small for the batch forces preemption (recompute); prompts prefill in 256-token chunks."""
    prompts = [{"prompt_token_ids": essay_ids(tiny_llama_dir, n, start=i * 5000)} for i, n in enumerate((100, 300, 600))] * 4
    # 12 requests of 100..600 tokens, 96 new tokens each
    settings = {"alpha": 1.0, "k": 1.0, "dense_below": 0}
    common = dict(dtype="float32", max_num_batched_tokens=256, enable_chunked_prefill=True, max_model_len=1024)
    free = generate_once(tiny_llama_dir, prompts, sparse=settings, max_tokens=96, **common)
    # 40 blocks of 32 = 1.3k tokens of cache: the admitted requests outgrow it while decoding, and vLLM preempts
    tight, preempted = generate_once(tiny_llama_dir, prompts, sparse=settings, max_tokens=96, with_llm=preemptions,
                                     num_gpu_blocks_override=40, disable_log_stats=False, **common)
    assert preempted > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in free]
