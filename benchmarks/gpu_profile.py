"""Where one layer's eager decode step spends its time on a GPU: torch.profiler over 10 steps.

Prints, for ``quest``, ``exact_pages`` (candidate factor 4, 16 rescored dims) and dense, the ops by
host time and the kernel launches / copies / syncs per step, on ``benchmarks/kernels.py``'s cache
(32 query / 8 KV heads, head 128, bf16, random K/V, k = 8, alpha = 0.5):

    python benchmarks/gpu_profile.py 32768 16      # context, batch (GPU machine, no vLLM needed)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as K
K._import_package()
import torch
from torch.profiler import profile, ProfilerActivity
from vllm_sparse.kernels import ops
from vllm_sparse.policies.budget import n_alpha_budget, attended_tokens

n, b = int(sys.argv[1]), int(sys.argv[2])
args = K.parse_args(["--contexts", str(n), "--batches", str(b)])
dev = torch.device("cuda")
cache, bt = K.build_cache(args, n, b, dev, torch.bfloat16)
seq = torch.full((b,), n, dtype=torch.int32, device=dev)
att_n = attended_tokens(n, n_alpha_budget(n, 8.0, 0.5, 256), 4, 64)
att = torch.full((b,), att_n, dtype=torch.int32, device=dev)
q = torch.randn(b, 32, 128, device=dev).to(torch.bfloat16)
out = torch.empty_like(q)
from vllm_sparse.kernels.selection import index_capacity
for sel, cf in (("quest", 1.0), ("exact_pages", 4.0), ("dense", 0)):
    if sel == "dense":
        step = lambda: ops.dense_decode(q, cache, bt, seq, 128**-0.5, out=out, max_seq_len=n)
    else:
        cap = index_capacity(sel, att_n, 16, 4, 64)
        kw = dict(sink_tokens=4, local_window=64, selection=sel, candidate_factor=cf, rescore_dims=16 if sel == "exact_pages" else 0)
        step = lambda: ops.sparse_decode(q, cache, bt, seq, att, 128**-0.5, out=out, capacity=cap, max_seq_len=n, **kw)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(f"===== {sel} ctx={n} B={b}")
    print(ka.table(sort_by="cpu_time_total", row_limit=45, max_name_column_width=60))
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    syncs = {e.key: e.count for e in ka if "Synchronize" in e.key or "Memcpy" in e.key}
    print("launches/step", launches / 10, "syncs", syncs)
