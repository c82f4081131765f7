"""Same-process A/B of quest_select variants on real SmolLM2 decode data (16 x ctx essays)."""
import os, sys, time, statistics
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/q/ext")
from pathlib import Path
import torch
from torch.utils import cpp_extension
variants = {}
for name, src in [a.split("=") for a in sys.argv[2:]]:
    variants[name] = cpp_extension.load(name=f"ab_{name}", sources=[src], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                        extra_ldflags=["-fopenmp"], verbose=False)
import vllm_sparse.cpu_attention as C
orig = C.select_pages
times = {}
for n in variants: times[n] = []
resc = []
state = {"calls": 0}
def hooked(query, cache, plan, table=None, keep=None, rescored=None):
    out = orig(query, cache, plan, table, keep) if rescored is None else orig(query, cache, plan, table, keep, rescored)
    if query.shape[0] == 16:
        state["calls"] += 1
        if 60 < state["calls"] <= 120:  # decode steps 3-4, every layer
            t = torch.empty_like(out)
            args = (query, cache.slot_rows, C._summary_offset(cache), plan.block_table, plan.seq, plan.count, plan.candidates,
                    plan.forced_lo, plan.forced_hi, cache.block_size, plan.rescore_dims, cache.amx, t)
            qargs = list(args); qargs[6] = plan.count
            for rep in range(3):
                for n, ext in variants.items():
                    t0 = time.perf_counter(); ext.quest_select(*args); times[n].append(time.perf_counter() - t0)
                    t0 = time.perf_counter(); ext.quest_select(*qargs); times.setdefault(n + "_quest_only", []).append(time.perf_counter() - t0)
            if False:
                r = torch.zeros(t.shape[0], dtype=torch.long)
                variants["new"].quest_select(*args, None, r); resc.append((int(r.sum()), int(plan.candidates.sum()) * cache.num_kv_heads))
    return out
C.select_pages = hooked
sys.path.insert(0, "/work/main/tests/vllm_sparse")
from llm_utils import generate_once, essay_ids
model = Path.home() / ".cache/vllm-sparse/models/smollm2"
n = int(sys.argv[1])
prompts = [{"prompt_token_ids": essay_ids(model, n, start=i * 8000)} for i in range(16)]
generate_once(model, prompts, sparse={}, max_tokens=48, dtype="bfloat16", gpu_memory_utilization=0.5)
for name, ts in times.items():
    print(f"AB {name}: median {1e3*statistics.median(ts):.3f} ms, mean {1e3*statistics.mean(ts):.3f} ms per layer call (n={len(ts)})")
if resc:
    print(f"AB rescored {sum(a for a,_ in resc)} of {sum(b for _,b in resc)} candidates")
