"""One layer's decode step on CPU, by design: which CPU path makes sparse decode cheaper than dense?

Times one attention layer's decode over a paged cache (default: SmolLM2's shape — 9 query / 3 KV
heads, head 64, bf16, 16-token pages — batch 16 at 7,000 tokens), same process, same data:

* ``dense (vLLM op)``: vLLM's fused CPU paged-attention op over the whole context — the stock
  backend's kernel, the baseline;
* ``reference token`` / ``reference quest``: the pure-torch reference (the plugin's CPU path
  before the fused one), exact token top-k and Quest's whole-page rule;
* ``torch.compile quest``: the same reference compiled by inductor's C++ backend (option c of the
  design choice);
* ``fused quest (vLLM op)``: page scores from the summaries, top-k, a compacted per-head block
  table, vLLM's op over it (option a — what the backend runs), plus its selection alone;
* ``fused exact_pages cfC [rR]``: the same with ``C`` × the budget's pages rescored by their
  exact max q·k (the ``exact_pages`` selection), or by q·k over the ``R`` dims of largest |q|
  (``rescore_dims``, SparQ's approximation).

Prints a table (median ms, speed-up over dense) and writes ``cpu_paths_block{N}.json`` + PNG::

    python benchmarks/cpu_paths.py --out benchmarks/results --block-size 32

``--layout amx`` (bf16, blocks of 32k, a CPU with AMX) stores K/V in vLLM's AMX packing and runs
every vLLM op with ISA ``amx`` — what the backend does where stock runs AMX; the torch-reference
rows, which need ``[block_size, head_size]`` key rows, are left out (``cpu_paths_block{N}_amx.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from vllm_sparse import cpu_attention as C
from vllm_sparse.config import SparseConfig
from vllm_sparse.kernels import PagedKVCache
from vllm_sparse.kernels import reference as R


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def make_cache(batch, context, num_kv_heads, head_size, block_size, dtype, seed, amx=False):
    torch.manual_seed(seed)
    nblk = -(-context // block_size)
    cache = PagedKVCache.allocate(batch * nblk + 1, block_size, num_kv_heads, head_size, block_size, dtype,
                                  key_transposed=not amx, fill=0.0, amx=amx)
    block_table = torch.randperm(batch * nblk).view(batch, nblk).int()
    for b in range(batch):  # through the real write path, so the page summaries are real
        pos = torch.arange(context)
        slots = block_table[b, pos // block_size].long() * block_size + pos % block_size
        k = torch.randn(context, num_kv_heads, head_size).to(dtype)
        C.write_kv(k, torch.randn_like(k), slots, cache)
    return cache, block_table


def layer_cost(args, cfg: SparseConfig) -> dict:
    """One layer's decode with ``cfg`` (fused path for quest/exact_pages, the torch reference otherwise)
    against vLLM's dense op, same cache and query. ``args``: batch, context, num_kv_heads, group,
    head_size, block_size, dtype, repeats, seed."""
    dtype = getattr(torch, args.dtype)
    b, n, h, g, d, bs = args.batch, args.context, args.num_kv_heads, args.group, args.head_size, args.block_size
    cache, bt = make_cache(b, n, h, d, bs, dtype, args.seed)
    seq = torch.full((b,), n)
    attended = cfg.attended(seq)
    q = torch.randn(b, h * g, d).to(dtype)
    scale, isa, out = d ** -0.5, C.cpu_isa(bs), torch.empty_like(q)
    qsl = torch.arange(b + 1, dtype=torch.int32)
    dense_md = C.scheduler_metadata(seq.int(), qsl, h * g, h, d, dtype, isa)
    dense = median_ms(lambda: C.attention(q, cache, bt, seq.int(), qsl, dense_md, scale, out), args.repeats)
    if cfg.selection in ("quest", "exact_pages"):
        plan = C.plan_decode(seq, attended, bt, block_size=bs, sink_tokens=cfg.sink_tokens,
                             local_window=cfg.local_window, num_heads=h * g, num_kv_heads=h, head_size=d,
                             dtype=dtype, isa=isa,
                             candidate_factor=cfg.candidate_factor if cfg.selection == "exact_pages" else 1.0,
                             rescore_dims=cfg.rescore_dims)
        ms = median_ms(lambda: C.sparse_decode(q, cache, plan, scale, out), args.repeats)
        tokens = plan.attended_tokens
    else:
        kw = dict(sink_tokens=cfg.sink_tokens, local_window=cfg.local_window, selection=cfg.selection,
                  candidate_factor=cfg.candidate_factor, rescore_dims=cfg.rescore_dims)
        ms = median_ms(lambda: R.sparse_decode(q, cache, bt, seq, attended, scale, **kw), max(3, args.repeats // 4))
        tokens = int(torch.minimum(attended, seq).sum())
    return dict(ms=ms, dense_ms=dense, speedup_vs_dense=dense / ms, attended_fraction=tokens / (b * n))


def run(args, k: float) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    cfg = SparseConfig(k=k, selection="quest", page_size=args.block_size)
    b, n, h, g, d, bs = args.batch, args.context, args.num_kv_heads, args.group, args.head_size, args.block_size
    cache, bt = make_cache(b, n, h, d, bs, dtype, args.seed, amx=args.layout == "amx")
    seq = torch.full((b,), n)
    attended = cfg.attended(seq)
    q = torch.randn(b, h * g, d).to(dtype)
    scale = d ** -0.5
    isa = C.cache_isa(cache)
    out = torch.empty_like(q)
    qsl = torch.arange(b + 1, dtype=torch.int32)
    dense_md = C.scheduler_metadata(seq.int(), qsl, h * g, h, d, dtype, isa)
    plan = C.plan_decode(seq, attended, bt, block_size=bs, sink_tokens=cfg.sink_tokens,
                         local_window=cfg.local_window, num_heads=h * g, num_kv_heads=h, head_size=d, dtype=dtype,
                         isa=isa)
    sel = dict(sink_tokens=cfg.sink_tokens, local_window=cfg.local_window)

    def ref(selection):
        return lambda: R.sparse_decode(q, cache, bt, seq, attended, scale, selection=selection, **sel)

    cases = {"dense (vLLM op)": lambda: C.attention(q, cache, bt, seq.int(), qsl, dense_md, scale, out)}
    if not cache.amx:
        cases["reference token"] = ref("token")
        cases["reference quest"] = ref("quest")
    if not args.no_compile and not cache.amx:
        compiled = torch.compile(R.sparse_decode, dynamic=False)
        cases["torch.compile quest"] = lambda: compiled(q, cache, bt, seq, attended, scale, selection="quest", **sel)
    cases["fused quest: selection only"] = lambda: C.select_pages(q, cache, plan)
    cases["fused quest (vLLM op)"] = lambda: C.sparse_decode(q, cache, plan, scale, out)
    for spec in args.rescore:
        cf, r = (float(x) for x in spec.split(":"))
        exact = C.plan_decode(seq, attended, bt, block_size=bs, sink_tokens=cfg.sink_tokens,
                              local_window=cfg.local_window, num_heads=h * g, num_kv_heads=h, head_size=d,
                              dtype=dtype, isa=isa, candidate_factor=cf, rescore_dims=int(r))
        name = f"fused exact_pages cf{cf:g}" + (f" r{int(r)}" if 0 < r < d else "")
        cases[f"{name}: selection"] = (lambda p: lambda: C.select_pages(q, cache, p))(exact)
        cases[f"{name} (vLLM op)"] = (lambda p: lambda: C.sparse_decode(q, cache, p, scale, out))(exact)
    rows = []
    for name, fn in cases.items():
        ms = median_ms(fn, args.repeats)
        rows.append(dict(path=name, k=k, ms=ms, attended_tokens=plan.attended_tokens // b))
        print(f"  k={k:<4g} {name:<40}{ms:9.2f} ms", flush=True)
    base = rows[0]["ms"]
    for r in rows:
        r["speedup_vs_dense"] = base / r["ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=7000)
    ap.add_argument("--num-kv-heads", type=int, default=3)
    ap.add_argument("--group", type=int, default=3, help="query heads per KV head")
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16, help="KV block = page size")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--k", type=float, nargs="+", default=[8.0, 24.0], help="budget coefficients (alpha 0.5)")
    ap.add_argument("--rescore", nargs="+", default=["4:0", "4:16", "8:16", "8:8"],
                    help="exact_pages variants as CANDIDATE_FACTOR:RESCORE_DIMS (0: every dim)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--layout", choices=["vec", "amx"], default="vec",
                    help="K/V layout and vLLM ISA: vec (key-transposed) or amx (vLLM's AMX packing)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if args.layout == "amx" and C.cpu_isa(args.block_size, getattr(torch, args.dtype), args.head_size,
                                          amx_ok=True) != "amx":
        ap.error("--layout amx needs --dtype bfloat16, --block-size and --head-size multiples of 32, and AMX tiles")
    from decode_throughput import cpu_model  # same folder

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    rows = [r for k in args.k for r in run(args, k)]
    print(f"\n{'path':<30}{'k':>5}{'ms/layer':>10}{'vs dense':>10}")
    for r in rows:
        print(f"{r['path']:<30}{r['k']:>5g}{r['ms']:>10.2f}{r['speedup_vs_dense']:>9.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(vars(args), out=str(args.out), machine=cpu_model(), threads=torch.get_num_threads())
    stem = f"cpu_paths_block{args.block_size}" + ("_amx" if args.layout == "amx" else "")
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    width = 0.8 / len(args.k)
    for i, k in enumerate(args.k):
        ys = [next(r["ms"] for r in rows if r["path"] == p and r["k"] == k) for p in paths]
        ax.barh([j + i * width for j in range(len(paths))], ys, height=width, label=f"k={k:g}")
    ax.set_yticks([j + width * (len(args.k) - 1) / 2 for j in range(len(paths))], paths)
    ax.set_xscale("log")
    ax.set_xlabel("ms per layer (log)")
    ax.set_title(f"one layer's decode, batch {args.batch} × {args.context} tokens, {args.dtype}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)


if __name__ == "__main__":
    main()
