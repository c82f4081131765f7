"""The speed × accuracy front of the selection settings: what the default is chosen from.

For every setting (``name=SETTINGS_JSON``; ``stock`` = vLLM's dense backend):

* **accuracy** with the real model through real vLLM (offline ``LLM.generate``, greedy): the
  12-prompt needle set of ``tests/`` (1k–7k tokens, depths 10/50/90%) and a multi-key lookup
  (``vllm_sparse.assets.data.multikey_prompts``: 4 key→number sentences at random depths, one asked
  for, at 4k and 7.7k tokens), exact match on the number;
* **speed**: one layer's sparse decode step against vLLM's fused CPU kernel over the whole
  context (``benchmarks/cpu_paths.py``'s measurement, SmolLM2's shape, batch 16 at 7,000
  tokens, same process) — the part of the step the plugin changes. End-to-end step times for
  the chosen settings come from ``benchmarks/decode_throughput.py``.

Prints a table, writes ``front.json`` and ``front.png`` (accuracy vs speed-up)::

    python benchmarks/front.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

DEFAULT_SETTINGS = [
    "stock",
    'token-k8={"selection": "token"}',
    'page-cf2-k8={"selection": "page", "candidate_factor": 2}',
    'quest-k8={"selection": "quest"}',
    'quest-k16={"selection": "quest", "k": 16}',
    'quest-k24={"selection": "quest", "k": 24}',
    'quest-k32={"selection": "quest", "k": 32}',
    'exact-cf2-k8={"selection": "exact_pages", "candidate_factor": 2, "rescore_dims": 0}',
    'exact-cf4-k4={"selection": "exact_pages", "candidate_factor": 4, "k": 4, "rescore_dims": 0}',
    'exact-cf4-k8={"selection": "exact_pages", "candidate_factor": 4, "rescore_dims": 0}',
    'exact-cf4-r16={"rescore_dims": 16}',
    'exact-cf4-r32={"rescore_dims": 32}',
    'exact-cf8-r16={"rescore_dims": 16, "candidate_factor": 8}',
    'exact-cf8-r8={"rescore_dims": 8, "candidate_factor": 8}',
]


def accuracy(model: str, settings: dict | None, needles, multikey, dtype: str = "bfloat16") -> dict:
    from vllm import LLM, SamplingParams

    from vllm_sparse.assets import data

    kw = dict(model=model, max_model_len=8192, enforce_eager=True, dtype=dtype, seed=0)
    if settings is not None:
        kw.update(attention_backend="CUSTOM", additional_config={"vllm_sparse": settings})
    llm = LLM(**kw)
    try:
        prompts = [c.prompt for c in needles + multikey]
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=True)
    finally:
        del llm
        gc.collect()
    texts = [o.outputs[0].text for o in outs]
    hits_n = [data.retrieved(c, t) for c, t in zip(needles, texts[: len(needles)])]
    hits_m = [data.retrieved(c, t) for c, t in zip(multikey, texts[len(needles):])]
    return dict(needles=sum(hits_n), needles_total=len(needles), needle_hits=hits_n,
                multikey=sum(hits_m), multikey_total=len(multikey),
                multikey_by_length={str(n): sum(h for c, h in zip(multikey, hits_m) if c.length == n)
                                    for n in sorted({c.length for c in multikey})})


def layer_speed(settings: dict | None, args) -> dict | None:
    """Per-layer decode cost at batch × context vs vLLM's dense op (None for stock / non-fused settings)."""
    if settings is None:
        return None
    from types import SimpleNamespace

    import cpu_paths  # same folder
    from vllm_sparse.config import SparseConfig

    cfg = SparseConfig(**settings)
    ns = SimpleNamespace(batch=args.batch, context=args.context, num_kv_heads=3, group=3, head_size=64,
                         block_size=cfg.page_size, dtype=args.dtype, repeats=10, seed=0)
    return cpu_paths.layer_cost(ns, cfg)


def main() -> None:
    from vllm_sparse.cpu_tuning import model_dtype

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    ap.add_argument("--multikey-per-length", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=7000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--dtype", default=model_dtype(), help="model dtype (default here: %(default)s; see cpu_tuning.py)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from decode_throughput import cpu_model, parse_backend
    from vllm_sparse.assets import data
    from vllm_sparse.assets.models import prepare_model

    model = str(prepare_model("smollm2"))
    tok = AutoTokenizer.from_pretrained(model)
    needles = data.needle_prompts(tok)
    multikey = data.multikey_prompts(tok, lengths=(4096, 7700), cases_per_length=args.multikey_per_length)
    rows = []
    for spec in args.settings:
        name, settings = parse_backend(spec)
        print(f"{name}: {settings if settings is not None else 'vLLM stock backend'}", flush=True)
        row = dict(name=name, settings=settings, **accuracy(model, settings, needles, multikey, args.dtype))
        row["layer"] = layer_speed(settings, args)
        rows.append(row)
        print(f"  needles {row['needles']}/{row['needles_total']}, multi-key {row['multikey']}/{row['multikey_total']}"
              + (f", layer {row['layer']['speedup_vs_dense']:.2f}x dense" if row["layer"] else ""), flush=True)

    print(f"\n{'setting':<16}{'needles':>9}{'multi-key':>11}{'attended':>10}{'layer vs dense':>16}")
    for r in rows:
        lay = r["layer"]
        att = f"{lay['attended_fraction']:.0%}" if lay else "100%"
        sp = f"{lay['speedup_vs_dense']:.2f}x" if lay else "1.00x"
        print(f"{r['name']:<16}{r['needles']:>6}/{r['needles_total']:<2}{r['multikey']:>8}/{r['multikey_total']:<2}"
              f"{att:>10}{sp:>16}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=cpu_model(), cpus=os.cpu_count(), model=f"SmolLM2-135M-Instruct {args.dtype}",
                speed=f"one layer's decode step, batch {args.batch} x {args.context} tokens, vs vLLM's dense CPU op")
    (args.out / "front.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))

    plot(rows, args.out / "front.png", args.batch, args.context)


def plot(rows, path: Path, batch: int, context: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x = r["layer"]["speedup_vs_dense"] if r["layer"] else 1.0
        y = (r["needles"] + r["multikey"]) / (r["needles_total"] + r["multikey_total"])
        ax.scatter(x, y)
        ax.annotate(r["name"], (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel=f"decode speed-up of one layer's attention vs dense (batch {batch} × {context})",
           ylabel="retrieval accuracy (needles + multi-key)", title="speed × accuracy, SmolLM2-135M, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
