"""benchmarks/serve_load.py without a server: its plan, its reading of /metrics, its SIGTERM check.

The scenarios themselves run against real servers in tests/vllm_sparse/test_server.py (small sizes)
and in `make bench` (full size)."""

import subprocess
import sys
import textwrap

import pytest

from bench_scripts import load_script

L = load_script("serve_load")

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 4.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 9.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="160"} 1.0
# HELP vllm_sparse:decode_steps_total Decode steps planned by vllm-sparse
# TYPE vllm_sparse:decode_steps_total counter
vllm_sparse:decode_steps_total 12.0
"""


def test_metrics_are_read_by_name_and_label():
    s = L.parse_metrics(METRICS)
    assert L.total(s, "vllm:num_requests_running") == 3
    assert L.total(s, "vllm:request_success_total") == 13
    assert L.total(s, "vllm:request_success_total", finished_reason="abort") == 4
    assert L.total(s, "vllm_sparse:decode_steps_total") == 12
    assert L.pool_info(s) == {"blocks": 160, "block_size": 32}
    later = L.parse_metrics(METRICS.replace("decode_steps_total 12.0", "decode_steps_total 20.0"))
    assert L.sparsity_delta(s, later)["decode_steps"] == 8 and not L.sparsity_delta(s, later)["moved"]


def test_the_load_plan():
    lengths = L.spread(48, 300, 7000)
    assert sorted(lengths)[0] == 300 and sorted(lengths)[-1] == 7000 and len(set(lengths)) == 48
    assert lengths == L.spread(48, 300, 7000) and lengths != sorted(lengths)  # fixed, interleaved
    reqs = L.mixed_requests(["a", "b", "c", "d"], 8)
    assert sum(r.stream for r in reqs) == 2 and {r.api for r in reqs} == {"completions", "chat"}
    # 7,000 + 32 tokens in 32-token blocks: 220 blocks; 100 + 32: 5 more
    assert L.dense_need([7000, 100, None], 32, 32, 2) == {"longest": 220, "at_once": 225}


def test_table_marks_failures():
    rows = [dict(scenario="burst", requests=300, concurrency=64, answered=300, errors=0, wall_s=61.0, p50_s=2.0,
                 p95_s=3.0, ok=True),
            dict(scenario="bad", requests=9, concurrency=1, answered=8, errors=1, status={"unknown model": 500},
                 ok=False),
            dict(scenario="mixed", ok=False, exception="RuntimeError: boom")]
    text = L.table(rows)
    assert "burst" in text and "FAILED unknown model 500" in text and "FAILED RuntimeError: boom" in text


def test_dry_run_plans_and_writes_nothing(tmp_path, capsys):
    assert L.main(["--dry-run", "--model", "/m", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mixed 48 requests of 300-7000 tokens, 24 at once" in out and "burst 300, 64 at once" in out
    assert '--num-gpu-blocks-override 160' in out and '"evict": "streaming"' in out
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit, match="--evict: vllm_sparse setting evict='nope'"):
        L.main(["--dry-run", "--model", "/m", "--evict", '{"evict": "nope"}'])


def _child(body: str) -> subprocess.Popen:
    code = "import os, signal, subprocess, sys, time\n" + textwrap.dedent(body) + "\nprint('ready', flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("body, ok, what", [
    ("signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))", True, None),
    ("signal.signal(signal.SIGTERM, lambda *_: os.abort())", False, "exit_code"),
    ("subprocess.Popen(['sleep', '60'])\nsignal.signal(signal.SIGTERM, lambda *_: os._exit(0))", False, "left"),
])
def test_sigterm_check(tmp_path, body, ok, what):
    log = tmp_path / "log"
    log.write_text("")
    proc = _child(body)
    row = L.stop_with_sigterm(proc, log, timeout=10, grace=1)
    assert row["ok"] is ok, row
    if what == "exit_code":
        assert row["exit_code"] == -6  # SIGABRT: the shell's 134
    if what == "left":
        assert row["exit_code"] == 0 and any(p.endswith(" sleep") for p in row["processes_left"])
    assert not L.alive(int(p.split()[0]) for p in row["processes_left"])  # the check cleans up after a failure
