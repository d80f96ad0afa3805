"""Rewards: pure functions of an episode's text, the sample and the boxes it cropped. Imports nothing of
the project.

    r = w_acc * accuracy + w_format * format + w_tool * 1[tool used and accuracy > 0.5] + w_geo * r_geo

format is 0 when the episode is well formed and -1 when not; r_geo (stage 2) is the grounding reward of the
episode's first crop against the sample's nested boxes B1 (innermost) ⊂ B2 ⊂ ... (METHOD.md §2).
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


ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
BARE_LETTER_RE = re.compile(r"\(?[A-Ea-e]\)?[.:]?")
LETTER_RE = re.compile(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])")


def extract_answer(text):
    """The content of the last <answer>...</answer>, stripped; None when there is none."""
    found = ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def extract_letter(text):
    """The first standalone option letter A-E in a reply ("B", "(B)", "B. red", "The answer is B")."""
    m = LETTER_RE.search(text or "")
    return m.group(1) if m else None


def _reply_letter(reply):
    """A lone letter in any case ("b", "(c)", "d."), else the first standalone capital A-E."""
    if BARE_LETTER_RE.fullmatch(reply.strip()):
        return reply.strip().strip("().:").upper()
    return extract_letter(reply)


def normalize(text):
    """Lowercase, drop punctuation, articles and extra spaces (short-answer matching)."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def accuracy(reply, answer, options=None):
    """1.0 if the reply is right. Multiple choice: the letter (or the option's text) matches. Short answer:
    normalised exact match. `reply` is the <answer> content (or a bare reply)."""
    if reply is None:
        return 0.0
    if options:
        texts = [normalize(o) for o in options]
        if normalize(reply) in texts:  # the option's own text (checked first: "A dog" is not the letter A)
            letter = "ABCDE"[texts.index(normalize(reply))]
        else:
            letter = _reply_letter(reply)
        return float(letter == answer.strip().upper())
    if re.fullmatch(r"[A-E]", answer.strip()):  # an option letter without the options (e.g. DeepEyes' data)
        return float(_reply_letter(reply) == answer.strip())
    return float(normalize(reply) == normalize(answer))


PAIRED_RE = re.compile(r"<think>.*?</think>|<tool_call>.*?</tool_call>", re.S)


def format_ok(text):
    """Well formed: <think>/<tool_call> tags open and close in order, no tool error replies, exactly one
    <answer>, at the end."""
    stray = PAIRED_RE.sub("", text)
    if any(tag in stray for tag in ("<think>", "</think>", "<tool_call>", "</tool_call>")):
        return False
    if "<tool_response>Error:" in text:
        return False
    if len(ANSWER_RE.findall(text)) != 1:
        return False
    tail = text[text.rfind("</answer>") + len("</answer>"):]
    return tail.replace("<|im_end|>", "").strip() == ""


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


def score(episode_text, sample, boxes, cfg=RewardConfig()):
    """The reward of one episode and its parts.

    episode_text: the response (assistant turns and tool replies); sample: has .answer, .options, .boxes,
    .width, .height; boxes: the boxes the episode cropped, original frame, in order."""
    acc = accuracy(extract_answer(episode_text), sample.answer, sample.options)
    fmt = 0.0 if format_ok(episode_text) else -1.0
    tool = 1.0 if boxes and acc > 0.5 else 0.0
    parts = dict(accuracy=acc, format=fmt, tool=tool, grounding=0.0, iou=None, coverage=None)
    if sample.boxes and boxes:
        geo, _, _, cov = grounding(boxes[0], sample.boxes, sample.width, sample.height, cfg.tau, cfg.omega)
        parts.update(grounding=geo, iou=max(iou(boxes[0], b) for b in sample.boxes), coverage=cov)
    total = (cfg.w_accuracy * acc + cfg.w_format * fmt + cfg.w_tool * tool
             + cfg.w_grounding * parts["grounding"])
    return dict(total=total, **parts)
