"""Decode-step kernel benchmark: sparse (k·n^α budget) vs dense attention over the same paged cache.

For every (context n, batch B) it builds one paged cache (random bf16 K/V, exact page
min/max), then times with ``triton.testing.do_bench`` (median, L2 flushed between runs):

* dense baselines: vLLM's Triton ``unified_attention`` when vLLM is importable, our split-K
  dense decode kernel, and torch SDPA on a gathered (contiguous) copy of the cache;
* the sparse decode step (``select_topk`` + ``sparse_attention``) for page selection (one
  variant per ``--candidate-factors`` entry) and token selection, eager and replayed from a
  CUDA graph, split into scoring (Triton kernels), top-k selection (torch.topk/sort) and
  attention;
* for the whole-page selections (``quest``, ``exact_pages``; page = block) also the route the
  vLLM backend takes: the chosen pages as compacted per-head block tables walked by our split-K
  kernel (``ops.table_decode``), and the same tables through vLLM's ``unified_attention`` over
  one-head blocks where vLLM is importable — the comparison that picks the GPU decode kernel.

Budget: ``attended_tokens(n, n_alpha_budget(n, k, alpha, min_budget), sink, window)``. Bytes
moved are the minimum traffic of each step (each input row read once, :func:`traffic`);
achieved bandwidth is reported as a fraction of a device-to-device copy measured in the same
run. ``floor_x`` is dense bytes / sparse bytes: the speed-up a step could reach if sparse and
dense both ran at the same bandwidth — no kernel tuning gets much past it. Prints a table,
writes ``kernels.json`` and ``kernels.png`` into ``--out``.

    python benchmarks/kernels.py --out benchmarks/out          # GPU
    python benchmarks/kernels.py --floor --out benchmarks/out   # byte floors only, no device
    python benchmarks/kernels.py --dry-run --out /tmp/bench         # tiny config, Triton interpreter, CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_package():
    """``vllm_sparse.kernels`` / ``.policies``, installed or straight from this checkout (the GPU machine)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from vllm_sparse.checkout import use_checkout_packages

    use_checkout_packages(ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), help="directory for JSON + PNG")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--k", type=float, default=8.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--min-budget", type=int, default=256)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--local-window", type=int, default=64)
    p.add_argument("--candidate-factors", type=float, nargs="+", default=[4.0, 2.0],
                   help="page selection: one variant per candidate factor; the first also for exact_pages (the plugin's default is 8)")
    p.add_argument("--selections", nargs="+", default=["page", "quest", "exact_pages", "token"],
                   choices=["page", "quest", "exact_pages", "token"])
    p.add_argument("--rescore-dims", type=int, default=16,
                   help="exact_pages: dims of the rescoring query (the plugin's default 12; 0 = all)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny config on CPU under the Triton interpreter: proves the script runs")
    p.add_argument("--floor", action="store_true",
                   help="no timing, no device: bytes each step must move and the speed-up they allow")
    args = p.parse_args(argv)
    args.variants = [(f"page_cf{cf:g}", "page", cf) for cf in args.candidate_factors if "page" in args.selections]
    args.variants += [(sel, sel, args.candidate_factors[0]) for sel in ("quest", "exact_pages", "token")
                      if sel in args.selections]
    if args.dry_run:
        args.contexts, args.batches = [200], [2]
        args.num_heads, args.num_kv_heads, args.head_size = 4, 2, 64
        args.min_budget, args.local_window, args.page_size = 32, 16, 16  # page = block: the compacted route too
    return args


class Timer:
    """Median milliseconds: ``do_bench`` on CUDA, a few host-timed calls in dry-run."""

    def __init__(self, cuda: bool, rep_ms: int):
        self.cuda, self.rep_ms = cuda, rep_ms

    def __call__(self, fn) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=self.rep_ms, return_mode="median"))
        fn()
        ts = []
        for _ in range(2):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return sorted(ts)[len(ts) // 2]


def copy_bandwidth(timer: Timer, device, nbytes: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x))
    return 2 * nbytes / (ms * 1e-3)


def build_cache(args, n: int, batch: int, device, dtype):
    """Random K/V for ``batch`` requests of ``n`` tokens in shuffled blocks, exact page min/max."""
    import torch

    from vllm_sparse.kernels import PagedKVCache

    bs, ps = args.block_size, args.page_size
    nblk = -(-n // bs)
    cache = PagedKVCache.allocate(batch * nblk, bs, args.num_kv_heads, args.head_size, ps, dtype, device)
    ppb = bs // ps
    step = max(1, (1 << 28) // (bs * args.num_kv_heads * args.head_size * 4))  # blocks per chunk (~1 GiB fp32)
    for lo in range(0, cache.num_blocks, step):
        sl = slice(lo, min(lo + step, cache.num_blocks))
        cache.key_cache[sl].normal_()
        cache.value_cache[sl].normal_()
        pages = cache.key_cache[sl].unflatten(1, (ppb, ps))  # [nb, ppb, ps, H, D]
        cache.key_min[sl] = pages.amin(2)
        cache.key_max[sl] = pages.amax(2)
    block_table = torch.randperm(batch * nblk, device=device).view(batch, nblk).to(torch.int32)
    return cache, block_table


def _vllm_unified_attention():
    """vLLM's Triton ``unified_attention`` and where it came from, or ``(None, why not)``. On the lent
    GPU machine (no vLLM) ``PYTHONPATH`` may hold the kernel's source alone (``vllm_kernel_shim.py``)."""
    try:
        import vllm
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except Exception as e:  # noqa: BLE001 - any import failure means "no vLLM baseline"
        return None, f"{type(e).__name__}: {e}"[:200]
    shim = getattr(vllm, "SHIM", None)
    return unified_attention, f"vLLM {vllm.__version__} unified_attention" + (f", {shim}" if shim else "")


def run_config(args, n: int, batch: int, timer: Timer, device, dtype, force: dict, unified) -> dict:
    import torch
    import torch.nn.functional as F

    from vllm_sparse.kernels import ops
    from vllm_sparse.kernels import reference as R
    from vllm_sparse.kernels.selection import candidate_capacity, candidate_pages
    from vllm_sparse.kernels.selectors import SelectInputs, SelectParams
    from vllm_sparse.kernels.triton_ranking import page_scores_triton, token_scores_triton
    from vllm_sparse.policies.budget import n_alpha_budget

    h, hkv, d = args.num_heads, args.num_kv_heads, args.head_size
    esz = torch.tensor([], dtype=dtype).element_size()
    cuda = device.type == "cuda"
    row = dict(context=n, batch=batch, budget=n_alpha_budget(n, args.k, args.alpha, args.min_budget),
               **traffic(args, n, batch, esz))
    att, kv_bytes = row["attended"], row["dense_bytes"]
    token_scores_bytes = 3 * batch * hkv * n * 4
    if cuda:
        free = torch.cuda.mem_get_info(device)[0]
        cache_bytes = kv_bytes * (1 + 0.5 * (-(-hkv // args.page_size)) / hkv) + (1 << 30)
        if cache_bytes + token_scores_bytes > 0.85 * free:
            row["skipped"] = f"needs ~{(cache_bytes + token_scores_bytes) / 2**30:.1f} GiB, {free / 2**30:.1f} free"
            return row
    cache, bt = build_cache(args, n, batch, device, dtype)
    seq_lens = torch.full((batch,), n, dtype=torch.int32, device=device)
    attended = torch.full((batch,), att, dtype=torch.int32, device=device)
    q = torch.randn(batch, h, d, device=device).to(dtype)
    scale = d**-0.5
    out = torch.empty_like(q)
    t = {}

    # -- dense baselines --------------------------------------------------------------------
    t["dense_ours"] = timer(lambda: ops.dense_decode(q, cache, bt, seq_lens, scale, out=out, max_seq_len=n, **force))
    dense_out = out.clone()
    if unified is not None:
        from vllm_sparse.gpu_attention import unified_split_kwargs

        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
        o_v = torch.empty_like(q)
        split = unified_split_kwargs(batch, h, hkv, d, device)  # as vLLM's Triton backend decodes

        def vllm_dense():
            unified(q=q, k=cache.key_cache, v=cache.value_cache, out=o_v, cu_seqlens_q=cu_q, max_seqlen_q=1,
                    seqused_k=seq_lens, max_seqlen_k=n, softmax_scale=scale, causal=True, window_size=(-1, -1),
                    block_table=bt, softcap=0, q_descale=None, k_descale=None, v_descale=None, **split)

        try:
            t["dense_vllm"] = timer(vllm_dense)
            row["err_vllm_vs_ours"] = _rel(o_v, dense_out)
        except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, not fatal
            row["dense_vllm_error"] = f"{type(e).__name__}: {e}"[:200]
    # gathered K and V, plus one transient half-size copy while transposing
    sdpa_fits = not cuda or 1.5 * kv_bytes < 0.8 * torch.cuda.mem_get_info(device)[0]
    if sdpa_fits:
        def gathered(paged):  # [num_blocks, bs, Hkv, D] -> contiguous [B, Hkv, n, D]
            rows = paged[bt.long()].flatten(1, 2)[:, :n]  # [B, n, Hkv, D] copy
            return rows.transpose(1, 2).contiguous()

        k, v = gathered(cache.key_cache), gathered(cache.value_cache)
        q4 = q[:, :, None, :]  # [B, H, 1, D]
        t["dense_sdpa"] = timer(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True))
        row["err_sdpa_vs_ours"] = _rel(F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)[:, :, 0],
                                       dense_out)
        del k, v
    else:
        row["dense_sdpa_skipped"] = "gathered copy does not fit"
    dense_key = "dense_vllm" if "dense_vllm" in t else "dense_ours"
    row["dense_baseline"] = dense_key

    # -- sparse ----------------------------------------------------------------------------
    for name, sel, cf in args.variants:
        p = f"sparse_{name}"
        try:
            params = SelectParams.create(sel, "kv_head", args.sink_tokens, args.local_window, cf,
                                         args.rescore_dims if sel == "exact_pages" else 0)
            kw = dict(params=params)
            idx = torch.empty((batch, hkv, params.index_capacity(att, args.page_size)), dtype=torch.int32,
                              device=device)
            so = torch.empty_like(q)

            def step():
                ops.sparse_decode(q, cache, bt, seq_lens, attended, scale, out=so, indices_out=idx, max_seq_len=n,
                                  **kw, **force)

            t[p] = timer(step)
            t[p + "_select"] = timer(lambda: ops.select_topk(q, cache, bt, seq_lens, attended, scale, **kw, out=idx,
                                                             max_seq_len=n, **force))
            t[p + "_attn"] = timer(lambda: ops.sparse_attention(q, cache, bt, idx, scale, out=so, **force))
            sargs = (q, cache, bt, seq_lens, scale, params)
            if sel == "page":
                n_pages = -(-n // args.page_size)
                c_cap = candidate_capacity(n_pages, att, args.page_size, args.sink_tokens, args.local_window, cf)
                ub = page_scores_triton(*sargs, num_pages=n_pages)
                cand = candidate_pages(ub, seq_lens, attended.long(), args.page_size, args.sink_tokens,
                                       args.local_window, cf, c_cap)
                t[p + "_score"] = timer(lambda: (page_scores_triton(*sargs, num_pages=n_pages),
                                                 token_scores_triton(*sargs, cand=cand)))
            elif sel == "quest":
                t[p + "_score"] = timer(lambda: page_scores_triton(*sargs, num_pages=-(-n // args.page_size)))
            elif sel == "exact_pages":  # bounds, candidates, rescoring and the page top-k (all of the selection)
                x = SelectInputs.build(q, cache, bt, seq_lens, attended, scale, params, n, idx.shape[-1])
                t[p + "_score"] = timer(lambda: x.params.selector.pages_triton(x))
            else:
                t[p + "_score"] = timer(lambda: token_scores_triton(*sargs, num_slots=n))
            t[p + "_topk"] = max(t[p + "_select"] - t[p + "_score"], 0.0)
            if cuda and not args.no_graph:
                _time_graph(timer, step, t, row, p + "_graph")
            if ops.compacted_route(params, cache):
                _time_compacted(t, row, p, q, cache, bt, seq_lens, attended, scale, kw, idx.shape[-1], n, so, timer,
                                cuda and not args.no_graph, force, unified)
            # correctness spot check: the first request against the torch reference
            step()
            one = (q[:1], cache, bt[:1], seq_lens[:1])
            ref = R.sparse_decode(q[:1].float(), *one[1:], attended[:1], scale, **kw)
            row[p + "_err_vs_reference"] = _rel(so[:1], ref)
            row[p + "_approx_err_vs_dense"] = _rel(so, dense_out)  # sparsity error, not a bug check
        except Exception as e:  # noqa: BLE001 - a variant that fails (e.g. does not compile) is reported
            row[p + "_error"] = f"{type(e).__name__}: {e}"[:300]
            row[p + "_traceback"] = traceback.format_exc()
            print(row[p + "_traceback"], file=sys.stderr, flush=True)
            for key in [k for k in t if k == p or k.startswith(p + "_")]:
                del t[key]  # no partial timings of a failed variant
    if cuda and not args.no_graph:
        _time_graph(timer, lambda: ops.dense_decode(q, cache, bt, seq_lens, scale, out=out, max_seq_len=n), t, row,
                    "dense_ours_graph")

    row["times_ms"] = t
    for name, _, _ in args.variants:
        p = f"sparse_{name}"
        if p not in t:  # the variant failed: its error is in the row
            continue
        row[p + "_speedup"] = t[dense_key] / t[p]
        if p + "_tables" in t:
            row[p + "_tables_speedup"] = t[dense_key] / t[p + "_tables"]
        if p + "_graph" in t and "dense_ours_graph" in t:
            row[p + "_graph_speedup_vs_dense_ours_graph"] = t["dense_ours_graph"] / t[p + "_graph"]
    del cache, bt
    if cuda:
        torch.cuda.empty_cache()
    return row


def _time_graph(timer, step, t: dict, row: dict, key: str) -> None:
    """``t[key]``: ``step`` captured in a CUDA graph and replayed; a capture failure is reported in ``row``."""
    import torch

    try:
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        t[key] = timer(graph.replay)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        row[key + "_error"] = f"{type(e).__name__}: {e}"[:200]


def _time_compacted(t, row, p, q, cache, bt, seq_lens, attended, scale, kw, capacity, n, so, timer, graphs, force,
                    unified) -> None:
    """Whole pages over compacted block tables (the route ``ops.sparse_decode`` takes without an index
    buffer): the whole step, its attention by our split-K kernel over the tables, and — where vLLM
    is importable — the same attention by vLLM's ``unified_attention`` over one-head blocks."""
    import torch

    from vllm_sparse.kernels import ops
    from vllm_sparse.kernels import reference as R
    from vllm_sparse.kernels.triton_select import select_tables_triton

    def step():
        ops.sparse_decode(q, cache, bt, seq_lens, attended, scale, out=so, capacity=capacity, max_seq_len=n, **kw,
                          **force)

    t[p + "_tables"] = timer(step)
    tables, lens = select_tables_triton(q, cache, bt, seq_lens, attended, scale, **kw, capacity=capacity,
                                        max_seq_len=n)
    width = tables.shape[-1] * cache.block_size
    t[p + "_tables_select"] = timer(lambda: select_tables_triton(q, cache, bt, seq_lens, attended, scale, **kw,
                                                                 capacity=capacity, max_seq_len=n))
    t[p + "_tables_attn"] = timer(lambda: ops.table_decode(q, cache, tables, lens, scale, out=so, max_len=width,
                                                           **force))
    step()
    row[p + "_tables_err_vs_reference"] = _rel(so[:1], R.sparse_decode(q[:1].float(), cache, bt[:1], seq_lens[:1],
                                                                       attended[:1], scale, **kw))
    if graphs:
        _time_graph(timer, step, t, row, p + "_tables_graph")
    if unified is not None and cache.slot_rows is not None:  # each (request, KV head) one single-head sequence
        from vllm_sparse.gpu_attention import unified_table_decode

        o_v = torch.empty_like(q)
        try:
            t[p + "_tables_vllm_attn"] = timer(lambda: unified_table_decode(q, cache, tables, lens, scale, o_v, width))
            row[p + "_tables_vllm_err_vs_ours"] = _rel(o_v, so)
        except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, not fatal
            row[p + "_tables_vllm_error"] = f"{type(e).__name__}: {e}"[:200]


def _rel(x, ref) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def traffic(args, n: int, batch: int, esz: int) -> dict:
    """Fewest bytes each step must move through device memory (every input row read once).

    Dense: all K and V rows. Sparse page: the page summaries (key min + max) and fp32 page
    bounds, the keys of the candidate pages with their fp32 score and int64 position, the
    top-k reads, then K and V of the attended rows with their index. Quest: the page
    summaries and bounds, the chosen pages' positions, then K and V of every token of those
    pages. Token: every key and its fp32 score, the top-k read, the attended rows.
    ``*_floor_x`` = dense / sparse bytes.
    """
    from vllm_sparse.kernels.selection import candidate_capacity, index_capacity
    from vllm_sparse.policies.budget import attended_tokens, n_alpha_budget

    hkv, ps, row_b = args.num_kv_heads, args.page_size, args.head_size * esz  # one head's K (or V) row
    att = attended_tokens(n, n_alpha_budget(n, args.k, args.alpha, args.min_budget), args.sink_tokens,
                          args.local_window)
    heads = batch * hkv
    out = dict(attended=att, dense_bytes=heads * n * 2 * row_b)
    for name, sel, cf in args.variants:
        p = f"sparse_{name}"
        attn = heads * att * (2 * row_b + 4)
        if sel in ("quest", "exact_pages"):  # page bounds, top-k over pages, then whole pages
            n_pages = -(-n // ps)
            width = index_capacity(True, att, ps, args.sink_tokens, args.local_window)
            score = heads * n_pages * (2 * row_b + 4)
            topk = heads * (n_pages * 4 + width * 8)
            attn = heads * width * (2 * row_b + 4)
            if sel == "exact_pages":  # + every key row of the candidate pages, with its fp32 score
                cand = ps * min(n_pages, math.ceil(width // ps * cf))
                score += heads * cand * (row_b + 4)
                topk += heads * cand * 4
        elif sel == "page":
            n_pages = -(-n // ps)
            cand = ps * candidate_capacity(n_pages, att, ps, args.sink_tokens, args.local_window, cf)
            score = heads * (n_pages * (2 * row_b + 4) + cand * (row_b + 12))
            topk = heads * (n_pages * 4 + cand * 12)
        else:
            score = heads * n * (row_b + 4)
            topk = heads * n * 4
        out[p + "_bytes"] = score + topk + attn
        out[p + "_attn_bytes"] = attn
        out[p + "_floor_x"] = out["dense_bytes"] / out[p + "_bytes"]
    return out


def add_bandwidth(row: dict, copy_bw: float, variants) -> None:
    t = row["times_ms"]
    row["dense_ours_bw_frac"] = row["dense_bytes"] / (t["dense_ours"] * 1e-3) / copy_bw
    for name, _, _ in variants:
        p = f"sparse_{name}"
        if p not in t:
            continue
        row[p + "_bw_frac"] = row[p + "_bytes"] / (t[p] * 1e-3) / copy_bw
        row[p + "_attn_bw_frac"] = row[p + "_attn_bytes"] / (t[p + "_attn"] * 1e-3) / copy_bw


def print_table(rows, variants) -> None:
    nan = float("nan")
    head = f"{'ctx':>7} {'B':>3} {'att':>5} | {'dense':>8} {'base':>10} {'sdpa':>8} |"
    for name, _, _ in variants:
        head += (f" {name + ' ms':>12} {'x':>5} {'floor':>5} {'score':>6} {'topk':>6} {'attn':>6} {'graph':>6}"
                 f" {'BW':>5} {'tables':>7} {'x':>5} {'t.attn':>6} {'vllm':>6} |")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "skipped" in r:
            print(f"{r['context']:>7} {r['batch']:>3} {r['attended']:>5} | skipped: {r['skipped']}")
            continue
        t = r["times_ms"]
        line = (f"{r['context']:>7} {r['batch']:>3} {r['attended']:>5} | {t[r['dense_baseline']]:8.3f} "
                f"{r['dense_baseline'][6:]:>10} {t.get('dense_sdpa', float('nan')):8.3f} |")
        for name, _, _ in variants:
            p = f"sparse_{name}"
            if p not in t:
                line += f" {'failed: ' + r.get(p + '_error', '?')[:80]:>86} |"
                continue
            line += (f" {t[p]:12.3f} {r[p + '_speedup']:5.2f} {r[p + '_floor_x']:5.2f} {t[p + '_score']:6.3f}"
                     f" {t[p + '_topk']:6.3f} {t[p + '_attn']:6.3f} {t.get(p + '_graph', float('nan')):6.3f}"
                     f" {r[p + '_bw_frac']:5.2f} {t.get(p + '_tables', nan):7.3f} {r.get(p + '_tables_speedup', nan):5.2f}"
                     f" {t.get(p + '_tables_attn', nan):6.3f} {t.get(p + '_tables_vllm_attn', nan):6.3f} |")
        print(line)
    print("ms: median time of one layer's decode attention step; x: dense baseline / sparse (eager); "
          "floor: dense bytes / sparse bytes (the x both kernels at equal bandwidth would give); "
          "score/topk/attn: the sparse step's parts; graph: sparse step replayed from a CUDA graph; "
          "BW: sparse bytes moved / time, as a fraction of a device-to-device copy; "
          "tables: whole pages over compacted block tables (the route without an index buffer), its x vs "
          "the dense baseline, t.attn its attention by our split-K kernel, vllm: the same attention by "
          "vLLM's unified_attention over one-head blocks (where vLLM is importable)")


def print_floor(args, esz: int) -> list[dict]:
    """``--floor``: the byte model of every configuration, no device involved."""
    rows = []
    print(f"{'ctx':>7} {'B':>3} {'att':>5} {'dense MB':>9} |" + "".join(f" {name + ' MB':>12} {'floor':>6} |"
                                                                     for name, _, _ in args.variants))
    for n in args.contexts:
        for b in args.batches:
            row = dict(context=n, batch=b, **traffic(args, n, b, esz))
            rows.append(row)
            print(f"{n:>7} {b:>3} {row['attended']:>5} {row['dense_bytes'] / 1e6:9.1f} |" + "".join(
                f" {row[f'sparse_{name}_bytes'] / 1e6:12.2f} {row[f'sparse_{name}_floor_x']:6.2f} |"
                for name, _, _ in args.variants))
    print("floor: dense bytes / sparse bytes = the speed-up when both steps run at the same fraction of "
          "memory bandwidth")
    return rows


def plot(rows, variants, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    done = [r for r in rows if "skipped" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = ["s-", "D-.", "^:", "v--"]
    for i, b in enumerate(sorted({r["batch"] for r in done})):
        color = f"C{i}"  # one colour per batch size, one marker per method
        rs = sorted((r for r in done if r["batch"] == b), key=lambda r: r["context"])
        ctx = [r["context"] for r in rs]
        ax1.plot(ctx, [r["times_ms"][r["dense_baseline"]] for r in rs], "o--", color=color, label=f"dense B={b}")
        for j, (name, _, _) in enumerate(variants):
            mk = markers[j % len(markers)]
            nan = float("nan")  # a failed variant leaves a gap
            ax1.plot(ctx, [r["times_ms"].get(f"sparse_{name}", nan) for r in rs], mk, color=color,
                     label=f"{name} B={b}")
            ax2.plot(ctx, [r.get(f"sparse_{name}_speedup", nan) for r in rs], mk, color=color, label=f"{name} B={b}")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("decode step, ms (median)")
    ax2.set_ylabel("speed-up vs dense baseline")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.floor:
        _import_package()
        import torch

        esz = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
        rows = print_floor(args, esz)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels_floor.json").write_text(json.dumps(dict(settings=vars(args), rows=rows), indent=1))
        print(f"wrote {out / 'kernels_floor.json'}")
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device here; nothing to time. "
              "Run it on a GPU machine, or use --dry-run to check the script under the Triton interpreter.")
        return 0
    _import_package()
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = getattr(torch, args.dtype)
    force = dict(force_triton=True) if args.dry_run else {}
    timer = Timer(device.type == "cuda", args.rep_ms)
    if args.dry_run:
        unified, why = None, "dry-run: vLLM baseline not attempted"
    else:
        unified, why = _vllm_unified_attention()  # why: its source, or why there is none
    copy_bw = copy_bandwidth(timer, device, (1 << 30) if device.type == "cuda" else (1 << 24))
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, dry_run=args.dry_run, copy_bandwidth_GBps=copy_bw / 1e9,
                vllm_baseline=why, settings=vars(args))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"device: {info['device']}  copy bandwidth: {copy_bw / 1e9:.0f} GB/s  dense baseline: "
          f"{why if unified else 'ours (' + str(why) + ')'}")
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in args.contexts:
        for b in args.batches:
            t0 = time.perf_counter()
            try:
                row = run_config(args, n, b, timer, device, dtype, force, unified)
            except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
                row = dict(context=n, batch=b, skipped=f"failed: {type(e).__name__}: {e}"[:300],
                           traceback=traceback.format_exc())
                print(row["traceback"], file=sys.stderr, flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if "skipped" not in row:
                add_bandwidth(row, copy_bw, args.variants)
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"  done ctx={n} B={b} in {row['wall_s']:.1f} s" + (f" (skipped: {row['skipped']})"
                                                                        if "skipped" in row else ""), flush=True)
            # written after every configuration: a run cut off by a time limit keeps what it measured
            (out / "kernels.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1, default=str))
    note = plot(rows, args.variants, out / "kernels.png")
    print()
    print_table(rows, args.variants)
    print(f"\nwrote {out / 'kernels.json'}" + (f" ({note})" if note else f" and {out / 'kernels.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
