"""Every policy that runs inside vLLM, at fixed budgets: retrieval, KV blocks held, batch that fits, step time.

For each (policy, budget) — ``dense`` once; ``topk`` (exact ``q·k`` pages, the default
selection), ``quest``, ``streaming`` as selection (all tokens stay resident) and ``streaming``
with eviction (``evict``: only sinks + the kept tail stay resident), and ``knorm`` / ``h2o``
eviction (sinks + a region of the lowest-key-norm / most-attended tokens + the window stay
resident) at budgets of 256, 512, 1024
and 2048 tokens — it runs the 12-prompt needle set of the tests (1k/2k/4k/7k tokens × depths
10/50/90%) through real vLLM (SmolLM2, greedy, one batch) and reports:

* **needles**: exact-match retrieval, by context length;
* **peak KV blocks**: the most blocks vLLM's pool had in use during the batch;
* **batch at 7k**: how many 7,000-token requests fit in a 2,560-token pool (80 blocks × 32) by
  the per-request bound vLLM admits with (a whole request for resident policies; sinks + kept
  region + kept tail + two 512-token chunks in flight with eviction);
* **wall**: seconds for the whole batch (prefill + 16 tokens each), and dense's time over it —
  a coarse cost figure: per-step decode speed of the selections is ``decode_throughput.py``'s.

``snapkv`` eviction (``snapkv-evict``) keeps the region by the votes of each prefill chunk's
last 32 queries. Prints a table, writes ``policies.json`` and ``policies.png`` (accuracy vs
budget per policy); ``--merge`` replaces only this run's policies in an existing
``policies.json`` (each row keeps its ``wall_vs_dense`` from its own run's dense baseline)::

    python benchmarks/policies.py --out benchmarks/out
    python benchmarks/policies.py --policies snapkv-evict --merge --out benchmarks/out
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

BUDGETS = (256, 512, 1024, 2048)
POOL_TOKENS, BLOCK = 2560, 32


def settings_for(policy: str, budget: int | None) -> dict:
    if policy == "dense":
        return {"policy": "dense"}
    if policy == "streaming-evict":
        return {"policy": "streaming", "policy_args": {"budget_tokens": budget}, "evict": "streaming",
                "evict_args": {"keep": max(budget, 36)}, "dense_below": 0}
    if policy in ("knorm-evict", "h2o-evict", "tova-evict", "snapkv-evict"):  # keep `budget` tokens resident (sinks, scored region, window)
        return {"policy": "dense", "evict": policy[:-6], "evict_args": {"keep": budget}}
    return {"policy": policy, "policy_args": {"budget_tokens": budget}, "dense_below": 0}


def per_request_blocks(settings: dict, length: int = 7016, in_flight: int = 1024) -> int:
    """Blocks one ``length``-token request holds at most (what admission reserves)."""
    from vllm_sparse.config import SparseConfig

    rule = SparseConfig.from_dict(settings).eviction_rule()
    full = -(-length // BLOCK)
    return full if rule is None else rule.max_resident_blocks(length, in_flight)


def run(model: str, settings: dict, cases, chunk: int, dtype: str = "bfloat16") -> dict:
    import time

    from vllm import LLM, SamplingParams

    from vllm_sparse.assets import data

    kw = dict(model=model, max_model_len=8192, enforce_eager=True, dtype=dtype, seed=0,
              enable_prefix_caching=False, max_num_batched_tokens=chunk, attention_backend="CUSTOM",
              additional_config={"vllm_sparse": settings})
    llm = LLM(**kw)
    try:
        core = llm.llm_engine.engine_core.engine_core
        pool = core.scheduler.kv_cache_manager.block_pool
        total = pool.num_gpu_blocks - 1
        low = [pool.get_num_free_blocks()]
        get_new = pool.get_new_blocks

        def tracked(n, *a, **k):
            out = get_new(n, *a, **k)
            low.append(pool.get_num_free_blocks())
            return out

        pool.get_new_blocks = tracked
        t = time.perf_counter()
        outs = llm.generate([c.prompt for c in cases], SamplingParams(max_tokens=16, temperature=0.0),
                            use_tqdm=True)
        wall = time.perf_counter() - t
    finally:
        del llm
        gc.collect()
    hits = [data.retrieved(c, o.outputs[0].text) for c, o in zip(cases, outs)]
    by_len = {}
    for c, h in zip(cases, hits):
        by_len.setdefault(str(c.length), []).append(h)
    return dict(needles=sum(hits), needles_total=len(hits), hits=hits,
                by_length={k: sum(v) for k, v in by_len.items()},
                peak_blocks=total - min(low), blocks_per_7k_request=per_request_blocks(settings),
                batch_at_7k=(POOL_TOKENS // BLOCK - 1) // per_request_blocks(settings), wall_s=wall)


def plot(rows: list[dict], path: Path) -> None:
    """Needle retrieval vs budget, one line per policy, dense dashed (``python -c`` re-plots a JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "dense"):
        pts = [(r["budget"], r["needles"] / r["needles_total"]) for r in rows if r["policy"] == policy]
        ax.plot(*zip(*pts), "o-", label=policy)
    dense = next(r for r in rows if r["policy"] == "dense")
    ax.axhline(dense["needles"] / dense["needles_total"], color="k", ls="--", label="dense")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="budget (tokens per KV head)", ylabel="needle retrieval (12 prompts, 1k-7k)",
           title="accuracy vs budget, SmolLM2-135M in vLLM (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from vllm_sparse.cpu_tuning import model_dtype

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=["topk", "quest", "streaming", "streaming-evict", "knorm-evict", "h2o-evict"])
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    ap.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens (chunked prefill)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the other policies' rows of an existing policies.json in --out")
    ap.add_argument("--dtype", default=model_dtype(), help="model dtype (default here: %(default)s; see cpu_tuning.py)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from decode_throughput import cpu_model
    from vllm_sparse.assets import data
    from vllm_sparse.assets.models import prepare_model

    model = str(prepare_model("smollm2"))
    cases = data.needle_prompts(AutoTokenizer.from_pretrained(model))
    rows = [dict(policy="dense", budget=None, settings=settings_for("dense", None),
                 **run(model, settings_for("dense", None), cases, args.chunk, args.dtype))]
    print(f"dense: {rows[0]['needles']}/12", flush=True)
    for policy in args.policies:
        for b in args.budgets:
            st = settings_for(policy, b)
            rows.append(dict(policy=policy, budget=b, settings=st, **run(model, st, cases, args.chunk, args.dtype)))
            print(f"{policy} @ {b}: {rows[-1]['needles']}/12", flush=True)
    dense_s = rows[0]["wall_s"]
    head = (f"{'policy':<17}{'budget':>7}{'needles':>9}  {'1k/2k/4k/7k':<13}{'peak blocks':>12}{'batch@7k':>9}"
            f"{'wall s':>8}{'vs dense':>9}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        bl = "/".join(str(v) for _, v in sorted(r["by_length"].items(), key=lambda kv: int(kv[0])))
        r["wall_vs_dense"] = dense_s / r["wall_s"]
        print(f"{r['policy']:<17}{str(r['budget'] or '-'):>7}{r['needles']:>6}/12  {bl:<13}{r['peak_blocks']:>12}"
              f"{r['batch_at_7k']:>9}{r['wall_s']:>8.1f}{r['wall_vs_dense']:>8.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=cpu_model(), cpus=os.cpu_count(), model=f"SmolLM2-135M-Instruct {args.dtype}",
                needles="12 prompts: 1k/2k/4k/7k tokens x depths 10/50/90%, one batch, greedy",
                pool=f"batch_at_7k: 7,000-token requests fitting {POOL_TOKENS} tokens ({BLOCK}-token blocks)")
    path = args.out / "policies.json"
    if args.merge and path.exists():  # the file's dense row stays; this run's dense goes into each new row
        old = json.loads(path.read_text())
        kept = [r for r in old["rows"] if r["policy"] not in set(args.policies)]
        dense_here = {k: rows[0][k] for k in ("needles", "peak_blocks", "wall_s")}
        for r in rows[1:]:
            r["dense_in_this_run"] = dense_here
        meta["runs"] = old["meta"].get("runs", [old["meta"].get("machine")]) + [f"{meta['machine']}: {args.policies}"]
        rows = kept + rows[1:]
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))

    plot(rows, args.out / "policies.png")


if __name__ == "__main__":
    main()
