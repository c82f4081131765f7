"""The dispatch layer (``kernels/ops.py``): CPU tensors take the torch reference, CUDA tensors (or CPU
tensors forced through the Triton interpreter) the Triton kernels; index buffers and routes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paged_case import make_case
from vllm_sparse.kernels import ops
from vllm_sparse.kernels import reference as R
from vllm_sparse.kernels.selectors import SelectParams

P = SelectParams.create  # the selection settings by name


def test_cpu_tensors_take_the_reference_path_by_default():
    c = make_case([40, 9], 4, 2, 64, 16, 8, torch.float32)
    q = torch.randn(2, 4, 64)
    att = torch.tensor([12, 12])
    params = P(sink_tokens=2, local_window=4)
    ours = ops.sparse_decode(q, c.cache, c.block_table, c.seq_lens, att, 0.1, params)
    assert torch.equal(ours, R.sparse_decode(q, c.cache, c.block_table, c.seq_lens, att, 0.1, params))
    idx = ops.select_topk(q, c.cache, c.block_table, c.seq_lens, att, 0.1, params, capacity=20)
    assert idx.shape == (2, 2, 20) and bool((idx[..., 12:] == -1).all())
    assert torch.equal(idx[..., :12], R.select_topk(q, c.cache, c.block_table, c.seq_lens, att, 0.1, params))


def test_an_index_buffer_narrower_than_the_selection_is_refused():
    c = make_case([40, 9], 4, 2, 64, 16, 8, torch.float32)
    q = torch.randn(2, 4, 64)
    with pytest.raises(ValueError, match="index capacity=8 is smaller than this step's selection width=12"):
        ops.select_topk(q, c.cache, c.block_table, c.seq_lens, torch.tensor([12, 12]), 0.1, P(), capacity=8)


def test_whole_pages_take_the_compacted_route_only_when_a_page_is_a_block():
    page_is_block = make_case([40], 4, 2, 64, 16, 16, torch.float32).cache
    two_pages_a_block = make_case([40], 4, 2, 64, 16, 8, torch.float32).cache
    assert ops.compacted_route(P("exact_pages"), page_is_block) and ops.compacted_route(P("quest"), page_is_block)
    assert not ops.compacted_route(P("exact_pages"), two_pages_a_block)
    assert not ops.compacted_route(P("token"), page_is_block) and not ops.compacted_route(P("recent"), page_is_block)


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    c = make_case([5], 2, 2, 64, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.write_kv(torch.randn(1, 2, 64), torch.randn(1, 2, 64), torch.tensor([5]), c.cache, force_triton=True)


def test_ops_imports_without_triton_and_kernels_never_import_vllm():
    root = str(Path(__file__).resolve().parents[2])
    code = f"""
import os, sys
sys.path.insert(0, {root!r})  # the kernels/ directory as a top-level package: works installed or not
sys.modules["triton"] = None  # import triton -> ImportError
import torch
from kernels import ops, PagedKVCache
c = PagedKVCache.allocate(2, 16, 2, 64, 16, torch.float32)
ops.write_kv(torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.tensor([0, 1, 2]), c)
del sys.modules["triton"]
os.environ["TRITON_INTERPRET"] = "1"
from kernels import (triton_common, triton_kv_write, triton_paged_attn, triton_ranking, triton_select,
                     triton_sparse_attn)
assert not [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")], "kernels imported vllm"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
