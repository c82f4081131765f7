"""Long-context throughput and latency through vLLM's own benchmark commands: dense vs sparse.

For every input length and backend it runs, as a user would (one subprocess each, one after
the other on the same machine):

* ``vllm-sparse bench throughput`` (random token prompts, ``--num-prompts`` × input length,
  ``--output-len`` output tokens, ``ignore_eos``): requests/s, **total tokens/s** and **output
  tokens/s**;
* ``vllm-sparse bench latency`` at batch 1, once with ``--latency-output-len`` (256) tokens and
  once with one token: **time per output token** = (latency(out) − latency(1)) / (out − 1), the
  decode cost without the prefill (many tokens, so the prefill's run-to-run noise divides out);
* the **KV capacity** vLLM reports at start-up ("KV cache size: N tokens"): what fits in the
  same memory (the page summaries cost 1/page_size of it).

and the ratios against the first backend (``stock`` = vLLM's own attention backend). Prints a
table, writes ``throughput.json`` and ``throughput.png`` (tokens/s and time per output token vs
input length). CPU (the default grid, about 25 minutes on a 2-core machine)::

    python benchmarks/throughput.py --out benchmarks/out

``--quick`` (two lengths, fewer prompts and tokens) is what ``make bench`` runs. ``--gpu`` is
the GPU preset: input lengths 8k–128k, 32 prompts, a model with that context (``--model``,
e.g. a Llama-3.1-8B-Instruct directory) and ``--max-model-len`` set to fit::

    python benchmarks/throughput.py --gpu --model /models/Llama-3.1-8B-Instruct --out benchmarks/out/gpu

Backends are ``name=SETTINGS_JSON`` (``stock``: no plugin); default ``stock``, ``sparse`` (the
documented defaults) and ``quest-k24`` (Quest's rule at a 3× budget, where it retrieved 11 of
the tests' 12 needles and one multi-key answer of 16 fewer than dense).
``--quick`` runs ``stock`` and ``sparse`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_BACKENDS = ["stock", "sparse={}", 'quest-k24={"selection": "quest", "k": 24}']
QUICK_BACKENDS = ["stock", "sparse={}"]
CPU_LENGTHS = [1024, 2048, 4096, 7000]
GPU_LENGTHS = [8192, 16384, 32768, 65536, 131072]
_KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def parse_backend(spec: str) -> tuple[str, dict | None]:
    name, _, settings = spec.partition("=")
    if name == "stock":
        return name, None
    try:
        return name, json.loads(settings or "{}")
    except json.JSONDecodeError as e:
        raise SystemExit(f"--backends {spec!r}: settings after '=' must be JSON ({e})") from None


def vllm_sparse_cmd() -> list[str]:
    """The ``vllm-sparse`` command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("vllm-sparse")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vllm_sparse.cli"]


def engine_args(model: str, settings: dict | None, max_model_len: int, extra: list[str],
                dtype: str = "bfloat16") -> list[str]:
    args = ["--model", model, "--max-model-len", str(max_model_len), "--dtype", dtype, "--seed", "0",
            "--no-enable-prefix-caching", *extra]
    if settings is not None:
        args += ["--attention-backend", "CUSTOM", "--additional-config", json.dumps({"vllm_sparse": settings})]
    return args


def run_bench(kind: str, args: list[str], log: Path) -> tuple[dict, int | None]:
    """One ``vllm-sparse bench KIND`` run: its JSON result and the KV capacity it logged."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [*vllm_sparse_cmd(), "bench", kind, *args, "--output-json", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n")
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            raise RuntimeError(f"`{' '.join(cmd[:3])}` failed (exit {proc.returncode}); log: {log}\n{tail}")
        m = _KV_TOKENS.search(proc.stdout)
        return json.loads(out.read_text()), (int(m.group(1).replace(",", "")) if m else None)


def measure(model: str, name: str, settings: dict | None, input_len: int, a, log: Path) -> dict:
    max_len = a.max_model_len or (input_len + max(a.output_len, a.latency_output_len) + 64)
    common = engine_args(model, settings, max_len, a.engine_arg, a.dtype)
    t0 = time.perf_counter()
    thr, kv_tokens = run_bench("throughput", [*common, "--dataset-name", "random", "--random-input-len",
                                              str(input_len), "--random-output-len", str(a.output_len),
                                              "--num-prompts", str(a.num_prompts)], log)
    out_tokens = a.num_prompts * a.output_len
    row = dict(backend=name, settings=settings, input_len=input_len, output_len=a.output_len,
               num_prompts=a.num_prompts, requests_per_s=thr["requests_per_second"],
               total_tokens_per_s=thr["tokens_per_second"], output_tokens_per_s=out_tokens / thr["elapsed_time"],
               elapsed_s=thr["elapsed_time"], kv_cache_tokens=kv_tokens)
    if a.latency_iters:
        lat = {}
        for out_len in (a.latency_output_len, 1):
            res, _ = run_bench("latency", [*common, "--input-len", str(input_len), "--output-len", str(out_len),
                                           "--batch-size", "1", "--num-iters", str(a.latency_iters),
                                           "--num-iters-warmup", "1"], log)
            lat[out_len] = res["avg_latency"]
        n_out = a.latency_output_len
        row.update(latency_s=lat[n_out], prefill_latency_s=lat[1], latency_output_len=n_out,
                   time_per_output_token_ms=1000 * (lat[n_out] - lat[1]) / max(1, n_out - 1))
    row["wall_s"] = time.perf_counter() - t0
    return row


def add_ratios(rows: list[dict], baseline: str) -> None:
    base = {r["input_len"]: r for r in rows if r["backend"] == baseline}
    for r in rows:
        b = base.get(r["input_len"])
        if b is None:
            continue
        r["total_tokens_per_s_vs_base"] = r["total_tokens_per_s"] / b["total_tokens_per_s"]
        r["output_tokens_per_s_vs_base"] = r["output_tokens_per_s"] / b["output_tokens_per_s"]
        if r.get("time_per_output_token_ms") and b.get("time_per_output_token_ms"):
            r["tpot_speedup_vs_base"] = b["time_per_output_token_ms"] / r["time_per_output_token_ms"]
        if r.get("kv_cache_tokens") and b.get("kv_cache_tokens"):
            r["kv_cache_tokens_vs_base"] = r["kv_cache_tokens"] / b["kv_cache_tokens"]


def table(rows: list[dict], baseline: str) -> str:
    head = (f"{'input':>7} {'backend':<12} {'total tok/s':>11} {'vs ' + baseline:>9} {'out tok/s':>9} "
            f"{'TPOT ms':>8} {'speed-up':>8} {'KV tokens':>11} {'vs':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "—"  # noqa: E731
        lines.append(f"{r['input_len']:>7} {r['backend']:<12} {f('total_tokens_per_s', '11.1f')} "
                     f"{f('total_tokens_per_s_vs_base', '8.2f')}× {f('output_tokens_per_s', '9.2f')} "
                     f"{f('time_per_output_token_ms', '8.1f')} {f('tpot_speedup_vs_base', '7.2f')}× "
                     f"{f('kv_cache_tokens', '11,d')} {f('kv_cache_tokens_vs_base', '5.3f')}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["backend"] for r in rows):
        rs = [r for r in rows if r["backend"] == name]
        x = [r["input_len"] for r in rs]
        axes[0].plot(x, [r["total_tokens_per_s"] for r in rs], marker="o", label=name)
        if all(r.get("time_per_output_token_ms") for r in rs):
            axes[1].plot(x, [r["time_per_output_token_ms"] for r in rs], marker="o", label=name)
    axes[0].set(xlabel="input tokens", ylabel="total tokens/s (bench throughput)", xscale="log")
    axes[1].set(xlabel="input tokens", ylabel="time per output token, batch 1 (ms)", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from vllm_sparse.cpu_tuning import model_dtype

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="model directory or asset name, e.g. gemma3-270m, smollm2-32k (default: SmolLM2-135M)")
    ap.add_argument("--input-lens", type=int, nargs="+", default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--latency-iters", type=int, default=None, help="0: skip `bench latency`")
    ap.add_argument("--latency-output-len", type=int, default=256, help="tokens generated by the timed latency run")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: input + output + 64")
    ap.add_argument("--backends", nargs="+", default=None, help=f"default: {DEFAULT_BACKENDS}")
    ap.add_argument("--engine-arg", action="append", default=[],
                    help="extra engine argument for every run (repeatable), e.g. --engine-arg=--enforce-eager")
    ap.add_argument("--quick", action="store_true", help="the reduced grid of `make bench`")
    ap.add_argument("--gpu", action="store_true", help="the GPU preset: 8k-128k inputs, 32 prompts")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--dry-run", action="store_true", help="print the plan (runs, commands) and exit")
    ap.add_argument("--dtype", default=model_dtype(), help="model dtype (default here: %(default)s; see cpu_tuning.py)")
    a = ap.parse_args(argv)
    preset = (dict(input_lens=GPU_LENGTHS, output_len=256, num_prompts=32, latency_iters=3) if a.gpu else
              dict(input_lens=[2048, 7000], output_len=64, num_prompts=4, latency_iters=1) if a.quick else
              dict(input_lens=CPU_LENGTHS, output_len=128, num_prompts=8, latency_iters=2))
    preset["backends"] = QUICK_BACKENDS if a.quick else DEFAULT_BACKENDS
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if not a.gpu and "--enforce-eager" not in a.engine_arg:
        a.engine_arg.append("--enforce-eager")  # CPU: no graph capture
    if a.gpu and a.model is None:
        raise SystemExit("--gpu needs --model: a model whose context holds the 128k preset (SmolLM2 holds 8k)")
    from vllm_sparse.assets.models import model_option

    model = model_option(a.model)
    backends = [parse_backend(s) for s in a.backends]
    from vllm_sparse.config import SparseConfig

    for name, settings in backends:  # a bad setting stops here, not after an hour of other runs
        if settings is not None:
            try:
                SparseConfig.from_dict(settings)
            except ValueError as e:
                raise SystemExit(f"--backends {name}: {e}") from None
    stem = "throughput_quick" if a.quick else "throughput_gpu" if a.gpu else "throughput"
    if a.dry_run:
        print(f"throughput: {len(a.input_lens) * len(backends)} runs (input lengths {a.input_lens} x backends "
              f"{[n for n, _ in backends]}), {a.num_prompts} prompts x {a.output_len} output tokens, latency "
              f"iterations {a.latency_iters}, model {model} -> {a.out}/{stem}.{{json,png,log}}")
        for name, settings in backends:
            max_len = a.max_model_len or max(a.input_lens) + max(a.output_len, a.latency_output_len) + 64
            print(f"  {name}: vllm-sparse bench throughput "
                  f"{' '.join(engine_args(model, settings, max_len, a.engine_arg, a.dtype)[2:])}")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.out / f"{stem}.log"
    log.unlink(missing_ok=True)
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with vLLM
        tqdm = None
    jobs = [(n, b) for n in a.input_lens for b in backends]
    bar = tqdm(jobs, desc="bench", unit="run") if tqdm else jobs
    for input_len, (name, settings) in bar:
        if tqdm:
            bar.set_postfix_str(f"{name} @ {input_len}")
        rows.append(measure(model, name, settings, input_len, a, log))
    baseline = backends[0][0]
    add_ratios(rows, baseline)
    machine = cpu_model() or "unknown CPU"
    gpu = shutil.which("nvidia-smi") and subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    result = dict(model=model, dtype=a.dtype, machine=machine, gpu=gpu or None, cpus=os.cpu_count(), baseline=baseline,
                  argv=sys.argv[1:] if argv is None else list(argv), rows=rows)
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, baseline))
    print(f"machine: {gpu or machine}, {os.cpu_count()} CPUs; log: {log}")
    plot(rows, a.out / f"{stem}.png",
         f"{Path(model).name}: {a.num_prompts} prompts × input, {a.output_len} out — {gpu or machine}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
