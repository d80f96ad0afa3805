"""The paper's stage-1 data as published on the Hub (sources.py layouts read by data.py), --columns, mixed
sources, and `data.py convert` round-tripping through the JSONL reader. Small generated tables with each
dataset's columns."""
import io
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data
import rewards
import sources


def _png(w=40, h=30, color="red"):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture
def pixelreasoner(tmp_path):
    """release.parquet with images.zip unpacked beside it (into images/)."""
    (tmp_path / "images" / "vstar").mkdir(parents=True)
    Image.new("RGB", (64, 48), "blue").save(tmp_path / "images" / "vstar" / "a.jpg")
    # answer: a list, its first element the answer in \boxed{} (verl-tool's prepare_train.py takes answer[0])
    rows = [dict(qid="pr-0", question="What color is the car?", image=["vstar/a.jpg"], is_video=False,
                 answer=["\\boxed{blue}"]),
            dict(qid="pr-1", question="Which frame?", image=["v/1.jpg", "v/2.jpg"], is_video=True, answer=["2"]),
            dict(qid="pr-2", question="Missing?", image=["vstar/none.jpg"], is_video=False, answer=["x"])]
    return _write(tmp_path / "release.parquet", rows)


@pytest.fixture
def thinklite(tmp_path):
    rows = [dict(id=7, image=dict(bytes=_png(), path="x.png"), answer="B",
                 problem="<image>How many cubes?\nChoices:\n(A) 2\n(B) 3"),
            dict(id=8, image=dict(bytes=_png(color="green"), path=None), answer="", problem="<image>No answer")]
    return _write(tmp_path / "ThinkLite-VL-70k.parquet", rows)


def _cof_row(answer="<answer>the red sign</answer>", image="./images/cof/1.jpg"):
    return dict(images=[image, "./images/cof/1_crop.jpg"], messages=[
        dict(role="system", content="You are a helpful assistant. # Tools ..."),
        dict(role="user", content="<image>What is written on the sign? Think in the mind first, then call tools."),
        dict(role="assistant", content='<think>zoom</think><tool_call>{"name": "image_zoom_in_tool"}</tool_call>'),
        dict(role="user", content="<tool_response><image></tool_response>"),
        dict(role="assistant", content=f"<think>read it</think>{answer}")])


@pytest.fixture
def cof(tmp_path):
    (tmp_path / "images" / "cof").mkdir(parents=True)
    Image.new("RGB", (50, 70), "white").save(tmp_path / "images" / "cof" / "1.jpg")
    return _write(tmp_path / "cof.parquet", [_cof_row(), _cof_row(answer="no answer tag")])


def test_pixelreasoner_layout(pixelreasoner, capsys):
    (s,) = data.load(pixelreasoner)
    out = capsys.readouterr().out
    assert "pixelreasoner layout" in out and "skipped 2 bad row(s)" in out
    assert "row 1: ValueError: a video item" in out and "none.jpg" in out
    assert (s.id, s.question, s.answer, s.options) == ("pr-0", "What color is the car?", "blue", None)
    assert rewards.accuracy("blue", s.answer) == 1.0  # was compared with "['\\boxed{blue}']": never right
    r, g, b = s.image().getpixel((0, 0))
    assert s.image().size == (64, 48) and b > 250 > 5 > max(r, g)  # the blue JPEG


def test_thinklite_layout(thinklite, capsys):
    (s,) = data.load(thinklite)
    out = capsys.readouterr().out
    assert "thinklite layout" in out and "row 1: ValueError: no answer" in out
    assert s.id == "7" and s.question.startswith("How many cubes?") and "<image>" not in s.question
    assert s.answer == "B" and s.image().size == (40, 30)


def test_chain_of_focus_layout_parquet_and_json(cof, tmp_path, capsys):
    (s,) = data.load(cof)
    assert "chain-of-focus layout" in capsys.readouterr().out
    assert (s.question, s.answer, s.width, s.height) == ("What is written on the sign?", "the red sign", 50, 70)
    row = _cof_row(answer="<answer>a sign</answer> then, closer: <answer>the red sign</answer>")
    assert sources.chain_of_focus(row)["answer"] == "the red sign"  # the final answer, not a first guess
    with open(tmp_path / "cof_sft_data.json", "w") as f:  # the file as the Hub holds it
        json.dump([_cof_row()], f)
    (j,) = data.load(str(tmp_path / "cof_sft_data.json"))
    assert (j.question, j.answer, j.image_path) == (s.question, s.answer, s.image_path)


def test_only_a_box_around_the_whole_answer_is_taken_off():
    assert sources._unboxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"  # braces inside the box
    assert sources._unboxed(" \\boxed{ B } ") == "B"
    assert sources._unboxed("\\boxed{a}, \\boxed{b}") == "\\boxed{a}, \\boxed{b}"  # two boxes: not one answer
    assert sources._unboxed("B") == "B" and sources._unboxed(None) is None
    assert sources._unboxed("\\boxed{12") == "\\boxed{12"  # a box never closed: as written


def test_deepeyes_is_still_recognised():
    assert sources.detect(["data_source", "prompt", "images", "reward_model", "extra_info"])[0] == "deepeyes"
    assert sources.detect(["foo"]) is None


def test_generic_columns(tmp_path, capsys):
    rows = [dict(img=_png(), q="Which?", a="b", opts=["x", "y", "z"], key="k1"),
            dict(img=_png(), q="Which?", a="E", opts=["x", "y"], key="k2")]  # E is not one of 2 options
    path = _write(tmp_path / "other.parquet", rows)
    with pytest.raises(SystemExit, match="match no known layout.*--columns"):
        data.load(path)
    (s,) = data.load(path, columns="image=img,question=q,answer=a,options=opts,id=key")
    assert (s.id, s.answer, s.options) == ("k1", "B", ["x", "y", "z"])
    assert "row 1: ValueError: answer 'E' is not a letter" in capsys.readouterr().out
    for bad in ("image=img,question=q", "image=img,question=q,answer=a,colour=c", "image=img,question=q,answer=a,x"):
        with pytest.raises(SystemExit, match="--columns"):
            data.load(path, columns=bad)


def test_mixed_sources_and_convert_round_trip(pixelreasoner, thinklite, cof, tmp_path, monkeypatch):
    spec = ",".join([pixelreasoner, thinklite, cof])
    mixed = data.load(spec)
    assert [s.id for s in mixed] == ["release/pr-0", "ThinkLite-VL-70k/7", "cof/0"]
    out = tmp_path / "conv" / "train.jsonl"
    monkeypatch.setattr(sys, "argv", ["data.py", "convert", spec, "--out", str(out)])
    data.main()
    back = data.read_jsonl(str(out))
    assert [(s.id, s.question, s.answer, s.options) for s in back] == [
        (s.id, s.question, s.answer, s.options) for s in mixed]
    for a, b in zip(mixed, back):
        assert (b.width, b.height) == (a.width, a.height)
        assert a.image().tobytes() == b.image().tobytes()
        assert b.image_path.startswith(str(tmp_path / "conv" / "train_images"))
    first = json.loads(out.read_text().splitlines()[1])
    assert first["image"] == "train_images/000001.png"  # embedded bytes kept as they were (a PNG)
    assert not (tmp_path / "conv" / "train.jsonl.tmp").exists()





def test_a_conversion_never_writes_over_a_set_which_may_be_its_own_source(tmp_path):
    """Adding a source to a converted set, written over it, read images from the folder being written (they were
    overwritten before being read); converting a folder into an --out whose image folder it is deleted it."""
    out = str(tmp_path / "c" / "train.jsonl")
    data.convert("micro:3", out)
    before = {s.id: s.image().tobytes() for s in data.read_jsonl(out)}
    with pytest.raises(SystemExit, match="exists already"):
        data.convert(f"synthetic:2,{out}", out)
    data.convert("synthetic:1", str(tmp_path / "foo_images" / "q.jsonl"))  # a folder of images with its JSONL
    with pytest.raises(SystemExit, match="exists already"):
        data.convert(str(tmp_path / "foo_images"), str(tmp_path / "foo.jsonl"))  # whose images go to foo_images/
    with pytest.raises(SystemExit, match="inside the source folder"):  # a second JSONL there: no longer a source
        data.convert(str(tmp_path / "foo_images"), str(tmp_path / "foo_images" / "train.jsonl"))
    assert len(data.load(str(tmp_path / "foo_images"))) == 1
    new = str(tmp_path / "d" / "train.jsonl")
    data.convert(f"synthetic:2,{out}", new)  # into a new set: the old one's images are read, then copied
    back = {s.id: s for s in data.read_jsonl(new)}
    assert len(back) == 5 and all(back[f"train/{i}"].image().tobytes() == px for i, px in before.items())
    assert {s.id: s.image().tobytes() for s in data.read_jsonl(out)} == before  # the source as it was
    assert sorted(os.listdir(tmp_path / "d")) == ["train.jsonl", "train_images"]  # nothing half-written left


def test_a_table_that_is_no_list_of_rows_or_not_there_is_one_line_and_a_row_without_an_image_is_skipped(
        tmp_path, capsys):
    (tmp_path / "rows.json").write_text('{"image": "a.png", "question": "q", "answer": "a"}')
    with pytest.raises(SystemExit, match="cannot read .*rows.json as JSON: a .json data file must hold a list of rows"):
        data.load(str(tmp_path / "rows.json"))
    with pytest.raises(SystemExit, match="data file not found: .*missing.parquet"):
        data.load(str(tmp_path / "missing.parquet"))
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    (tmp_path / "rows.json").write_text(json.dumps([dict(image=None, question="q", answer="a"),
                                                    dict(image="a.png", question="q", answer="a")]))
    assert len(data.load(str(tmp_path / "rows.json"), columns="image=image,question=question,answer=answer")) == 1
    assert "row 0: ValueError: no image" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no image"):  # a DeepEyes row whose images list is empty
        sources.deepeyes(dict(prompt=[dict(role="user", content="<image>q")], images=[],
                              reward_model=dict(ground_truth="a")))
