"""What Ada-KV's per-head budgets would cost in KV memory with eviction in vLLM's paged layout.

Ada-KV (Feng et al., 2024) gives a layer's total budget ``H × count`` to the best-scored tokens
across its KV heads, so heads keep unequal numbers of tokens. In vLLM's paged cache one KV block
holds the same token slots for **every** head of the layer: a layer whose heads keep
``count_h`` tokens needs ``max_h count_h`` slots per head to hold them, not the mean, and the
blocks freed are those of the *largest* head. The memory cost of Ada-KV in this layout is
therefore ``max_h count_h / count`` per layer (1.0 = free; H = one head takes everything).

This measures that ratio on real attention scores: SmolLM2-135M (3 KV heads, 30 layers) in vLLM
(CPU, float32) prefills one needle prompt with ``evict: "snapkv"`` / ``"h2o"`` and a ``keep`` larger
than the prompt (nothing is evicted; the per-token scores the workers keep in the KV blocks are
read back after the prompt: SnapKV's pooled votes of the last 32 prompt queries, in one prefill
chunk, and H2O's accumulated attention), then runs :class:`vllm_sparse.policies.AdaKVAllocator`
(the reference) over each layer's scores at several budgets.

Prints a table, writes ``adakv_cost.json`` and ``adakv_cost.png``::

    python benchmarks/adakv_cost.py --out benchmarks/out
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

BUDGETS = (256, 512, 1024, 2048)


def layer_scores(model: str, prompt_ids: list[int], evict: str) -> list:
    """Per layer ``[H, n]`` float32 scores the workers kept for the prompt's tokens."""
    import torch
    from vllm import LLM, SamplingParams

    from vllm_sparse.config import SparseConfig
    from vllm_sparse.kernels import PagedKVCache
    from vllm_sparse.kernels.layout import score_states

    n = len(prompt_ids)
    sparse = {"evict": evict, "evict_args": {"keep": 8192}, "dense_below": 100_000}
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=8192, enable_prefix_caching=False,
              max_num_batched_tokens=8192, attention_backend="CUSTOM", additional_config={"vllm_sparse": sparse})
    try:
        core = llm.llm_engine.engine_core.engine_core
        caches = core.model_executor.driver_worker.worker.model_runner.kv_caches
        pool = core.scheduler.kv_cache_manager.block_pool
        ids, get_new = [], pool.get_new_blocks

        def tracked(k, *a, **kw):  # one request: blocks are handed out in position order
            out = get_new(k, *a, **kw)
            ids.extend(b.block_id for b in out)
            return out

        pool.get_new_blocks = tracked
        # one generated token: H2O's state then includes the first decode query, SnapKV's does not change
        llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        cfg = SparseConfig.from_dict(sparse)
        bs = cfg.page_size
        out = []
        for kv in caches:
            h = kv.shape[1]
            rows = score_states(bs, kv.shape[-1] // 2, kv.dtype)
            cache = PagedKVCache.from_raw(kv, h, bs, key_transposed=True, score_rows=rows)
            blocks = torch.tensor(ids[: -(-n // bs)])
            s = cache.token_scores[blocks].permute(1, 0, 2).reshape(h, -1)[:, :n].clone()
            out.append(s)
        return out
    finally:
        del llm
        gc.collect()


def costs(scores: list, budgets, sink_tokens: int = 4, local_window: int = 64) -> dict:
    """For each budget: per-layer ``max_h count_h / count`` and the per-head counts."""
    import torch

    from vllm_sparse.policies import AdaKVAllocator

    alloc = AdaKVAllocator()
    res = {}
    for budget in budgets:
        ratios, counts = [], []
        for s in scores:
            h, n = s.shape
            pos = torch.arange(n)
            forced = ((pos < sink_tokens) | (pos >= n - local_window))[None].expand(h, n)
            finite = torch.nan_to_num(s.float(), posinf=0.0)  # SnapKV's window (+inf) is forced anyway
            c = alloc.counts(finite, forced, budget)
            assert int(c.sum()) == h * budget  # the total is Ada-KV's invariant
            counts.append(c.tolist())
            ratios.append(float(c.max()) / budget)
        res[budget] = dict(ratio_per_layer=ratios, counts_per_layer=counts,
                           mean_ratio=sum(ratios) / len(ratios), max_ratio=max(ratios),
                           memory_ratio=sum(max(c) for c in counts) / (budget * len(counts)))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=7000, help="prompt tokens (a needle prompt)")
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from decode_throughput import cpu_model
    from vllm_sparse.assets import data
    from vllm_sparse.assets.models import prepare_model

    model = str(prepare_model("smollm2"))
    tok = AutoTokenizer.from_pretrained(model)
    (case,) = [c for c in data.needle_prompts(tok) if c.length == args.length and c.depth == 0.5]
    ids = tok(case.prompt, add_special_tokens=False)["input_ids"]
    rows = {}
    for evict in ("snapkv", "h2o"):
        rows[evict] = costs(layer_scores(model, ids, evict), args.budgets)
    head = f"{'scores':<8}{'budget':>7}{'memory ×':>10}{'worst layer ×':>15}{'layers > 1.5×':>15}"
    print(f"\n{len(ids)}-token prompt, SmolLM2 (3 KV heads × 30 layers)\n" + head + "\n" + "-" * len(head))
    for evict, by_budget in rows.items():
        for b, r in by_budget.items():
            over = sum(x > 1.5 for x in r["ratio_per_layer"])
            print(f"{evict:<8}{b:>7}{r['memory_ratio']:>10.2f}{r['max_ratio']:>15.2f}{over:>15}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=cpu_model(), cpus=os.cpu_count(), model="SmolLM2-135M-Instruct float32, 3 KV heads",
                prompt_tokens=len(ids), needle_depth=case.depth,
                memory_ratio="sum over layers of max_h count_h / (layers x budget): KV memory Ada-KV needs "
                             "in a layout where one block holds every head, relative to equal per-head budgets")
    (args.out / "adakv_cost.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for evict, by_budget in rows.items():
        for b in (min(args.budgets), max(args.budgets)):
            ax.plot(by_budget[b]["ratio_per_layer"], "o-", ms=3, label=f"{evict} scores, budget {b}")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set(xlabel="layer", ylabel="max_h count_h / budget",
           title=f"Ada-KV per-head counts: KV slots per head needed ({len(ids)} tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "adakv_cost.png", dpi=120)


if __name__ == "__main__":
    main()
