"""Synthetic long-context tasks: determinism, placement, length, spans, scoring."""

import re

import pytest

from slimcompile import tasks
from slimcompile.tasks import TASKS, make_sample, make_samples, score


@pytest.fixture(scope="session")
def tok():
    # The user's default cache: the first run converts the GGUF once (~50 s), later runs read it.
    from slimcompile.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def test_task_names():
    assert TASKS == ("passkey", "needle", "multikey", "multivalue", "vartrack")
    with pytest.raises(ValueError):
        make_sample("nope", 500, None, 0)


def test_haystack_is_prose():
    sents = tasks.haystack_sentences()
    assert len(sents) > 500
    assert len(set(sents)) == len(sents)
    # Digits or all-caps words in the haystack could collide with answers.
    assert not any(re.search(r"\d|\b[A-Z]{3,}\b", s) for s in sents)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic(tok, task):
    a = make_sample(task, 600, tok, seed=7)
    b = make_sample(task, 600, tok, seed=7)
    c = make_sample(task, 600, tok, seed=8)
    assert a.input_ids == b.input_ids and a.answers == b.answers and a.needle_spans == b.needle_spans
    assert a.input_ids != c.input_ids and a.answers != c.answers


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("target", [1000, 4000])
def test_length_placement_and_spans(tok, task, target):
    s = make_sample(task, target, tok, seed=3, depth=0.4)
    assert s.task == task and s.n_tokens == len(s.input_ids)
    assert abs(s.n_tokens - target) <= 0.05 * target
    assert s.input_ids == tok(s.prompt_text, add_special_tokens=False)["input_ids"]
    # Same ids as the chat template itself produces, plus the answer prefix at the end.
    templ = tok.apply_chat_template(s.chat_messages, add_generation_prompt=True, tokenize=False)
    assert s.prompt_text.startswith(templ)
    # The question ends the user turn: nothing but the assistant header and prefix follows it.
    tail = s.prompt_text[s.prompt_text.rindex(s.question) + len(s.question):]
    assert tail.startswith("<|im_end|>") and len(tok(tail)["input_ids"]) < 64

    spans_text = [tok.decode(s.input_ids[a:b]) for a, b in s.needle_spans]
    assert spans_text and all(t.strip() in s.needle_texts for t in spans_text)
    assert [t.strip() for t in spans_text] == s.needle_texts
    assert all(0 <= a < b <= s.n_tokens for a, b in s.needle_spans + s.distractor_spans)
    spans = sorted(s.needle_spans + s.distractor_spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))

    for ans in s.answers:
        if task == "vartrack":
            assert s.prompt_text.count(f"VAR {ans} = ") == 1
            assert any(ans in t for t in spans_text)
        else:
            # Exactly once in the whole prompt, and that occurrence lies inside a needle span.
            assert s.prompt_text.count(ans) == 1
            assert sum(ans in t for t in spans_text) == 1


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_needle_span_tokens_are_exactly_the_needle(tok, task):
    s = make_sample(task, 1000, tok, seed=11, depth=0.5)
    (a, b), = s.needle_spans
    assert tok.decode(s.input_ids[a:b]).strip() == s.needle_texts[0]
    # Neighbouring tokens are haystack, not part of the needle.
    assert s.needle_texts[0] not in tok.decode(s.input_ids[a + 1:b])
    assert s.answers[0] not in tok.decode(s.input_ids[:a]) + tok.decode(s.input_ids[b:])


def test_depths_spread(tok):
    samples = make_samples("needle", 1000, tok, n=5, seed=0)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # Measured position of the needle inside the haystack follows the requested depth.
    starts = [s.needle_spans[0][0] / s.n_tokens for s in samples]
    assert starts == sorted(starts)
    assert starts[0] < 0.15 and starts[-1] > 0.85
    for s in samples:
        before = s.prompt_text[: s.prompt_text.index(s.needle_texts[0])]
        assert abs(len(tok(before)["input_ids"]) - s.needle_spans[0][0]) <= 1
    # Default depth comes from the seed and covers [0, 1] evenly for consecutive seeds.
    auto = sorted(tasks.depth_for_seed(i) for i in range(10))
    assert all(b - a < 0.2 for a, b in zip([0.0] + auto, auto + [1.0]))


def test_score(tok):
    s = make_sample("passkey", 500, tok, seed=1)
    (key,) = s.answers
    assert score(s, f"The pass key is {key}.") == 1.0
    assert score(s, "The pass key is 0.") == 0.0
    assert score(s, "") == 0.0

    mv = make_sample("multivalue", 500, tok, seed=1)
    assert len(mv.answers) == 4
    assert score(mv, " ".join(mv.answers)) == 1.0
    assert score(mv, ", ".join(mv.answers[:2])) == 0.5
    assert score(mv, "none") == 0.0

    mk = make_sample("multikey", 500, tok, seed=1)
    assert score(mk, mk.answers[0]) == 1.0
    assert score(mk, "1234567") == 0.0

    vt = make_sample("vartrack", 500, tok, seed=1)
    assert 3 <= len(vt.answers) <= 4
    assert score(vt, " ".join(vt.answers)) == 1.0
    assert score(vt, vt.answers[0]) == pytest.approx(1 / len(vt.answers))


def test_vartrack_chain_is_consistent(tok):
    s = make_sample("vartrack", 1000, tok, seed=5, depth=0.2)
    value = re.search(r"assigned the value (\d+)", s.question).group(1)
    # Resolve every variable in the context and check the answers are exactly those holding `value`.
    env: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.prompt_text):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
    assert sorted(n for n, v in env.items() if v == value) == sorted(s.answers)
    assert len(env) > len(s.answers)  # distractor chains exist
