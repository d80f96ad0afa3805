"""Rewards: pure functions of an episode's text, the sample and the boxes it cropped. Imports nothing of
the project.

    r = w_acc * accuracy + w_format * format + w_tool * 1[tool used and accuracy > 0.5] + w_geo * r_geo

format is 0 when the episode is well formed and -1 when not; r_geo (stage 2) is the grounding reward of the
episode's first crop against the sample's nested boxes B1 (innermost) ⊂ B2 ⊂ ... (the paper's stage 2).
"""
import re
import string
from dataclasses import dataclass


@dataclass
class RewardConfig:
    w_accuracy: float = 0.8  # DeepEyes' weights [choice]
    w_format: float = 0.2
    w_tool: float = 1.2
    w_grounding: float = 0.0  # stage 2 turns it on
    tau: float = 0.9  # coverage of B1 needed before IoU counts
    omega: float = 0.5  # r_geo = omega * r_IoU + (1 - omega) * r_L1 [choice]
    matcher: str = "rule"  # short answers: exact | rule | math (see accuracy)


BARE_LETTER_RE = re.compile(r"\(?[A-Ea-e]\)?[.:]?")
LETTER_RE = re.compile(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])")
ARTICLE_A_RE = re.compile(r"A (?!(?:is|was|seems|looks|appears)\b)[a-z]")
# what precedes a sentence's first word: the start, an end of sentence (and a closing quote), a new line or bullet
SENTENCE_START_RE = re.compile(r"(?:(?:^|\n)\s*(?:[-*\u2022]\s*)?|[.!?][\"')\]]?\s+)$")


def tag_spans(text, pairs):
    """Non-overlapping (start, end, open tag) spans of `open ... close` in `text`, leftmost first, the first close
    after each open: what re.findall(r"open(.*?)close|...", re.S) finds, in linear time on any model output (the
    lazy regex rescans to the end from every unclosed open tag: 5,000 unclosed <tool_call> tags took 82 s)."""
    spans, pos, nxt = [], 0, {o: text.find(o) for o in pairs}
    while True:
        live = [(i, o) for o, i in nxt.items() if i >= 0]
        if not live:
            return spans
        start, open_ = min(live)
        end = text.find(pairs[open_], start + len(open_))
        if end < 0:  # no close after this open, so none after any later open of this tag either
            del nxt[open_]
            continue
        end += len(pairs[open_])
        spans.append((start, end, open_))
        pos = end
        nxt = {o: (i if i >= pos else text.find(o, pos)) for o, i in nxt.items()}


def tag_contents(text, open_, close):
    """The contents of every `open_ ... close` (innermost text, tags dropped), in order; linear time."""
    return [text[s + len(open_):e - len(close)] for s, e, _ in tag_spans(text, {open_: close})]


def strip_spans(text, pairs):
    """`text` without its `open ... close` spans (what re.sub of the lazy pattern leaves), in linear time."""
    kept, last = [], 0
    for start, end, _ in tag_spans(text, pairs):
        kept.append(text[last:start])
        last = end
    return "".join(kept) + text[last:]


TOOL_TURN = {"<|im_start|>user\n": "<|im_start|>assistant\n"}


def assistant_text(text):
    """An episode's response without the tool's replies (user turns): what the policy wrote. DeepEyes' tool
    reply repeats its instructions, "<tool_call>...</tool_call>" and "<answer>...</answer>" included."""
    return strip_spans(text, TOOL_TURN)


def extract_answer(text):
    """The content of the last <answer>...</answer> the policy wrote, stripped; None when there is none."""
    found = tag_contents(assistant_text(text), "<answer>", "</answer>")
    return found[-1].strip() if found else None


def scored_reply(text):
    """What an episode answered, as eval and the held-out probe score it: its <answer> content; for a model that
    does not use the protocol (no <think>, <tool_call> or <answer> tag anywhere), its bare reply; else None, no
    answer (a transcript cut short is not scored by a letter in its thinking)."""
    reply = extract_answer(text)
    if reply is None and not any(tag in text for tag in ("<think>", "<tool_call>", "<answer>")):
        return END_TOKENS_RE.sub("", text).strip()
    return reply


def extract_letter(text):
    """The first standalone option letter A-E in a reply ("B", "(B)", "B. red", "The answer is B"). A bare "A"
    starting a sentence before a lower-case word is the article ("A large cat."), not option A, unless that word
    is a verb ("A is correct"); elsewhere it is the letter ("The answer is A because ...")."""
    m = _letter_match(text or "")
    return m.group(1) if m else None


def _letter_match(text):
    for m in LETTER_RE.finditer(text):
        if not (ARTICLE_A_RE.match(text, m.start()) and SENTENCE_START_RE.search(text, 0, m.start())):
            return m
    return None


def _reply_letter(reply):
    """A lone letter in any case ("b", "(c)", "d."), else the first standalone capital A-E."""
    return _bare_letter(reply) or extract_letter(reply)


def _bare_letter(reply):
    """The letter of a reply that is one letter alone, in any case ("b", "(c)", "d."), else None."""
    return reply.strip().strip("().:").upper() if BARE_LETTER_RE.fullmatch(reply.strip()) else None


def normalize(text):
    """Lowercase, drop punctuation, articles and extra spaces (short-answer matching). A number keeps its sign,
    point, fraction bar, ratio colon and percent: "3.5" is not "35", nor "-3" "3", nor "1/2" "12"."""
    text = text.lower()
    keep = {m.start() for m in NUMBER_PUNCT_RE.finditer(text)}
    text = "".join(c for i, c in enumerate(text) if c not in string.punctuation or i in keep)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def accuracy(reply, answer, options=None, matcher="rule"):
    """1.0 if the reply is right. Multiple choice: the letter (or the option's text) matches. Short answer,
    by `matcher`: "exact" (normalised exact match), "rule" (also: numbers compared as numbers, yes/no by the
    reply's first word, the answer contained in a short reply) or "math" (math-verify, then "rule").
    `reply` is the <answer> content (or a bare reply)."""
    if reply is None:
        return 0.0
    if options:
        return float(picked_option(reply, options) == answer.strip().upper())
    if re.fullmatch(r"\(?[A-E]\)?[.:]?", answer.strip()):  # an option letter without the options (DeepEyes' data)
        return float(_reply_letter(reply) == answer.strip().strip("().:"))
    if matcher not in MATCHERS:
        raise ValueError(f"matcher {matcher!r}: expected one of {', '.join(MATCHERS)}")
    if not normalize(answer):  # an answer of punctuation or articles only: nothing is left to compare but itself
        return float(reply.strip().lower() == answer.strip().lower())
    if normalize(reply) == normalize(answer):
        return 1.0
    if matcher == "math" and _math_equal(reply, answer):
        return 1.0
    return float(matcher != "exact" and _rule_match(reply, answer))


PAIRED = {"<think>": "</think>", "<tool_call>": "</tool_call>"}
MATCHERS = ("exact", "rule", "math")
NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
NUMBER_PUNCT_RE = re.compile(r"(?<=\d)[./:](?=\d)|-(?=\.?\d)|(?<=\d)%|\.(?=\d)")  # what normalize keeps
END_TOKENS_RE = re.compile(r"<\|im_end\|>|<\|endoftext\|>")


def _numbers(text):
    """The numbers written in a text, as floats ("1,000" is 1000, "3.0" is 3)."""
    out = []
    for m in NUMBER_RE.findall(text):
        try:
            out.append(float(m.replace(",", "")))
        except ValueError:
            continue
    return out


def _rule_match(reply, answer):
    """The rule-based matcher for short answers (beyond exact match): an answer that is a number matches a
    reply holding that one number; yes/no match the reply's first word; otherwise the answer's words must
    appear together in a reply of at most a few more words than the answer (so a reply listing every
    option does not count), and not right after a negation ("not a cat", "isn't red")."""
    a, r = normalize(answer), normalize(reply)
    if a in ("yes", "no"):
        return r.split()[:1] == [a]
    numbers = _numbers(answer.replace(" ", ""))
    if len(numbers) == 1 and NUMBER_RE.fullmatch(answer.strip().rstrip("%").replace(" ", "")):
        found = _numbers(reply)
        return len(found) == 1 and abs(found[0] - numbers[0]) <= 1e-6 * max(1.0, abs(numbers[0]))
    words = r.split()
    # "not a cat" does not say "cat" (numbers are not checked: "No. 5", "0 (no cars)")
    return bool(a) and f" {a} " in f" {r} " and len(words) <= len(a.split()) + 5 and not _negated(reply, a)


NEGATIONS = {"not", "no", "never", "none", "neither", "nor", "without", "cannot", "isnt", "arent", "wasnt", "werent",
             "doesnt", "dont", "didnt", "cant", "wont", "hasnt", "havent", "hadnt", "couldnt", "shouldnt", "wouldnt"}


# the end of a clause: a negation before it does not reach past it ("No, red." says red). Marked with a character
# that normalize keeps (it drops ASCII punctuation only) and no negation holds.
CLAUSE_END_RE = re.compile(r"[.,;:!?]+(?=\s|$)")


def _negated(reply, text):
    """Every place the reply holds the (normalised) text is right after a negation in the same clause: "not red",
    "isn't red", "no red" say nothing for red; "red, not blue", "it is red" and "No, red." do."""
    reply = normalize(CLAUSE_END_RE.sub(" \u00b6 ", reply))
    words = r"(?: \u00b6)? ".join(map(re.escape, text.split()))  # the text's own punctuation is marked too
    before = [reply[:m.start()].split()[-1:] for m in re.finditer(rf"(?<!\S){words}(?!\S)", reply)]
    return bool(before) and all(w and (w[0] in NEGATIONS or w[0].endswith("n’t")) for w in before)


def _math_equal(reply, answer):
    """math-verify's equivalence of two answers (LaTeX or plain expressions); False when it cannot parse."""
    from math_verify import parse, verify
    try:
        gold, pred = parse(answer), parse(reply)
        return bool(gold and pred and verify(gold, pred))
    except Exception:  # math-verify raises on expressions it cannot handle; that is "not shown equal"
        return False


def picked_option(reply, options):
    """The option letter a reply picks: a lone letter ("B", "(c)"), else the option's own text ("A dog" is not
    the letter A), else a letter in it (but an "A" that may be the article yields to an option's text the reply
    holds: "Answer: A cat"), else the one option whose text it holds ("A large cat, I think"); None when it
    names none, or several options' texts and no letter."""
    if letter := _bare_letter(reply):
        return letter
    texts = [normalize(o) for o in options]
    if normalize(reply) in texts:
        return "ABCDE"[texts.index(normalize(reply))]
    m = _letter_match(reply)
    # "A" after a colon and before a lower-case word may be the article ("Answer: A cat"): the option the reply
    # names wins ("The answer is A because the cat ..." keeps its letter)
    if m and not (ARTICLE_A_RE.match(reply, m.start()) and reply[:m.start()].rstrip().endswith(":")):
        return m.group(1)
    return _named_option(reply, texts) or (m.group(1) if m else None)


def _named_option(reply, texts):
    """The one option whose (normalised) text the reply holds, longest texts first, each match blanked out so
    that "cat" is not found again inside "large cat"; None when it names none or several, or negates it
    ("not red" does not pick "red"). Options "yes" and "no": the reply's first word decides, if it is one."""
    said = normalize(reply)
    first = said.split()[:1]
    if first and first[0] in ("yes", "no") and first[0] in texts:  # a yes/no question: the first word decides
        return "ABCDE"[texts.index(first[0])]
    rest, named = f" {said} ", set()
    for i in sorted(range(len(texts)), key=lambda i: -len(texts[i])):
        if texts[i] and f" {texts[i]} " in rest:
            named.add(i)
            rest = rest.replace(f" {texts[i]} ", " | ")
    if len(named) != 1:
        return None
    i = named.pop()
    return None if _negated(reply, texts[i]) else "ABCDE"[i]


def same_answer(a, b, options=None, matcher="rule"):
    """Two replies give the same answer (the information-gap selection compares the policy with itself):
    the same option for multiple choice ("B" and "(B) red" agree; two replies naming none, the same words),
    else a match either way under `matcher`."""
    if options:
        picked = picked_option(a, options), picked_option(b, options)
        return picked[0] == picked[1] if any(picked) else normalize(a) == normalize(b)
    return accuracy(a, b, matcher=matcher) == 1.0 or accuracy(b, a, matcher=matcher) == 1.0


ERROR_TURN_RE = re.compile(r"<tool_response>\n?Error: |<\|im_start\|>user\nError: ")  # every prompt's layout


def format_ok(text):
    """Well formed: <think>/<tool_call> tags open and close in order, no tool error replies, exactly one
    <answer>...</answer> (no stray tag of it), at the end."""
    if ERROR_TURN_RE.search(text):  # a tool call that got an error reply
        return False
    text = assistant_text(text)  # what the policy wrote
    stray = strip_spans(text, PAIRED)
    if any(tag in stray for tag in ("<think>", "</think>", "<tool_call>", "</tool_call>")):
        return False
    if text.count("<answer>") != 1 or text.count("</answer>") != 1 or len(tag_contents(text, "<answer>", "</answer>")) != 1:
        return False
    tail = text[text.rfind("</answer>") + len("</answer>"):]
    return END_TOKENS_RE.sub("", tail).strip() == ""  # either end token closes a turn (rollout.py)


def area(b):
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def intersection(a, b):
    """Area of the overlap of two boxes (x1, y1, x2, y2)."""
    return area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def iou(a, b):
    inter = intersection(a, b)
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def coverage(pred, target):
    """Fraction of `target` inside `pred`."""
    return intersection(pred, target) / area(target) if area(target) > 0 else 0.0


def grounding(pred, nested, width, height, tau=0.9, omega=0.5):
    """r_geo of a predicted box against nested boxes (innermost first), all in original pixels.

    r_IoU = max_i IoU(P, B_i) if coverage(P, B1) > tau else 0; r_L1 = 1 - min_i mean |corner differences|,
    x normalised by width and y by height. Returns (r_geo, r_iou, r_l1, coverage)."""
    cov = coverage(pred, nested[0])
    r_iou = max(iou(pred, b) for b in nested) if cov > tau else 0.0
    norm = (width, height, width, height)
    r_l1 = 1.0 - min(sum(abs(p - q) / n for p, q, n in zip(pred, b, norm)) / 4 for b in nested)
    return omega * r_iou + (1 - omega) * r_l1, r_iou, r_l1, cov


def matcher_for(sample, default):
    """The short-answer matcher of a sample: its own (a data set's math rows: "math") or the run's."""
    return (getattr(sample, "meta", None) or {}).get("matcher") or default


def score(episode_text, sample, boxes, cfg=RewardConfig()):
    """The reward of one episode and its parts.

    episode_text: the response (assistant turns and tool replies); sample: has .answer, .options, .boxes,
    .width, .height; boxes: the boxes the episode cropped, original frame, in order."""
    acc = accuracy(extract_answer(episode_text), sample.answer, sample.options, matcher_for(sample, cfg.matcher))
    fmt = 0.0 if format_ok(episode_text) else -1.0
    tool = 1.0 if boxes and acc > 0.5 else 0.0
    parts = dict(accuracy=acc, format=fmt, tool=tool, grounding=0.0, iou=None, coverage=None)
    if sample.boxes and boxes:
        geo, _, _, cov = grounding(boxes[0], sample.boxes, sample.width, sample.height, cfg.tau, cfg.omega)
        parts.update(grounding=geo, iou=max(iou(boxes[0], b) for b in sample.boxes), coverage=cov)
    total = (cfg.w_accuracy * acc + cfg.w_format * fmt + cfg.w_tool * tool
             + cfg.w_grounding * parts["grounding"])
    return dict(total=total, **parts)
