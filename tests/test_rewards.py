"""rewards.py: answer extraction, accuracy, format, box geometry, grounding and the total reward."""
from types import SimpleNamespace

import pytest

import rewards
from data import Sample
from rewards import RewardConfig


# ------------------------------------------------------------------ extract_answer

@pytest.mark.parametrize("text,expected", [
    ("<answer>B</answer>", "B"),
    ("<think>hm</think><answer>  B. red  </answer>", "B. red"),
    ("<answer>\nthe cat\n</answer><|im_end|>", "the cat"),
    ("<answer>A</answer> then <answer>C</answer>", "C"),  # the last one
    ("<answer></answer>", ""),
    ("no tags at all", None),
    ("<answer>B", None),  # not closed
    ("B</answer>", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert rewards.extract_answer(text) == expected


# ------------------------------------------------------------------ extract_letter

@pytest.mark.parametrize("text,expected", [
    ("B", "B"),
    ("(B)", "B"),
    ("B)", "B"),
    ("(C) blue", "C"),
    ("B. red", "B"),
    ("D: a cat", "D"),
    ("The answer is B", "B"),
    ("I think it is C.", "C"),
    ("Option E", "E"),
    ("A", "A"),
    # no standalone capital A-E
    ("F", None),
    ("Apple", None),  # a word starting with A is not a letter
    ("BAD", None),
    ("b", None),  # lower case is never a letter (so the article "a" is not read as A)
    ("a dog", None),
    ("A large cat", None),  # the article "A" starting a sentence is not option A
    ("It is a cat. A large one.", None),
    ("A large cat, so B", "B"),
    ("A is correct", "A"),  # ... but a capital A followed by a verb is
    ("A. large cat", "A"),
    ("(A) large cat", "A"),
    ("The answer is A because the car is red", "A"),  # mid-sentence, "A" is the letter
    ("Answer: A as shown", "A"),
    ("I choose A because it is red", "A"),
    ("It is big.\nA small dog", None),  # a new line starts a sentence
    ("- A small dog", None),  # so does a bullet
    ('It is big." A small dog', None),  # and an end of sentence inside quotes
    ("B. A dog sits there", "B"),  # an article later on does not hide the letter before it
    ("A island", None),  # "is" only as a whole word is a verb
    ("", None),
    (None, None),
])
def test_extract_letter(text, expected):
    assert rewards.extract_letter(text) == expected


# ------------------------------------------------------------------ accuracy

OPTIONS = ["red apple", "Blue car", "the green tree", "Yellow"]


@pytest.mark.parametrize("reply,answer,options,expected", [
    # multiple choice, by letter
    ("B", "B", OPTIONS, 1.0),
    ("(B)", "B", OPTIONS, 1.0),
    ("B. Blue car", "B", OPTIONS, 1.0),
    ("The answer is B", "B", OPTIONS, 1.0),
    ("B", " b ", OPTIONS, 1.0),  # the key is stripped and upper-cased
    ("C", "B", OPTIONS, 0.0),
    ("(A)", "B", OPTIONS, 0.0),
    ("E", "B", OPTIONS, 0.0),
    ("", "B", OPTIONS, 0.0),
    (None, "B", OPTIONS, 0.0),
    # multiple choice, by the option's text (normalised)
    ("blue car", "B", OPTIONS, 1.0),
    ("Blue car.", "B", OPTIONS, 1.0),
    ("green tree", "C", OPTIONS, 1.0),  # article dropped on both sides
    ("yellow", "D", OPTIONS, 1.0),
    ("Yellow", "C", OPTIONS, 0.0),
    ("purple", "A", OPTIONS, 0.0),
    ("red", "A", OPTIONS, 0.0),  # part of an option is not the option
    # short answers
    ("The Cat!", "cat", None, 1.0),
    ("  a   red  apple ", "Red apple.", None, 1.0),
    ("42", "42", None, 1.0),
    ("cats", "cat", None, 0.0),
    ("B", "cat", None, 0.0),
    ("cat dog", "cat", None, 1.0),  # the rule matcher (default): the answer within a short reply
    ("not a cat", "cat", None, 0.0),  # ... but not negated
    ("it isn't red", "red", None, 0.0),
    ("it isn\u2019t red", "red", None, 0.0),
    ("no cat", "cat", None, 0.0),
    ("red, not blue", "red", None, 1.0),  # the negation is not on the answer
    ("Not red? No, it is red.", "red", None, 1.0),  # said once without a negation: said
    ("No, red.", "red", None, 1.0),  # a negation ends at its clause: "No," answers something else
    ("No. Red.", "red", None, 1.0),
    ("No; red.", "red", None, 1.0),  # each clause mark ends it
    ("No: red", "red", None, 1.0),
    ("not U.S.A", "U.S.A", None, 0.0),  # a mark inside a word ends no clause
    ("not St. Louis", "St. Louis", None, 0.0),  # punctuation inside the answer is no clause's end
    ("not New York, NY", "New York, NY", None, 0.0),
    ("not a cat, a bobcat", "cat", None, 0.0),  # a word that ends or starts with the answer is not the answer
    ("not a cat, a catfish", "cat", None, 0.0),
    ("0 (no cars)", "0", None, 1.0),
    ("No. 5", "5", None, 1.0),
    ("Jersey No. 23", "23", None, 1.0),
    ("not sure", "not sure", None, 1.0),  # the answer's own negation
    ("I am not sure", "not sure", None, 1.0),
    ("no", "no", None, 1.0),
    ("Yes, there is no doubt", "no", None, 0.0),  # yes/no answers: the reply's first word, not any word
    (None, "cat", None, 0.0),
    ("cat", "cat", [], 1.0),  # an empty option list is a short answer
    ("b", "B", OPTIONS, 1.0),  # a lone lowercase letter is that letter
    ("(c)", "C", OPTIONS, 1.0),
    ("d.", "B", OPTIONS, 0.0),
    # numbers are numbers: their points, signs, fraction bars, colons and percents are not punctuation
    ("35", "3.5", None, 0.0),
    ("3", "-3", None, 0.0),
    ("12", "1/2", None, 0.0),
    ("125", "12.5%", None, 0.0),
    ("21", "2:1", None, 0.0),
    ("3.50", "3.5", None, 1.0),
    ("1000", "1,000", None, 1.0),
    ("1/2", "1/2", None, 1.0),
    # an answer that normalises to nothing is not matched by an empty reply
    ("", "The", None, 0.0),
    (".", "...", None, 0.0),
    ("...", "...", None, 1.0),
    # a letter answer with its punctuation, without the options
    ("A", "(A)", None, 1.0),
    ("", "(A)", None, 0.0),
    ("B.", "B.", None, 1.0),
])
def test_accuracy(reply, answer, options, expected):
    assert rewards.accuracy(reply, answer, options) == expected


@pytest.mark.parametrize("reply,answer,options,expected", [
    # an option's own text that holds a standalone capital A-E is that option, not the letter
    ("A dog", "B", ["a cat", "a dog"], 1.0),
    ("A dog", "A", ["a cat", "a dog"], 0.0),
    ("USB Type C", "B", ["USB Type A", "USB Type C"], 1.0),
    ("usb type a", "A", ["USB Type A", "USB Type C"], 1.0),
    ("B", "B", ["USB Type A", "USB Type C"], 1.0),  # letters still work beside such options
    ("A cat, I think", "A", ["a cat", "a dog"], 1.0),  # holds one option's text, and no letter
    ("A large cat", "A", ["dog", "cat"], 0.0),  # the article is not option A...
    ("A large cat", "B", ["dog", "cat"], 1.0),  # ... the reply names option B's text
    ("A cat or a dog", "A", ["a cat", "a dog"], 0.0),  # two options' texts: neither
    ("B, not a cat", "B", ["a cat", "a dog"], 1.0),  # a letter before any option's text
    ("I think it is a large cat", "B", ["cat", "large cat"], 1.0),  # the longer text holding the other
    ("It is red, not dark red", "B", ["red", "dark red"], 0.0),  # both named on their own: neither
    ("Answer: A cat", "B", ["dog", "cat"], 1.0),  # "A" the article: the option's text decides
    ("Answer: A", "A", ["dog", "cat"], 1.0),
    ("The answer is A because the cat is red", "A", ["dog", "cat"], 1.0),  # mid-sentence: the letter
    ("Answer: A because it is bigger", "A", ["dog", "cat"], 1.0),  # may be the article, but no option is named
    # a negated option text names nothing
    ("not red", "A", ["red", "blue"], 0.0),
    ("It isn't a cat", "B", ["dog", "cat"], 0.0),
    ("There is no dog", "A", ["dog", "cat"], 0.0),
    ("It is not a dog", "A", ["not a dog", "a dog"], 1.0),  # the negation is the option's own text
    # ... but a negation elsewhere in the reply is not
    ("It is red, not blue.", "A", ["red", "green"], 1.0),
    ("No, it is not.", "B", ["Yes", "No"], 1.0),  # yes/no options: the reply's first word decides
    ("Yes, there is no doubt", "A", ["yes", "no"], 1.0),
    ("No, it isn't", "B", ["yes", "no"], 1.0),
    ("No, it is the blue one", "B", ["red", "blue"], 1.0),  # a first "no" decides only between yes/no options
    ("No, the red one.", "A", ["red", "blue"], 1.0),  # "No," negates nothing in the next clause
    ("Not the red one, on the left.", "A", ["The red one, on the left", "The blue one"], 0.0),
])
def test_accuracy_option_text_holding_a_letter(reply, answer, options, expected):
    assert rewards.accuracy(reply, answer, options) == expected


@pytest.mark.parametrize("negation", ["not", "no", "never", "none", "neither", "nor", "without", "cannot", "isn't",
                                      "aren't", "wasn't", "weren't", "doesn't", "don't", "didn't", "can't", "won't",
                                      "hasn't", "haven't", "hadn't", "couldn't", "shouldn't", "wouldn't"])
def test_each_negation_right_before_the_answer_negates_it(negation):
    assert rewards.accuracy(f"{negation} red", "red") == 0.0
    assert rewards.accuracy(f"It is {negation} red", "A", ["red", "blue"]) == 0.0


@pytest.mark.parametrize("text,expected", [
    ("The Cat!", "cat"),
    ("An  apple, a day.", "apple day"),
    ("  THE end ", "end"),
    ("there", "there"),  # only whole words are articles
    ("Well-known, 3.5 m; -2, 1/2, 50% at 2:1.", "wellknown 3.5 m -2 1/2 50% at 2:1"),
])
def test_normalize(text, expected):
    assert rewards.normalize(text) == expected


# ------------------------------------------------------------------ format_ok

CALL = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 30, 40]}}</tool_call>'
CROP_REPLY = "<|im_end|>\n<|im_start|>user\n<tool_response><|vision_start|><|vision_end|></tool_response><|im_end|>\n"


@pytest.mark.parametrize("text,expected", [
    # well formed
    ("<think>easy</think><answer>B</answer>", True),
    ("<think>easy</think>\n<answer>B</answer><|im_end|>", True),
    ("<think>easy</think><answer>B</answer>  \n", True),
    ("<answer>B</answer>", True),  # thinking is optional
    (f"<think>zoom</think>{CALL}{CROP_REPLY}<think>I see it</think><answer>B</answer><|im_end|>", True),
    (f"<think>a</think>{CALL}{CROP_REPLY}<think>b</think>{CALL}{CROP_REPLY}<answer>C</answer>", True),
    # unbalanced tags
    ("<think>easy<answer>B</answer>", False),
    ("easy</think><answer>B</answer>", False),
    ("<think>a</think><think>b<answer>B</answer>", False),
    ('<think>zoom</think><tool_call>{"name": "image_zoom_in_tool"}<answer>B</answer>', False),
    ('<think>zoom</think>{"name": "x"}</tool_call><answer>B</answer>', False),
    # answers: exactly one, last
    ("<think>x</think>", False),
    ("<think>x</think><answer>B", False),
    ("<answer>A</answer><answer>B</answer>", False),
    ("<answer>A</answer>\n<answer>A</answer><|im_end|>", False),
    ("<answer>B</answer> because it is blue", False),
    ("<answer>B</answer><|im_end|>extra", False),
    (f"<answer>B</answer>{CALL}", False),
    # a tool error reply
    (f"<think>zoom</think>{CALL}<|im_end|>\n<|im_start|>user\n<tool_response>Error: bbox_2d holds a non-finite "
     f"number</tool_response><|im_end|>\n<answer>B</answer>", False),
    ("<tool_response>Error: one tool call per turn, please</tool_response><answer>B</answer>", False),
    # tags in the wrong order, though balanced in count
    ("</think>x<think><answer>B</answer>", False),
    (f"</tool_call>{CALL.replace('</tool_call>', '')}<tool_call><answer>B</answer>", False),
    # stray answer tags around the one closed pair
    ("<think>x</think><answer>A<answer>B</answer>", False),
    ("<think>x</think></answer> junk <answer>B</answer>", False),
    # <|endoftext|> ends a turn as <|im_end|> does (rollout.py)
    ("<think>x</think><answer>B</answer><|endoftext|>", True),
])
def test_format_ok(text, expected):
    assert rewards.format_ok(text) is expected


# ------------------------------------------------------------------ iou, coverage

@pytest.mark.parametrize("a,b,expected", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),
    ((0, 0, 10, 10), (0, 0, 5, 5), 25 / 100),
    ((0, 0, 10, 10), (2, 2, 4, 4), 4 / 100),
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),
    ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),  # no union: 0, not a division by zero
    ((0, 0, 10, 10), (5, 5, 5, 5), 0.0),
])
def test_iou(a, b, expected):
    assert rewards.iou(a, b) == pytest.approx(expected)
    assert rewards.iou(b, a) == pytest.approx(expected)  # symmetric


@pytest.mark.parametrize("pred,target,expected", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 100, 100), (10, 10, 20, 20), 1.0),  # a big box covers a small target fully
    ((10, 10, 20, 20), (0, 0, 100, 100), 0.01),  # ...not the other way round
    ((0, 0, 8, 10), (0, 0, 10, 10), 0.8),
    ((5, 5, 15, 15), (0, 0, 10, 10), 0.25),
    ((20, 20, 30, 30), (0, 0, 10, 10), 0.0),
    ((0, 0, 10, 10), (5, 5, 5, 9), 0.0),  # an empty target
])
def test_coverage(pred, target, expected):
    assert rewards.coverage(pred, target) == pytest.approx(expected)


# ------------------------------------------------------------------ grounding

W, H = 1000, 500  # x differences are divided by 1000, y differences by 500
B1, B2, B3 = (100, 100, 200, 200), (50, 50, 300, 300), (0, 0, 600, 400)
NESTED = [B1, B2, B3]


@pytest.mark.parametrize("pred,r_iou,r_l1,cov", [
    (B1, 1.0, 1.0, 1.0),
    (B2, 1.0, 1.0, 1.0),  # covers B1 and is B2 exactly
    (B3, 1.0, 1.0, 1.0),
    # covers only 80% of B1: IoU does not count at tau 0.9; L1 to B1 is 20 px of x over 4 corners
    ((100, 100, 180, 200), 0.0, 1 - (20 / W) / 4, 0.8),
    ((100, 100, 200, 180), 0.0, 1 - (20 / H) / 4, 0.8),  # the same 20 px in y costs twice as much
    # exactly 90% is not "over" tau
    ((110, 100, 210, 200), 0.0, 1 - (10 / W + 10 / W) / 4, 0.9),
    ((100, 110, 200, 210), 0.0, 1 - (10 / H + 10 / H) / 4, 0.9),
    # covers B1 and more: the best IoU over B1..B3; L1 to the nearest box
    ((90, 90, 210, 210), 100 * 100 / (120 * 120), 1 - (10 / W + 10 / H + 10 / W + 10 / H) / 4, 1.0),
    ((95, 100, 200, 200), 100 / 105, 1 - (5 / W) / 4, 1.0),
    # far away: no IoU, L1 to B3 (the nearest)
    ((900, 450, 1000, 500), 0.0, 1 - (900 / W + 450 / H + 400 / W + 100 / H) / 4, 0.0),
])
def test_grounding_values(pred, r_iou, r_l1, cov):
    geo, got_iou, got_l1, got_cov = rewards.grounding(pred, NESTED, W, H)  # tau 0.9, omega 0.5
    assert got_cov == pytest.approx(cov)
    assert got_iou == pytest.approx(r_iou)
    assert got_l1 == pytest.approx(r_l1)
    assert geo == pytest.approx(0.5 * r_iou + 0.5 * r_l1)


@pytest.mark.parametrize("omega", [0.0, 0.25, 0.5, 1.0])
def test_grounding_omega_weighting(omega):
    pred = (90, 90, 210, 210)
    r_iou, r_l1 = 100 * 100 / (120 * 120), 1 - (10 / W + 10 / H + 10 / W + 10 / H) / 4
    geo, *_ = rewards.grounding(pred, NESTED, W, H, tau=0.9, omega=omega)
    assert geo == pytest.approx(omega * r_iou + (1 - omega) * r_l1)


@pytest.mark.parametrize("tau,counts", [(0.5, True), (0.79, True), (0.8, False), (0.9, False)])
def test_grounding_tau(tau, counts):
    pred = (100, 100, 180, 200)  # 80% of B1
    _, r_iou, _, _ = rewards.grounding(pred, NESTED, W, H, tau=tau)
    assert r_iou == pytest.approx(max(rewards.iou(pred, b) for b in NESTED) if counts else 0.0)
    assert (r_iou > 0) is counts


def test_grounding_single_box_and_image_size_matters():
    # the same 50 px offset: L1 shrinks as the image grows
    small = rewards.grounding((150, 100, 250, 200), [B1], 500, 500)[2]
    big = rewards.grounding((150, 100, 250, 200), [B1], 5000, 500)[2]
    assert small == pytest.approx(1 - (50 / 500 + 50 / 500) / 4)
    assert big == pytest.approx(1 - (50 / 5000 + 50 / 5000) / 4)


# ------------------------------------------------------------------ score

GOOD_TEXT = f"<think>zoom</think>{CALL}{CROP_REPLY}<think>it is blue</think><answer>B</answer><|im_end|>"
WRONG_TEXT = f"<think>zoom</think>{CALL}{CROP_REPLY}<answer>C</answer><|im_end|>"
GOOD_NO_TOOL = "<think>easy</think><answer>B</answer><|im_end|>"
TRAILING = "<think>easy</think><answer>B</answer> since it is blue"
NO_ANSWER = "<think>I give up</think>"
ERROR_TEXT = (f"<think>zoom</think>{CALL}<|im_end|>\n<|im_start|>user\n<tool_response>Error: bbox_2d must hold "
              f"numbers only</tool_response><|im_end|>\n<answer>B</answer>")

MC = SimpleNamespace(answer="B", options=["red", "blue", "green", "white"], boxes=[list(B1), list(B2)],
                     width=W, height=H)
MC_NO_BOXES = SimpleNamespace(answer="B", options=["red", "blue", "green", "white"], boxes=None, width=W, height=H)
SHORT = SimpleNamespace(answer="blue", options=None, boxes=None, width=W, height=H)
AWAY = (700, 400, 800, 500)  # a crop far from B1
AWAY_GEO = rewards.grounding(AWAY, [B1, B2], W, H)[0]


@pytest.mark.parametrize("text,sample,boxes,total,acc,fmt,tool", [
    # DeepEyes weights: 0.8 accuracy + 0.2 format (0 or -1) + 1.2 tool bonus when cropped and right
    (GOOD_TEXT, MC, [B1], 0.8 + 1.2, 1.0, 0.0, 1.0),
    (GOOD_TEXT, MC, [AWAY, B1], 0.8 + 1.2, 1.0, 0.0, 1.0),
    (GOOD_NO_TOOL, MC, [], 0.8, 1.0, 0.0, 0.0),  # right but no crop: no bonus
    (GOOD_NO_TOOL, MC, None, 0.8, 1.0, 0.0, 0.0),
    (WRONG_TEXT, MC, [B1], 0.0, 0.0, 0.0, 0.0),  # cropped but wrong: no bonus
    (TRAILING, MC, [], 0.8 - 0.2, 1.0, -1.0, 0.0),
    (TRAILING, MC, [B1], 0.8 - 0.2 + 1.2, 1.0, -1.0, 1.0),
    (ERROR_TEXT, MC, [], 0.8 - 0.2, 1.0, -1.0, 0.0),  # a tool error is a format fault
    (NO_ANSWER, MC, [B1], -0.2, 0.0, -1.0, 0.0),
    ("<answer>blue</answer>", SHORT, [], 0.8, 1.0, 0.0, 0.0),
    ("<answer>The blue.</answer>", SHORT, [B1], 2.0, 1.0, 0.0, 1.0),
    ("<answer>red</answer>", SHORT, [B1], 0.0, 0.0, 0.0, 0.0),
])
def test_score_deepeyes_weights(text, sample, boxes, total, acc, fmt, tool):
    r = rewards.score(text, sample, boxes)
    assert r["total"] == pytest.approx(total)
    assert (r["accuracy"], r["format"], r["tool"]) == (acc, fmt, tool)
    # w_grounding is 0 by default: geometry is reported but never paid
    if sample.boxes and boxes:
        assert r["grounding"] == pytest.approx(rewards.grounding(boxes[0], sample.boxes, W, H)[0])
        assert r["iou"] == pytest.approx(max(rewards.iou(boxes[0], b) for b in sample.boxes))
        assert r["coverage"] == pytest.approx(rewards.coverage(boxes[0], sample.boxes[0]))
    else:
        assert (r["grounding"], r["iou"], r["coverage"]) == (0.0, None, None)


STAGE2 = RewardConfig(w_grounding=1.0)


@pytest.mark.parametrize("text,sample,boxes,total", [
    (GOOD_TEXT, MC, [B1], 0.8 + 1.2 + 1.0),  # B1 exactly: r_geo 1
    (GOOD_TEXT, MC, [B2], 0.8 + 1.2 + 1.0),  # B2 covers B1: r_iou 1, r_l1 1
    (GOOD_TEXT, MC, [AWAY, B1], 0.8 + 1.2 + AWAY_GEO),  # only the first crop is graded
    (WRONG_TEXT, MC, [B1], 0.0 + 1.0),  # grounding is paid even when the answer is wrong
    (GOOD_NO_TOOL, MC, [], 0.8),  # no crop: no grounding
    (GOOD_TEXT, MC_NO_BOXES, [B1], 0.8 + 1.2),  # the sample has no boxes: no grounding
    (TRAILING, MC, [B1], 0.8 - 0.2 + 1.2 + 1.0),
])
def test_score_with_grounding(text, sample, boxes, total):
    r = rewards.score(text, sample, boxes, STAGE2)
    assert r["total"] == pytest.approx(total)


def test_score_grounding_weight_and_omega():
    cfg = RewardConfig(w_grounding=0.5, omega=1.0)  # r_geo = r_iou
    pred = (90, 90, 210, 210)
    r = rewards.score(GOOD_TEXT, MC, [pred], cfg)
    assert r["grounding"] == pytest.approx(100 * 100 / (120 * 120))
    assert r["total"] == pytest.approx(0.8 + 1.2 + 0.5 * 100 * 100 / (120 * 120))
    cfg = RewardConfig(w_grounding=0.5, omega=0.0, tau=0.9)  # r_geo = r_l1
    r = rewards.score(GOOD_TEXT, MC, [(100, 100, 180, 200)], cfg)
    assert r["coverage"] == pytest.approx(0.8)
    assert r["grounding"] == pytest.approx(1 - (20 / W) / 4)


def test_score_takes_a_data_sample():
    s = Sample(id="x", question="q", answer="C", width=W, height=H, options=["a", "b", "c"],
               boxes=[[100.0, 100.0, 200.0, 200.0]])
    r = rewards.score("<answer>(C)</answer>", s, [(100, 100, 200, 200)], STAGE2)
    assert r["total"] == pytest.approx(0.8 + 1.2 + 1.0)
    r = rewards.score("<answer>c</answer>", s, [], STAGE2)  # the option text "c", not a letter
    assert r["total"] == pytest.approx(0.8)


def test_a_lone_letter_is_a_letter_before_it_is_an_options_text():
    assert rewards.picked_option("B", ["B", "E", "F", "A"]) == "B"  # not option A, whose text is "B"
    assert rewards.picked_option("A", ["the", "a cat"]) == "A"  # "A" normalises to "" (an article), like "the"
    assert rewards.picked_option("a cat", ["the", "a cat"]) == "B"  # an option's own text


def test_a_bare_reply_is_scored_without_its_end_token():
    """A model that ignores the protocol: its reply, not the turn's closing token, is what is scored."""
    assert rewards.scored_reply("red car<|im_end|>") == "red car"
    assert rewards.accuracy(rewards.scored_reply("Blue car<|endoftext|>"), "B", OPTIONS) == 1.0


def test_an_unknown_matcher_is_an_error_and_math_verify_failing_is_no_match(monkeypatch):
    """math-verify raising is "not shown equal", never a crashed step."""
    with pytest.raises(ValueError, match="matcher 'fuzzy': expected one of exact, rule, math"):
        rewards.accuracy("cat", "cat", matcher="fuzzy")
    assert rewards.accuracy("1/2", "0.5", matcher="math") == 1.0  # math-verify finds them equal; the rule does not
    import math_verify
    monkeypatch.setattr(math_verify, "verify", lambda *a, **kw: 1 / 0)
    assert rewards.accuracy("1/2", "0.5", matcher="math") == 0.0


@pytest.mark.parametrize("reply", ["b", "(b)", "B.", " b: "])
def test_a_lone_letter_in_any_case_answers_a_letter_question_without_options(reply):
    """DeepEyes' rows: the answer letter without the options."""
    assert rewards.accuracy(reply, "B") == 1.0 and rewards.accuracy(reply, "C") == 0.0
