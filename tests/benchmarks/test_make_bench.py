"""`make bench` as CI sees it: every benchmark of the suite checks its settings and prints its plan."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists() or Path(sys.prefix).resolve() !=
                    (ROOT / ".venv").resolve(), reason="runs through the Makefile's own .venv (make test's)")
def test_make_bench_dry_run_plans_every_benchmark(tmp_path):
    env = {**os.environ, "BENCH_OUT": str(tmp_path)}
    run = subprocess.run(["make", "-s", "bench", "BENCH_ARGS=--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "quality: " in out and "'single': 6" in out and "ntopk-a0.5-k12=" in out
    assert "throughput: 4 runs" in out and "--attention-backend CUSTOM" in out
    assert "approx_error: lengths [512," in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
