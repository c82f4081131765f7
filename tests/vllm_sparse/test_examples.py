"""The offline example runs as a user would run it (script, subprocess, real vLLM)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_offline_needles_example(smollm2_dir):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "offline_needles.py"), "--model", str(smollm2_dir),
                          "--lengths", "1500"], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    m = re.search(r"retrieved: dense (\d+)/3, sparse (\d+)/3", run.stdout)
    assert m, run.stdout[-2000:]
    assert int(m.group(1)) == 3 and int(m.group(2)) == 3
