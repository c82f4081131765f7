"""benchmarks/ablation.py: one engine switched between settings decodes as an engine started with
each, and the paired statistics are right."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
from bench_scripts import load_script

a = load_script("ablation")


def _rows(scores_by_setting, outputs_by_setting):
    return {n: dict(scores=[dict(frac=f, all=f == 1.0) for f in fr], outputs=outputs_by_setting[n], attended_fraction=0.5,
                    decode_s=1.0) for n, fr in scores_by_setting.items()}


def test_paired_difference_and_its_standard_error():
    rng = random.Random()
    n = 12
    cases = [SimpleNamespace(task="multi_key", length=4096) for _ in range(n)]
    ref = [rng.choice((0.0, 0.5, 1.0)) for _ in range(n)]
    other = [rng.choice((0.0, 0.5, 1.0)) for _ in range(n)]
    outs_ref = [f"r{i}" for i in range(n)]
    outs_other = [outs_ref[i] if i % 3 else f"x{i}" for i in range(n)]
    rows = _rows({"dense": ref, "s": other}, {"dense": outs_ref, "s": outs_other})
    (mine,) = [r for r in a.compare(cases, rows, "dense") if r["setting"] == "s"]
    d = [100 * (o - r) for o, r in zip(other, ref)]
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    assert mine["diff"] == pytest.approx(mean) and mine["diff_se"] == pytest.approx(se)
    assert mine["frac"] == pytest.approx(100 * sum(other) / n) and mine["identical"] == sum(1 for i in range(n) if i % 3)
    (refrow,) = [r for r in a.compare(cases, rows, "dense") if r["setting"] == "dense"]
    assert refrow["diff"] == 0 and refrow["identical"] == n
    (s,) = [r for r in a.summary(cases, rows, "dense") if r["setting"] == "s"]
    assert s["diff"] == pytest.approx(mean) and s["worst_cell"] == pytest.approx(mean)


@pytest.mark.parametrize("setting", ['e={"evict": "streaming"}', 'p={"page_size": 16}', 'bad={"alpha": 2}'])
def test_settings_that_cannot_share_an_engine_are_refused_before_it_starts(setting):
    with pytest.raises(SystemExit, match="setting (e|p|bad)"):
        a.main(["--settings", setting, "--samples", "1"])


@pytest.mark.vllm
def test_a_switched_engine_decodes_like_one_started_with_the_setting(smollm2_dir):
    """Prompts of ~1.1k tokens (past dense_below): the engine switched dense -> defaults gives the
    outputs and attended tokens of an engine started with the defaults, and dense attends all."""
    from transformers import AutoTokenizer

    seed = random.SystemRandom().randrange(2**31)
    print(f"seed {seed}")
    cases = a.build_cases(AutoTokenizer.from_pretrained(str(smollm2_dir)), ["multi_key"], [1100], 2, seed)
    from vllm_sparse.cpu_tuning import model_dtype

    model, dtype, sparse = str(smollm2_dir), model_dtype(), {}  # the defaults: pages reused across steps
    kept = []
    both = a.run(model, cases, {"dense": {"policy": "dense"}, "sparse": sparse}, 1, dtype, 32,
                 after_group=lambda done, rows: kept.append((done, rows)))["rows"]
    # the same groups (batch shapes change float rounding, and greedy continuations with it)
    alone = a.run(model, cases, {"sparse": sparse}, 1, dtype, 32)["rows"]
    assert both["dense"]["attended_fraction"] == 1.0
    assert 0.1 < both["sparse"]["attended_fraction"] < 0.5
    assert both["sparse"]["attended_fraction"] == pytest.approx(alone["sparse"]["attended_fraction"])
    assert both["sparse"]["outputs"] == alone["sparse"]["outputs"]
    assert all(isinstance(t, str) and t for t in both["dense"]["outputs"])
    # one group of one case, then the last: what was measured after the first is kept
    ((done, rows),) = kept
    assert done == 1 and rows["sparse"]["outputs"] == both["sparse"]["outputs"][:1]
    assert len(rows["dense"]["scores"]) == 1

