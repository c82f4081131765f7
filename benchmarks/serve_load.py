"""Serving under load and faults: a real ``vllm-sparse serve`` on 127.0.0.1, driven by the ``openai`` client.

Scenarios, in this order, against one server with the plugin's defaults:

* ``mixed``: requests of 300–7,000 prompt tokens (completions and chat, half of them streaming,
  ``ignore_eos``), many at once. Every one is answered with all its tokens, and the sparsity
  counters on ``/metrics`` move (decode steps, attended < context tokens);
* ``hangups``: streams dropped by their clients after the first chunk. The server aborts them:
  ``vllm:num_requests_running`` and ``..._waiting`` return to 0, far fewer tokens are generated
  than were asked for, and the next request is answered;
* ``bad``: bad inputs (prompt past ``--max-model-len``, ``max_tokens`` past it or negative, bad
  sampling values, unknown model, malformed JSON, no messages): each gets a 4xx, and a good request
  after them is answered;
* ``burst``: a burst of short requests, many at once;
* ``sigterm``: the server stopped with SIGTERM exits 0 within a minute, with no abort in its output
  and no process of its tree left;

then the ``mixed`` load again against a second server with ``evict`` on (``{"evict": "streaming"}``)
in a pool of ``--evict-pool-blocks`` KV blocks, fewer than the longest request alone would need
without eviction (``evict``): every request is answered, and the pool's peak (``vllm:kv_cache_usage_perc``
polled every 0.2 s, times the pool's blocks from ``vllm:cache_config_info``) stays under the dense need;
that server is stopped with SIGTERM too.

Full size is what ``make bench`` runs (48 mixed requests 24 at once, 12 hangups, a 300-request burst
64 at once, the evicting load in 160 blocks; about 25 minutes on a 2-core CPU)::

    python benchmarks/serve_load.py --out benchmarks/out

``make test`` runs the same functions at small sizes (a few requests, prompts up to 1.5k tokens;
``tests/vllm_sparse/test_server.py``), so that the suite stays within its time on 2 cores while
every code path here (streaming and not, chat and completions, aborts, 4xx, eviction in a small
pool, SIGTERM) still runs. Prints a table, writes ``serve_load.json`` and ``serve_load.png`` (KV blocks in use over
the mixed load, both servers); exits 1 if any request
failed or any check did not hold.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import functools
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("mixed", "hangups", "bad", "burst", "sigterm", "evict")
#: what a crashed or aborted process leaves in its output (vLLM's own "Aborted request ..." lines are fine)
ABORT_MARKERS = ("SIGABRT", "core dumped", "terminate called", "Fatal Python error", "Check failed")
QUESTION = "\n\nIn one sentence, what is the text above about?"


# -- the server ----------------------------------------------------------------------------------------
def vllm_sparse_exe() -> str:
    return str(Path(sys.executable).with_name("vllm-sparse"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model: str, args: list[str], log_path: Path, timeout: float = 600, env: dict | None = None):
    """``vllm-sparse serve MODEL ARGS`` on 127.0.0.1 in its own process group (setsid); yields ``(base_url, process)``.

    Leaving the block stops it with SIGTERM if it still runs (SIGKILL to its process group after 60 s)."""
    import requests

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}, **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([vllm_sparse_exe(), "serve", model, "--host", "127.0.0.1", "--port", str(port),
                                 *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = "\n".join(log_path.read_text().splitlines()[-20:])
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready in {timeout} s (log: {log_path})")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def process_tree(pid: int) -> set[int]:
    """``pid`` and its descendants, plus every process of its process group (setsid) if it leads one."""
    import psutil

    try:
        tree = {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()
    if os.getsid(pid) == pid:
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == pid:
                    tree.add(p.pid)
    return tree


def alive(pids) -> list[str]:
    """The processes among ``pids`` still running (zombies excluded), as ``"pid name"``."""
    import psutil

    left = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {p.name()}")
    return left


def stop_with_sigterm(proc: subprocess.Popen, log_path: Path, timeout: float = 90, grace: float = 15) -> dict:
    """SIGTERM to ``proc`` alone, as a service manager sends it: its exit code, the seconds it took, abort
    markers in the output it wrote afterwards, and processes of its tree still alive ``grace`` s later."""
    tree = process_tree(proc.pid)
    offset = log_path.stat().st_size
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.monotonic() - t0
    deadline = time.monotonic() + grace
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive(tree)
    with open(log_path, errors="replace") as f:
        f.seek(offset)
        after = f.read()
    markers = [m for m in ABORT_MARKERS if m in after]
    if code is None or left:  # clean up what the check found
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
    return dict(exit_code=code, seconds=round(seconds, 1), abort_markers=markers, processes_left=left,
                processes_before=len(tree), ok=code == 0 and not markers and not left)


# -- /metrics ----------------------------------------------------------------------------------------
def metrics(base: str) -> list[tuple[str, dict, float]]:
    """Every sample on the server's ``/metrics``: ``(name, labels, value)``."""
    import requests

    return parse_metrics(requests.get(base + "/metrics", timeout=30).text)


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples, name: str, **labels) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def pool_info(samples) -> dict:
    """The KV pool vLLM reports (``vllm:cache_config_info``): blocks and tokens per block."""
    for n, lab, _ in samples:
        if n == "vllm:cache_config_info" and lab.get("num_gpu_blocks") not in (None, "None"):
            return dict(blocks=int(lab["num_gpu_blocks"]), block_size=int(lab["block_size"]))
    raise RuntimeError("vllm:cache_config_info has no num_gpu_blocks")


class PoolWatch:
    """Polls ``/metrics`` every ``interval`` s in a thread: ``series`` of (seconds, KV-cache usage, running
    requests), and their peaks."""

    def __init__(self, base: str, interval: float = 0.2):
        self.base, self.interval = base, interval
        self.series: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.perf_counter()
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                s = metrics(self.base)
                self.series.append((round(time.perf_counter() - t0, 2), total(s, "vllm:kv_cache_usage_perc"),
                                    int(total(s, "vllm:num_requests_running"))))
            self._stop.wait(self.interval)

    @property
    def peak_usage(self) -> float:
        return max((u for _, u, _ in self.series), default=0.0)

    @property
    def peak_running(self) -> int:
        return max((r for _, _, r in self.series), default=0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- requests ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    api: str  # "completions" | "chat"
    stream: bool
    prompt: str
    max_tokens: int


@functools.lru_cache(maxsize=2)
def _essays(model: str):
    """``model``'s tokenizer and the bundled essays in its tokens (a few seconds: once per model)."""
    from transformers import AutoTokenizer

    from vllm_sparse.assets import data

    tok = AutoTokenizer.from_pretrained(model)
    return tok, tok.encode(data.essays_text(), add_special_tokens=False)


def essay_prompts(model: str, lengths: list[int], seed: int = 0) -> list[str]:
    """Essay text of about each of ``lengths`` tokens (the model's tokenizer), from different places."""
    tok, ids = _essays(str(model))
    rng = random.Random(seed)
    return [tok.decode(ids[(s := rng.randrange(len(ids) - n)):s + n]) for n in lengths]


def spread(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """``n`` lengths evenly from ``lo`` to ``hi``, in a fixed shuffled order (long and short interleave)."""
    out = [round(lo + (hi - lo) * k / max(1, n - 1)) for k in range(n)]
    random.Random(seed).shuffle(out)
    return out


def mixed_requests(prompts: list[str], max_tokens: int, suffix: str = QUESTION) -> list[Req]:
    """Completions and chat, each streaming and not, in turn: half of the requests stream."""
    kinds = [("completions", False), ("chat", True), ("completions", True), ("chat", False)]
    return [Req(*kinds[i % 4], p + suffix, max_tokens) for i, p in enumerate(prompts)]


def one(client, model: str, req: Req) -> dict:
    """Send ``req``; answered means all ``max_tokens`` tokens came back (``ignore_eos``)."""
    t0, ttft, usage, error = time.perf_counter(), None, None, None
    kw = dict(model=model, max_tokens=req.max_tokens, temperature=0, extra_body={"ignore_eos": True})
    if req.stream:
        kw.update(stream=True, stream_options={"include_usage": True})
    try:
        if req.api == "completions":
            out = client.completions.create(prompt=req.prompt, **kw)
        else:
            out = client.chat.completions.create(messages=[{"role": "user", "content": req.prompt}], **kw)
        if req.stream:
            for chunk in out:
                if ttft is None and chunk.choices and (getattr(chunk.choices[0], "text", None)
                                                       or getattr(getattr(chunk.choices[0], "delta", None), "content", None)):
                    ttft = time.perf_counter() - t0
                usage = chunk.usage or usage
        else:
            usage = out.usage
    except Exception as e:  # noqa: BLE001 - openai's errors, and a stream cut mid-way (httpx's)
        error = f"{type(e).__name__}: {e}"[:300]
    ok = error is None and usage is not None and usage.completion_tokens == req.max_tokens
    if error is None and not ok:
        error = f"usage {usage}"
    return dict(ok=ok, error=error, latency_s=time.perf_counter() - t0, ttft_s=ttft,
                prompt_tokens=usage.prompt_tokens if usage else None, stream=req.stream, api=req.api)


def client_for(base: str, timeout: float = 1800):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def run_load(base: str, model: str, reqs: list[Req], concurrency: int) -> dict:
    """``reqs`` through a pool of ``concurrency`` client threads; summary of the answers."""
    client = client_for(base)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda r: one(client, model, r), reqs))
    wall = time.perf_counter() - t0
    lat = sorted(r["latency_s"] for r in results)
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    errors = [r["error"] for r in results if not r["ok"]]
    return dict(requests=len(reqs), concurrency=concurrency, answered=len(reqs) - len(errors), errors=len(errors),
                error_samples=errors[:5], streaming=sum(r.stream for r in reqs), wall_s=round(wall, 1),
                p50_s=round(statistics.median(lat), 2), p95_s=round(lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)], 2),
                max_s=round(lat[-1], 2), ttft_p50_s=round(statistics.median(ttft), 2) if ttft else None,
                prompt_tokens=[r["prompt_tokens"] for r in results],
                longest_prompt=max((r["prompt_tokens"] or 0) for r in results))


def thin(series: list[tuple], points: int = 300) -> list[tuple]:
    """At most about ``points`` of ``series``, its peak (second field) kept."""
    step = max(1, len(series) // points)
    peak = max(range(len(series)), key=lambda i: series[i][1], default=None)
    return [x for i, x in enumerate(series) if i % step == 0 or i == peak]


def sparsity_delta(before, after) -> dict:
    d = {k: total(after, f"vllm_sparse:{k}_total") - total(before, f"vllm_sparse:{k}_total")
         for k in ("decode_steps", "attended_tokens", "context_tokens")}
    d["attended_fraction"] = round(d["attended_tokens"] / max(1.0, d["context_tokens"]), 4)
    d["moved"] = d["decode_steps"] > 0 and 0 < d["attended_tokens"] < d["context_tokens"]
    return d


# -- scenarios ---------------------------------------------------------------------------------------
def mixed(base: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """The mixed load, watching the pool; ``ok``: every request answered (the caller adds its own checks)."""
    before = metrics(base)
    with PoolWatch(base) as watch:
        row = run_load(base, model, mixed_requests(prompts, max_tokens), concurrency)
    after = metrics(base)
    pool = pool_info(after)
    row.update(sparsity=sparsity_delta(before, after), pool_blocks=pool["blocks"], block_size=pool["block_size"],
               peak_pool_blocks=round(watch.peak_usage * (pool["blocks"] - 1)), peak_running=watch.peak_running,
               pool_series=thin([(t, round(u * (pool["blocks"] - 1)), r) for t, u, r in watch.series]),
               preemptions=total(after, "vllm:num_preemptions_total") - total(before, "vllm:num_preemptions_total"))
    row["ok"] = row["errors"] == 0
    return row


def hangups(base: str, model: str, prompt: str, n: int, max_tokens: int = 256, drain_s: float = 120) -> dict:
    """``n`` streams dropped after their first chunk; ``ok``: aborted (nothing running or waiting, far fewer
    tokens generated than asked for) and the next request answered."""
    client = client_for(base)
    before = metrics(base)

    def hang_up(i):
        stream = client.completions.create(model=model, prompt=f"({i}) " + prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        try:
            return any(c.choices and c.choices[0].text for c in stream)  # ends at the first text chunk
        finally:
            stream.close()

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as pool:
        first = list(pool.map(hang_up, range(n)))
    closed = time.perf_counter()
    deadline, busy = closed + drain_s, None
    while time.perf_counter() < deadline:
        s = metrics(base)
        busy = total(s, "vllm:num_requests_running") + total(s, "vllm:num_requests_waiting")
        if busy == 0:
            break
        time.sleep(0.2)
    drained = time.perf_counter() - closed
    after = metrics(base)
    generated = total(after, "vllm:generation_tokens_total") - total(before, "vllm:generation_tokens_total")
    aborted = (total(after, "vllm:request_success_total", finished_reason="abort")
               - total(before, "vllm:request_success_total", finished_reason="abort"))
    nxt = one(client, model, Req("completions", False, "The capital of France is", 4))
    answered = sum(first) + nxt["ok"]  # the dropped streams' first chunks, and the next request
    return dict(requests=n + 1, concurrency=n, answered=answered, errors=n + 1 - answered,
                wall_s=round(closed - t0, 1), drained_s=round(drained, 1), left_busy=busy, aborted=aborted,
                generated_tokens=generated, asked_tokens=n * max_tokens, next_ok=nxt["ok"],
                ok=answered == n + 1 and busy == 0 and generated < n * max_tokens / 2)


def bad_inputs(base: str, model: str, max_model_len: int, long_prompt: str) -> dict:
    """Each bad request gets a 4xx; ``ok`` also needs a good request answered after them."""
    import requests

    short = {"model": model, "prompt": "Hello", "max_tokens": 4}
    cases = {
        "prompt past max-model-len": ("/v1/completions", {**short, "prompt": long_prompt}),
        "max_tokens past max-model-len": ("/v1/completions", {**short, "max_tokens": max_model_len + 1}),
        "negative max_tokens": ("/v1/completions", {**short, "max_tokens": -3}),
        "temperature -1": ("/v1/completions", {**short, "temperature": -1}),
        "top_p 1.5": ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                               "top_p": 1.5}),
        "unknown model": ("/v1/completions", {**short, "model": "no-such-model"}),
        "no messages": ("/v1/chat/completions", {"model": model}),
        "malformed JSON": ("/v1/completions", "{not json"),
    }
    status = {}
    for name, (path, body) in cases.items():
        data = body if isinstance(body, str) else json.dumps(body)
        status[name] = requests.post(base + path, data=data, headers={"Content-Type": "application/json"},
                                     timeout=120).status_code
    nxt = one(client_for(base), model, Req("chat", False, "Name the capital of France.", 4))
    bad = [k for k, v in status.items() if not 400 <= v < 500]
    return dict(requests=len(cases) + 1, concurrency=1, answered=len(cases) - len(bad) + nxt["ok"],
                errors=len(bad) + (not nxt["ok"]), status=status, next_ok=nxt["ok"], ok=not bad and nxt["ok"])


def burst(base: str, model: str, n: int, concurrency: int, max_tokens: int = 8) -> dict:
    """``n`` short requests (a line each, all four kinds), ``concurrency`` at once; ``ok``: all answered."""
    reqs = mixed_requests([f"Request {i}: name a colour and a fruit." for i in range(n)], max_tokens, suffix="")
    row = run_load(base, model, reqs, concurrency)
    row["ok"] = row["errors"] == 0
    return row


def dense_need(prompt_tokens: list[int | None], max_tokens: int, block_size: int, concurrency: int) -> dict:
    """Blocks the requests hold at their end without eviction: the longest alone, and the ``concurrency`` longest."""
    blocks = sorted((-(-(p + max_tokens) // block_size) for p in prompt_tokens if p), reverse=True)
    return dict(longest=blocks[0], at_once=sum(blocks[:concurrency]))


def sparse_load(base: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """The mixed load; ``ok``: every request answered and the sparsity counters moved."""
    row = mixed(base, model, prompts, max_tokens, concurrency)
    row["ok"] = row["ok"] and row["sparsity"]["moved"]
    return row


def evict_load(base: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """The mixed load on an evicting server; ``ok``: every request answered and the pool's peak under
    the dense need (the pool itself is smaller than the longest request alone would need)."""
    row = mixed(base, model, prompts, max_tokens, concurrency)
    row["dense_need"] = dense_need(row["prompt_tokens"], max_tokens, row["block_size"], concurrency)
    row["ok"] = row["ok"] and row["peak_pool_blocks"] <= row["pool_blocks"] < row["dense_need"]["longest"]
    return row


# -- the run -----------------------------------------------------------------------------------------
def server_args(name: str, max_model_len: int, dtype: str, sparse: dict, extra: list[str]) -> list[str]:
    return ["--served-model-name", name, "--attention-backend", "CUSTOM", "--enforce-eager", "--max-model-len",
            str(max_model_len), "--dtype", dtype, "--additional-config", json.dumps({"vllm_sparse": sparse}), *extra]


def evict_args(pool_blocks: int, chunk: int = 512) -> list[str]:
    return ["--num-gpu-blocks-override", str(pool_blocks), "--max-num-batched-tokens", str(chunk),
            "--no-enable-prefix-caching"]


def git_commit() -> str:
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = run("rev-parse", "--short", "HEAD")
    return head + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "") if head else "unknown"


def table(rows: list[dict]) -> str:
    head = f"{'scenario':<9} {'requests':>8} {'at once':>7} {'answered':>8} {'errors':>6} {'wall s':>7} {'p50 s':>6} {'p95 s':>6}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "—"  # noqa: E731
        lines.append(f"{r['scenario']:<9} {f('requests', '8d')} {f('concurrency', '7d')} {f('answered', '8d')} "
                     f"{f('errors', '6d')} {f('wall_s', '7.1f')} {f('p50_s', '6.1f')} {f('p95_s', '6.1f')}  "
                     f"{'' if r['ok'] else 'FAILED '}{note(r)}")
    return "\n".join(lines)


def note(r: dict) -> str:
    if "exception" in r:
        return r["exception"]
    if r["scenario"] in ("mixed", "evict"):
        s = r["sparsity"]
        text = (f"{r['streaming']} streaming, prompts up to {r['longest_prompt']:,}; attended "
                f"{100 * s['attended_fraction']:.1f}% of context; pool peak {r['peak_pool_blocks']:,}/{r['pool_blocks']:,} "
                f"blocks, {r['peak_running']} running, {r['preemptions']:.0f} preemptions")
        if "dense_need" in r:
            text += f"; dense need {r['dense_need']['longest']} (longest) / {r['dense_need']['at_once']:,} (at once)"
        return text
    if r["scenario"] == "hangups":
        return (f"dropped after 1st chunk: idle {r['drained_s']} s later, {r['generated_tokens']:.0f}/"
                f"{r['asked_tokens']} tokens generated, {r['aborted']:.0f} counted aborted; next answered: {r['next_ok']}")
    if r["scenario"] == "bad":
        return ", ".join(f"{k} {v}" for k, v in r["status"].items())
    if r["scenario"] == "sigterm":
        return (f"{r['server']}: exit {r['exit_code']} in {r['seconds']} s, {r['processes_before']} processes, "
                f"left {r['processes_left'] or 'none'}, abort markers {r['abort_markers'] or 'none'}")
    return ""


def plot(rows: list[dict], path: Path, title: str) -> None:
    """KV blocks in use and requests running over the mixed load, per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [r for r in rows if r.get("pool_series")]
    if not loads:
        return
    fig, axes = plt.subplots(1, len(loads), figsize=(5.5 * len(loads), 3.8), squeeze=False)
    for ax, r in zip(axes[0], loads):
        t, blocks, running = zip(*r["pool_series"])
        ax.plot(t, blocks, label="KV blocks in use")
        ax.axhline(r["pool_blocks"], color="k", ls=":", label=f"pool ({r['pool_blocks']:,} blocks)")
        if "dense_need" in r:
            ax.axhline(r["dense_need"]["longest"], color="r", ls="--", label="longest request, no eviction")
        ax.set(xlabel="s", ylabel="blocks", title=f"{r['server']}: {r['requests']} requests, {r['concurrency']} at once")
        ax2 = ax.twinx()
        ax2.plot(t, running, color="tab:green", alpha=0.5, label="running")
        ax2.set_ylabel("requests running")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from vllm_sparse.cpu_tuning import model_dtype

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the prepared SmolLM2)")
    ap.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--requests", type=int, default=48, help="mixed load: requests (default 48)")
    ap.add_argument("--concurrency", type=int, default=24, help="mixed load: requests at once (default 24)")
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=[300, 7000], metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, default=32, help="mixed load: tokens generated per request")
    ap.add_argument("--hangups", type=int, default=12, help="streams dropped after their first chunk")
    ap.add_argument("--hangup-prompt-tokens", type=int, default=2000, help="their prompt's length")
    ap.add_argument("--burst", type=int, default=300, help="short requests in the burst")
    ap.add_argument("--burst-concurrency", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--sparse", default="{}", help="the first server's vllm_sparse settings (JSON)")
    ap.add_argument("--evict", default='{"evict": "streaming"}', help="the evicting server's settings (JSON)")
    ap.add_argument("--evict-pool-blocks", type=int, default=160, help="its KV pool, in blocks")
    ap.add_argument("--dtype", default=model_dtype(), help="model dtype (default here: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    a = ap.parse_args(argv)
    try:
        sparse, evict = json.loads(a.sparse), json.loads(a.evict)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--sparse/--evict must be JSON objects ({e})") from None
    from vllm_sparse.config import SparseConfig

    for flag, settings in (("--sparse", sparse), ("--evict", evict)):
        try:
            SparseConfig.from_dict(settings)
        except ValueError as e:
            raise SystemExit(f"{flag}: {e}") from None
    model = a.model
    if model is None:
        from vllm_sparse.assets.models import model_path

        model = str(model_path("smollm2"))
    name = Path(model).name or "model"  # the served model name
    first = server_args(name, a.max_model_len, a.dtype, sparse, [])
    second = server_args(name, a.max_model_len, a.dtype, evict, evict_args(a.evict_pool_blocks))
    plan = (f"serve_load: {a.scenarios}; mixed {a.requests} requests of {a.prompt_tokens[0]}-{a.prompt_tokens[1]} "
            f"tokens, {a.concurrency} at once, {a.max_tokens} out; {a.hangups} hangups; burst {a.burst}, "
            f"{a.burst_concurrency} at once; evict pool {a.evict_pool_blocks} blocks -> {a.out}/serve_load.json")
    if a.dry_run:
        print(plan)
        print(f"  vllm-sparse serve {model} {' '.join(first)}")
        if "evict" in a.scenarios:
            print(f"  vllm-sparse serve {model} {' '.join(second)}")
        return 0
    print(plan, flush=True)
    commit = git_commit()  # the code that runs: read before the first server starts
    a.out.mkdir(parents=True, exist_ok=True)
    lengths = spread(a.requests, *a.prompt_tokens)
    prompts = essay_prompts(model, lengths)
    hangup_prompt, long_prompt = essay_prompts(model, [a.hangup_prompt_tokens, a.max_model_len + 200], seed=1)
    rows: list[dict] = []

    def record(scenario, run, **extra):
        try:
            row = run()
        except Exception as e:  # noqa: BLE001 - a scenario that breaks is a failed row, the others still run
            row = dict(ok=False, exception=f"{type(e).__name__}: {e}"[:500])
        rows.append({"scenario": scenario, **extra, **row})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        return rows[-1]

    if set(a.scenarios) - {"evict"}:
        log = a.out / "serve_load_server.log"
        with serve(model, first, log) as (base, proc):
            if "mixed" in a.scenarios:
                record("mixed", lambda: sparse_load(base, name, prompts, a.max_tokens, a.concurrency), server="sparse")
            if "hangups" in a.scenarios:
                record("hangups", lambda: hangups(base, name, hangup_prompt, a.hangups), server="sparse")
            if "bad" in a.scenarios:
                record("bad", lambda: bad_inputs(base, name, a.max_model_len, long_prompt), server="sparse")
            if "burst" in a.scenarios:
                record("burst", lambda: burst(base, name, a.burst, a.burst_concurrency), server="sparse")
            if "sigterm" in a.scenarios:
                record("sigterm", lambda: stop_with_sigterm(proc, log), server="sparse")
    if "evict" in a.scenarios:
        log = a.out / "serve_load_evict.log"
        with serve(model, second, log) as (base, proc):
            record("evict", lambda: evict_load(base, name, prompts, a.max_tokens, a.concurrency),
                         server="evict", settings=evict)
            record("sigterm", lambda: stop_with_sigterm(proc, log), server="evict")
    ok = all(r["ok"] for r in rows)
    machine = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown"
    result = dict(ok=ok, machine=machine, cpus=os.cpu_count(), date=datetime.date.today().isoformat(),
                  commit=commit, model=model, dtype=a.dtype, sparse=sparse, evict=evict,
                  argv=sys.argv[1:] if argv is None else list(argv), rows=rows)
    text = json.dumps(result, indent=2)  # number lists (the series' points) on one line each
    text = re.sub(r"\[\s+([-\d.e, \n]+?)\s+\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)
    (a.out / "serve_load.json").write_text(text + "\n")
    plot(rows, a.out / "serve_load.png", f"{Path(model).name} ({a.dtype}), {machine}, {result['commit']}")
    print(table(rows))
    print(f"machine: {machine}, {os.cpu_count()} CPUs, {a.dtype}; commit {result['commit']}; "
          f"{'all requests answered, every check held' if ok else 'FAILED'}; {a.out}/serve_load.json")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
