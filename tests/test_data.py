"""data.py: the synthetic set and the JSONL reader. Every file is written under tmp_path."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import crop
import data


def _digest(image):
    return hashlib.sha256(image.tobytes()).hexdigest(), image.size, image.mode


def _meta(s):
    return (s.id, s.question, s.answer, s.width, s.height, s.options, s.boxes, s.category, s.global_tokens)


# ------------------------------------------------------------------ synthetic: determinism

def test_synthetic_same_seed_same_samples():
    a, b = data.synthetic(2, seed=5), data.synthetic(2, seed=5)
    assert [_meta(s) for s in a] == [_meta(s) for s in b]
    assert [_digest(s.image()) for s in a] == [_digest(s.image()) for s in b]
    assert _digest(a[0].image()) == _digest(a[0].image())  # drawing twice draws the same


def test_synthetic_different_seed_different_samples():
    a, b = data.synthetic(2, seed=5), data.synthetic(2, seed=6)
    for s, t in zip(a, b):
        assert s.id != t.id
        assert (s.width, s.height, s.boxes) != (t.width, t.height, t.boxes)
        assert _digest(s.image()) != _digest(t.image())
    assert data.synthetic(1, seed=5)[0].image().tobytes() != data.synthetic(2, seed=5)[1].image().tobytes()


def test_synthetic_prefix_does_not_depend_on_n():
    assert [_meta(s) for s in data.synthetic(3, seed=2)[:2]] == [_meta(s) for s in data.synthetic(2, seed=2)]


# ------------------------------------------------------------------ synthetic: what a sample holds

SAMPLES = data.synthetic(40, seed=0)  # cheap: images are drawn only when asked for


@pytest.mark.parametrize("s", SAMPLES, ids=lambda s: s.id)
def test_synthetic_sample_fields(s):
    assert 2048 <= s.width <= 4096 and 2048 <= s.height <= 4096
    assert s.answer in "ABCD" and len(s.answer) == 1
    assert isinstance(s.options, list) and len(s.options) == 4 and len(set(s.options)) == 4
    assert s.category in ("word", "glyph")
    assert set(s.options) <= set(data.WORDS if s.category == "word" else data.GLYPHS)
    assert s.image_path is None and callable(s.make)
    # nested boxes, innermost first, all inside the image
    assert len(s.boxes) == 3
    for x1, y1, x2, y2 in s.boxes:
        assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height
    for inner, outer in zip(s.boxes, s.boxes[1:]):
        assert outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]
        assert (outer[2] - outer[0]) * (outer[3] - outer[1]) > (inner[2] - inner[0]) * (inner[3] - inner[1])
    x1, y1, x2, y2 = s.boxes[0]
    assert (x2 - x1, y2 - y1) == ((96, 30) if s.category == "word" else (30, 30))


def test_synthetic_answers_and_categories_vary():
    assert {s.answer for s in SAMPLES} == set("ABCD")
    assert {s.category for s in SAMPLES} == {"word", "glyph"}
    assert len({(s.width, s.height) for s in SAMPLES}) == len(SAMPLES)


def _render_word_label(word):
    """The label as the task describes it: black text (default font, 16 px) on white, black outline."""
    im = Image.new("L", (96, 30), 255)
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, 96, 30], outline=0)
    d.text((4, 6), word, fill=0, font=ImageFont.load_default(size=16))
    return np.asarray(im, dtype=np.float64)


def _glyph_signature(grey):
    """Dark or not at four points of the 30x30 label: top-left, top-middle and bottom-left of the glyph, centre."""
    dark = lambda x, y: bool(grey[y, x] < 128)  # noqa: E731
    return dark(7, 7), dark(15, 7), dark(7, 24), dark(15, 15)


GLYPH_SIGNATURES = {"square": (True, True, True, True), "circle": (False, True, False, True),
                    "triangle": (False, True, True, True), "cross": (True, False, True, True)}

# the first samples of seed 0 hold both kinds of label
DRAWN = SAMPLES[:8]


@pytest.mark.parametrize("s", DRAWN, ids=lambda s: f"{s.id}-{s.category}")
def test_synthetic_label_holds_the_answer_at_full_resolution(s):
    image = s.image()
    assert image.size == (s.width, s.height) and image.mode == "RGB"
    label = np.asarray(image.crop(tuple(s.boxes[0])).convert("L"), dtype=np.float64)
    # a white label with black ink: high contrast
    assert (label > 230).mean() > 0.4 and (label < 60).mean() > 0.05 and label.std() > 50
    k = "ABCD".index(s.answer)
    if s.category == "word":  # the answer's word, and no other option's, is what the label shows
        diffs = [np.abs(label - _render_word_label(o)).mean() for o in s.options]
        assert diffs[k] < 1.0 < min(d for i, d in enumerate(diffs) if i != k)
    else:
        assert _glyph_signature(label) == GLYPH_SIGNATURES[s.options[k]]


@pytest.mark.parametrize("s", DRAWN, ids=lambda s: f"{s.id}-{s.category}")
def test_synthetic_label_is_unreadable_at_64_tokens(s):
    shown = crop.resized(s.image(), 64 * 784)
    assert shown.size == crop.shown_size((s.width, s.height), 64 * 784)
    assert shown.size[0] * shown.size[1] <= 64 * 784
    x1, y1, x2, y2 = crop.map_box(s.boxes[0], (s.width, s.height), shown.size)
    w, h = x2 - x1, y2 - y1
    # the 16 px text (or the 20 px glyph) shrinks under 2 shown pixels; the whole label is a handful of pixels
    assert 16 * shown.size[1] / s.height < 2.0 and 20 * shown.size[0] / s.width < 3.0
    if s.category == "glyph":
        assert w < 3 and h < 3
    else:
        assert w < 9 and h < 3
    assert w * h < 25


# ------------------------------------------------------------------ JSONL

def _png(path, size=(120, 80), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """A folder with images and a helper that writes a JSONL of rows (dicts are dumped, strings kept)."""
    root = tmp_path / "set"
    _png(root / "imgs" / "a.png", (120, 80))
    _png(root / "imgs" / "b.png", (64, 48), (1, 2, 3))
    _png(tmp_path / "shared" / "c.png", (30, 40))
    (root / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (root / "imgs" / "text.png").write_bytes(b"this is not an image at all")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative image paths must resolve against the file's folder, not the cwd

    def write(rows, name="data.jsonl"):
        path = root / name
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
        return str(path)

    write.root = root
    write.tmp = tmp_path
    return write


GOOD_ROWS = [
    {"id": "a1", "image": "imgs/a.png", "question": "Which colour?", "options": ["red", "blue", "green"],
     "answer": "b", "boxes": [[10, 10, 20, 20], [5, 5, 40, 30], [0, 0, 120, 80]], "category": "colour",
     "global_tokens": 64},
    {"image": "imgs/b.png", "question": "Name it.", "answer": " cat ", "matcher": "exact"},
    {"id": 7, "image": "../shared/c.png", "question": "Q", "options": ["x", "y", "z", "w", "v"], "answer": "E",
     "boxes": [[0.5, 1.5, 29.5, 40]]},
]


def test_a_jsonl_saved_with_a_bom_keeps_its_first_row(dataset):
    path = dataset([GOOD_ROWS[1], GOOD_ROWS[0]])
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write("\ufeff".encode() + raw)  # as Windows editors save UTF-8
    assert [s.id for s in data.read_jsonl(path)] == ["1", "a1"]


def test_a_tables_id_0_is_its_id_and_levels_start_at_4_tokens(dataset, capsys):
    s = data._table_sample(dict(id=0, image="imgs/a.png", question="q", answer="x"), str(dataset.root), 5)
    assert s.id == "0"  # not the row number, 5 (which another row may carry)
    path = dataset([dict(GOOD_ROWS[1], id="four", global_tokens=4), dict(GOOD_ROWS[1], id="three", global_tokens=3)])
    assert [s.id for s in data.read_jsonl(path)] == ["four"]
    assert "at least 4" in capsys.readouterr().out


def test_a_number_is_an_answer_and_an_empty_cell_is_none(dataset):
    """A counting set's JSONL answers 3, as its table would ("0" is kept); a table's NaN cell (pandas' missing
    value) is no answer or question, not the text "nan"."""
    path = dataset([dict(GOOD_ROWS[1], id="three", answer=3), dict(GOOD_ROWS[1], id="half", answer=2.5)])
    assert [(s.id, s.answer) for s in data.read_jsonl(path)] == [("three", "3"), ("half", "2.5")]
    for field in ("answer", "question"):
        with pytest.raises(ValueError, match=f"no {field}"):
            data._table_sample(dict(dict(image="imgs/a.png", question="q", answer="x"), **{field: float("nan")}),
                               str(dataset.root), 0)


def test_a_folder_of_two_jsonl_files_is_no_source(dataset):
    """A folder is its images with one JSONL: with two, which rows it holds is not known, and it stops."""
    dataset([GOOD_ROWS[0]], name="one.jsonl")
    dataset([GOOD_ROWS[1]], name="two.jsonl")
    with pytest.raises(SystemExit, match="holds 2 .jsonl files; expected exactly one"):
        data.load(str(dataset.root))


def test_an_image_files_error_names_the_file_not_embedded_bytes(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    for name in ("missing.png", "text.png"):
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as e:
            data._open_checked(path, path)
        assert str(e.value).startswith(f"image {path}: ") and "embedded" not in str(e.value)
        assert not str(e.value).endswith((":", " "))  # PIL's "...: 'path'", the path taken out, leaves no colon


def test_a_rows_matcher_is_one_rewards_knows():
    import rewards
    assert data.MATCHERS == rewards.MATCHERS  # data keeps its own copy: it imports no scoring code


def test_read_jsonl_good_rows(dataset):
    path = dataset(GOOD_ROWS)
    samples = data.read_jsonl(path)
    assert len(samples) == 3
    a, b, c = samples
    assert (a.id, a.question, a.answer, a.width, a.height) == ("a1", "Which colour?", "B", 120, 80)
    assert a.options == ["red", "blue", "green"] and a.category == "colour" and a.global_tokens == 64
    assert a.boxes == [[10.0, 10.0, 20.0, 20.0], [5.0, 5.0, 40.0, 30.0], [0.0, 0.0, 120.0, 80.0]]
    assert os.path.samefile(a.image_path, dataset.root / "imgs" / "a.png")
    assert a.image().size == (120, 80) and a.image().mode == "RGB"
    assert a.options == ["red", "blue", "green"] and a.answer == "B"
    # no options: the answer is text, kept as written (stripped); the id is the line number
    assert (b.id, b.answer, b.options, b.boxes, b.category) == ("2", "cat", None, None, "default")
    assert (b.width, b.height) == (64, 48) and b.image().getpixel((0, 0)) == (1, 2, 3)
    assert b.question == "Name it." and b.options is None
    assert b.meta == {"matcher": "exact"} and a.meta == {}  # a row's own matcher
    assert data._matcher_meta("") == {}  # a table's empty cell: the run's
    assert (c.id, c.answer, c.width, c.height) == ("7", "E", 30, 40)
    assert c.boxes == [[0.5, 1.5, 29.5, 40.0]]


def test_read_jsonl_absolute_path_and_blank_lines(dataset, capsys):
    row = dict(GOOD_ROWS[1], image=str(dataset.root / "imgs" / "b.png"))
    path = dataset(["", json.dumps(row), "   ", json.dumps(GOOD_ROWS[0]), ""])
    samples = data.read_jsonl(path)
    assert [s.id for s in samples] == ["2", "a1"]  # ids count lines, blank ones included
    assert "skipped" not in capsys.readouterr().out  # blank lines are not bad rows


BAD_ROWS = [
    # (row, a piece of the reason)
    ("{not json", "Expecting"),
    ('{"image": "imgs/a.png", "question": "q", "answer": "A"', "Expecting"),  # cut short
    ({"image": "imgs/missing.png", "question": "q", "answer": "A"}, "missing.png"),
    ({"image": "imgs/corrupt.png", "question": "q", "answer": "A"}, "cannot identify"),
    ({"image": "imgs/text.png", "question": "q", "answer": "A"}, "cannot identify"),
    ({"image": "imgs", "question": "q", "answer": "A"}, "directory"),  # a folder
    ({"image": "imgs/a.png", "question": "q", "options": ["x", "y", "z"], "answer": "D"}, "not an option letter"),
    ({"image": "imgs/a.png", "question": "q", "options": ["x", "y"], "answer": "yes"}, "not an option letter"),
    ({"image": "imgs/a.png", "question": "q", "options": ["x", "y", "z"], "answer": "AB"}, "not an option letter"),
    ({"image": "imgs/a.png", "question": "q", "options": ["x", "y", "z"], "answer": "ABC"}, "not an option letter"),
    ({"image": "imgs/a.png", "question": "q", "options": ["x", "y", "z"], "answer": "(A)"}, "not an option letter"),
    ({"image": "imgs/a.png", "question": "q", "options": ["x"], "answer": "A"}, "options"),
    ({"image": "imgs/a.png", "question": "q", "options": "x,y", "answer": "A"}, "options"),
    ({"image": "imgs/a.png", "question": "q", "options": ["x", 2], "answer": "A"}, "options"),
    ({"image": "imgs/a.png", "question": "q", "options": list("abcdef"), "answer": "A"}, "options"),
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[10, 10, 130, 20]]}, "outside"),
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[-1, 10, 20, 20]]}, "outside"),
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[20, 10, 10, 20]]}, "empty"),
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[5, 5, 40, 30], [10, 10, 20, 20]]},
     "does not contain"),  # outer first: not nested innermost first
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[5, 5, 40, 30], [6, 0, 50, 40]]},
     "does not contain"),  # overlapping, not nested
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[10, 10, 20, 20], [11, 5, 40, 30]]},
     "does not contain"),  # short of the inner box on its left side only
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[10, 10, 20, 20], [5, 11, 40, 30]]},
     "does not contain"),  # short of the inner box on its top side only
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[10, 10, 20, 20], [5, 5, 19, 30]]},
     "does not contain"),  # short of the inner box on its right side only
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[10, 10, 20, 20], [5, 5, 40, 19]]},
     "does not contain"),  # short of the inner box on its bottom side only
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[0.4, 0.4, 0.45, 0.45], [0.3, 0.3, 0.6, 1]]},
     "look normalised to 0-1"),  # would pass as a sub-pixel box in the corner, which every crop there covers
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": []}, "boxes"),
    ({"image": "imgs/a.png", "question": "q", "answer": "1/2", "matcher": "maths"}, "matcher 'maths'"),
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[1, 2, 3]]}, "is not"),
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [[True, 2, 30, 40]]}, "is not"),
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [["1", 2, 30, 40]]}, "is not"),
    ({"image": "imgs/a.png", "question": "q", "answer": "A", "boxes": [10, 10, 20, 20]}, "is not"),
    ("[1, 2, 3]", "JSON object"),
    ('"a string"', "JSON object"),
    ("42", "JSON object"),
    ("null", "JSON object"),
    ({"image": "imgs/a.png", "answer": "A"}, "question"),
    ({"image": "imgs/a.png", "question": "   ", "answer": "A"}, "question"),
    ({"question": "q", "answer": "A"}, "image"),
    ({"image": "imgs/a.png", "question": "q"}, "answer"),
    ({"image": "imgs/a.png", "question": "q", "answer": True}, "'answer' must be text or a number, not bool"),
    ({"image": "imgs/a.png", "question": "q", "answer": ["B"]}, "'answer' must be text or a number, not list"),
    ({"image": "imgs/a.png", "question": "q", "answer": float("nan")}, "'answer' must be text or a number, not float"),
]


@pytest.mark.parametrize("row,reason", BAD_ROWS, ids=[f"bad{i}" for i in range(len(BAD_ROWS))])
def test_read_jsonl_skips_a_bad_row(dataset, capsys, row, reason):
    path = dataset([GOOD_ROWS[0], row, GOOD_ROWS[1]])
    samples = data.read_jsonl(path)
    assert [s.id for s in samples] == ["a1", "3"]  # the good rows around it are kept
    out = capsys.readouterr().out
    assert f"skipped 1 bad row(s) of {path}" in out
    reason_lines = [ln for ln in out.splitlines() if ln.startswith("  ")]
    assert len(reason_lines) == 1
    assert f"{path}:2: " in reason_lines[0] and reason in reason_lines[0]


def test_read_jsonl_counts_and_limits_reasons(dataset, capsys):
    bad = [r for r, _ in BAD_ROWS]
    path = dataset(bad[:3] + [GOOD_ROWS[0]] + bad[3:])
    samples = data.read_jsonl(path)
    assert [s.id for s in samples] == ["a1"]
    out = capsys.readouterr().out
    assert f"skipped {len(bad)} bad row(s) of {path}" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("  ")]
    assert len(lines) == 6  # the first 5 reasons, and how many more
    assert [ln.split(": ", 1)[0] for ln in lines[:5]] == [f"  {path}:{n}" for n in (1, 2, 3, 5, 6)]
    assert lines[5] == f"  ... and {len(bad) - 5} more"
    assert samples.skipped[0].startswith(f"{path}:1: ") and len(samples.skipped) == len(bad)  # every reason kept
    data.read_jsonl(path, max_reasons=100)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    assert len(lines) == len(bad)


def test_read_jsonl_skips_a_truncated_image(dataset, capsys):
    noise = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    full = dataset.root / "imgs" / "full.png"
    Image.fromarray(noise).save(full)
    (dataset.root / "imgs" / "cut.png").write_bytes(full.read_bytes()[:5000])  # of about 29 KB
    row = {"image": "imgs/cut.png", "question": "q", "answer": "A"}
    samples = data.read_jsonl(dataset([GOOD_ROWS[0], row]))
    assert [s.id for s in samples] == ["a1"]


def test_read_jsonl_without_usable_rows_exits(dataset):
    path = dataset([r for r, _ in BAD_ROWS[:4]])
    with pytest.raises(SystemExit) as e:
        data.read_jsonl(path)
    assert path in str(e.value.code) and "no usable sample" in str(e.value.code)


def test_read_jsonl_empty_file_exits(dataset):
    path = dataset.root / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        data.read_jsonl(str(path))
    assert str(path) in str(e.value.code)


def test_read_jsonl_missing_file_exits(tmp_path):
    path = str(tmp_path / "nope" / "data.jsonl")
    with pytest.raises(SystemExit) as e:
        data.read_jsonl(path)
    assert path in str(e.value.code) and "not found" in str(e.value.code)


# ------------------------------------------------------------------ load

def test_load_synthetic():
    samples = data.load("synthetic:3")
    assert len(samples) == 3 and [s.id for s in samples] == ["syn-0-0", "syn-0-1", "syn-0-2"]
    assert [_meta(s) for s in samples] == [_meta(s) for s in data.synthetic(3, 0)]
    assert [s.id for s in data.load("synthetic:2", seed=4)] == ["syn-4-0", "syn-4-1"]
    assert len(data.load("synthetic")) == 256


def test_load_jsonl_and_errors(dataset, tmp_path):
    path = dataset(GOOD_ROWS)
    assert [s.id for s in data.load(path)] == ["a1", "2", "7"]
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(SystemExit, match="missing.jsonl"):
        data.load(missing)
    with pytest.raises(SystemExit, match="not found"):
        data.load(str(tmp_path / "missing.tsv"))
    other = tmp_path / "table.tsv"
    other.write_text("a\tb\n")
    with pytest.raises(SystemExit, match="unsupported"):
        data.load(str(other))


# ------------------------------------------------------------------ audit: load paths no test ran

def test_a_rows_null_id_is_its_line_number_as_in_a_table(dataset):
    """"id": null is no id, as a table's None cell is: not two items "None"."""
    path = dataset([dict(GOOD_ROWS[1], id=None), dict(GOOD_ROWS[1], id=None)])
    assert [s.id for s in data.load(path)] == ["1", "2"]


def test_a_file_whose_only_line_was_cut_is_emptied_and_a_long_cut_line_is_found(tmp_path):
    """A kill during the first item leaves no whole line; a cut line may be longer than the 64 KiB blocks."""
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"id": "a", "te')
    assert data.cut_partial_line(str(path)) and path.read_bytes() == b""
    path.write_bytes(b'{"id": "a"}\n' + b"x" * 200_000)
    assert data.cut_partial_line(str(path)) and path.read_bytes() == b'{"id": "a"}\n'
    assert not data.cut_partial_line(str(path))  # whole: left as it is


@pytest.mark.parametrize("spec", ["synthetic:0", "micro:x", "synthetic:-3", "micro:1.5"])
def test_a_bad_count_in_a_generated_spec_is_one_line(spec):
    with pytest.raises(SystemExit, match=f"bad data spec '{spec}': expected .*:N with N a positive number"):
        data.load(spec)


def test_two_sources_of_one_file_name_are_refused(dataset, tmp_path):
    """Mixed ids are prefixed by the file's name: a/train.jsonl and b/train.jsonl would share results and levels."""
    row = dict(GOOD_ROWS[1], image=str(dataset.root / "imgs" / "b.png"))
    a = dataset([row], name="train.jsonl")
    (tmp_path / "other").mkdir()
    b = tmp_path / "other" / "train.jsonl"
    b.write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit, match="two sources share a file name; rename one"):
        data.load(f"{a},{b}")


def test_a_rows_null_category_is_the_default_and_data_not_found_lists_the_specs(dataset, tmp_path):
    """"category": null is none, as a table's None cell is (not a category "None")."""
    path = dataset([dict(GOOD_ROWS[1], id="x", category=None)])
    assert [s.category for s in data.load(path)] == ["default"]
    with pytest.raises(SystemExit, match="data not found: .*expected synthetic\\[:N\\], micro"):
        data.load(str(tmp_path / "nothing-here"))
