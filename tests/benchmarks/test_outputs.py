"""Benchmarks write into benchmarks/out/ by default, a folder git ignores: a run adds no file to the repository."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _scripts():
    return sorted(BENCHMARKS.glob("*.py")) + sorted(BENCHMARKS.glob("*.sh"))


def test_no_benchmark_writes_into_the_tree_by_default():
    for path in _scripts():
        text = path.read_text()
        assert "benchmarks/results" not in text, path.name
        assert '"results"' not in text, path.name
        for default in re.findall(r'"--out"[^\n]*?default=([^\n]+)', text):
            assert '"out"' in default or "benchmarks/out" in default, (path.name, default)
    assert "OUT=${OUT:-benchmarks/out}" in (BENCHMARKS / "gpu_check.sh").read_text()
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^BENCH_OUT \?= benchmarks/out/", make, re.M)
    assert "approx_error.py --out benchmarks/out" in make


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_the_output_folder_is_ignored_by_git():
    probe = "benchmarks/out/decode_throughput.json"
    run = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    assert run.returncode == 0, f"{probe} is not ignored by .gitignore"
