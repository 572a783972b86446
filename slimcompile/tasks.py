"""RULER-style synthetic long-context tasks: one job — build deterministic haystack prompts and score answers.

The haystack is English prose from ``pydoc_data.topics`` (the Python docs that
ship with CPython), split into sentences and shuffled by the seed. Needles are
inserted between sentences at a chosen depth; the question comes last, so the
observation window of the pruning method sees it.

Tasks (:data:`TASKS`):

* ``passkey``    — "The pass key is 482913. Remember it." ; what is the pass key number?
* ``needle``     — one "The special magic number for <key> is: <number>." ; ask it.
* ``multikey``   — four such needles with different keys ; ask one of them.
* ``multivalue`` — four numbers for one key ; ask for all (scored as fraction found).
* ``vartrack``   — "VAR ABCDE = 12345." then "VAR FGHIJ = VAR ABCDE." chains of
  2-3 hops among distractor chains ; which variables hold the value (fraction found).

Note: the haystack text depends on the Python version (``pydoc_data`` differs
between releases), so a (task, seed, length) triple gives identical prompts
only on the same Python + tokenizer.
"""

from __future__ import annotations

import bisect
import functools
import random
import re
import string
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TASKS", "Sample", "make_sample", "make_samples", "score", "depth_for_seed", "haystack_sentences"]

TASKS = ("passkey", "needle", "multikey", "multivalue", "vartrack")

_N_MULTI = 4  # needles in multikey (1 asked + 3 distractor keys) and values in multivalue
_N_DISTRACTOR_CHAINS = 2
_GOLDEN = 0.6180339887498949

_ADJECTIVES = (
    "amber", "bold", "brave", "calm", "clever", "cosy", "crimson", "dusty", "eager", "fancy",
    "gentle", "glossy", "golden", "happy", "hollow", "humble", "icy", "jolly", "lucky", "mellow",
    "misty", "noble", "odd", "pale", "proud", "quiet", "rapid", "rusty", "shiny", "silent",
    "silver", "sleepy", "smooth", "steady", "sunny", "swift", "tidy", "vivid", "wild", "witty",
)
_NOUNS = (
    "anchor", "badger", "beacon", "canyon", "cedar", "comet", "falcon", "fjord", "garden", "glacier",
    "harbor", "heron", "island", "jaguar", "kettle", "lantern", "meadow", "mirror", "otter", "orchid",
    "panda", "parrot", "pebble", "pepper", "pigeon", "quartz", "rabbit", "raven", "river", "saddle",
    "salmon", "spruce", "teapot", "thistle", "tiger", "tulip", "valley", "violin", "walrus", "willow",
)

_INSTRUCTIONS = {
    "passkey": "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it afterwards.",
    "needle": "A special magic number is hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the number afterwards.",
    "multikey": "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize them. I will quiz you about one of them afterwards.",
    "multivalue": "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize them. I will quiz you about the numbers afterwards.",
    "vartrack": "Memorize and track the chains of variable assignments hidden in the following text.",
}


@dataclass
class Sample:
    """One prompt. ``prompt_text`` is the chat template applied to
    ``chat_messages`` (with the generation prompt) followed by ``answer_prefix``;
    ``input_ids`` is its tokenization. ``needle_spans`` are half-open ``[start, end)`` token index
    ranges in ``input_ids`` of the statements that carry the answer (for
    ``vartrack``: every statement of the asked chain), in prompt order;
    ``distractor_spans`` likewise for the distractor statements."""

    task: str
    prompt_text: str
    chat_messages: list[dict[str, str]]
    answers: list[str]
    needle_spans: list[tuple[int, int]]
    depth: float
    n_tokens: int
    input_ids: list[int]
    seed: int = 0
    target_tokens: int = 0
    question: str = ""
    needle_texts: list[str] = field(default_factory=list)
    distractor_spans: list[tuple[int, int]] = field(default_factory=list)
    answer_prefix: str = ""

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids

    @property
    def max_new_tokens(self) -> int:
        """Enough generated tokens for a complete answer (lists need more than one number)."""
        return {"multivalue": 64, "vartrack": 48}.get(self.task, 16)

    def needle_token_indices(self) -> list[int]:
        """Every token index covered by ``needle_spans`` (what a forced drop removes)."""
        return [i for a, b in self.needle_spans for i in range(a, b)]


# ---------------------------------------------------------------- haystack


def _blocks(doc: str):
    """Paragraphs, also split where the indentation changes (a definition-list
    term sits one line above its indented body and must not join its first sentence)."""
    for para in re.split(r"\n\s*\n", doc):
        block: list[str] = []
        indent = None
        for line in para.split("\n"):
            ind = len(line) - len(line.lstrip())
            if block and ind != indent:
                yield block
                block = []
            block.append(line)
            indent = ind
        if block:
            yield block


@functools.lru_cache(maxsize=1)
def haystack_sentences() -> tuple[str, ...]:
    """Prose sentences from ``pydoc_data.topics``, deduplicated, in a fixed order.

    Kept: sentences that start with a capital, end with a period and contain no
    digits (so no number in the haystack can collide with an answer), no
    markup/code characters and no all-caps words (so no variable-name collision).
    """
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        for para in _blocks(topics[key]):
            lines = [line.strip() for line in para]
            if any(line.startswith((">>>", "...")) or "::=" in line for line in lines):
                continue
            text = re.sub(r"\s+", " ", " ".join(lines))
            for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                sent = sent.strip()
                if not 40 <= len(sent) <= 400 or not sent.endswith("."):
                    continue
                if not re.match(r"[A-Z][a-z]", sent) or re.search(r"\d|[*=_{}\[\]<>|\\#@$`;]", sent):
                    continue
                if re.search(r"\b(e\.g|i\.e|etc|vs)\.$", sent) or re.search(r"\b[A-Z]{3,}\b", sent):
                    continue
                if re.search(r"pass key|magic number|\bVAR\b", sent, re.I):
                    continue
                seen.setdefault(sent, None)
    return tuple(seen)


def _haystack(seed: int, n: int) -> list[str]:
    """``n`` sentences: the pool shuffled by seed, reshuffled each time it is exhausted."""
    pool = list(haystack_sentences())
    rng = random.Random(f"slimcompile-haystack-{seed}")
    out: list[str] = []
    while len(out) < n:
        rng.shuffle(pool)
        out.extend(pool)
    return out[:n]


# ---------------------------------------------------------------- needles


@dataclass
class _Needle:
    text: str
    depth: float  # where it goes, as a fraction of the haystack tokens
    relevant: bool  # carries (part of) the answer
    order: int = 0  # keeps chain statements in order when they share a slot


def _number(rng: random.Random, digits: int, used: set[str]) -> str:
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in used:
            used.add(value)
            return value


def _keys(rng: random.Random, n: int) -> list[str]:
    adjs = rng.sample(_ADJECTIVES, n)
    nouns = rng.sample(_NOUNS, n)
    return [f"{a}-{b}" for a, b in zip(adjs, nouns)]


def _var_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def _magic(key: str, value: str) -> str:
    return f"The special magic number for {key} is: {value}."


def _design(task: str, rng: random.Random, depth: float):
    """Needles, question, answers and the answer prefix for one sample."""
    used: set[str] = set()
    if task == "passkey":
        key = _number(rng, rng.choice((5, 6, 7)), used)
        needles = [_Needle(f"The pass key is {key}. Remember it.", depth, True)]
        # "What is the pass key?" alone makes SmolLM2 explain Python's `pass`
        # (the haystack is Python docs); naming a number in the text fixes that.
        question = "What is the pass key number mentioned in the provided text?"
        return needles, question, [key], "The pass key number mentioned in the provided text is"
    if task == "needle":
        (key,) = _keys(rng, 1)
        value = _number(rng, 7, used)
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        prefix = f"The special magic number for {key} mentioned in the provided text is"
        return [_Needle(_magic(key, value), depth, True)], question, [value], prefix
    if task == "multikey":
        keys = _keys(rng, _N_MULTI)
        values = [_number(rng, 7, used) for _ in keys]
        needles = [_Needle(_magic(keys[0], values[0]), depth, True)]
        needles += [_Needle(_magic(k, v), rng.random(), False) for k, v in zip(keys[1:], values[1:])]
        question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
        return needles, question, [values[0]], prefix
    if task == "multivalue":
        (key,) = _keys(rng, 1)
        values = [_number(rng, 7, used) for _ in range(_N_MULTI)]
        depths = [depth] + [rng.random() for _ in values[1:]]
        needles = [_Needle(_magic(key, v), d, True) for v, d in zip(values, depths)]
        question = (
            f"What are all the special magic numbers for {key} mentioned in the provided text? "
            f"There are {len(values)} of them."
        )
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        return needles, question, values, prefix
    if task == "vartrack":
        hops = [rng.choice((2, 3)) for _ in range(1 + _N_DISTRACTOR_CHAINS)]
        names = _var_names(rng, sum(h + 1 for h in hops))
        values = [_number(rng, 5, used) for _ in hops]
        needles: list[_Needle] = []
        answers: list[str] = []
        start = 0
        for c, (h, value) in enumerate(zip(hops, values)):
            chain = names[start : start + h + 1]
            start += h + 1
            texts = [f"VAR {chain[0]} = {value}."]
            texts += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            if c == 0:
                # The asked chain starts at `depth`; later hops follow somewhere after it.
                depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in texts[1:])
                answers = chain
            else:
                depths = sorted(rng.random() for _ in texts)
            needles += [_Needle(t, d, c == 0, order=i) for i, (t, d) in enumerate(zip(texts, depths))]
        question = f"Find all variables that are assigned the value {values[0]} in the text above."
        prefix = (
            f"According to the chains of variable assignment in the text above, {len(answers)} variables "
            f"are assigned the value {values[0]}, they are:"
        )
        return needles, question, answers, prefix
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


# ---------------------------------------------------------------- prompt assembly


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, user: str, prefix: str | None) -> str:
    if _has_chat_template(tokenizer):
        messages = [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = user + "\n"
    return text + prefix if prefix else text


def _assemble(sentences: list[str], counts_cum: list[int], needles: list[_Needle]) -> tuple[str, list[tuple[int, int]]]:
    """Join haystack and needles; return the context and each needle's char span (in ``needles`` order)."""
    total = counts_cum[-1] if counts_cum else 0
    slots = []
    for idx, nd in enumerate(needles):
        # Sentence boundary whose token fraction is closest to the requested depth.
        want = nd.depth * total
        b = bisect.bisect_left(counts_cum, want)
        if b > 0 and (b == len(counts_cum) or want - counts_cum[b - 1] <= counts_cum[b] - want):
            b -= 1
        # counts_cum[i] = tokens before sentence i, so boundary b puts the needle before sentence b.
        slots.append((b, idx))
    by_slot: dict[int, list[int]] = {}
    for b, idx in sorted(slots, key=lambda s: (s[0], needles[s[1]].order, s[1])):
        by_slot.setdefault(b, []).append(idx)

    parts: list[str] = []
    spans: list[tuple[int, int] | None] = [None] * len(needles)
    pos = 0

    def put(text: str, idx: int | None = None) -> None:
        nonlocal pos
        if parts:
            parts.append(" ")
            pos += 1
        if idx is not None:
            spans[idx] = (pos, pos + len(text))
        parts.append(text)
        pos += len(text)

    for i in range(len(sentences) + 1):
        for idx in by_slot.get(i, ()):
            put(needles[idx].text, idx)
        if i < len(sentences):
            put(sentences[i])
    return "".join(parts), spans  # type: ignore[return-value]


def _token_spans(tokenizer, text: str, char_spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize ``text`` and map char spans to token spans (tokens overlapping the span)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        out = []
        for cs, ce in char_spans:
            hit = [t for t, (a, b) in enumerate(offsets) if b > cs and a < ce and b > a]
            out.append((hit[0], hit[-1] + 1))
        return ids, out
    # Slow tokenizers have no offsets: tokenize prefixes (approximate at merges across the boundary).
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = []
    for cs, ce in char_spans:
        a = len(tokenizer.encode(text[:cs], add_special_tokens=False))
        b = len(tokenizer.encode(text[:ce], add_special_tokens=False))
        out.append((a, max(b, a + 1)))
    return ids, out


def depth_for_seed(seed: int) -> float:
    """Default depth when none is given: a golden-ratio sequence, so consecutive seeds cover [0, 1] evenly."""
    return (seed * _GOLDEN) % 1.0


def make_sample(
    task: str,
    target_tokens: int,
    tokenizer: Any,
    seed: int,
    depth: float | None = None,
    answer_prefix: bool = True,
) -> Sample:
    """Build one deterministic sample of about ``target_tokens`` prompt tokens.

    ``depth`` in [0, 1] places the (first) answer-carrying needle at that
    fraction of the haystack; ``None`` derives it from ``seed``
    (:func:`depth_for_seed`). ``answer_prefix`` appends RULER's answer prefix
    (e.g. "The special magic number for <key> mentioned in the provided text is")
    after the assistant header, which small models
    need to answer in the expected form; the question still ends the user turn.
    The length lands within about one sentence of ``target_tokens`` (the real
    count is ``n_tokens``); it cannot go below the fixed part (instruction,
    needles, question: ~100-250 tokens for SmolLM2).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if depth is None:
        depth = depth_for_seed(seed)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"slimcompile-{task}-{seed}")
    needles, question, answers, prefix = _design(task, rng, depth)
    prefix = prefix if answer_prefix else None
    instruction = _INSTRUCTIONS[task]

    def build(k: int):
        sentences = hay[:k]
        context, char_spans = _assemble(sentences, cum[: k + 1], needles)
        user = f"{instruction}\n\n{context}\n\n{question}"
        text = _render(tokenizer, user, prefix)
        offset = text.index(context)
        ids, spans = _token_spans(tokenizer, text, [(offset + a, offset + b) for a, b in char_spans])
        return text, user, ids, spans, context

    # Token counts of single sentences are close to additive when joined with spaces,
    # so a cumulative sum predicts how many sentences reach the target; a few
    # measured corrections then land within about one sentence of it.
    base = len(_overhead_ids(tokenizer, instruction, needles, question, prefix))
    avg = 30
    n_guess = max(0, (target_tokens - base) // avg + 64)
    hay = _haystack(seed, n_guess)
    counts = [len(x) for x in tokenizer(hay, add_special_tokens=False)["input_ids"]] if hay else []
    while sum(counts) + base < target_tokens:  # very long targets: grow the pool
        hay = _haystack(seed, 2 * len(hay) + 64)
        counts = [len(x) for x in tokenizer(hay, add_special_tokens=False)["input_ids"]]
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)

    def pick(goal: int) -> int:
        k = bisect.bisect_left(cum, goal)
        if k > 0 and (k >= len(cum) or goal - cum[k - 1] <= cum[k] - goal):
            k -= 1
        return min(k, len(hay))

    k = pick(target_tokens - base)
    best = None
    tried: set[int] = set()
    for _ in range(6):
        if k in tried:
            break
        tried.add(k)
        built = build(k)
        n = len(built[2])
        if best is None or abs(n - target_tokens) < abs(best[0] - target_tokens):
            best = (n, k, built)
        if n == target_tokens:
            break
        k = pick(cum[k] + (target_tokens - n))
    n, k, (text, user, ids, spans, context) = best

    for ans in answers:
        _check_placement(task, ans, context, text)
    placed = sorted(zip(spans, needles), key=lambda p: p[0])
    needle_spans = [span for span, nd in placed if nd.relevant]
    distractor_spans = [span for span, nd in placed if not nd.relevant]
    needle_texts = [nd.text for _, nd in placed if nd.relevant]
    return Sample(
        task=task,
        prompt_text=text,
        chat_messages=[{"role": "user", "content": user}],
        answers=list(answers),
        needle_spans=needle_spans,
        depth=float(depth),
        n_tokens=len(ids),
        input_ids=ids,
        seed=seed,
        target_tokens=target_tokens,
        question=question,
        needle_texts=needle_texts,
        distractor_spans=distractor_spans,
        answer_prefix=prefix or "",
    )


def _overhead_ids(tokenizer, instruction: str, needles: list[_Needle], question: str, prefix: str | None) -> list[int]:
    """Token ids of the prompt with needles but no haystack: the fixed overhead."""
    context = " ".join(nd.text for nd in needles)
    text = _render(tokenizer, f"{instruction}\n\n{context}\n\n{question}", prefix)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_placement(task: str, answer: str, context: str, prompt: str) -> None:
    if task == "vartrack":
        # A chain variable is referenced again by the next hop, so count its definition.
        defined = len(re.findall(rf"VAR {answer} = ", context))
        ok = defined == 1 and prompt.count(answer) == context.count(answer)
    else:
        ok = context.count(answer) == 1 and prompt.count(answer) == 1
    if not ok:
        raise AssertionError(f"{task}: answer {answer!r} is not placed exactly once in the prompt")


def make_samples(task: str, target_tokens: int, tokenizer: Any, n: int, seed: int = 0, **kwargs: Any) -> list[Sample]:
    """``n`` samples with seeds ``seed..seed+n-1`` and depths evenly spaced over [0, 1]."""
    depths = [0.5] if n == 1 else [i / (n - 1) for i in range(n)]
    return [make_sample(task, target_tokens, tokenizer, seed + i, depth=d, **kwargs) for i, d in enumerate(depths)]


# ---------------------------------------------------------------- scoring


def score(sample: Sample, generated_text: str) -> float:
    """Fraction of answer strings contained verbatim in ``generated_text`` (1.0 or 0.0 for single answers)."""
    if not sample.answers:
        return 0.0
    found = sum(ans in generated_text for ans in sample.answers)
    if sample.task in ("multivalue", "vartrack"):
        return found / len(sample.answers)
    return 1.0 if found == len(sample.answers) else 0.0
