"""benchmarks/throughput.py: `vllm-sparse bench throughput/latency` driven for dense vs sparse."""

import json

import pytest

from bench_scripts import load_script

thr = load_script("throughput")


def test_backends_parse_and_bad_settings_stop_with_the_spec():
    assert thr.parse_backend("stock") == ("stock", None)
    assert thr.parse_backend('fast={"selection": "quest", "k": 24}') == ("fast", {"selection": "quest", "k": 24})
    with pytest.raises(SystemExit, match="must be JSON"):
        thr.parse_backend("x={selection: quest}")
    with pytest.raises(SystemExit, match="--gpu needs --model"):
        thr.main(["--gpu"])
    with pytest.raises(SystemExit, match=r"--backends bad: vllm_sparse setting alpha=2 is invalid"):
        thr.main(["--dry-run", "--backends", "stock", 'bad={"alpha": 2}'])


def test_ratios_and_the_kv_capacity_line():
    m = thr._KV_TOKENS.search("INFO [kv_cache_utils.py:2327] CPU KV cache size: 2,097,152 tokens, Maximum")
    assert int(m.group(1).replace(",", "")) == 2_097_152
    rows = [dict(backend="stock", input_len=n, total_tokens_per_s=100.0 * i, output_tokens_per_s=10.0 * i,
                 time_per_output_token_ms=40.0, kv_cache_tokens=1000) for i, n in enumerate((1024, 4096), 1)]
    rows += [dict(backend="sparse", input_len=4096, total_tokens_per_s=300.0, output_tokens_per_s=30.0,
                  time_per_output_token_ms=20.0, kv_cache_tokens=970)]
    thr.add_ratios(rows, "stock")
    assert rows[2]["total_tokens_per_s_vs_base"] == 1.5 and rows[2]["tpot_speedup_vs_base"] == 2.0
    assert rows[2]["kv_cache_tokens_vs_base"] == 0.97
    assert "4096 sparse" in thr.table(rows, "stock")


@pytest.mark.vllm
@pytest.mark.slow
def test_a_small_run_drives_vllm_bench_with_the_plugin(smollm2_dir, tmp_path):
    """One real `vllm-sparse bench throughput` through the script, the plugin on: JSON, plot, log."""
    thr.main(["--model", str(smollm2_dir), "--input-lens", "1500", "--output-len", "16", "--num-prompts", "4",
              "--latency-iters", "0", "--backends", "sparse={}", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "throughput.json").read_text())
    (row,) = result["rows"]
    assert row["backend"] == "sparse" and row["input_len"] == 1500 and row["num_prompts"] == 4
    assert row["total_tokens_per_s"] > row["output_tokens_per_s"] > 0
    assert row["kv_cache_tokens"] > 10_000  # read from vLLM's start-up log
    assert (tmp_path / "throughput.png").stat().st_size > 0
    log = (tmp_path / "throughput.log").read_text()
    assert "Throughput:" in log and "--attention-backend CUSTOM" in log
