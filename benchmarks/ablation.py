"""Which approximation of the sparse decode loses answers: each setting against dense, same prompts.

The plugin's decode approximates dense attention in several independent ways — whole pages instead
of tokens, candidates ranked by a bound then rescored (``candidate_factor``), rescoring over a
subset of the head dims (``rescore_dims``), pages reused across decode steps (``reselect_every``,
``reselect_similarity``, ``reselect_candidate_factor``). This script turns them on one at a time and
measures each against dense on the quality tasks of :mod:`quality` (RULER-style, real essays,
fresh answers per run), paired: the same prompts, the same prefill, only the decode differs.

**How one engine serves every setting.** Prefill is dense in every setting, and at ~90 prompt
tokens/s on a 2-core CPU it is nearly all the cost (one 7.5k-token prompt: about a minute). So one
in-process ``vllm.LLM`` with the plugin and prefix caching on prefills each group of prompts once:
a priming request of the prompt less its last two tokens (``max_tokens=1``) fills vLLM's prefix
cache; then, for each setting, :func:`apply_settings` rebuilds the plugin's metadata builders and
layer settings from the new ``additional_config`` (through ``LLM.collective_rpc``) and the group is
generated again. Each request finds its prompt's full blocks cached and computes the last 2–33
tokens with the plugin's prefill (dense, vLLM's kernel), so every setting — the reference included —
decodes from the same K/V and the same first-token path. Only settings that keep the cache layout
can share an engine (same ``page_size``, no ``evict``): :func:`apply_settings` refuses the others.

The reference is the plugin's ``dense`` policy: vLLM's own attention op over every page of the
plugin's cache, the stock backend's kernel (their greedy tokens are equal in float32:
``tests/vllm_sparse/test_backend_tiny.py``, ``test_cuda_route.py``). Per task, length and setting
the table gives the fraction of answers stated (RULER's score for multi-answer tasks), its paired
difference from the reference with the standard error of that difference, and how many outputs
are identical to the reference's::

Beside the named settings, ``quest``, ``streaming`` and ``topk`` are those selection policies at the
default ``ntopk``'s average budget over the run's prompts (the other rules at the same cost).
``--model`` takes an asset's name; a model without a chat template (``gemma3-270m``, a base model)
gets plain completion prompts::

    python benchmarks/ablation.py                                   # 4 tasks × 4k/7.5k × 20 samples, the ablation set
    python benchmarks/ablation.py --model gemma3-270m --lengths 16384 --tasks single multi_key --samples 6 \
        --settings default quest streaming                          # long context (make bench-long)
    python benchmarks/ablation.py --lengths 4096 --samples 8 --settings default 'mine={"rescore_dims": 0}'
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # collective_rpc and the counters in-process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "6")

TASKS = ("multi_value", "multi_query", "single", "multi_key")
REFERENCE = "dense"
#: selection policies at the default's average budget over the run's prompts (quality.py's rule)
BUDGETED = ("quest", "streaming", "topk")
#: one approximation at a time, then combinations; the reference first
SETTINGS = {
    "dense": {"policy": "dense"},
    "default": {},
    "every-step": {"reselect_every": 1},
    "exact-rescore": {"rescore_dims": 0},
    "exact-rescore-every-step": {"rescore_dims": 0, "reselect_every": 1},
    "cf16-every-step": {"candidate_factor": 16.0, "reselect_every": 1},
    "cf4-every-step": {"candidate_factor": 4.0, "reselect_every": 1},
    "tokens": {"selection": "token", "reselect_every": 1},
    "pages-then-tokens": {"selection": "page", "reselect_every": 1},
}


def _sibling(name: str):
    """A sibling script: ``quality`` imported once by path, the others through its loader."""
    if "_bench_quality" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_bench_quality", Path(__file__).with_name("quality.py"))
        sys.modules["_bench_quality"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["_bench_quality"])
    return sys.modules["_bench_quality"] if name == "quality" else sys.modules["_bench_quality"]._bench(name)


def build_cases(tok, tasks, lengths, samples: int, seed: int, chat: bool = True):
    """``samples`` cases per (task, length); ``single`` spreads its needle over ``samples`` depths
    (one per equal slice of [0, 1], jittered). ``chat``: the chat template (a base model has none:
    plain completion prompts)."""
    q = _sibling("quality")
    rng, out = random.Random(seed), []
    for t, task in enumerate(tasks):
        s = seed + 7919 * (t + 1)
        for length in lengths:
            if task == "single":
                depths = [(i + rng.random()) / samples for i in range(samples)]
                out += q.single_needle(tok, [length], depths, seed=s + length, chat=chat)
            else:
                maker = dict(multi_value=q.multi_value, multi_query=q.multi_query, multi_key=q.multi_key,
                             multi_needle=q.multi_needle, vt=q.variable_tracking)[task]
                out += maker(tok, [length], per_length=samples, seed=s + length, chat=chat)
    return out


def resolve(settings: dict[str, dict | str], cases) -> dict[str, dict]:
    """Settings named after a budgeted policy of ``quality.py`` (``quest``, ``streaming``, ``topk``)
    become that policy at the default ``ntopk``'s average budget over ``cases`` (same cost, other rule)."""
    q = _sibling("quality")
    budget = q.average_budget(cases)
    return {name: q.settings_of(s, budget) if isinstance(s, str) else s for name, s in settings.items()}


def apply_settings(worker, settings: dict) -> str:
    """Run on the worker (``LLM.collective_rpc``): make ``settings`` the plugin's, as if the engine
    had started with them — fresh metadata builders (their selection parameters and reuse state)
    and every sparse layer's settings. Refuses a change of cache layout (page size, eviction)."""
    from vllm_sparse.backend import SparseAttentionBackend, SparseAttentionImpl
    from vllm_sparse.config import CONFIG_KEY, SparseConfig

    vllm_config = worker.vllm_config
    new, old = SparseConfig.from_dict(settings), SparseAttentionBackend.process_config
    if old is not None and (new.page_size != old.page_size or new.evict or old.evict):
        raise ValueError(f"settings {settings}: page_size and evict fix the cache layout; they need their own engine")
    vllm_config.additional_config = {**(vllm_config.additional_config or {}), CONFIG_KEY: dict(settings)}
    builders = 0
    for groups in worker.model_runner.attn_groups:
        for group in groups:
            if group.backend is not SparseAttentionBackend:
                continue
            for b in group.metadata_builders:
                type(b).__init__(b, b.kv_cache_spec, b.layer_names, vllm_config, b.device)
                builders += 1
    layers = 0
    for layer in vllm_config.compilation_config.static_forward_context.values():
        impl = getattr(layer, "impl", None)
        if isinstance(impl, SparseAttentionImpl):
            impl.reconfigure(new)
            layers += 1
    if not builders or not layers:
        raise RuntimeError(f"no sparse attention found in this engine (builders {builders}, layers {layers})")
    return f"{builders} builders, {layers} layers"


def run(model: str, cases, settings: dict[str, dict], group: int, dtype: str, page_size: int,
        after_group=None) -> dict:
    """Every case under every setting; ``after_group(done, rows)`` after each group (``done`` cases
    finished, ``rows`` their outputs so far), e.g. to keep what a long run has measured."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sparse import stats

    q = _sibling("quality")
    tok = AutoTokenizer.from_pretrained(model)
    ids = [tok(c.prompt, add_special_tokens=False).input_ids for c in cases]
    first = next(iter(settings.values()))
    # room for the longest prompt and its answer (the model's own limit still applies)
    max_len = max(8192, max(len(x) + c.max_tokens for x, c in zip(ids, cases)) + 16)
    llm = LLM(model=model, max_model_len=max_len, enforce_eager=True, dtype=dtype, seed=0,
              enable_prefix_caching=True, max_num_batched_tokens=8192, attention_backend="CUSTOM",
              additional_config={"vllm_sparse": {**first, "page_size": page_size}})
    out = {name: dict(outputs=[None] * len(cases), attended=0, context=0, decode_s=0.0) for name in settings}
    prefill_s, t0, current = 0.0, time.perf_counter(), next(iter(settings))
    for start in range(0, len(cases), group):
        idx = list(range(start, min(start + group, len(cases))))
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids[i][:-2]) for i in idx],
                     SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        prefill_s += time.perf_counter() - t
        for name, s in settings.items():
            if name != current:  # a one-setting run never switches: the engine as it started
                llm.collective_rpc(apply_settings, args=({**s, "page_size": page_size},))
                current = name
            before, t = stats.snapshot(), time.perf_counter()
            res = llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in idx],
                               [SamplingParams(max_tokens=cases[i].max_tokens, temperature=0.0) for i in idx],
                               use_tqdm=False)
            after, row = stats.snapshot(), out[name]
            row["decode_s"] += time.perf_counter() - t
            row["attended"] += after["attended_tokens"] - before["attended_tokens"]
            row["context"] += after["context_tokens"] - before["context_tokens"]
            for i, r in zip(idx, res):
                row["outputs"][i] = r.outputs[0].text
        print(f"  {idx[-1] + 1}/{len(cases)} cases, {time.perf_counter() - t0:.0f} s "
              f"(priming prefill {prefill_s:.0f} s)", flush=True)
        if after_group is not None and idx[-1] + 1 < len(cases):
            after_group(idx[-1] + 1, _scored(out, cases[:idx[-1] + 1]))
    return dict(rows=_scored(out, cases), prefill_s=prefill_s, wall_s=time.perf_counter() - t0)


def _scored(out: dict, cases) -> dict:
    """The rows of the first ``len(cases)`` cases, scored, with their attended fraction."""
    q, n = _sibling("quality"), len(cases)
    rows = {}
    for name, row in out.items():
        outputs = row["outputs"][:n]
        rows[name] = dict(outputs=outputs, scores=[q.score(c, x) for c, x in zip(cases, outputs)],
                          attended_fraction=row["attended"] / row["context"] if row["context"] else 1.0,
                          context=row["context"], decode_s=row["decode_s"])
    return rows


def compare(cases, rows: dict, reference: str) -> list[dict]:
    """Per (task, length, setting): answer fraction, all-stated accuracy, paired difference from the
    reference in points with its standard error, identical outputs."""
    ref = rows[reference]
    cells = sorted({(c.task, c.length) for c in cases}, key=lambda x: (TASKS.index(x[0]) if x[0] in TASKS else 9, x[1]))
    table = []
    for task, length in cells:
        idx = [i for i, c in enumerate(cases) if (c.task, c.length) == (task, length)]
        for name, row in rows.items():
            frac = [row["scores"][i]["frac"] for i in idx]
            d = [100 * (row["scores"][i]["frac"] - ref["scores"][i]["frac"]) for i in idx]
            n = len(d)
            mean = sum(d) / n
            se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
            table.append(dict(task=task, length=length, setting=name, n=n, frac=100 * sum(frac) / n,
                              all=100 * sum(row["scores"][i]["all"] for i in idx) / n, diff=mean, diff_se=se,
                              identical=sum(row["outputs"][i] == ref["outputs"][i] for i in idx)))
    return table


def summary(cases, rows, reference) -> list[dict]:
    """Per setting over every case: mean answer fraction, paired difference, worst cell, identical."""
    table = compare(cases, rows, reference)
    out = []
    for name, row in rows.items():
        mine = [r for r in table if r["setting"] == name]
        d = [100 * (row["scores"][i]["frac"] - rows[reference]["scores"][i]["frac"]) for i in range(len(cases))]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
        out.append(dict(setting=name, frac=sum(r["frac"] * r["n"] for r in mine) / len(cases), diff=mean, diff_se=se,
                        worst_cell=min(r["diff"] for r in mine), identical=sum(r["identical"] for r in mine),
                        n=len(cases), attended=row["attended_fraction"], decode_s=row["decode_s"]))
    return out


def format_tables(cases, rows, reference) -> str:
    table, lines = compare(cases, rows, reference), []
    names = list(rows)
    head = f"{'task':<12}{'length':>7} " + "".join(f"{n[:16]:>18}" for n in names)
    lines += [head, "-" * len(head)]
    for task, length in dict.fromkeys((r["task"], r["length"]) for r in table):
        cell = {r["setting"]: r for r in table if (r["task"], r["length"]) == (task, length)}
        lines.append(f"{task:<12}{length:>7} " + "".join(
            f"{cell[n]['frac']:>7.1f} {cell[n]['diff']:>+5.1f}±{cell[n]['diff_se']:<4.1f}" for n in names))
    lines.append("(each setting: % of answers stated, then its paired difference from "
                 f"{reference!r} in points ± standard error)\n")
    head = f"{'setting':<26}{'stated':>8}{'vs ref':>9}{'± se':>7}{'worst cell':>12}{'identical':>11}{'attended':>10}"
    lines += [head, "-" * len(head)]
    for r in summary(cases, rows, reference):
        lines.append(f"{r['setting']:<26}{r['frac']:>7.1f}%{r['diff']:>+9.2f}{r['diff_se']:>7.2f}{r['worst_cell']:>+12.1f}"
                     f"{r['identical']:>6}/{r['n']:<4}{r['attended']:>10.1%}")
    return "\n".join(lines)


def parse_settings(names) -> dict[str, dict | str]:
    """Named settings, ``NAME=JSON``, or a budgeted policy's name (resolved by :func:`resolve`)."""
    out = {}
    for name in names:
        if "=" in name:
            label, _, js = name.partition("=")
            out[label] = json.loads(js or "{}")
        elif name in SETTINGS:
            out[name] = SETTINGS[name]
        elif name in BUDGETED:
            out[name] = name
        else:
            raise SystemExit(f"--settings {name!r}: one of {list(SETTINGS)}, {list(BUDGETED)} (at the default's "
                             "budget) or NAME=JSON")
    return out


def check(settings: dict[str, dict], page_size: int) -> None:
    """A bad setting, or one that needs its own engine, stops the run before the engine starts."""
    from vllm_sparse.config import SparseConfig

    for name, s in settings.items():
        try:
            cfg = SparseConfig.from_dict({**s, "page_size": page_size})
        except ValueError as e:
            raise SystemExit(f"setting {name}: {e}") from None
        if cfg.evict or "page_size" in s:
            raise SystemExit(f"setting {name}: evict and page_size fix the cache layout, which the settings of one "
                             "engine share (--page-size sets it; benchmarks/quality.py runs eviction)")


def main(argv=None) -> dict:
    from vllm_sparse.cpu_tuning import model_dtype

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="output folder (default: %(default)s)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 7500])
    ap.add_argument("--samples", type=int, default=20, help="cases per (task, length) (default %(default)s)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS),
                    help=f"named ({list(SETTINGS)}) or NAME=JSON; the reference {REFERENCE!r} is added first")
    ap.add_argument("--group", type=int, default=8, help="prompts prefilled together and kept cached (default %(default)s)")
    ap.add_argument("--page-size", type=int, default=32, help="the engine's page size (default %(default)s)")
    ap.add_argument("--seed", type=int, help="default: a fresh random seed (printed)")
    ap.add_argument("--model", help="model directory or asset name, e.g. gemma3-270m (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default=model_dtype(), help="model dtype (default here: %(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="build the cases, check every setting, print the plan, exit")
    args = ap.parse_args(argv)
    named = parse_settings([REFERENCE] + [s for s in args.settings if s != REFERENCE])
    check({name: s for name, s in named.items() if isinstance(s, dict)}, args.page_size)  # before any model work
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    commit = _sibling("serve_load").git_commit()  # the code that runs, read before the engine starts
    print(f"seed {seed}, commit {commit}", flush=True)
    from transformers import AutoTokenizer

    from vllm_sparse.assets import data

    from vllm_sparse.assets.models import model_option

    q = _sibling("quality")
    model = model_option(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    chat = data._has_chat_template(tok)
    cases = build_cases(tok, args.tasks, args.lengths, args.samples, seed, chat)
    settings = resolve(named, cases)
    check(settings, args.page_size)
    print(f"ablation: {len(cases)} cases × {len(settings)} settings: {settings} ({'chat' if chat else 'completion'} "
          f"prompts, {sum(c.context_tokens for c in cases):,} context tokens, each prefilled once)", flush=True)
    if args.dry_run:
        return dict(settings=settings, cases=len(cases))
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(seed=seed, model=model, chat=chat, dtype=args.dtype, page_size=args.page_size, group=args.group,
                samples=args.samples, reference=REFERENCE, settings=settings, cpus=os.cpu_count(),
                machine=q._cpu_model(), commit=commit)

    def result(done: int, rows: dict, **extra) -> dict:
        return dict(meta={**meta, **extra, "cases_done": done, "cases_planned": len(cases)},
                    cells=compare(cases[:done], rows, REFERENCE), summary=summary(cases[:done], rows, REFERENCE),
                    cases=[dict(task=c.task, length=c.length, tokens=c.context_tokens, answers=c.answers,
                                depths=c.actual_depths) for c in cases[:done]],
                    rows=rows)

    def keep(done: int, rows: dict) -> None:  # what a run stopped early has measured
        (args.out / "ablation.partial.json").write_text(
            json.dumps(result(done, rows, wall_s=time.perf_counter() - t0), indent=2))

    res = run(model, cases, settings, args.group, args.dtype, args.page_size, after_group=keep)
    print("\n" + format_tables(cases, res["rows"], REFERENCE))
    out = result(len(cases), res["rows"], prefill_s=res["prefill_s"], wall_s=res["wall_s"])
    (args.out / "ablation.json").write_text(json.dumps(out, indent=2))
    (args.out / "ablation.partial.json").unlink(missing_ok=True)
    print(f"wrote {args.out / 'ablation.json'}")
    return out


if __name__ == "__main__":
    main()
