"""Long-context quality, RULER-style: six retrieval tasks × the plugin's settings, through real vLLM.

Every prompt is real text — the Paul Graham essays of :mod:`vllm_sparse.assets.data` cut to a stated
token length (+-0.5%) — with needle sentences in the magic-number format of ``data.STYLES``
("The special magic number for cobalt is 9725.") at stated depths, then a question, ending in
the answer's opening words. Tasks (after RULER, Hsieh et al. 2024):

============== ===========================================================================
single         one needle; a grid of lengths (1k-7.5k tokens) × depths (0-100%)
multi_needle   ``needles`` (3) keyed needles, no distractors; asks for all the numbers
multi_key      one key asked among ``distractors`` (3) other keys (RULER MK-NIAH)
multi_value    ``values`` (3) numbers for one key ("One of the special magic numbers for …")
multi_query    ``queries`` (2) keys asked at once among ``distractors`` (2) other keys
vt             variable tracking: "VAR QXKZT = 48213." then ``hops`` (4) "VAR B = A." links;
               asks which variables equal the value (answer: all ``hops + 1`` names);
               ``chains`` - 1 distractor chains with their own names and value
============== ===========================================================================

Answers are numbers/names drawn fresh per run (``--seed``, random unless given, printed), all
distinct within a prompt and absent from the essays and from the distractors. A case scores 1
when the output states **every** answer (``vllm_sparse.assets.data.retrieved``'s word-bounded match per
answer); the fraction of answers found is reported beside it, and distractor values the output
states are recorded in the JSON.

**Prompt format.** Chat template (the default; ``--completion`` gives the plain "Question: …
Answer: …" form of ``data.needle_prompts``). The issue asks for the chat template, and it does not
hurt dense SmolLM2-135M-Instruct here: one dense vLLM engine, seed 1, both formats in the same
batch (2k and 4k tokens; 6 single-needle cases, 4 of each other task), accuracy / fraction of
answers stated, chat vs completion: single 100% / 100%, multi_key 75% / 75%, multi_needle
0% (42% of answers) vs 0% (0%), multi_value 0% (42%) vs 0% (8%), multi_query 0% (50%) vs 0% (12%),
vt 0% vs 0%. With the template the model answers multi-answer questions as a list of numbers;
as a completion it mostly rambles. The 135M model rarely states *every* answer of a
multi-answer task even densely, so those tasks' answer fractions carry the comparison.

For every setting — ``dense`` (vLLM's stock backend, no ``attention_backend``) and the plugin's
``ntopk`` at several (α, k), and ``topk`` / ``quest`` / ``streaming`` (selection) /
``streaming-evict`` / ``snapkv-evict`` / ``h2o-evict`` at the *same average budget* as the
default ``ntopk`` (k=12, α=0.5) over this run's prompts (``benchmarks/policies.py::settings_for``)
— one in-process ``vllm.LLM`` (greedy, bf16, ``enforce_eager``, ``max_model_len`` the longest prompt's
(at least 8192), prefix caching off;
prefill in 512-token chunks with eviction, whole prompts otherwise: :func:`chunk_for`)
generates every task's prompts in one call. The attended fraction is the
plugin's own decode counters (``vllm_sparse.stats``) over that call: tokens attended / tokens of
context, summed over the decode steps the plugin planned (stock dense: 1). With eviction the
attended tokens are at most the resident ones and the context is the full length, so
``dense`` + ``evict`` reports the resident fraction.

Prints an accuracy table (task × setting), writes ``quality.json``, ``quality_tasks.png``
(accuracy per task per setting) and ``quality_single_<setting>.png`` (depth × length heatmaps)::

    python benchmarks/quality.py                                      # full grid, all settings, into benchmarks/out
    python benchmarks/quality.py --out /tmp/q --quick                 # reduced grid: 6.3 min on 2 cores
    python benchmarks/quality.py --out /tmp/q --policies dense ntopk-a0.5-k12 'mine={"k": 4}'
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the stats counters live in-process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from vllm_sparse.assets import data  # noqa: E402  (after the environment: data imports no vLLM)

TASKS = ("single", "multi_needle", "multi_key", "multi_value", "multi_query", "vt")
LENGTHS = (1024, 2048, 4096, 7500)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
QUICK = dict(lengths=(2048, 4096), depths=(0.0, 0.5, 1.0), task_lengths=(3072,), per_length=1,
             policies=("dense", "ntopk-a0.5-k12", "topk", "streaming-evict"))
NTOPK = ((0.5, 12.0), (0.5, 8.0), (0.5, 4.0), (0.6, 4.0), (0.4, 16.0))  # (alpha, k); the first is the plugin default
BUDGETED = ("topk", "quest", "streaming", "streaming-evict", "snapkv-evict", "h2o-evict")
DEFAULT_POLICIES = ("dense", *(f"ntopk-a{a:g}-k{k:g}" for a, k in NTOPK), *BUDGETED)
MAX_TOKENS = dict(single=12, multi_key=12, multi_needle=28, multi_value=28, multi_query=20, vt=32)

NUMBER = data.STYLES["magic-number"]
# keys: data's words, then more that the essays lack (filtered against them at use)
_MORE_KEYS = ("albatross", "amethyst", "anchovy", "basilisk", "bergamot", "bobcat", "cardamom", "cassowary",
              "chinchilla", "cinnabar", "cormorant", "cuttlefish", "dromedary", "eucalyptus", "flamingo",
              "gardenia", "gazelle", "hibiscus", "ibex", "iguana", "jackal", "kestrel", "kumquat", "lemur",
              "lilac", "lynx", "magnolia", "mandolin", "manatee", "marigold", "marmot", "nutmeg", "ocelot",
              "okapi", "oleander", "osprey", "papaya", "pelican", "peony", "persimmon", "quince", "rhubarb",
              "salamander", "sandalwood", "tamarind", "tapir", "toucan", "turquoise", "verbena", "walrus",
              "wombat", "zinnia")


@dataclass(frozen=True)
class Case:
    task: str
    prompt: str
    answers: tuple[str, ...]        # every one must be stated
    distractors: tuple[str, ...]    # values/names in the prompt that are not answers
    needles: tuple[str, ...]        # the inserted sentences, answer-bearing ones first
    length: int                     # requested prompt length, tokens
    context_tokens: int             # actual prompt length, tokens
    depths: tuple[float, ...]       # requested depth of each answer-bearing needle
    actual_depths: tuple[float, ...]  # where they landed: tokens before / tokens of the context
    question: str
    prefix: str
    chat: bool
    max_tokens: int = 12


def keys() -> list[str]:
    return [w for w in dict.fromkeys(data._WORDS + _MORE_KEYS) if w not in data.essay_words()]


def _case(tok, task, length, needles, answers, distractors, question, prefix, chat, n_answer_needles):
    """Build the prompt; ``needles`` is ``[(depth, sentence)]``, answer-bearing ones first."""
    prompt, n = data.insert_sentences(tok, length, needles, question, prefix, chat)
    start, end = data.context_span(tok, prompt, question, prefix, chat)
    context = prompt[start:end]
    found = tuple(data.sentence_depth(tok, context, s) for _, s in needles[:n_answer_needles])
    return Case(task=task, prompt=prompt, answers=tuple(map(str, answers)), distractors=tuple(map(str, distractors)),
                needles=tuple(s for _, s in needles), length=length, context_tokens=n,
                depths=tuple(d for d, _ in needles[:n_answer_needles]), actual_depths=found,
                question=question, prefix=prefix, chat=chat, max_tokens=MAX_TOKENS[task])


def _fmt(word, number):
    return {k: v.format(word=word, number=number) for k, v in NUMBER.items()}


def single_needle(tok, lengths=LENGTHS, depths=DEPTHS, seed=0, chat=True) -> list[Case]:
    """One magic-number needle per (length, depth), lengths outer."""
    rng = random.Random(seed)
    grid = [(n, d) for n in lengths for d in depths]
    words = rng.sample(keys(), min(len(grid), len(keys())))
    numbers = data.fresh_numbers(rng, len(grid))
    out = []
    for i, (length, depth) in enumerate(grid):
        f = _fmt(words[i % len(words)], numbers[i])
        out.append(_case(tok, "single", length, [(depth, f["needle"])], [f["answer"]], [], f["question"],
                         f["prefix"], chat, 1))
    return out


def _spread(rng, count):
    """``count`` depths, one in each equal slice of [0.02, 0.98], in order."""
    w = 0.96 / count
    return [0.02 + w * (i + rng.uniform(0.1, 0.9)) for i in range(count)]


def multi_needle(tok, lengths, per_length=2, needles=3, seed=0, chat=True) -> list[Case]:
    """``needles`` keyed magic numbers, spread over the context; asks for all of them."""
    rng, out = random.Random(seed), []
    question = "What are all the special magic numbers mentioned in the provided text?"
    prefix = "The special magic numbers mentioned in the provided text are"
    for length in lengths:
        for _ in range(per_length):
            words, numbers = rng.sample(keys(), needles), data.fresh_numbers(rng, needles)
            sents = [(d, _fmt(w, x)["needle"]) for d, w, x in zip(_spread(rng, needles), words, numbers)]
            out.append(_case(tok, "multi_needle", length, sents, numbers, [], question, prefix, chat, needles))
    return out


def multi_key(tok, lengths, per_length=2, distractors=3, seed=0, chat=True) -> list[Case]:
    """One key asked among ``distractors`` other keyed numbers at random depths (RULER MK-NIAH;
    ``data.multikey_prompts`` with fresh answers, a distractor count, exact depths)."""
    rng, out = random.Random(seed), []
    if distractors + 1 > len(keys()):
        raise ValueError(f"distractors={distractors}: at most {len(keys()) - 1} (distinct keys)")
    for length in lengths:
        for _ in range(per_length):
            words, numbers = rng.sample(keys(), distractors + 1), data.fresh_numbers(rng, distractors + 1)
            sents = [(rng.uniform(0.02, 0.98), _fmt(w, x)["needle"]) for w, x in zip(words, numbers)]
            f = _fmt(words[0], numbers[0])
            out.append(_case(tok, "multi_key", length, sents, numbers[:1], numbers[1:], f["question"], f["prefix"],
                             chat, 1))
    return out


def multi_value(tok, lengths, per_length=2, values=3, seed=0, chat=True) -> list[Case]:
    """``values`` numbers for one key; asks for all of them (RULER MV-NIAH)."""
    rng, out = random.Random(seed), []
    for length in lengths:
        for _ in range(per_length):
            word, numbers = rng.choice(keys()), data.fresh_numbers(rng, values)
            sents = [(d, f"One of the special magic numbers for {word} is {x}.")
                     for d, x in zip(_spread(rng, values), numbers)]
            out.append(_case(tok, "multi_value", length, sents, numbers, [],
                             f"What are all the special magic numbers for {word} mentioned in the provided text?",
                             f"The special magic numbers for {word} mentioned in the provided text are", chat, values))
    return out


def multi_query(tok, lengths, per_length=2, queries=2, distractors=2, seed=0, chat=True) -> list[Case]:
    """``queries`` keys asked at once among ``distractors`` other keys (RULER MQ-NIAH)."""
    rng, out = random.Random(seed), []
    for length in lengths:
        for _ in range(per_length):
            n = queries + distractors
            words, numbers = rng.sample(keys(), n), data.fresh_numbers(rng, n)
            sents = [(rng.uniform(0.02, 0.98), _fmt(w, x)["needle"]) for w, x in zip(words, numbers)]
            asked = ", ".join(words[:queries - 1]) + f" and {words[queries - 1]}" if queries > 1 else words[0]
            out.append(_case(tok, "multi_query", length, sents, numbers[:queries], numbers[queries:],
                             f"What are all the special magic numbers for {asked} mentioned in the provided text?",
                             f"The special magic numbers for {asked} mentioned in the provided text are", chat,
                             queries))
    return out


def variable_names(rng, count, exclude=()) -> list[str]:
    """``count`` distinct 5-letter upper-case names absent from the essays (as words)."""
    taken, out = set(data.essay_words()) | {x.lower() for x in exclude}, []
    while len(out) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name.lower() not in taken:
            taken.add(name.lower())
            out.append(name)
    return out


def variable_tracking(tok, lengths, per_length=2, hops=4, chains=1, seed=0, chat=True) -> list[Case]:
    """RULER VT: ``chains`` chains ``VAR A = value. VAR B = A. …`` of ``hops`` links each, in text
    order at spread depths; asks for every name equal to the first chain's value."""
    rng, out = random.Random(seed), []
    for length in lengths:
        for _ in range(per_length):
            names = variable_names(rng, chains * (hops + 1))
            values = data.fresh_numbers(rng, chains, 10000, 100000)
            sents = []
            for c in range(chains):
                chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
                lines = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = {a}." for a, b in zip(chain, chain[1:])]
                sents += list(zip(_spread(rng, hops + 1), lines))
            value = values[0]
            others = names[hops + 1:] + [str(v) for v in values[1:]]  # the distractor chains' names and values
            out.append(_case(tok, "vt", length, sents, names[:hops + 1], others,
                             f"Find all variables that are assigned the value {value} in the text above.",
                             f"According to the chain(s) of variables assigned in the text above, {hops + 1} "
                             f"variables are assigned the value {value}, they are:", chat, hops + 1))
    return out


def build(tok, seed, chat=True, lengths=LENGTHS, depths=DEPTHS, task_lengths=(2048, 4096, 7500), per_length=2,
          tasks=TASKS) -> list[Case]:
    """Every task's cases (each task from its own seed), in :data:`TASKS` order."""
    makers = dict(single=lambda s: single_needle(tok, lengths, depths, s, chat),
                  multi_needle=lambda s: multi_needle(tok, task_lengths, per_length, seed=s, chat=chat),
                  multi_key=lambda s: multi_key(tok, task_lengths, per_length, seed=s, chat=chat),
                  multi_value=lambda s: multi_value(tok, task_lengths, per_length, seed=s, chat=chat),
                  multi_query=lambda s: multi_query(tok, task_lengths, per_length, seed=s, chat=chat),
                  vt=lambda s: variable_tracking(tok, task_lengths, per_length, seed=s, chat=chat))
    return [c for i, t in enumerate(TASKS) if t in tasks for c in makers[t](seed + 7919 * i)]


def score(case: Case, text: str) -> dict:
    """``all``: every answer stated; ``frac``: the fraction stated; ``distractors``: those stated."""
    hits = [data.retrieved(SimpleNamespace(answer=a), text) for a in case.answers]
    wrong = [d for d in case.distractors if data.retrieved(SimpleNamespace(answer=d), text)]
    return dict(all=all(hits), frac=sum(hits) / len(hits), distractors=wrong)


# -- settings ---------------------------------------------------------------------------------------

def _bench(name: str):
    """A sibling script of benchmarks/ as a module (``policies`` would import the policy package)."""
    key = f"_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def average_budget(cases, alpha: float | None = None, k: float | None = None) -> int:
    """Mean over the cases' prompt lengths of the ``ntopk`` budget at (α, k) (the plugin's rule;
    by default the plugin's default α and k)."""
    from vllm_sparse.config import SparseConfig
    from vllm_sparse.policies.budget import n_alpha_budget

    cfg = SparseConfig(**{key: v for key, v in dict(alpha=alpha, k=k).items() if v is not None})
    b = [n_alpha_budget(c.context_tokens, cfg.k, cfg.alpha, cfg.min_budget, cfg.max_budget) for c in cases]
    return round(sum(b) / len(b))


def settings_of(name: str, budget: int) -> dict | None:
    """``dense`` (None: stock backend), ``ntopk-a<α>-k<k>``, a :data:`BUDGETED` policy, or ``name=JSON``."""
    if "=" in name:
        return json.loads(name.partition("=")[2] or "{}")
    if name == "dense":
        return None
    if name.startswith("ntopk-a"):
        a, _, k = name[len("ntopk-a"):].partition("-k")
        return {"policy": "ntopk", "alpha": float(a), "k": float(k)}
    if name in BUDGETED:
        return _bench("policies").settings_for(name, budget)
    raise ValueError(f"--policies {name!r}: one of {list(DEFAULT_POLICIES)} or NAME=JSON settings")


def chunk_for(settings: dict | None, chunk: int | None = None) -> int:
    """Prefill chunk (``max_num_batched_tokens``): ``chunk`` if given, else 512 for eviction (its
    blocks are freed between chunks; ``policies.py``'s value) and 8192 (whole prompts) otherwise.
    Chunking changes nothing in a resident run's arithmetic, but 512-token chunks make a fresh
    engine of the vLLM CPU build far slower (measured: 2 chat prompts of 1.1k tokens, first
    ``generate`` 27 s with 512, 1.2 s with 2048; the third call 1.3 s vs 1.2 s)."""
    if chunk is not None:
        return chunk
    return 512 if settings is not None and settings.get("evict") else 8192


def run(model: str, settings: dict | None, cases, chunk: int | None = None, dtype: str = "bfloat16") -> dict:
    """Generate every case with one in-process LLM; outputs, scores, attended fraction, wall time."""
    from vllm import LLM, SamplingParams

    from vllm_sparse import stats

    # room for the longest prompt and its answer (at least SmolLM2's 8192; the model's own limit applies)
    kw = dict(model=model, max_model_len=max(8192, max(c.context_tokens + c.max_tokens for c in cases) + 256),
              enforce_eager=True, dtype=dtype, seed=0,
              enable_prefix_caching=False, max_num_batched_tokens=chunk_for(settings, chunk))
    if settings is not None:
        kw.update(attention_backend="CUSTOM", additional_config={"vllm_sparse": settings})
    t0 = time.perf_counter()
    llm = LLM(**kw)
    try:
        before, t = stats.snapshot(), time.perf_counter()
        outs = llm.generate([c.prompt for c in cases],
                            [SamplingParams(max_tokens=c.max_tokens, temperature=0.0) for c in cases], use_tqdm=True)
        wall, after = time.perf_counter() - t, stats.snapshot()
    finally:
        del llm
        gc.collect()
    texts = [o.outputs[0].text for o in outs]
    ctx = after["context_tokens"] - before["context_tokens"]
    attended = (after["attended_tokens"] - before["attended_tokens"]) / ctx if ctx else 1.0
    return dict(outputs=texts, scores=[score(c, x) for c, x in zip(cases, texts)], attended_fraction=attended,
                chunk=kw["max_num_batched_tokens"], generate_s=wall, total_s=time.perf_counter() - t0)


def summarize(cases, scores) -> dict:
    """Per task: accuracy (all answers), answer fraction, case count; ``single`` also by (length, depth)."""
    out = {}
    for task in dict.fromkeys(c.task for c in cases):
        s = [x for c, x in zip(cases, scores) if c.task == task]
        out[task] = dict(acc=sum(x["all"] for x in s) / len(s), frac=sum(x["frac"] for x in s) / len(s), n=len(s))
    grid = {}
    for c, x in zip(cases, scores):
        if c.task == "single":
            grid.setdefault(str(c.length), {})[f"{c.depths[0]:g}"] = int(x["all"])
    out["single_grid"] = grid
    return out


# -- output -----------------------------------------------------------------------------------------

def table(rows, tasks) -> str:
    head = f"{'setting':<18}{'attended':>9}" + "".join(f"{t:>13}" for t in tasks) + f"{'mean':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r["summary"]
        cells = "".join(f"{s[t]['acc']:>7.0%} {s[t]['frac']:>4.0%}" + " " for t in tasks)
        mean = sum(s[t]["acc"] for t in tasks) / len(tasks)
        lines.append(f"{r['name']:<18}{r['attended_fraction']:>9.1%}{cells}{mean:>7.0%}")
    return "\n".join(lines) + "\n(each task: accuracy with every answer stated, then the fraction of answers stated)"


def plot(rows, tasks, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.4 * len(tasks) + 2), 7), sharex=True)
    w = 0.8 / len(rows)
    for ax, key, what in zip(axes, ("acc", "frac"), ("accuracy (every answer stated)", "fraction of answers stated")):
        for i, r in enumerate(rows):
            ax.bar(np.arange(len(tasks)) + (i - (len(rows) - 1) / 2) * w, [r["summary"][t][key] for t in tasks], w,
                   label=f"{r['name']} ({r['attended_fraction']:.0%} attended)")
        ax.set(ylim=(0, 1.05), ylabel=what)
    axes[1].set_xticks(range(len(tasks)), tasks)
    axes[0].set_title("RULER-style quality, SmolLM2-135M in vLLM")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "quality_tasks.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for r in rows:
        grid = r["summary"].get("single_grid")
        if not grid:
            continue
        lengths = sorted(grid, key=int)
        depths = sorted({d for g in grid.values() for d in g}, key=float)
        m = np.array([[grid[n].get(d, np.nan) for n in lengths] for d in depths], dtype=float)
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
        ax.imshow(m, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=f"single needle: {r['name']}")
        fig.tight_layout()
        paths.append(out / f"quality_single_{r['name'].replace('/', '_')}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _cpu_model() -> str:
    return _bench("decode_throughput").cpu_model()


def main(argv=None) -> dict:
    from vllm_sparse.cpu_tuning import model_dtype

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="output folder (default: %(default)s, ignored by git)")
    ap.add_argument("--quick", action="store_true", help=f"reduced grid and settings: {QUICK}")
    ap.add_argument("--policies", nargs="+", help=f"settings to run (default {list(DEFAULT_POLICIES)})")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--lengths", type=int, nargs="+", help="single-needle grid lengths")
    ap.add_argument("--depths", type=float, nargs="+", help="single-needle grid depths")
    ap.add_argument("--task-lengths", type=int, nargs="+", help="lengths of the other tasks")
    ap.add_argument("--per-length", type=int, help="cases per length of the other tasks")
    ap.add_argument("--seed", type=int, help="default: a fresh random seed (printed)")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--chat", dest="chat", action="store_true", default=None,
                     help="chat template (the default when the model's tokenizer has one)")
    fmt.add_argument("--completion", dest="chat", action="store_false",
                     help="plain completion prompts (the default for a base model, e.g. gemma3-270m)")
    ap.add_argument("--chunk", type=int, help="max_num_batched_tokens (default: 512 with eviction, else 8192)")
    ap.add_argument("--model", help="model directory or asset name, e.g. gemma3-270m (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default=model_dtype(), help="model dtype (default here: %(default)s; see cpu_tuning.py)")
    ap.add_argument("--dry-run", action="store_true", help="build the cases, check every setting, print the plan, exit")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else dict(lengths=LENGTHS, depths=DEPTHS, task_lengths=(2048, 4096, 7500),
                                         per_length=2, policies=DEFAULT_POLICIES)
    pick = lambda name: getattr(args, name) or base[name]  # noqa: E731
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"seed {seed}", flush=True)
    from transformers import AutoTokenizer

    from vllm_sparse.assets.models import model_option

    model = model_option(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    if args.chat is None:
        args.chat = data._has_chat_template(tok)
    t0 = time.perf_counter()
    cases = build(tok, seed, args.chat, pick("lengths"), pick("depths"), pick("task_lengths"), pick("per_length"),
                  args.tasks)
    budget = average_budget(cases)
    print(f"{len(cases)} cases built in {time.perf_counter() - t0:.0f} s; budget of the budgeted policies: "
          f"{budget} tokens (mean ntopk k=12, alpha=0.5 budget over the prompts)", flush=True)
    plan = [(name.partition("=")[0], settings_of(name, budget)) for name in pick("policies")]
    from vllm_sparse.config import SparseConfig

    for label, settings in plan:  # a bad setting stops here, before any engine runs
        if settings is not None:
            try:
                SparseConfig.from_dict(settings)
            except ValueError as e:
                raise SystemExit(f"quality setting {label}: {e}") from None
    if args.dry_run:
        counts = {t: sum(c.task == t for c in cases) for t in args.tasks}
        print(f"quality: {len(cases)} cases {counts}, {sum(c.length for c in cases)} prompt tokens per setting; "
              f"settings: " + "; ".join(f"{n}={s}" for n, s in plan) + f" -> {args.out}/quality.json + PNGs")
        return dict(plan=plan, cases=len(cases))
    rows = []
    for name in pick("policies"):
        settings = settings_of(name, budget)
        label = name.partition("=")[0]
        print(f"{label}: {settings if settings is not None else 'vLLM stock backend'}", flush=True)
        res = run(model, settings, cases, args.chunk, args.dtype)
        rows.append(dict(name=label, settings=settings, summary=summarize(cases, res["scores"]), **res))
        print("  " + ", ".join(f"{t} {v['acc']:.0%}" for t, v in rows[-1]["summary"].items() if t != "single_grid")
              + f"; attended {res['attended_fraction']:.1%}; {res['total_s']:.0f} s", flush=True)
    tasks = [t for t in TASKS if t in args.tasks]
    print("\n" + table(rows, tasks))
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(meta=dict(seed=seed, chat=args.chat, model=model, dtype=args.dtype, budget=budget, chunk=args.chunk,
                            wall_s=time.perf_counter() - t0, cpus=os.cpu_count(), machine=_cpu_model()),
                  cases=[{k: v for k, v in asdict(c).items() if k != "prompt"} for c in cases], rows=rows)
    (args.out / "quality.json").write_text(json.dumps(result, indent=2))
    plot(rows, tasks, args.out)
    print(f"wrote {args.out / 'quality.json'} and plots; {time.perf_counter() - t0:.0f} s in all")
    return result


if __name__ == "__main__":
    main()
