"""vLLM's Triton ``unified_attention`` over the plugin's compacted one-head block tables (the GPU
alternative of :mod:`vllm_sparse.gpu_attention`), run on CPU tensors by the Triton interpreter."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = f"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is decorated
sys.path.insert(0, {str(ROOT / "tests" / "kernels")!r})
import torch, triton, triton.language as tl
import triton.language.extra.libdevice as tldevice
import vllm.triton_utils as tu
# vLLM's CPU build turns Triton off (its Triton has no CPU backend) and hands out placeholders;
# the interpreter needs none: give vLLM's kernel module the real Triton before it is imported
tu.triton, tu.tl, tu.tldevice = triton, tl, tldevice
from paged_case import make_case
from vllm_sparse.gpu_attention import unified_table_decode
from vllm_sparse.kernels import reference as R
from vllm_sparse.kernels.selection import compact_pages
from vllm_sparse.kernels.selectors import SelectParams
from vllm_sparse.kernels.triton_select import select_pages_triton

# (bf16: the interpreter computes bf16 math wrongly, so our own kernels upcast there; vLLM's do not)
for group, dtype, tol in ((1, torch.float32, 1e-5), (3, torch.float32, 1e-5), (4, torch.float16, 3e-3)):
    hkv, d, bs = 2, 64, 16
    lens = [300, 77, 160, 1]
    c = make_case(lens, hkv * group, hkv, d, bs, bs, dtype)
    q = torch.randn(len(lens), hkv * group, d).to(dtype)
    attended = torch.tensor([64, 40, 400, 1])
    params = SelectParams.create("exact_pages", "kv_head", sink_tokens=2, local_window=8, candidate_factor=2.0)
    cap = params.index_capacity(160, bs)
    pages = select_pages_triton(q, c.cache, c.block_table, c.seq_lens, attended, 0.125, params, capacity=cap,
                                max_seq_len=300)
    tables, lens_t = compact_pages(pages, c.block_table, c.seq_lens, bs)
    out = unified_table_decode(q, c.cache, tables, lens_t, 0.125, torch.full_like(q, float("nan")),
                               tables.shape[-1] * bs)
    ref = R.sparse_decode(q.float(), c.cache, c.block_table, c.seq_lens, attended, 0.125, params)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(group, dtype, err)
    assert torch.isfinite(out).all() and err < tol, (group, dtype, err)
print("ok")
"""


def test_vllm_unified_attention_over_compacted_tables_equals_reference():
    """Each (request, KV head) as one single-head sequence over the one-head block view: vLLM's kernel
    attends exactly the pages ``exact_pages`` chose (the reference's output), GQA 1/3/4, fp32/fp16."""
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, (res.stdout[-2000:], res.stderr[-3000:])
