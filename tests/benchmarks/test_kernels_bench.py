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


def test_a_failing_variant_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    """On a GPU machine one variant that does not compile must not cost the run the rest."""
    import os

    import importlib.util

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # by path: the name `kernels` is the checkout's kernels/ package in a full test run
    spec = importlib.util.spec_from_file_location("bench_kernels_script", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench._import_package()
    from vllm_sparse.kernels import ops

    real = ops.select_topk

    def broken_for_quest(*a, **kw):
        if kw.get("params", a[6] if len(a) > 6 else None).selector.name == "quest":
            raise RuntimeError("planted failure")
        return real(*a, **kw)

    monkeypatch.setattr(ops, "select_topk", broken_for_quest)
    assert os.environ["TRITON_INTERPRET"] == "1"
    bench.main(["--dry-run", "--out", str(tmp_path), "--selections", "quest", "token"])
    (row,) = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert "planted failure" in row["sparse_quest_error"]
    assert not any(k.startswith("sparse_quest") for k in row["times_ms"])  # no partial timings
    assert row["sparse_token_speedup"] > 0 and row["sparse_token_err_vs_reference"] < 2e-2


SHIM_CHECK = r"""
import sys, torch
sys.path.insert(0, {cases!r})
import vllm
assert vllm.SHIM and vllm.__file__.startswith({shim!r}), vllm.__file__
from paged_case import make_case
from vllm_sparse.kernels import ops
from vllm_sparse.kernels.selection import compact_pages
from vllm_sparse.kernels.selectors import SelectParams
from vllm_sparse.kernels.triton_select import select_pages_triton
from vllm_sparse.gpu_attention import unified_split_kwargs, unified_table_decode
from vllm.v1.attention.ops.triton_unified_attention import unified_attention

def rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())

c = make_case([300, 77], 8, 2, 64, 16, 16, torch.float32)
q = torch.randn(2, 8, 64)
att = torch.tensor([64, 64])
params = SelectParams.create("quest", sink_tokens=4, local_window=16)
pages = select_pages_triton(q, c.cache, c.block_table, c.seq_lens, att, 0.125, params, capacity=128, max_seq_len=300)
tables, lens = compact_pages(pages, c.block_table, c.seq_lens, 16)
ours = ops.table_decode(q, c.cache, tables, lens, 0.125, max_len=tables.shape[-1] * 16, force_triton=True)
o = torch.full_like(q, float("nan"))
unified_table_decode(q, c.cache, tables, lens, 0.125, o, tables.shape[-1] * 16)
print("tables", rel(o, ours))
dense = ops.dense_decode(q, c.cache, c.block_table, c.seq_lens, 0.125, max_seq_len=300, force_triton=True)
o = torch.full_like(q, float("nan"))
split = unified_split_kwargs(2, 8, 2, 64, q.device)
assert split["seq_threshold_3D"] == 64  # vLLM's rule: 128 // num_kv_heads
unified_attention(q=q, k=c.cache.key_cache, v=c.cache.value_cache, out=o, cu_seqlens_q=torch.arange(3, dtype=torch.int32),
                  max_seqlen_q=1, seqused_k=c.seq_lens.to(torch.int32), max_seqlen_k=300, softmax_scale=0.125, causal=True,
                  window_size=(-1, -1), block_table=c.block_table, softcap=0, q_descale=None, k_descale=None,
                  v_descale=None, **split)
print("dense", rel(o, dense))
"""


def test_vllm_kernel_shim_runs_vllms_kernel_without_vllm(tmp_path):
    """benchmarks/vllm_kernel_shim.py: vLLM's unified_attention source alone (what the GPU machine gets)
    imports through the stand-ins, and over the compacted tables and densely it computes what our
    split-K kernel does (interpreter, float32)."""
    import os

    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm_kernel_shim.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "vllm" / "v1" / "attention" / "ops" / "triton_unified_attention.py").is_file()
    code = SHIM_CHECK.format(cases=str(ROOT / "tests" / "kernels"), shim=str(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    errs = dict(line.split() for line in res.stdout.splitlines() if line.split()[0] in ("tables", "dense"))
    assert float(errs["tables"]) < 1e-5 and float(errs["dense"]) < 1e-5, errs
