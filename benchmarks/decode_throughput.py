"""Decode throughput in real vLLM: the sparse backend against the stock backend, same machine, same run.

For every (context, batch) the script generates ``1 + D`` tokens from ``batch`` random
prompts of ``context`` tokens (greedy, ``ignore_eos``, prefix caching off) with the engine
in-process, and times every engine step. A *decode step* is a step whose scheduler output is
exactly one token for each of the ``batch`` requests (no prefill chunk mixed in); the median of
those step times is the decode step time, and ``batch / step`` the decode tokens/s. The other
steps (those that carry prompt tokens) add up to the prefill time. It prints a table with the
sparse/stock ratios and writes JSON + a PNG plot.

Example (CPU machine, SmolLM2-135M, about 15 minutes)::

    python benchmarks/decode_throughput.py --contexts 4096 7000 --batches 1 16

Backends are given as ``name=SETTINGS_JSON`` (``stock`` is vLLM's own backend); default:
``stock``, ``sparse`` (the default settings) and ``sparse-page`` (``selection=page``).
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


def cpu_model() -> str:
    """The CPU model name as ``lscpu`` prints it (ratios differ between machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_backend(spec: str) -> tuple[str, dict | None]:
    name, _, settings = spec.partition("=")
    return name, (None if name == "stock" else json.loads(settings or "{}"))


class StepTimer:
    """Times the in-process engine's steps and keeps those that were pure full-batch decode."""

    def __init__(self, llm):
        core = llm.llm_engine.engine_core.engine_core  # in-process EngineCore
        self.decode_steps: list[float] = []
        self.prefill_s = 0.0  # steps that carried prompt tokens
        self.batch = 0
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
            return result

        core.scheduler.schedule, core.step_fn = timed_schedule, timed_step


def run_backend(model: str, settings: dict | None, contexts, batches, decode_tokens: int, seed: int) -> list[dict]:
    import statistics

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise SystemExit("run with VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine must run in-process to be timed)")
    # one scheduler step may take every prompt whole, so all requests start decoding together
    kw = dict(model=model, enforce_eager=True, max_model_len=max(contexts) + decode_tokens + 16, dtype="bfloat16",
              enable_prefix_caching=False, seed=seed, max_num_batched_tokens=max(contexts) * max(batches) + 64)
    if settings is not None:
        kw.update(attention_backend="CUSTOM", additional_config={"vllm_sparse": settings})
    llm = LLM(**kw)
    timer = StepTimer(llm)
    vocab = llm.get_tokenizer().vocab_size
    gen = torch.Generator().manual_seed(seed)
    sp = SamplingParams(max_tokens=1 + decode_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    try:
        for n in contexts:
            for b in batches:
                prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, vocab, (n,), generator=gen).tolist())
                           for _ in range(b)]
                timer.batch, timer.decode_steps, timer.prefill_s = b, [], 0.0
                t = time.perf_counter()
                llm.generate(prompts, sp, use_tqdm=False)
                wall = time.perf_counter() - t
                if not timer.decode_steps:
                    raise RuntimeError(f"no pure decode step of batch {b} was seen; raise --decode-tokens")
                step = statistics.median(timer.decode_steps)
                rows.append(dict(context=n, batch=b, wall_s=wall, decode_steps_timed=len(timer.decode_steps),
                                 step_ms=1e3 * step, decode_tokens_per_s=b / step, prefill_s=timer.prefill_s))
                print(f"  context {n:6d} batch {b:3d}: {len(timer.decode_steps)} decode steps, median "
                      f"{1e3 * step:8.1f} ms ({wall:.0f} s in all)", flush=True)
    finally:
        del llm
        gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the prepared SmolLM2)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 7000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--backends", nargs="+", default=DEFAULT_BACKENDS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs", flush=True)

    if args.model is None:
        from vllm_sparse.models import prepare_model

        args.model = str(prepare_model("smollm2"))
    results = {}
    for spec in args.backends:
        name, settings = parse_backend(spec)
        print(f"{name}: {settings if settings is not None else 'vLLM stock backend'}", flush=True)
        results[name] = dict(settings=settings, rows=run_backend(args.model, settings, args.contexts, args.batches,
                                                                 args.decode_tokens, args.seed))

    base = {(r["context"], r["batch"]): r for r in results.get("stock", {}).get("rows", [])}
    header = (f"{'backend':<24}{'context':>8}{'batch':>6}{'step ms':>10}{'tok/s':>9}{'vs stock':>10}"
              f"{'prefill s':>11}{'vs stock':>10}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, res in results.items():
        for r in res["rows"]:
            ref = base.get((r["context"], r["batch"]))
            r["speedup_vs_stock"] = ref["step_ms"] / r["step_ms"] if ref else None
            r["prefill_speed_vs_stock"] = ref["prefill_s"] / r["prefill_s"] if ref and r["prefill_s"] else None
            ratio = f"{r['speedup_vs_stock']:.2f}x" if ref else "-"
            pratio = f"{r['prefill_speed_vs_stock']:.2f}x" if r["prefill_speed_vs_stock"] else "-"
            print(f"{name:<24}{r['context']:>8}{r['batch']:>6}{r['step_ms']:>10.1f}{r['decode_tokens_per_s']:>9.1f}"
                  f"{ratio:>10}{r['prefill_s']:>11.1f}{pratio:>10}")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=args.model, machine=cpu_model(), cpus=os.cpu_count(),
                decode_tokens=args.decode_tokens,
                method="median engine-step time over pure full-batch decode steps, in-process engine, prefix caching off")
    (args.out / "decode_throughput.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
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
    fig.savefig(args.out / "decode_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
