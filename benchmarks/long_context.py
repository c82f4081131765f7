"""The long-context suite (``make bench-long``): 4k-32k decode, quality and KV capacity on the long-context assets.

Every step is another benchmark script run as a subprocess, one after the other (timings need the
machine to themselves), each writing into its own folder under ``--out``:

============== ==========================================================================================
decode         ``decode_throughput.py`` on ``smollm2-32k`` (SmolLM2-135M, YaRN x4): stock vs the defaults,
               contexts 256 / 4k / 8k / 16k / 32,000 x batches 1 / 4 / 8, prompts of essay prose, each
               context's prompt prefilled once per engine (``--shared-prefill``); log-log slopes + plot
kv-capacity    ``throughput.py`` on ``gemma3-270m`` (5 of 6 layers sliding-window): the KV capacity vLLM
               reports at start-up, stock vs the defaults (a short 1k-token throughput run beside it)
quality-16k    ``ablation.py`` on ``gemma3-270m`` at 16,384 tokens: single needle over depths + multi-key,
quality-32k    dense vs the defaults vs ``quest`` and ``streaming`` at the defaults' budget, paired
               (one prefill per prompt, every setting decodes from it); the same at 32,000 tokens
smollm2-32k    ``ablation.py`` on ``smollm2-32k`` at 8k / 16k / 32,000: the scaled model's own dense
               quality, with the defaults beside it
============== ==========================================================================================

The plan printed first gives each step's command and its expected duration on a 2-core AVX2 CPU
(fp32), measured on the machine named in ``docs/RESULTS.md``; a faster CPU takes less. At the end it
prints what each step took. ``--dry-run`` prints the plan and checks every step's settings
(each script's own ``--dry-run``) without running an engine; ``--steps`` picks steps::

    python benchmarks/long_context.py --out benchmarks/out/long             # everything, ~4.3 h on 2 cores
    python benchmarks/long_context.py --steps decode kv-capacity --dry-run
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Step:
    name: str
    script: str
    args: tuple[str, ...]
    minutes: int  # expected duration on a 2-core AVX2 CPU, fp32
    what: str
    dry_run: bool = True  # the script takes --dry-run


def steps(samples: int) -> list[Step]:
    quality = ("--tasks", "single", "multi_key", "--samples", str(samples), "--group", "4")
    return [
        Step("decode", "decode_throughput.py",
             ("--model", "smollm2-32k", "--contexts", "256", "4096", "8192", "16384", "32000", "--batches", "1", "4",
              "8", "--backends", "stock", "sparse={}", "--shared-prefill", "--profile", "--prompts", "essays",
              "--name", "decode_long"),
             50, "decode step, stock vs sparse, 4k-32k x batch 1/4/8, log-log slopes, op profiles"),
        Step("kv-capacity", "throughput.py",
             ("--model", "gemma3-270m", "--input-lens", "1024", "--num-prompts", "4", "--output-len", "32",
              "--latency-iters", "0", "--max-model-len", "32768", "--backends", "stock", "sparse={}"),
             4, "KV capacity of gemma3-270m at max_model_len 32768, stock vs sparse"),
        Step("quality-16k", "ablation.py",
             ("--model", "gemma3-270m", "--lengths", "16384", *quality, "--settings", "default", "quest", "streaming"),
             25, "gemma3-270m at 16k: dense / defaults / quest / streaming"),
        Step("quality-32k", "ablation.py",
             ("--model", "gemma3-270m", "--lengths", "32000", *quality, "--settings", "default", "quest", "streaming"),
             70, "gemma3-270m at 32k: dense / defaults / quest / streaming"),
        Step("smollm2-32k", "ablation.py",
             ("--model", "smollm2-32k", "--lengths", "8192", "16384", "32000", "--tasks", "single", "multi_key",
              "--samples", str(max(2, samples // 2)), "--group", "2", "--settings", "default"),
             110, "smollm2-32k's own dense quality at 8k/16k/32k, defaults beside"),
    ]


def command(step: Step, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, str(HERE / step.script), *step.args, "--out", str(out / step.name), *extra]


def main(argv=None) -> int:
    every = steps(6)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/long"))
    ap.add_argument("--steps", nargs="+", choices=[s.name for s in every], help="default: every step, in order")
    ap.add_argument("--samples", type=int, default=6,
                    help="quality cases per (task, length) on gemma3-270m (half that on smollm2-32k); default %(default)s")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, check every step's settings, run no engine")
    args = ap.parse_args(argv)
    chosen = [s for s in steps(args.samples) if args.steps is None or s.name in args.steps]
    total = sum(s.minutes for s in chosen)
    print(f"bench-long: {len(chosen)} steps, about {total // 60} h {total % 60:02d} min on a 2-core AVX2 CPU "
          f"(fp32; each step alone on the machine) -> {args.out}")
    for s in chosen:
        print(f"  {s.name:<12} ~{s.minutes:3d} min  {s.what}\n"
              f"               {shlex.join(command(s, args.out, [])[1:])}")
    sys.stdout.flush()
    done, t0 = [], time.perf_counter()
    for s in chosen:
        if args.dry_run and not s.dry_run:
            continue
        cmd = command(s, args.out, ["--dry-run"] if args.dry_run else [])
        if not args.dry_run:
            print(f"\n== {s.name} ({time.strftime('%H:%M:%S')}, expected ~{s.minutes} min)", flush=True)
            (args.out / s.name).mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        done.append((s, rc, time.perf_counter() - t))
        if rc != 0:
            print(f"step {s.name} failed (exit {rc}): {shlex.join(cmd)}", file=sys.stderr)
            return rc
    if not args.dry_run:
        print(f"\nbench-long done in {(time.perf_counter() - t0) / 60:.0f} min:")
        for s, _, dt in done:
            print(f"  {s.name:<12} {dt / 60:6.1f} min (expected ~{s.minutes}) -> {args.out / s.name}")
    else:
        print(f"dry run: {len(done)} steps checked their settings; nothing was written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
