"""benchmarks/kernels.py: the dry run (tiny config, Triton interpreter) and the byte model."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernels.py"


def _run(*args):
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout


def test_dry_run_times_every_variant_and_checks_it_against_the_reference(tmp_path):
    out = _run("--dry-run", "--out", str(tmp_path))
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert (tmp_path / "kernels.png").stat().st_size > 0
    (row,) = data["rows"]
    variants = ["page_cf4", "page_cf2", "quest", "token"]
    for v in variants:
        p = f"sparse_{v}"
        assert f"{v} ms" in out  # a column of the printed table
        assert row[p + "_err_vs_reference"] < 2e-2  # bf16 cache against the float32 reference
        for part in ("", "_score", "_select", "_attn"):
            assert row["times_ms"][p + part] > 0
        assert row[p + "_bytes"] > 0
    assert row["err_sdpa_vs_ours"] < 2e-2


def test_byte_floor_model(tmp_path):
    _run("--floor", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "kernels_floor.json").read_text())["rows"]
    by_ctx = {r["context"]: r for r in rows if r["batch"] == 1}
    for r in rows:
        # token selection reads every key to score it: never better than dense / (K / (K + V))
        assert 1 < r["sparse_token_floor_x"] < 2
        # quest reads no key to select; candidate factor 2 moves fewer candidate keys than 4
        assert r["sparse_quest_floor_x"] > r["sparse_page_cf2_floor_x"] > r["sparse_page_cf4_floor_x"]
        assert r["sparse_quest_floor_x"] == r["dense_bytes"] / r["sparse_quest_bytes"]
        # the floor does not depend on the batch (everything is per request and head)
        assert abs(r["sparse_quest_floor_x"] - by_ctx[r["context"]]["sparse_quest_floor_x"]) < 1e-9
    ctx = sorted(by_ctx)
    floors = [by_ctx[n]["sparse_quest_floor_x"] for n in ctx]
    assert floors == sorted(floors)  # the budget grows like sqrt(n): the floor grows with the context
