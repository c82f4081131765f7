"""The long-context suite: decode_throughput's shared-prefill mode and slope fit, and `make bench-long`'s plan."""

from __future__ import annotations

import json
import random

import pytest
from bench_scripts import load_script

d = load_script("decode_throughput")
long_context = load_script("long_context")


def test_slopes_recover_the_growth_of_the_attention_part():
    """Step times ``floor + c·n^p``: the step less the floor grows with slope p, whatever the floor and c."""
    rng = random.Random()
    floor, c1, c2 = rng.uniform(20, 80), rng.uniform(1e-3, 1e-2), rng.uniform(0.05, 0.2)
    contexts = [256, 4096, 8192, 16384, 32000]
    rows = [dict(context=n, batch=b, step_ms=floor * b ** 0.5 + (c1 * n if b == 1 else c2 * n ** 0.5) * b)
            for n in contexts for b in (1, 4)]
    # the step less the step at 256 tokens: c·(n^p - 256^p), a little steeper than p over 4k-32k
    fit = d.fit_slopes(rows, base=256)
    assert 1.0 < fit[1]["attention_slope"] < 1.04
    assert 0.5 < fit[4]["attention_slope"] < 0.62
    assert fit[1]["step_slope"] < fit[1]["attention_slope"]  # the floor flattens the raw step's slope
    assert fit[4]["contexts"] == contexts[1:] and fit[4]["base_step_ms"] == pytest.approx(rows[1]["step_ms"])
    assert d.fit_slopes(rows, base=None)[1]["attention_slope"] is None  # no floor context: raw slope only


@pytest.mark.vllm
def test_shared_prefill_grid_runs_stock_and_sparse_and_plots(tiny_llama_dir, tmp_path, monkeypatch):
    """A small grid on the tiny Llama, each context prefilled once per engine, every batch decoding
    from it: rows for every (context, batch), ratios to stock, slopes, the log-log plot, the op profiles."""
    monkeypatch.setattr("sys.argv", [
        "decode_throughput.py", "--model", str(tiny_llama_dir), "--contexts", "64", "512", "1024", "--batches", "1",
        "3", "--decode-tokens", "6", "--backends", "stock", 'sparse={"dense_below": 0, "min_budget": 68, "k": 1}',
        "--shared-prefill", "--profile", "--out", str(tmp_path), "--name", "grid"])
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    d.main()
    res = json.loads((tmp_path / "grid.json").read_text())
    assert res["meta"]["shared_prefill"] and res["meta"]["commit"]
    for name in ("stock", "sparse"):
        rows = res["results"][name]["rows"]
        assert sorted((r["context"], r["batch"]) for r in rows) == [(n, b) for n in (64, 512, 1024) for b in (1, 3)]
        assert all(r["step_ms"] > 0 and r["decode_steps_timed"] >= 4 and r["prefill_s"] > 0 for r in rows)
        # one prefill per (engine, context), shared by its batch sizes
        assert len({(r["context"], r["prefill_s"]) for r in rows}) == 3
        assert set(res["results"][name]["slopes"]) == {"1", "3"}
    assert all(r["speedup_vs_stock"] > 0 for r in res["results"]["sparse"]["rows"])
    assert (tmp_path / "grid_loglog.png").stat().st_size > 0
    # the profiles: 8 decode steps of the largest batch and nothing else — 16 attention calls (2 layers × 8)
    for name in ("stock", "sparse"):
        text = (tmp_path / f"grid_profile_{name}_1024.txt").read_text()
        assert text.startswith("context 1024, batch 3") and "8 decode steps" in text
        (line,) = [x for x in text.splitlines() if "vllm::unified_attention_with_output" in x]
        assert line.split()[-1] == "16"


def test_bench_long_prints_its_plan_and_checks_its_steps(capfd):
    """The plan names every step with its expected duration; a dry run of the cheap steps checks their
    settings through the scripts' own dry runs and writes nothing."""
    assert long_context.main(["--dry-run", "--steps", "decode", "--out", "/nonexistent/bench-long"]) == 0
    out = capfd.readouterr().out
    total = sum(s.minutes for s in long_context.steps(6) if s.name == "decode")
    assert f"about {total // 60} h {total % 60:02d} min" in out
    assert "--shared-prefill" in out and "smollm2-32k" in out
    plan = long_context.steps(4)
    assert [s.name for s in plan] == ["decode", "kv-capacity", "quality-16k", "quality-32k", "smollm2-32k"]
    assert all(s.minutes > 0 for s in plan)

    def samples(step):
        return step.args[step.args.index("--samples") + 1]

    assert samples(plan[2]) == samples(plan[3]) == "4" and samples(plan[4]) == "2"  # smollm2-32k: half
    assert samples(long_context.steps(6)[2]) == "6"
