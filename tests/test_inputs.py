"""Inputs that must never cost a run or bend a number: hostile model output, benchmark files and images that
are checked at load (issue 16)."""
import csv
import io
import json
import os
import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import benchmarks
import data
import report
import rewards
from rollout import parse_tool_call

# ---------------------------------------------------------------- model output is parsed in linear time

TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>", "x", " ", "B",
        "<|im_start|>user\n", "<|im_start|>assistant\n"]


def _regex_reference(text):
    """What the old lazy regexes found (quadratic on unclosed tags): the oracle for the linear scanner."""
    answers = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    calls = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.S)
    stray = re.sub(r"<think>.*?</think>|<tool_call>.*?</tool_call>", "", text, flags=re.S)
    return answers, calls, stray


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(TAGS), max_size=30))
def test_tag_scanner_finds_what_the_regexes_found(parts):
    text = "".join(parts)
    answers, calls, stray = _regex_reference(text)
    assert rewards.tag_contents(text, "<answer>", "</answer>") == answers
    assert rewards.tag_contents(text, "<tool_call>", "</tool_call>") == calls
    assert rewards.strip_spans(text, rewards.PAIRED) == stray
    turns = re.sub(r"<\|im_start\|>user\n.*?<\|im_start\|>assistant\n", "", text, flags=re.S)
    assert rewards.assistant_text(text) == turns


def test_unclosed_tags_parse_in_linear_time():
    # 10,000 unclosed tags of each kind: the lazy regexes took ~10 s per call here (quadratic); bound 1 s for all
    n = 10_000
    texts = ["<tool_call>x" * n, "<answer>x" * n, "<think>x" * n, "<tool_call>{}</tool_call>" + "<think>" * n,
             "<|im_start|>user\nx" * n]
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


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_images_are_scaled_from_65535_in_either_byte_order(mode):
    """A 16-bit value v is v * 255 / 65535 in 8 bits, whatever the image's own largest value (a dark image
    stays dark)."""
    import struct

    values = [20000] * 5 + [40000]
    fmt = ">" if mode == "I;16B" else "<"
    im = Image.frombytes(mode, (3, 2), struct.pack(f"{fmt}6H", *values))
    assert data.to_rgb(im).getpixel((0, 0)) == (77, 77, 77)  # 20000 * 255 / 65535 = 77.8, not 127 (of 40000)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA"])
def test_transparency_is_laid_on_white_as_qwens_processor_does(mode):
    """transformers' convert_to_rgb (which Qwen2.5-VL's image processor calls) puts transparent pixels on white;
    a plain convert("RGB") shows whatever colour they store (often black)."""
    from transformers.image_transforms import convert_to_rgb

    im = Image.new("RGBA", (8, 6), (0, 0, 0, 0))  # transparent black
    im.paste((200, 30, 30, 255), (0, 0, 4, 6))  # an opaque red half
    im.paste((0, 0, 255, 128), (4, 0, 6, 6))  # half-transparent blue
    if mode == "P":  # a palette with one transparent entry (how a GIF or a small PNG keeps transparency)
        im = im.convert("RGB").quantize(4)
        im.info["transparency"] = im.getpixel((7, 0))
    else:
        im = im.convert(mode)
    ours = data.to_rgb(im)
    assert ours.getpixel((7, 0)) == (255, 255, 255)
    assert ours.tobytes() == convert_to_rgb(im, return_numpy=True).tobytes()


def test_a_rotated_tiff_has_its_upright_size_once(tmp_path):
    """Pillow reports a TIFF's size upright already (a JPEG's as stored): the loader must not turn it twice, or
    boxes are checked against a frame the pixels do not have."""
    exif = Image.Exif()
    exif[data.ORIENTATION] = 6
    Image.new("RGB", (80, 40), "white").save(tmp_path / "scan.tif", exif=exif)
    rows = [dict(id="a", image="scan.tif", question="q", answer="x", boxes=[[0, 0, 30, 70]])]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    [s] = data.read_jsonl(str(tmp_path / "d.jsonl"))
    assert (s.width, s.height) == s.image().size == (40, 80)


def test_rows_that_would_break_a_run_later_are_skipped_at_load_with_the_reason(tmp_path, capsys):
    Image.new("RGB", (80, 60), "red").save(tmp_path / "ok.png")
    good = dict(image="ok.png", question="q", answer="x")
    lines = [json.dumps(dict(good, id="a")).encode(),
             json.dumps(dict(good, id="b", global_tokens="64")).encode(),  # a string: a TypeError mid-run
             json.dumps(dict(good, id="c", global_tokens=-5)).encode(),
             ("[" * 100_000 + "]" * 100_000).encode(),  # nesting past the JSON reader's recursion limit
             json.dumps(dict(good, id="e", question="caf")).encode()[:-2] + b"\xe9\"}",  # Latin-1, not UTF-8
             json.dumps(dict(good, id="f")).encode()]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    samples = data.read_jsonl(str(tmp_path / "d.jsonl"))
    assert [s.id for s in samples] == ["a", "f"]
    out = capsys.readouterr().out
    assert "skipped 4 bad row(s)" in out and ":2: 'global_tokens' must be a whole number" in out
    assert ":4: maximum recursion depth" in out and ":5: 'utf-8' codec can't decode" in out


def test_a_rows_line_number_that_another_row_carries_as_its_id_stops_the_load(tmp_path):
    Image.new("RGB", (80, 60), "red").save(tmp_path / "ok.png")
    rows = [dict(image="ok.png", question="q", answer="x"), dict(id=1, image="ok.png", question="q", answer="y")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="appear more than once: 1"):
        data.load(str(tmp_path / "d.jsonl"))


def test_table_rows_keep_an_answer_of_0_and_refuse_options_given_as_a_string(tmp_path):
    Image.new("RGB", (80, 60), "red").save(tmp_path / "ok.png")
    rows = [dict(pic="ok.png", q="How many?", a=0), dict(pic="ok.png", q="Which?", a="A", opts="AB"),
            dict(pic="ok.png", q="Which?", a="B", opts=["x", "y"]), dict(pic="ok.png", q="Which?", a="yes")]
    (tmp_path / "t.json").write_text(json.dumps(rows))
    samples = data.read_table(str(tmp_path / "t.json"), "image=pic,question=q,answer=a,options=opts")
    assert [(s.answer, s.options) for s in samples] == [("0", None), ("B", ["x", "y"]), ("yes", None)]


def test_an_image_that_makes_the_decoder_raise_anything_is_a_bad_image(tmp_path, monkeypatch):
    Image.new("RGB", (80, 60), "red").save(tmp_path / "ok.png")
    [s] = data.read_jsonl(_jsonl(tmp_path, {"a": "ok.png"}))
    monkeypatch.setattr(data, "to_rgb", lambda im: (_ for _ in ()).throw(TypeError("'IFDRational' object")))
    with pytest.raises(data.BadImage, match="TypeError: 'IFDRational'"):
        s.image()


# ---------------------------------------------------------------- benchmark files are checked at load

def _tsv(path, rows, bom=False):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="\t")
    w.writeheader()
    w.writerows(rows)
    path.write_text(("\ufeff" if bom else "") + buf.getvalue(), encoding="utf-8")
    return str(path)


def _load(bench, path):
    return benchmarks.load_benchmark(bench, str(path))


def test_benchmark_files_that_cannot_be_read_are_one_message_before_the_model(tmp_path, monkeypatch):
    from test_benchmarks import _hrbench_rows
    monkeypatch.setattr("model.load_policy", lambda *a, **kw: pytest.fail("the model loaded first"))
    assert len(_load("hrbench", _tsv(tmp_path / "bom.tsv", _hrbench_rows(), bom=True))) == 3  # Excel's BOM
    (tmp_path / "bin.tsv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(SystemExit, match=f"{tmp_path / 'bin.tsv'} is a binary file, not text"):
        _load("hrbench", tmp_path / "bin.tsv")
    (tmp_path / "latin1.tsv").write_bytes(b"index\tquestion\n0\tcaf\xe9\n")
    with pytest.raises(SystemExit, match=f"{tmp_path / 'latin1.tsv'} is not UTF-8 text"):
        _load("hrbench", tmp_path / "latin1.tsv")
    rows = [{k: v for k, v in r.items() if k != "question"} for r in _hrbench_rows()]
    with pytest.raises(SystemExit, match="lacks the column.s. question"):
        _load("hrbench", _tsv(tmp_path / "noq.tsv", rows))
    (tmp_path / "mme.json").write_text(json.dumps({"Question_id": "q1"}))
    with pytest.raises(SystemExit, match="holds a JSON dict; a list of items was expected"):
        _load("mmerw", tmp_path / "mme.json")


def test_a_missing_scoring_column_is_a_warning_not_another_official_score(tmp_path, capsys):
    import eval as ev
    from test_benchmarks import _hrbench_rows
    rows = [{k: v for k, v in r.items() if k != "cycle_category"} for r in _hrbench_rows()]
    samples = _load("hrbench", _tsv(tmp_path / "hr.tsv", rows))
    assert "no 'cycle_category' column: HR-Bench's official score" in capsys.readouterr().out
    items = [dict(id=s.id, category=s.category, correct=1.0, tool_calls=0, tool_errors=0, seconds=1.0, meta=s.meta)
             for s in samples]
    summary = ev.summarize(items, "hr", "hrbench")
    assert summary["official"] is None and summary["accuracy"] == 1.0  # not the plain accuracy, relabelled
    assert "official (per cycle, averaged) n/a" in report.markdown(summary)


def test_items_that_cannot_be_scored_are_skipped_at_load_with_the_reason(tmp_path, capsys):
    from test_benchmarks import _hrbench_rows
    rows = _hrbench_rows()
    rows[2]["answer"] = "E"  # options A-D
    assert [s.id for s in _load("hrbench", _tsv(tmp_path / "hr.tsv", rows))] == ["0", "1"]
    assert "skipped 1 bad item(s)" in capsys.readouterr().out
    Image.new("RGB", (100, 50)).save(tmp_path / "a.png")
    six = [f"({c}) x" for c in "ABCDEF"]
    items = [dict(Question_id=q, Image="a.png", Text="?", Category="c", Subtask="s", Task="t",
                  **{"Answer choices": choices, "Ground truth": truth})
             for q, choices, truth in (("ok", six[:4], "B"), ("six", six, "A"), ("E of 4", six[:4], "E"))]
    (tmp_path / "mme.json").write_text(json.dumps(items))
    assert [s.id for s in _load("mmerw", tmp_path / "mme.json")] == ["ok"]
    out = capsys.readouterr().out
    assert "skipped 2 bad item(s)" in out and "6 options, more than the letters" in out and "'E' is not one" in out
    for name, bbox in (("in", [10, 10, 20, 20]), ("out", [90, 10, 20, 20]), ("flat", [10, 10, 0, 5])):
        os.makedirs(tmp_path / "vstar" / "direct_attributes", exist_ok=True)
        Image.new("RGB", (100, 50)).save(tmp_path / "vstar" / "direct_attributes" / f"{name}.jpg")
        (tmp_path / "vstar" / "direct_attributes" / f"{name}.json").write_text(
            json.dumps(dict(question="?", options=["a", "b"], bbox=bbox)))
    # a V* box only serves the gt-box probe and the IoU: past the edge it is clipped, empty it is left out, and the
    # question stays (V*'s 191 items stay 191), each with a line
    vstar = {s.id: s.boxes for s in _load("vstar", tmp_path / "vstar")}
    assert vstar == {"direct_attributes/flat": None, "direct_attributes/in": [[10, 10, 30, 30]],
                     "direct_attributes/out": [[90, 10, 100, 30]]}
    out = capsys.readouterr().out
    assert "bbox [90, 10, 20, 20] reaches outside the 100x50 image: clipped" in out
    assert "bbox [10, 10, 0, 5] is empty or outside the 100x50 image: left out" in out
