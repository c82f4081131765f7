"""benchmarks/quality.py: the RULER-style builders state the truth about their prompts, scoring is
exact, and one tiny end-to-end run through real vLLM writes sane JSON and plots.

Builders run on fresh random seeds (printed, so a failure can be replayed with that seed).
"""

from __future__ import annotations

import json
import random
import re

import pytest
from bench_scripts import load_script

from vllm_sparse.assets import data

q = load_script("quality")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def seed():
    s = random.SystemRandom().randrange(2**31)
    print(f"seed {s}")
    return s


def _n_tokens(tok, text):
    return len(tok.encode(text, add_special_tokens=False))


def _context(tok, c):
    start, end = data.context_span(tok, c.prompt, c.question, c.prefix, c.chat)
    return c.prompt[start:end]


def _words(text):
    return set(re.findall(r"\w+", text.lower()))


def _check_common(tok, c):
    """Length, needles present once, depths, answers unique and absent from distractors/haystack."""
    assert abs(c.context_tokens - c.length) <= max(2, c.length // 200), (c.task, c.length, c.context_tokens)
    assert _n_tokens(tok, c.prompt) == c.context_tokens
    ctx = _context(tok, c)
    for s in c.needles:
        assert ctx.count(s) == 1, (c.task, s)
    haystack = ctx
    for s in c.needles:
        haystack = haystack.replace(s, " ")
    assert len(set(c.answers)) == len(c.answers) and not set(c.answers) & set(c.distractors)
    for a in c.answers + c.distractors:  # only the needles carry them; the essays never do
        assert a.lower() not in _words(haystack) and a.lower() not in data.essay_words(), (c.task, a)
        assert sum(a in s.split(" ")[-1] or f" {a} " in s for s in c.needles) >= 1
    # within one sentence of the essays (needles go to sentence starts) plus the needles inserted before it
    tol = max(0.03, (80 + 15 * len(c.needles)) / c.context_tokens)
    assert len(c.actual_depths) == len(c.depths)
    for want, got in zip(c.depths, c.actual_depths):
        assert abs(got - want) <= tol, (c.task, c.length, want, got)
        assert got <= want + 0.005 or len(c.needles) > 1  # a lone needle goes to the sentence start before
    assert c.prompt.endswith(c.prefix) and c.question in c.prompt


@pytest.mark.parametrize("chat", [True, False])
def test_single_needle_grid_lengths_and_depths(tok, seed, chat):
    lengths, depths = (1024, 3000, 7500), (0.0, 0.3, 1.0)
    cases = q.single_needle(tok, lengths, depths, seed=seed, chat=chat)
    assert [(c.length, c.depths[0]) for c in cases] == [(n, d) for n in lengths for d in depths]
    assert len({c.answers[0] for c in cases}) == len(cases)  # fresh answer per case
    for c in cases:
        _check_common(tok, c)
        assert c.chat is chat and ("<|im_start|>assistant" in c.prompt) is chat
        key = re.search(r"for (\w+)\?", c.question).group(1)
        assert c.needles == (f"The special magic number for {key} is {c.answers[0]}.",)
    assert cases[0].actual_depths == (0.0,)


def test_multi_answer_tasks(tok, seed):
    length = 2500
    mn = q.multi_needle(tok, [length], per_length=2, needles=4, seed=seed)
    mk = q.multi_key(tok, [length], per_length=2, distractors=9, seed=seed)
    mv = q.multi_value(tok, [length], per_length=2, values=3, seed=seed)
    mq = q.multi_query(tok, [length], per_length=2, queries=3, distractors=3, seed=seed)
    for c in mn + mk + mv + mq:
        _check_common(tok, c)
    for c in mn:
        assert len(c.answers) == 4 and not c.distractors and len(c.needles) == 4
    for c in mk:  # the asked key's sentence carries the answer; 9 distractor keys, all distinct
        keys = [re.search(r"for (\w+) is", s).group(1) for s in c.needles]
        assert len(set(keys)) == 10 and len(c.distractors) == 9
        assert c.needles[0] == f"The special magic number for {keys[0]} is {c.answers[0]}."
        assert f"for {keys[0]}?" in c.question
    for c in mv:  # one key, three values
        assert len({re.search(r"for (\w+) is", s).group(1) for s in c.needles}) == 1 and len(c.answers) == 3
    for c in mq:  # the three asked keys are named in the question, the distractors' keys are not
        keys = [re.search(r"for (\w+) is", s).group(1) for s in c.needles]
        assert all(k in c.question for k in keys[:3]) and not any(k in c.question for k in keys[3:])
        assert [s.split()[-1].rstrip(".") for s in c.needles] == list(c.answers + c.distractors)
    with pytest.raises(ValueError, match="distractors"):
        q.multi_key(tok, [length], distractors=len(q.keys()), seed=seed)


def test_variable_tracking_chain(tok, seed):
    cases = q.variable_tracking(tok, [3000], per_length=2, hops=4, chains=2, seed=seed)
    for c in cases:
        _check_common(tok, c)
        ctx = _context(tok, c)
        value = re.search(r"assigned the value (\d+)", c.question).group(1)
        # follow the chain in the text: every VAR line, in text order
        assign = re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", ctx)
        assert len(assign) == 10 and all(line in ctx for line in c.needles)
        equal = set()
        for name, rhs in assign:  # a name equals `value` when it is assigned value or a name that equals it
            if rhs == value or rhs in equal:
                equal.add(name)
        assert sorted(equal) == sorted(c.answers) and len(c.answers) == 5
        # the distractor chain: its own names and value, none of the answers
        assert not set(c.answers) & set(c.distractors) and len(c.distractors) == 6
        assert list(c.actual_depths) == sorted(c.actual_depths)  # the chain is in text order
        assert "5 variables are assigned the value " + value in c.prefix


def test_build_is_reproducible_per_seed_and_fresh_across_seeds(tok, seed):
    kw = dict(lengths=(1024,), depths=(0.5,), task_lengths=(1200,), per_length=1)
    a, b = q.build(tok, seed, **kw), q.build(tok, seed, **kw)
    c = q.build(tok, seed + 1, **kw)
    assert [x.task for x in a] == list(q.TASKS)
    assert a == b and [x.answers for x in a] != [x.answers for x in c]


def _case(answers, distractors=()):
    return q.Case(task="t", prompt="", answers=tuple(answers), distractors=tuple(distractors), needles=(),
                  length=0, context_tokens=0, depths=(), actual_depths=(), question="", prefix="", chat=True)


def test_score_exact_match():
    one = _case(["4821"], ["4822", "9999"])
    assert q.score(one, " 4821.") == dict(all=True, frac=1.0, distractors=[])
    assert q.score(one, " 48210.")["all"] is False  # digits must not run on
    assert q.score(one, " 14821")["all"] is False
    assert q.score(one, " 4822, I think") == dict(all=False, frac=0.0, distractors=["4822"])
    assert q.score(one, "4821 or 9999") == dict(all=True, frac=1.0, distractors=["9999"])
    three = _case(["1111", "2222", "3333"])
    assert q.score(three, " 1111, 2222, and 3333.")["all"] is True
    part = q.score(three, " 3333 and 1111")
    assert part["all"] is False and part["frac"] == pytest.approx(2 / 3)
    assert q.score(three, "")["frac"] == 0.0
    vt = _case(["ABCDE", "FGHIJ"], ["KLMNO"])
    assert q.score(vt, " ABCDE, FGHIJ")["all"] is True
    assert q.score(vt, " ABCDEF, FGHIJ")["frac"] == 0.5
    assert q.score(vt, " FGHIJ, KLMNO") == dict(all=False, frac=0.5, distractors=["KLMNO"])


def test_summary_and_settings():
    cases = [_case(["1"]), _case(["2"])]
    cases = [q.Case(**{**c.__dict__, "task": "single", "length": 1024, "depths": (d,)})
             for c, d in zip(cases, (0.0, 0.5))]
    s = q.summarize(cases, [q.score(cases[0], "1"), q.score(cases[1], "3")])
    assert s["single"] == dict(acc=0.5, frac=0.5, n=2) and s["single_grid"] == {"1024": {"0": 1, "0.5": 0}}
    assert q.settings_of("dense", 300) is None
    assert q.settings_of("ntopk-a0.6-k4", 300) == {"policy": "ntopk", "alpha": 0.6, "k": 4.0}
    assert q.settings_of("topk", 300) == {"policy": "topk", "policy_args": {"budget_tokens": 300}, "dense_below": 0}
    assert q.settings_of("h2o-evict", 300) == {"policy": "dense", "evict": "h2o", "evict_args": {"keep": 300}}
    assert q.settings_of('mine={"k": 4}', 300) == {"k": 4}
    with pytest.raises(ValueError, match="policies"):
        q.settings_of("nope", 300)
    from vllm_sparse.config import SparseConfig

    for name in q.DEFAULT_POLICIES[1:]:  # every catalogue setting is valid
        SparseConfig.from_dict(q.settings_of(name, 400))
    # the average budget at the default k = 12: k * sqrt(n) at 4096 = 768, at 1024 clamped by nothing (384)
    two = [q.Case(**{**cases[0].__dict__, "context_tokens": n}) for n in (1024, 4096)]
    assert q.average_budget(two) == 576 and q.average_budget(two, k=8.0) == 384


@pytest.mark.slow
@pytest.mark.vllm
def test_end_to_end_tiny_run(tmp_path, smollm2_dir):
    out = tmp_path / "q"
    res = q.main(["--out", str(out), "--tasks", "single", "multi_key", "--lengths", "1100", "--depths", "0.5",
                  "--task-lengths", "1100", "--per-length", "1", "--policies", "dense", "ntopk-a0.5-k8",
                  "--model", str(smollm2_dir)])
    saved = json.loads((out / "quality.json").read_text())
    assert saved["meta"]["seed"] == res["meta"]["seed"] and saved["meta"]["chat"] is True
    assert [r["name"] for r in saved["rows"]] == ["dense", "ntopk-a0.5-k8"]
    assert [c["task"] for c in saved["cases"]] == ["single", "multi_key"]
    for r in saved["rows"]:
        assert set(r["summary"]) == {"single", "multi_key", "single_grid"}
        assert len(r["outputs"]) == 2 and all(isinstance(t, str) and t for t in r["outputs"])
        for t in ("single", "multi_key"):
            assert 0 <= r["summary"][t]["acc"] <= 1 and r["summary"][t]["n"] == 1
        assert list(r["summary"]["single_grid"]) == ["1100"]
    dense, sparse = saved["rows"]
    assert dense["attended_fraction"] == 1.0
    # the plugin planned the decode steps past dense_below (1024): ~k*sqrt(n) of ~1.1k tokens
    assert 0.1 < sparse["attended_fraction"] < 0.5
    for name in ("quality_tasks.png", "quality_single_dense.png", "quality_single_ntopk-a0.5-k8.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
