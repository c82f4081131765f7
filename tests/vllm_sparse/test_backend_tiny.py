"""The backend inside real vLLM (CPU build) on a tiny random Llama: selection, stats, refusals."""

import json
import shutil

import pytest

from llm_utils import greedy, make_llm
from vllm_sparse import stats

pytestmark = pytest.mark.vllm

PROMPTS = ["hello world " * n for n in (3, 200, 900)]


@pytest.fixture(scope="module")
def stock_outputs(tiny_llama_dir):
    with make_llm(tiny_llama_dir, backend="stock") as llm:
        return [o.token_ids for o in greedy(llm, PROMPTS)]


@pytest.mark.parametrize("selection", ["token", "quest"])
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


@pytest.mark.parametrize("selection", ["token", "quest"])
def test_full_budget_matches_stock_backend(tiny_llama_dir, stock_outputs, selection):
    settings = {"alpha": 1.0, "k": 1.0, "dense_below": 0, "selection": selection}
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


def test_unsupported_models_are_refused_at_start_up(tiny_llama_dir, tmp_path):
    # sliding-window attention (a Mistral-style config) is not something this backend does
    swa = _variant(tiny_llama_dir, tmp_path / "swa", architectures=["MistralForCausalLM"], model_type="mistral",
                   sliding_window=64)
    with pytest.raises(ValueError, match="sliding window not supported"):
        with make_llm(swa):
            pass
