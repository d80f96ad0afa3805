"""Inputs that must never cost a run or bend a number: hostile model output, benchmark files and images that
are checked at load (issue 16)."""
import json
import os
import re
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import data
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


# ---------------------------------------------------------------- images that can never be used are refused at load

def _jsonl(folder, images):
    rows = [dict(id=k, image=v, question="q", answer="x") for k, v in images.items()]
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(folder / "d.jsonl")


def test_images_the_encoder_refuses_are_skipped_at_load_with_file_and_line(tmp_path, capsys):
    Image.new("RGB", (50_000, 1), "red").save(tmp_path / "thin.png")  # passed the loader, then killed every run
    Image.new("RGB", (80, 60), "red").save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "fifo.png")  # opening it for reading blocks until a writer comes

    def unblock():  # if the loader opens the FIFO anyway, free it after a while so the test fails, not hangs
        time.sleep(5)
        with open(tmp_path / "fifo.png", "wb"):
            pass

    threading.Thread(target=unblock, daemon=True).start()
    path = _jsonl(tmp_path, {"thin": "thin.png", "ok": "ok.png", "fifo": "fifo.png"})
    samples = data.read_jsonl(path)
    out = capsys.readouterr().out
    assert [s.id for s in samples] == ["ok"] and "skipped 2 bad row(s)" in out
    assert f"{path}:1: image {tmp_path / 'thin.png'}: 50000x1: aspect ratio over 200:1" in out
    assert f"{path}:3: image {tmp_path / 'fifo.png'}: not a regular file" in out


def test_exif_orientation_is_applied_so_boxes_are_in_the_upright_frame(tmp_path):
    im = Image.new("RGB", (80, 60), "white")
    im.paste((255, 0, 0), (0, 0, 10, 10))  # a red mark at the stored image's top left
    exif = Image.Exif()
    exif[data.ORIENTATION] = 6  # shown rotated a quarter turn clockwise
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    [s] = data.read_jsonl(_jsonl(tmp_path, {"phone": "phone.jpg"}))
    upright = s.image()
    assert (s.width, s.height) == upright.size == (60, 80)
    r, g, b = upright.getpixel((55, 3))  # the mark is now at the top right
    assert r > 200 and g < 80 and b < 80
