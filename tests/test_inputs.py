"""Inputs that must never cost a run or bend a number: hostile model output, benchmark files and images that
are checked at load (issue 16)."""
import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st

import rewards
from rollout import parse_tool_call

# ---------------------------------------------------------------- model output is parsed in linear time

TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>", "x", " ", "B"]


def _regex_reference(text):
    """What the old lazy regexes found (quadratic on unclosed tags): the oracle for the linear scanner."""
    answers = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    calls = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.S)
    stray = re.sub(r"<think>.*?</think>|<tool_call>.*?</tool_call>", "", text, flags=re.S)
    return answers, calls, stray


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TAGS), max_size=30))
def test_tag_scanner_finds_what_the_regexes_found(parts):
    text = "".join(parts)
    answers, calls, stray = _regex_reference(text)
    assert rewards.tag_contents(text, "<answer>", "</answer>") == answers
    assert rewards.tag_contents(text, "<tool_call>", "</tool_call>") == calls
    spans = rewards.tag_spans(text, rewards.PAIRED)
    kept = "".join(text[a:b] for a, b in zip([0] + [e for _, e, _ in spans], [s for s, _, _ in spans] + [len(text)]))
    assert kept == stray


def test_unclosed_tags_parse_in_linear_time():
    # 10,000 unclosed tags of each kind: the lazy regexes took ~10 s per call here (quadratic); bound 1 s for all
    n = 10_000
    texts = ["<tool_call>x" * n, "<answer>x" * n, "<think>x" * n, "<tool_call>{}</tool_call>" + "<think>" * n]
    t0 = time.perf_counter()
    for text in texts:
        parse_tool_call(text)
        rewards.format_ok(text)
        rewards.extract_answer(text)
    assert time.perf_counter() - t0 < 1.0
    assert parse_tool_call("<tool_call>x" * n)[1][0] == "unclosed"
    assert not rewards.format_ok("<think>x" * n)
