"""Decode throughput in real vLLM: the sparse backend against the stock backend, same machine, same run.

For every (context, batch) the script generates ``1 + D`` tokens from ``batch`` random
prompts of ``context`` tokens (greedy, ``ignore_eos``, prefix caching off) with the engine
in-process, and times every engine step. A *decode step* is a step whose scheduler output is
exactly one token for each of the ``batch`` requests (no prefill chunk mixed in); the median of
those step times is the decode step time, and ``batch / step`` the decode tokens/s; their mean is
reported beside it (``mean ms``: with ``reselect_every`` most steps reuse their pages and every
N-th selects, so the median is a reusing step and the mean the amortized cost). The other
steps (those that carry prompt tokens) add up to the prefill time. It prints a table with the
sparse/stock ratios and writes JSON + a PNG plot.

Every (backend, case) runs on a fresh engine, and the backends of one case run back to back,
so a slow drift of the machine (this project's 2-core VMs drift ±20% over minutes) hits
stock and sparse alike; odd rounds reverse the backends' order. ``--rounds R`` repeats the
whole grid R times that way; the reported ratio is the median of the R per-round ratios, with
their range.

Example (CPU machine, SmolLM2-135M, about 12 minutes per round)::

    python benchmarks/decode_throughput.py --backends stock "sparse={}" --rounds 3

The engines run eager (``enforce_eager``, this project's convention since the first runs);
``--compiled`` runs them as ``vllm serve`` / ``LLM`` do by default on CPU instead: the model traced
once by dynamo and compiled by inductor's C++ backend, attention (stock's and the plugin's) an
opaque op inside it — a smaller non-attention share of the step for both.

**Long contexts** (``make bench-long``): prefilling a 32k prompt takes minutes per prompt on a
2-core CPU, so ``--shared-prefill`` gives each (backend, context) one engine with prefix caching,
prefills the context's prompt once, and decodes every ``--batches`` size from copies of it
(:func:`run_shared`). With three or more contexts, the smallest at most 512 tokens, the script fits
the log-log slope of the step time against the context, and of its attention part (the step less
the step at the smallest context: the model's other work), per backend and batch, prints them and
plots ``<name>_loglog.png`` (:func:`fit_slopes`). ``--profile`` writes where a step's time goes::

    python benchmarks/decode_throughput.py --model smollm2-32k --contexts 256 4096 8192 16384 32000 \
        --batches 1 4 8 --backends stock "sparse={}" --shared-prefill --profile --prompts essays

Backends are given as ``name=SETTINGS_JSON`` (``stock`` is vLLM's own backend); default:
``stock``, ``sparse`` (the default settings) and ``token`` (``selection=token``).

``stock-thp`` is vLLM's stock backend with the system's transparent huge pages set to
``always`` during its runs (written to ``/sys/kernel/mm/transparent_hugepage/enabled``, which
needs root; the previous value is restored after each run): what stock gains from the 2 MiB
pages the plugin asks for its KV cache by itself (``vllm_sparse/cpu_tuning.py``). Example::

    python benchmarks/decode_throughput.py --backends stock "sparse={}" stock-thp --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine must run in-process to be timed
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "6")

DEFAULT_BACKENDS = ["stock", "sparse={}", 'token={"selection": "token"}']
STOCK = ("stock", "stock-thp")  # vLLM's own backend; -thp: with transparent huge pages always on
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def cpu_model() -> str:
    """The CPU model name as ``lscpu`` prints it (ratios differ between machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes): ``serve_load.py``'s, loaded by path."""
    import importlib.util
    import sys

    key = "_bench_serve_load"  # the key quality.py's sibling loader uses
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name("serve_load.py"))
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key].git_commit()


def parse_backend(spec: str) -> tuple[str, dict | None]:
    name, _, settings = spec.partition("=")
    return name, (None if name in STOCK else json.loads(settings or "{}"))


class StepTimer:
    """Times the in-process engine's steps and keeps those that were pure full-batch decode."""

    def __init__(self, llm):
        core = llm.llm_engine.engine_core.engine_core  # in-process EngineCore
        self.decode_steps: list[float] = []
        self.prefill_s = 0.0  # steps that carried prompt tokens
        self.batch = 0
        self.after_step = None  # called after every engine step (e.g. a profiler's step())
        last = {}
        schedule, step = core.scheduler.schedule, core.step_fn

        def timed_schedule(*args, **kwargs):
            last["out"] = out = schedule(*args, **kwargs)
            return out

        def timed_step(*args, **kwargs):
            t = time.perf_counter()
            result = step(*args, **kwargs)
            dt = time.perf_counter() - t
            so = last.pop("out", None)
            if so is not None and len(so.num_scheduled_tokens) == self.batch and all(
                    v == 1 for v in so.num_scheduled_tokens.values()):
                self.decode_steps.append(dt)
            elif so is not None and any(v > 1 for v in so.num_scheduled_tokens.values()):
                self.prefill_s += dt
            if self.after_step is not None:
                self.after_step()
            return result

        core.scheduler.schedule, core.step_fn = timed_schedule, timed_step


def thp_mode(mode: str | None = None) -> str:
    """The system's transparent-huge-page mode (``[always] madvise never`` -> ``always``); sets it when given."""
    if mode is not None:
        THP.write_text(mode)
    return THP.read_text().split("[")[1].split("]")[0]


def prompt_ids(kind: str, tokenizer, context: int, batch: int, gen) -> list[list[int]]:
    """``batch`` prompts of ``context`` tokens: random token ids, or windows of the essays' text
    (``essays``: each request at another offset, so what it decodes next is ordinary prose)."""
    import torch

    if kind == "random":
        return [torch.randint(100, tokenizer.vocab_size, (context,), generator=gen).tolist() for _ in range(batch)]
    from vllm_sparse.assets.data import essays_text

    ids = tokenizer.encode(essays_text(), add_special_tokens=False)
    if len(ids) < context + batch:
        raise SystemExit(f"--prompts essays: the essays hold {len(ids)} tokens, fewer than context {context}")
    starts = torch.randint(0, len(ids) - context, (batch,), generator=gen).tolist()
    return [list(ids[s: s + context]) for s in starts]


def _engine(model: str, settings: dict | None, context: int, decode_tokens: int, seed: int, dtype: str,
            compiled: bool, prefix_caching: bool, batched_tokens: int):
    """An in-process ``vllm.LLM`` for one case: stock (``settings`` None) or the plugin with ``settings``."""
    from vllm import LLM

    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise SystemExit("run with VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine must run in-process to be timed)")
    kw = dict(model=model, enforce_eager=not compiled, max_model_len=context + decode_tokens + 16, dtype=dtype,
              enable_prefix_caching=prefix_caching, seed=seed, max_num_batched_tokens=batched_tokens)
    if settings is not None:
        kw.update(attention_backend="CUSTOM", additional_config={"vllm_sparse": settings})
    return LLM(**kw)


def _decode_row(timer: StepTimer, context: int, batch: int, wall: float, prefill_s: float, note: str) -> dict:
    """One case's row from the timed steps (median and mean of the pure decode steps), printed."""
    import statistics

    if not timer.decode_steps:
        raise RuntimeError(f"no pure decode step of batch {batch} was seen; raise --decode-tokens")
    step = statistics.median(timer.decode_steps)
    print(f"    context {context:6d} batch {batch:3d}: {len(timer.decode_steps)} decode steps, median "
          f"{1e3 * step:8.1f} ms ({wall:.0f} s{note})", flush=True)
    return dict(context=context, batch=batch, wall_s=wall, decode_steps_timed=len(timer.decode_steps),
                step_ms=1e3 * step, step_mean_ms=1e3 * statistics.fmean(timer.decode_steps), prefill_s=prefill_s)


def run_case(model: str, settings: dict | None, context: int, batch: int, decode_tokens: int, seed: int,
             huge_pages: bool = False, dtype: str = "bfloat16", compiled: bool = False,
             prompt_kind: str = "random") -> dict:
    """One (context, batch) on a fresh engine: median pure-decode step time and prefill time
    (``huge_pages``: with the system's transparent huge pages ``always`` while it runs)."""
    if huge_pages:
        before = thp_mode()
        try:
            thp_mode("always")
            return run_case(model, settings, context, batch, decode_tokens, seed, dtype=dtype, compiled=compiled,
                            prompt_kind=prompt_kind)
        finally:
            thp_mode(before)
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # one scheduler step may take every prompt whole, so all requests start decoding together
    llm = _engine(model, settings, context, decode_tokens, seed, dtype, compiled, False, context * batch + 64)
    try:
        timer = StepTimer(llm)
        gen = torch.Generator().manual_seed(seed + 7919 * context + batch)  # same prompts for every backend
        sp = SamplingParams(max_tokens=1 + decode_tokens, temperature=0.0, ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=ids)
                   for ids in prompt_ids(prompt_kind, llm.get_tokenizer(), context, batch, gen)]
        timer.batch = batch
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t
    finally:
        del llm
        gc.collect()
    return _decode_row(timer, context, batch, wall, timer.prefill_s, " in all")


def run_shared(model: str, settings: dict | None, context: int, batches: list[int], decode_tokens: int, seed: int,
               dtype: str = "bfloat16", compiled: bool = False, prompt_kind: str = "random",
               profile: Path | None = None) -> dict[int, dict]:
    """Every batch size of one context on one engine, the prompt prefilled once (``--shared-prefill``).

    One prompt of ``context`` tokens is prefilled, less its last two tokens, into vLLM's prefix cache
    (timed: the prefill). Then, for each batch size, ``batch`` requests of that prompt find its full
    blocks cached, compute their last 2-33 tokens, and decode: each request its own sequence over
    the shared prompt blocks, the attention work of ``batch`` separate sequences. What this cannot
    show: a batch of *different* prompts reads ``batch`` times as much distinct KV memory.

    ``profile``: afterwards, ``torch.profiler`` over 8 more decode steps of the largest batch (not
    the requests' first step, which computes their tails); the ops' self CPU time, largest first,
    is written to that file (where a decode step's time goes)."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _engine(model, settings, context, decode_tokens, seed, dtype, compiled, True,
                  max(context, 64 * max(batches)) + 64)
    rows = {}
    try:
        timer = StepTimer(llm)
        gen = torch.Generator().manual_seed(seed + 7919 * context)  # same prompt for every backend
        ids = prompt_ids(prompt_kind, llm.get_tokenizer(), context, 1, gen)[0]
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids[:-2])], SamplingParams(max_tokens=1), use_tqdm=False)
        prefill = time.perf_counter() - t
        sp = SamplingParams(max_tokens=1 + decode_tokens, temperature=0.0, ignore_eos=True)
        for b in batches:
            timer.batch, timer.decode_steps = b, []
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=ids)] * b, sp, use_tqdm=False)
            wall = time.perf_counter() - t
            rows[b] = _decode_row(timer, context, b, wall, prefill, f"; shared prefill {prefill:.0f} s")
        if profile is not None:
            # engine steps: the requests' tails (a prefill step, not profiled), one decode step of warm-up,
            # then 8 decode steps profiled
            b = max(batches)
            sched = torch.profiler.schedule(wait=1, warmup=1, active=8, repeat=1)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=sched) as prof:
                timer.after_step = prof.step
                try:
                    llm.generate([TokensPrompt(prompt_token_ids=ids)] * b,
                                 SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), use_tqdm=False)
                finally:
                    timer.after_step = None
            profile.parent.mkdir(parents=True, exist_ok=True)
            profile.write_text(f"context {context}, batch {b}, {settings if settings is not None else 'stock'}: "
                               f"8 decode steps (median step {rows[b]['step_ms']:.1f} ms in the timed run)\n"
                               + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    finally:
        del llm
        gc.collect()
    return rows


def fit_slopes(rows: list[dict], base: int | None) -> dict[int, dict]:
    """Per batch: the log-log slope of the step time against the context (least squares over the
    contexts above ``base``), and of its *attention part*, the step time less the step at the
    ``base`` context (the model's other work, which does not grow with the context). Stock's
    attention reads every key (slope ~1); the plugin's attends k·n^α of them (slope ~α) plus
    selection work over its page summaries, which grows with n but is ``page_size`` times smaller."""
    import math

    out = {}
    for b in sorted({r["batch"] for r in rows}):
        mine = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["context"])
        floor = next((r["step_ms"] for r in mine if r["context"] == base), None)
        pts = [r for r in mine if base is None or r["context"] > base]

        def slope(xs, ys):
            if len(xs) < 2:
                return None
            lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
            mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
            return sum((a - mx) * (c - my) for a, c in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)

        attn = [(r["context"], r["step_ms"] - floor) for r in pts if floor is not None and r["step_ms"] > floor]
        out[b] = dict(step_slope=slope([r["context"] for r in pts], [r["step_ms"] for r in pts]),
                      attention_slope=slope(*zip(*attn)) if len(attn) >= 2 else None,
                      base_context=base, base_step_ms=floor, contexts=[r["context"] for r in pts])
    return out


def plot_loglog(results: dict, batches: list[int], base: int | None, path: Path) -> None:
    """Step time and its attention part against context, log-log, one panel per batch, with the fitted slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for i, (name, res) in enumerate(results.items()):
            rows = sorted((r for r in res["rows"] if r["batch"] == b), key=lambda r: r["context"])
            fit = res["slopes"][b]
            color = f"C{i}"
            ax.plot([r["context"] for r in rows], [r["step_ms"] for r in rows], "o-", color=color,
                    label=f"{name}: step (slope {_fmt_slope(fit['step_slope'])})")
            if fit["base_step_ms"] is not None:
                attn = [(r["context"], r["step_ms"] - fit["base_step_ms"]) for r in rows
                        if r["context"] > base and r["step_ms"] > fit["base_step_ms"]]
                if attn:
                    ax.plot(*zip(*attn), "s--", color=color, alpha=0.7,
                            label=f"{name}: step − step@{base} (slope {_fmt_slope(fit['attention_slope'])})")
        ax.set(xscale="log", yscale="log", title=f"batch {b}", xlabel="context tokens", ylabel="decode step (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt_slope(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def combine(rounds: list[dict[str, dict]], names: list[str]) -> dict[str, list[dict]]:
    """Per backend and case: medians over the rounds, and each round's ratio to stock *of the same round*
    (the backends of one case run back to back, so slow drift of the machine cancels in the ratio)."""
    import statistics

    out = {}
    for name in names:
        rows = []
        for key in rounds[0][name]:
            runs = [r[name][key] for r in rounds]
            step = statistics.median(x["step_ms"] for x in runs)
            row = dict(context=key[0], batch=key[1], step_ms=step, decode_tokens_per_s=1e3 * key[1] / step,
                       prefill_s=statistics.median(x["prefill_s"] for x in runs),
                       step_ms_rounds=[x["step_ms"] for x in runs], prefill_s_rounds=[x["prefill_s"] for x in runs],
                       step_mean_ms=statistics.median(x["step_mean_ms"] for x in runs),
                       decode_steps_timed=sum(x["decode_steps_timed"] for x in runs))
            if "stock" in rounds[0]:
                ratios = [r["stock"][key]["step_ms"] / r[name][key]["step_ms"] for r in rounds]
                pratios = [r["stock"][key]["prefill_s"] / r[name][key]["prefill_s"] for r in rounds
                           if r[name][key]["prefill_s"]]
                mean_ratios = [r["stock"][key]["step_mean_ms"] / r[name][key]["step_mean_ms"] for r in rounds]
                row.update(speedup_vs_stock=statistics.median(ratios), speedup_rounds=ratios,
                           speedup_mean_vs_stock=statistics.median(mean_ratios),
                           prefill_speed_vs_stock=statistics.median(pratios) if pratios else None)
            rows.append(row)
        out[name] = rows
    return out


def main() -> None:
    from vllm_sparse.cpu_tuning import model_dtype

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="model directory or asset name, e.g. smollm2-32k (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 7000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--backends", nargs="+", default=DEFAULT_BACKENDS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=model_dtype(), help="model dtype (default here: %(default)s; see cpu_tuning.py)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every case this many times, backends interleaved; ratios are medians over rounds")
    ap.add_argument("--compiled", action="store_true",
                    help="vLLM's default compilation (on CPU: the model traced once by dynamo, inductor's C++ "
                         "backend; attention stays an opaque op) instead of enforce_eager")
    ap.add_argument("--prompts", choices=["random", "essays"], default="random",
                    help="random token ids (the tables so far), or windows of the essays' prose (what a kept "
                         "selection sees in real use: reselect_similarity's share of reselected heads depends on it)")
    ap.add_argument("--shared-prefill", action="store_true",
                    help="one engine per (backend, context), prefix caching on: the context's prompt prefilled once "
                         "and every batch size decodes copies of it (see run_shared); makes 16k-32k grids affordable")
    ap.add_argument("--profile", action="store_true",
                    help="with --shared-prefill: profile 8 decode steps of the largest batch per (backend, context) "
                         "after the timed ones (torch.profiler; ops by self CPU time, into --out)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, then exit")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--name", default="decode_throughput", help="stem of the JSON/PNG written under --out")
    args = ap.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; dtype {args.dtype}", flush=True)

    if args.profile and not args.shared_prefill:
        raise SystemExit("--profile needs --shared-prefill (it profiles the shared-prefill engines)")
    from vllm_sparse.assets.models import model_option

    args.model = model_option(args.model)
    backends = dict(parse_backend(spec) for spec in args.backends)
    from vllm_sparse.config import SparseConfig

    for name, settings in backends.items():  # a bad setting stops here, before any engine runs
        if settings is not None:
            try:
                SparseConfig.from_dict(settings)
            except ValueError as e:
                raise SystemExit(f"--backends {name}: {e}") from None
    base = min(args.contexts) if min(args.contexts) <= 512 and len(args.contexts) > 2 else None
    engines = len(backends) * len(args.contexts) * (1 if args.shared_prefill else len(args.batches)) * args.rounds
    prefilled = args.rounds * len(backends) * sum(n * (1 if args.shared_prefill else sum(args.batches))
                                                   for n in args.contexts)
    print(f"plan: {engines} engines, {len(args.contexts)} contexts {args.contexts} x batches {args.batches} x "
          f"backends {list(backends)} x {args.rounds} round(s); {prefilled:,} prompt tokens prefilled"
          f"{' (shared prefill)' if args.shared_prefill else ''}; model {args.model}", flush=True)
    if args.dry_run:
        return
    commit = _git_commit()  # the code that runs, read before the engines start
    if "stock-thp" in backends and not os.access(THP, os.W_OK):
        raise SystemExit(f"backend stock-thp sets {THP} during its runs: it needs write access (root)")
    rounds = []
    for k in range(args.rounds):  # round -> case -> backend: the backends of a case run back to back
        print(f"round {k + 1}/{args.rounds}", flush=True)
        rnd = {name: {} for name in backends}
        for n in args.contexts:
            if args.shared_prefill:
                for name, settings in list(backends.items())[:: -1 if k % 2 else 1]:
                    print(f"  {name}: {settings if settings is not None else 'vLLM stock backend'}", flush=True)
                    rows = run_shared(args.model, settings, n, args.batches, args.decode_tokens, args.seed,
                                      dtype=args.dtype, compiled=args.compiled, prompt_kind=args.prompts,
                                      profile=args.out / f"{args.name}_profile_{name}_{n}.txt" if args.profile else None)
                    rnd[name].update({(n, b): row for b, row in rows.items()})
                continue
            for b in args.batches:
                # ABBA: odd rounds reverse the order, so "built second in the process" favours no backend
                for name, settings in list(backends.items())[:: -1 if k % 2 else 1]:
                    print(f"  {name}: {settings if settings is not None else 'vLLM stock backend'}", flush=True)
                    rnd[name][(n, b)] = run_case(args.model, settings, n, b, args.decode_tokens, args.seed,
                                                 huge_pages=name == "stock-thp", dtype=args.dtype,
                                                 compiled=args.compiled, prompt_kind=args.prompts)
        rounds.append(rnd)
    rows = combine(rounds, list(backends))
    results = {name: dict(settings=backends[name], rows=rows[name], slopes=fit_slopes(rows[name], base))
               for name in backends}

    header = (f"{'backend':<24}{'context':>8}{'batch':>6}{'step ms':>10}{'tok/s':>9}{'vs stock':>10}"
              f"{'rounds':>20}{'mean ms':>9}{'vs stock':>10}{'prefill s':>11}{'vs stock':>10}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, res in results.items():
        for r in res["rows"]:
            ratio = f"{r['speedup_vs_stock']:.2f}x" if r.get("speedup_vs_stock") else "-"
            spread = (f"{min(r['speedup_rounds']):.2f}-{max(r['speedup_rounds']):.2f}x"
                      if r.get("speedup_rounds") and len(r["speedup_rounds"]) > 1 else "")
            pratio = f"{r['prefill_speed_vs_stock']:.2f}x" if r.get("prefill_speed_vs_stock") else "-"
            mratio = f"{r['speedup_mean_vs_stock']:.2f}x" if r.get("speedup_mean_vs_stock") else "-"
            print(f"{name:<24}{r['context']:>8}{r['batch']:>6}{r['step_ms']:>10.1f}{r['decode_tokens_per_s']:>9.1f}"
                  f"{ratio:>10}{spread:>20}{r['step_mean_ms']:>9.1f}{mratio:>10}{r['prefill_s']:>11.1f}{pratio:>10}")

    if len(args.contexts) > 2:
        print("\nlog-log slope of the decode step vs context (attention part: the step less the step at "
              f"context {base})" if base else "\nlog-log slope of the decode step vs context")
        for name, res in results.items():
            for b, fit in res["slopes"].items():
                print(f"  {name:<22} batch {b:3d}: step {_fmt_slope(fit['step_slope'])}, "
                      f"attention part {_fmt_slope(fit['attention_slope'])}")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=args.model, dtype=args.dtype, machine=cpu_model(), cpus=os.cpu_count(),
                shared_prefill=args.shared_prefill, commit=commit,
                decode_tokens=args.decode_tokens, rounds=args.rounds, compiled=args.compiled, prompts=args.prompts,
                method="median engine-step time over pure full-batch decode steps, in-process engine, prefix caching "
                       "off, one engine per (backend, case), backends of a case back to back (order reversed in odd "
                       "rounds); over rounds: median step time and the median of each round's ratio to stock; step_mean_ms and "
                       "speedup_mean_vs_stock: the same with each run's mean step")
    (args.out / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(args.batches), figsize=(5 * len(args.batches), 4), squeeze=False)
    for ax, b in zip(axes[0], args.batches):
        for name, res in results.items():
            rows = [r for r in res["rows"] if r["batch"] == b]
            ax.plot([r["context"] for r in rows], [r["decode_tokens_per_s"] for r in rows], "o-", label=name)
        ax.set(title=f"batch {b}", xlabel="context tokens", ylabel="decode tokens/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{args.name}.png", dpi=120)
    if len(args.contexts) > 2:
        plot_loglog(results, args.batches, base, args.out / f"{args.name}_loglog.png")


if __name__ == "__main__":
    main()
