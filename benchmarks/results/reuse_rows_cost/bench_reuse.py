"""Per-layer cost of select_or_reuse's row handling: torch ops (reuse_rows_reference) vs the C++ reuse_rows."""
import sys, time
import torch
from vllm_sparse.kernels import cpu_ext
from vllm_sparse import cpu_attention as C

dtype = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float32
torch.set_num_threads(1)
b, h, g, d, width = 16, 3, 3, 64, 52
n = b * h
q = torch.randn(b, h * g, d).to(dtype)
prev_table = torch.randint(0, 10000, (n, width), dtype=torch.int32)
rows = torch.arange(n)
keep = torch.rand(n) < 0.9
at = torch.zeros(n, width, dtype=torch.bool); at[:3, -1] = True
new = torch.randint(0, 10000, (n,), dtype=torch.int32)
prev_ref = torch.nn.functional.normalize(q.float().reshape(n, -1) + 0.3 * torch.randn(n, g * d), dim=1)
ext = cpu_ext.load()
def ref():
    return C.reuse_rows_reference(q, h, prev_table, rows, keep, width, (at, new[:, None]), prev_ref, 0.9, True)
def cpp():
    return ext.reuse_rows(q, h, prev_table, rows, keep, width, at, new, prev_ref, 0.9, True)
for f in (ref, cpp):
    for _ in range(200): f()
res = {}
for rnd in range(5):
    for name, f in (("torch", ref), ("c++", cpp)):
        t = time.perf_counter()
        for _ in range(2000): f()
        res.setdefault(name, []).append((time.perf_counter() - t) / 2000 * 1e6)
for k, v in res.items():
    print(f"{k:6s} median {sorted(v)[2]:7.1f} us per layer call  ({', '.join(f'{x:.1f}' for x in v)})")
print(f"30 layers: {30 * (sorted(res['torch'])[2] - sorted(res['c++'])[2]) / 1000:.2f} ms saved per decode step")
