"""Benchmarks as users download them: HR-Bench (TSV, parquet), V*, MME-RealWorld; scoring, probes, shards and
resume on the tiny model. Fixture files are written here in each exact format."""
import base64
import csv
import io
import json
import os
import shutil
from types import SimpleNamespace

import pytest
from PIL import Image

import benchmarks
import data
import eval as ev
import logbook
import report
import rewards
from helpers import rollout_cfg
import rollout as rollout_module
from rollout import DEPENDENCY_PROBE

TINY = ["--global-tokens", "16", "--crop-tokens", "16", "--max-turn-tokens", "8", "--max-response-tokens", "30"]


def _png_bytes(w, h, color):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _hrbench_rows():
    img = base64.b64encode(_png_bytes(300, 200, "red")).decode()
    return [
        dict(index=0, question="What color?", answer="A", A="red", B="blue", C="green", D="gray",
             category="single", cycle_category="c0", image=img),
        dict(index=1, question="What color?", answer="B", A="blue", B="red", C="green", D="gray",
             category="single", cycle_category="c1", image="0"),  # VLMEvalKit: the image of row 0
        dict(index=2, question="Which is left?", answer="C", A="x", B="y", C="z", D="w",
             category="cross", cycle_category="c0", image=base64.b64encode(_png_bytes(120, 90, "blue")).decode()),
    ]


def _write_tsv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def hrbench_tsv(tmp_path):
    path = tmp_path / "hr_bench_4k.tsv"
    rows = _hrbench_rows()
    _write_tsv(path, rows)
    return str(path)


def test_an_hrbench_file_without_rows_or_a_fourth_option_says_so(tmp_path, capsys):
    """HR-Bench has four options: a file without a D column is evaluated at 3 (chance 33 %, not 25 %), said in a
    line; a file with a header and no rows is empty, not one lacking every column."""
    three = tmp_path / "three.tsv"
    _write_tsv(three, [{k: v for k, v in r.items() if k != "D"} for r in _hrbench_rows()[:2]])
    assert [len(s.options) for s in benchmarks.load_benchmark("hrbench", str(three))] == [3, 3]
    assert "has no 'D' column: its items have fewer options than HR-Bench's four" in capsys.readouterr().out
    two = tmp_path / "two.tsv"
    _write_tsv(two, [{k: v for k, v in r.items() if k not in "CD"} for r in _hrbench_rows()[:2]])
    assert [len(s.options) for s in benchmarks.load_benchmark("hrbench", str(two))] == [2, 2]
    out = capsys.readouterr().out
    assert "has no 'C' column: its items have fewer options" in out and "has no 'D' column" in out
    empty = tmp_path / "empty.tsv"
    empty.write_text("index\tquestion\tanswer\tA\tB\tC\tD\timage\n")
    with pytest.raises(SystemExit, match=f"{empty} holds no items"):
        benchmarks.load_benchmark("hrbench", str(empty))


@pytest.fixture
def vstar_dir(tmp_path):
    root = tmp_path / "vstar"
    items = {"direct_attributes/sa_1": dict(target_object=["cup"], bbox=[[10, 20, 30, 40]],
                                            question="What is the color of the cup?",
                                            options=["white", "black", "red", "blue"]),
             "relative_position/sa_2": dict(target_object=["dog", "cat"], bbox=[[5, 5, 10, 10], [50, 60, 20, 10]],
                                            question="Is the dog on the left or right of the cat?",
                                            options=["left", "right"])}
    for name, item in items.items():
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        Image.new("RGB", (160, 120), "white").save(root / f"{name}.jpg")
        (root / f"{name}.json").write_text(json.dumps(item))
    return str(root)


@pytest.fixture
def mmerw_json(tmp_path):
    os.makedirs(tmp_path / "imgs")
    Image.new("RGB", (200, 100), "green").save(tmp_path / "imgs" / "a.png")
    items = [dict(Question_id="q1", Image="imgs/a.png", Text="What is shown?",
                  **{"Answer choices": ["(A) a tree", "(B) a car", "(C) a dog", "(D) a cup", "(E) a hat"],
                     "Ground truth": "B"}, Category="Perception", Subtask="OCR", Task="Remote"),
             dict(Question_id="q2", Image="imgs/a.png", Text="How many?",
                  **{"Answer choices": ["(A) 1", "(B) 2"], "Ground truth": "(A)"}, Category="Reasoning",
                  Subtask="Count", Task="Monitoring"),
             dict(Question_id="q3", Image="imgs/missing.png", Text="?",
                  **{"Answer choices": ["(A) 1"], "Ground truth": "A"}, Category="x", Subtask="y", Task="z")]
    path = tmp_path / "MME-RealWorld-Lite.json"
    path.write_text(json.dumps(items))
    return str(path)


def test_hrbench_tsv_and_parquet_load_the_same(hrbench_tsv, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tsv = benchmarks.load_benchmark("hrbench", hrbench_tsv)
    pq.write_table(pa.Table.from_pylist(_hrbench_rows()), tmp_path / "hr.parquet")
    par = benchmarks.load_benchmark("hrbench", str(tmp_path / "hr.parquet"))
    for samples in (tsv, par):
        assert [s.id for s in samples] == ["0", "1", "2"]
        assert [s.answer for s in samples] == ["A", "B", "C"] and samples[1].options[1] == "red"
        assert (samples[1].width, samples[1].height) == (300, 200)  # row 1 borrows row 0's image
        assert samples[1].image().getpixel((0, 0)) == (255, 0, 0)
        assert [s.category for s in samples] == ["single", "single", "cross"]
        assert [s.meta["cycle"] for s in samples] == ["c0", "c1", "c0"]


def test_an_integer_cycle_0_is_a_cycle(tmp_path):
    """A parquet release may store cycle_category as integers: 0 is a cycle, not a missing one (which would turn
    HR-Bench's official score into n/a)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, cycle_category=k % 2) for k, r in enumerate(_hrbench_rows())]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hr.parquet")
    assert [s.meta["cycle"] for s in benchmarks.load_benchmark("hrbench", str(tmp_path / "hr.parquet"))] == \
        ["0", "1", "0"]


def test_hrbench_parquet_with_image_bytes_a_gap_in_the_options_and_no_category(tmp_path, capsys):
    """A parquet may hold the image as raw bytes or as the Hub's {bytes, path}; an empty option before a filled
    one is refused with its letter (dropping it would re-letter the rest under the answer); a null category is
    "default"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _hrbench_rows()
    rows[0]["image"] = _png_bytes(300, 200, "red")
    rows[1]["image"] = "0".encode()  # in a bytes column, still a reference to row 0's image
    rows[2].update(image=_png_bytes(120, 90, "blue"), category=None)
    gap = dict(rows[2], index=4, B="", answer="C")
    gap_c = dict(rows[2], index=5, C=None, answer="D")  # the last but one: D filled
    pq.write_table(pa.Table.from_pylist([rows[0], rows[1], rows[2], gap, gap_c]), tmp_path / "hr.parquet")
    hub = [dict(r, image={"bytes": r["image"], "path": None}) for r in rows]  # the Hub's Image feature
    pq.write_table(pa.Table.from_pylist(hub), tmp_path / "hub.parquet")
    for name in ("hr.parquet", "hub.parquet"):
        samples = benchmarks.load_benchmark("hrbench", str(tmp_path / name))
        assert [s.id for s in samples] == ["0", "1", "2"]
        assert [s.image().getpixel((0, 0)) for s in samples] == [(255, 0, 0), (255, 0, 0), (0, 0, 255)]
        assert samples[2].category == "default"
    out = capsys.readouterr().out
    assert "row 4: ValueError: option B is empty but a later one is not" in out
    assert "row 5: ValueError: option C is empty but a later one is not" in out
    rows = _hrbench_rows()  # trailing empty options are fewer options
    pq.write_table(pa.Table.from_pylist([dict(rows[0], D=None, C="")]), tmp_path / "three.parquet")
    assert benchmarks.load_benchmark("hrbench", str(tmp_path / "three.parquet"))[0].options == ["red", "blue"]


def test_a_vstar_box_past_the_edge_is_clipped_and_the_question_kept(vstar_dir, capsys):
    path = os.path.join(vstar_dir, "direct_attributes", "sa_1.json")
    item = json.load(open(path))
    json.dump(dict(item, bbox=[[150, 100, 11, 21], [200, 10, 5, 5]]), open(path, "w"))  # the image is 160 x 120
    (a, _) = benchmarks.load_benchmark("vstar", vstar_dir)
    assert a.id == "direct_attributes/sa_1" and a.boxes == [[150, 100, 160, 120]]
    out = capsys.readouterr().out
    assert "reaches outside the 160x120 image: clipped" in out and "is empty or outside" in out
    json.dump(dict(item, bbox=[[1, 2, 3, 4, 5], [10, 20, 30, 40]]), open(path, "w"))  # a malformed box
    (a, _) = benchmarks.load_benchmark("vstar", vstar_dir)
    assert a.id == "direct_attributes/sa_1" and a.boxes == [[10, 20, 40, 60]]  # the question and the good box stay
    assert "bbox [1, 2, 3, 4, 5] is not [x, y, w, h]: left out" in capsys.readouterr().out


def test_a_missing_vstar_category_is_said_and_not_an_unreadable_item(vstar_dir, capsys):
    shutil.rmtree(os.path.join(vstar_dir, "relative_position"))
    samples = benchmarks.load_benchmark("vstar", vstar_dir)
    assert [s.category for s in samples] == ["direct_attributes"] and samples.skipped == []
    assert "relative_position is missing: the relative_position items are not evaluated" in capsys.readouterr().out


def test_a_vstar_folder_as_unzipped_on_a_mac_or_saved_on_windows(vstar_dir, capsys):
    """A .JPG image and a JSON with a BOM are an item; macOS' ._ files are no items; an image without its JSON
    is an unreadable item, counted (else the total reads one short and the run looks complete)."""
    folder = os.path.join(vstar_dir, "direct_attributes")
    os.rename(os.path.join(folder, "sa_1.jpg"), os.path.join(folder, "sa_1.JPG"))
    other = os.path.join(vstar_dir, "relative_position")
    os.rename(os.path.join(other, "sa_2.json"), os.path.join(other, "sa_2.JSON"))
    text = open(os.path.join(folder, "sa_1.json")).read()
    open(os.path.join(folder, "sa_1.json"), "w", encoding="utf-8-sig").write(text)
    open(os.path.join(folder, "._sa_1.json"), "wb").write(b"\x00\x05\x16\x07 Mac OS X resource fork")
    Image.new("RGB", (40, 30)).save(os.path.join(folder, "sa_9.jpg"))
    samples = benchmarks.load_benchmark("vstar", vstar_dir)
    assert [s.id for s in samples] == ["direct_attributes/sa_1", "relative_position/sa_2"]
    assert len(samples.skipped) == 1 and "sa_9.jpg: no question file (sa_9.json) beside it" in samples.skipped[0]
    assert "._sa_1" not in capsys.readouterr().out


def test_a_vstar_item_with_a_jpeg_and_a_png_reads_its_jpeg(vstar_dir):
    """A stem's JPEG is its image, a PNG beside it (a converted copy, say) is not read instead."""
    folder = os.path.join(vstar_dir, "direct_attributes")
    Image.new("RGB", (40, 30)).save(os.path.join(folder, "sa_1.png"))
    samples = benchmarks.load_benchmark("vstar", vstar_dir)
    assert [(s.id, s.width, s.height) for s in samples][0] == ("direct_attributes/sa_1", 160, 120)


def test_vstar_loader_shuffles_options_deterministically(vstar_dir):
    a = benchmarks.load_benchmark("vstar", vstar_dir, seed=1)
    b = benchmarks.load_benchmark("vstar", vstar_dir, seed=1)
    assert [(s.options, s.answer) for s in a] == [(s.options, s.answer) for s in b]
    for s, right in zip(a, ["white", "left"]):
        assert s.options["ABCD".index(s.answer)] == right  # options[0] of the file is the right one
    assert [s.category for s in a] == ["direct_attributes", "relative_position"]
    assert a[0].boxes == [[10, 20, 40, 60]]  # [x, y, w, h] -> [x1, y1, x2, y2]
    assert a[1].boxes == [[5, 5, 70, 70]]  # two targets: their union
    seeds = {tuple(benchmarks.load_benchmark("vstar", vstar_dir, seed=k)[0].options) for k in range(8)}
    assert len(seeds) > 1  # the shuffle does move the right answer around
    for k in range(8):  # the answer letter follows the right option whatever the shuffle (seed 1's is its own inverse)
        for s, right in zip(benchmarks.load_benchmark("vstar", vstar_dir, seed=k), ["white", "left"]):
            assert s.options["ABCD".index(s.answer)] == right


def test_mmerw_loader(mmerw_json, capsys):
    samples = benchmarks.load_benchmark("mmerw", mmerw_json)
    assert [s.id for s in samples] == ["q1", "q2"]  # q3's image is missing: skipped and reported
    assert [s.category for s in samples] == ["Remote/OCR/Perception", "Monitoring/Count/Reasoning"]
    assert "missing.png" in capsys.readouterr().out
    assert samples[0].options == ["a tree", "a car", "a dog", "a cup", "a hat"] and samples[0].answer == "B"
    assert samples[1].answer == "A" and samples[1].meta == dict(task="Monitoring", subtask="Count")


@pytest.mark.parametrize("bench", ["hrbench", "vstar", "mmerw"])
def test_missing_file_names_what_is_expected(bench, tmp_path):
    with pytest.raises(SystemExit) as e:
        benchmarks.load_benchmark(bench, str(tmp_path / "nope"))
    assert "nope" in str(e.value) and benchmarks.BENCHMARKS[bench].split()[0] in str(e.value)


def _item(id, category, correct, **meta):
    return dict(id=id, category=category, correct=correct, tool_calls=1, tool_errors=0, seconds=1.0, meta=meta)


def test_hrbench_scoring_by_hand():
    items = [_item("0", "single", 1.0, cycle="c0"), _item("1", "single", 0.0, cycle="c1"),
             _item("2", "cross", 1.0, cycle="c0"), _item("3", "cross", 1.0, cycle="c1"),
             _item("4", "cross", 0.0, cycle="c1")]
    s = ev.summarize(items, "hr", "hrbench")
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["per_category"] == {"cross": pytest.approx(2 / 3), "single": 0.5}
    assert s["official"] == pytest.approx((1.0 + 1 / 3) / 2)  # c0: 2/2, c1: 1/3
    assert s["deepeyes"] == pytest.approx((0.5 + 2 / 3) / 2)
    # without the cross questions DeepEyes' score is not computed; an item without its cycle leaves out the official
    assert ev.summarize(items[:2], "hr", "hrbench")["deepeyes"] is None
    assert ev.summarize(items + [_item("5", "cross", 1.0)], "hr", "hrbench")["official"] is None
    # the IoU is the first crop's, with B1, over the items that cropped
    boxed = [dict(_item("0", "single", 1.0, cycle="c0"), boxes=[[0, 0, 10, 10], [0, 0, 10, 5]], gt_boxes=[[0, 0, 10, 5]]),
             dict(_item("1", "single", 1.0, cycle="c0"), boxes=[], gt_boxes=[[0, 0, 1, 1]])]
    assert ev.summarize(boxed, "hr", "hrbench")["iou_first_crop"] == pytest.approx(0.5)
    calls = [dict(_item(str(k), "single", 1.0, cycle="c0"), tool_calls=2, tool_errors=k) for k in (0, 1)]
    assert (ev.summarize(calls, "hr", "hrbench")["tool_calls"], ev.summarize(calls, "hr", "hrbench")["tool_errors"]) == (2, 0.5)


def test_mmerw_and_vstar_scoring_by_hand():
    items = [_item("a", "Perception", 1.0, task="Remote", subtask="OCR"),
             _item("b", "Perception", 0.0, task="Remote", subtask="Color"),
             _item("c", "Reasoning", 1.0, task="Auto", subtask="OCR")]
    s = ev.summarize(items, "mme", "mmerw")
    assert s["per_task"] == {"Auto": 1.0, "Remote": 0.5}
    # subtasks of the same name under two tasks are two subtasks
    assert s["per_subtask"] == {"Auto/OCR": 1.0, "Remote/Color": 0.0, "Remote/OCR": 1.0}
    v = ev.summarize([_item("1", "direct_attributes", 1.0), _item("2", "direct_attributes", 0.0),
                      _item("3", "relative_position", 1.0)], "v", "vstar")
    assert v["accuracy"] == pytest.approx(2 / 3)  # micro, not the mean of the folders (0.75)
    assert v["per_category"] == {"direct_attributes": 0.5, "relative_position": 1.0}


@pytest.mark.parametrize("bench,fixture", [("hrbench", "hrbench_tsv"), ("vstar", "vstar_dir"), ("mmerw", "mmerw_json")])
def test_eval_on_each_benchmark(bench, fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    out = tmp_path / "out" / bench
    s = ev.main(["--bench", bench, "--data", path, "--out", str(out), "--html", str(tmp_path / "r.html"), *TINY])
    assert s["num_items"] == {"hrbench": 3, "vstar": 2, "mmerw": 2}[bench]
    assert json.load(open(out / "summary.json"))["num_items"] == s["num_items"]
    assert "| **overall** |" in open(out / "table.md").read()
    assert open(tmp_path / "r.html").read().count("<section class='item'") == s["num_items"]
    if bench == "hrbench":
        assert "official" in s and "HR-Bench official" in open(out / "table.md").read()


def test_probes_and_their_summary(vstar_dir, tmp_path, capsys):
    root = tmp_path / "eval"
    for probe in (None, "noise", "gt-box", "no-tool"):
        name = "vstar" + (f"-{probe}" if probe else "")
        ev.main(["--bench", "vstar", "--data", vstar_dir, "--out", str(root / name), *TINY]
                + (["--probe", probe] if probe else []))
    capsys.readouterr()
    [results] = ev.main(["--bench", "vstar", "--summary", "--out", str(root / "vstar")])  # one setting
    text = capsys.readouterr().out
    assert set(results) == {"none", "noise", "gt-box", "no-tool"}
    assert "| noise | 2 of 2 |" in text and "crop dependency" in text


def test_probes_are_compared_on_the_items_every_run_has(vstar_dir, tmp_path, capsys):
    """A noise run with --limit 1 (and another noise_sigma) pairs with the full plain run, on its one item."""
    root = tmp_path / "eval"
    ev.main(["--bench", "vstar", "--data", vstar_dir, "--out", str(root / "vstar"), *TINY])
    ev.main(["--bench", "vstar", "--data", vstar_dir, "--out", str(root / "vstar-noise"), "--probe", "noise",
             "--noise-sigma", "32", "--limit", "1", *TINY])
    capsys.readouterr()
    [results] = ev.main(["--bench", "vstar", "--summary", "--out", str(root / "vstar")])
    assert results["none"]["num_items"] == results["noise"]["num_items"] == 1
    assert "| noise | 1 of 2 |" in capsys.readouterr().out
    assert json.load(open(root / "vstar" / "summary.json"))["num_items"] == 2  # its own summary is left alone
    shutil.copytree(root / "vstar", root / "vstar-again")  # one setting twice: which one counts is said
    ev.main(["--bench", "vstar", "--summary", "--out", str(root / "vstar")])
    assert "hold the same setting and probe; vstar-again is used" in capsys.readouterr().out


def test_an_unfinished_episode_is_not_scored_by_a_letter_in_its_thinking():
    assert rewards.scored_reply("<think>Option A says red, but I need to zoom</think><tool_call>{") is None
    assert rewards.scored_reply("<think>it is red</think><answer>A</answer>") == "A"
    assert rewards.scored_reply("B") == "B"  # a model that does not use the protocol: its bare reply


def test_the_held_out_probe_scores_replies_as_eval_does(monkeypatch):
    s = data.micro(1)[0]
    texts = iter([s.answer, "<think>x</think>", "C", "<think>x</think>"])  # bare right, tags but no answer
    monkeypatch.setattr(logbook, "rollout", lambda policy, samples, cfg, step: [
        SimpleNamespace(text=next(texts), sample=s, num_tool_calls=0) for _ in samples])
    out = logbook.probe_held_out(None, [s, s], rollout_cfg(), "rule")
    assert out["heldout_accuracy"] == 0.5 and out["heldout_noise_accuracy"] == float(s.answer == "C") / 2


def test_interrupted_eval_resumes_without_redoing_items(hrbench_tsv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hr"
    real = rollout_module.rollout
    calls = []

    def dying(policy, samples, cfg):
        calls.append([s.id for s in samples])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(policy, samples, cfg)

    monkeypatch.setattr(rollout_module, "rollout", dying)
    args = ["--bench", "hrbench", "--data", hrbench_tsv, "--out", str(out), "--batch", "1", *TINY]
    with pytest.raises(KeyboardInterrupt):
        ev.main(args)
    assert len(open(out / "items.jsonl").readlines()) == 1
    calls.clear()
    monkeypatch.setattr(rollout_module, "rollout", lambda p, s, c: calls.append([x.id for x in s]) or real(p, s, c))
    s = ev.main(args)
    assert calls == [["1"], ["2"]] and s["num_items"] == 3  # item 0 was not redone
    assert "1 item(s) already in" in capsys.readouterr().out


def test_unreadable_rows_count_in_the_benchmark_and_are_kept_with_their_reasons(tmp_path, capsys):
    """A row the loader cannot read is not silently dropped from the benchmark: the results are partial (the
    score is over fewer items than the file holds), and skipped.txt names every such row and why."""
    rows = _hrbench_rows()
    rows[2]["image"] = "not base64 of an image" * 4
    path = tmp_path / "hr_bench_4k.tsv"
    _write_tsv(path, rows)
    out = tmp_path / "hr"
    summary = ev.main(["--bench", "hrbench", "--data", str(path), "--out", str(out), *TINY])
    assert (summary["num_items"], summary["num_total"], summary["num_unreadable"]) == (2, 3, 1)
    assert open(out / "skipped.txt").read() == (f"{path}: row 2: ValueError: image of row 2: cannot identify image "
                                                f"file (embedded bytes)\n")  # the same words in every run
    shown = report.markdown(summary)
    assert "**partial: 2 of 3 items** (1 unreadable in the benchmark's file, listed in skipped.txt)" in shown
    assert ev.folder_summary(str(out), "hrbench")[0]["num_total"] == 3  # read back from run.json
    # the first rows only (--limit): which unreadable rows fall within the limit is unknown, so none is counted
    summary = ev.main(["--bench", "hrbench", "--data", str(path), "--out", str(tmp_path / "two"), "--limit", "2",
                       *TINY])
    assert (summary["num_items"], summary["num_total"], summary["num_unreadable"]) == (2, 2, 0)
    # an image that passes the load's checks but fails to decode in the rollout (a truncated JPEG) counts the
    # same, and a rerun does not retry it
    buf = io.BytesIO()
    Image.effect_noise((300, 200), 60).convert("RGB").save(buf, "JPEG")
    rows[1]["image"] = base64.b64encode(buf.getvalue()[:len(buf.getvalue()) // 2]).decode()
    _write_tsv(path, rows)
    out = tmp_path / "cut"
    summary = ev.main(["--bench", "hrbench", "--data", str(path), "--out", str(out), *TINY])
    assert (summary["num_items"], summary["num_total"], summary["num_unreadable"]) == (1, 3, 2)
    assert "**partial: 1 of 3 items** (2 unreadable" in report.markdown(summary)
    assert "sample 1 (embedded image)" in open(out / "skipped.txt").read().splitlines()[1]
    summary = ev.main(["--bench", "hrbench", "--data", str(path), "--out", str(out), *TINY])  # nothing to redo
    assert (summary["num_items"], summary["num_total"], summary["num_unreadable"]) == (1, 3, 2)
    assert len(open(out / "skipped.txt").read().splitlines()) == 2
    assert "0 to go" in capsys.readouterr().out
    # a first run under --limit (no load reasons written) and then the whole benchmark into the same folder:
    # skipped.txt ends up with every reason, once
    out = tmp_path / "limit_then_all"
    ev.main(["--bench", "hrbench", "--data", str(path), "--out", str(out), "--limit", "2", *TINY])
    summary = ev.main(["--bench", "hrbench", "--data", str(path), "--out", str(out), *TINY])
    assert summary["num_unreadable"] == 2 and len(open(out / "skipped.txt").read().splitlines()) == 2


def test_an_item_is_judged_by_its_rows_own_matcher():
    """A row's matcher (DeepEyes' math rows: "math") judges it in eval as in training, whatever --matcher."""
    s = data.Sample(id="m", question="q", answer="\\frac{1}{2}", width=10, height=10, meta={"matcher": "math"})
    e = SimpleNamespace(sample=s, text="<answer>0.5</answer>", boxes_shown=[], boxes=[], turns=1, num_tool_calls=0,
                        num_tool_errors=0)
    assert ev._item(e, 0.1, e.text, "rule")["correct"] == 1.0
    s.meta = {}
    assert ev._item(e, 0.1, e.text, "rule")["correct"] == 0.0


def test_a_damaged_results_line_is_named_and_its_item_redone(tmp_path, capsys):
    """items.jsonl read back: a line that is not an item (null, a list, no id, not JSON) is named with its line
    number, never a crash; a last line without its newline (a shard still writing it) is left out quietly."""
    path = tmp_path / "items.jsonl"
    path.write_text('{"id": "a", "correct": 1}\nnull\n[1]\n{"correct": 0}\n{"id": "b"\n{"id": "c", "correct": 0}\n{"id"')
    assert sorted(ev._read_items(str(path))) == ["a", "c"]
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in out] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "TypeError" in out[0] and "KeyError" in out[2] and "JSONDecodeError" in out[3]


def test_shards_cover_the_benchmark(hrbench_tsv, tmp_path, monkeypatch):
    out = tmp_path / "hr"
    base = ["--bench", "hrbench", "--data", hrbench_tsv, "--out", str(out), *TINY]
    ev.main(base + ["--shard", "0/2"])
    ev.main(base + ["--shard", "1/2"])
    assert sorted(os.listdir(out)) == ["items.shard-0-of-2.jsonl", "items.shard-1-of-2.jsonl", "run.json",
                                       "summary.json", "table.md"]
    assert len(open(out / "items.shard-0-of-2.jsonl").readlines()) == 2  # items 0 and 2
    monkeypatch.setattr(rollout_module, "rollout", lambda *a: pytest.fail("everything was done by the shards"))
    assert ev.main(base)["num_items"] == 3
    with pytest.raises(SystemExit):
        ev.main(base + ["--shard", "2/2"])


def test_the_seeds_table_gives_each_models_mean_spread_and_seeds(tmp_path, monkeypatch):
    """`eval.py --summary --out runs/exp/summary` over `make experiment`'s seed folders: the README's table."""
    def results(adapter, acc, noisy):
        plain = dict(accuracy=acc, tool_calls=1.0, iou_first_crop=0.1, settings=dict(adapter=adapter))
        return {"none": plain, DEPENDENCY_PROBE: dict(accuracy=noisy)}
    per_seed = [[results("runs/exp/s0/stage1/final", 0.8, 0.3), results(None, 0.2, 0.2)],
                [results("runs/exp/s2/stage1/final", 0.6, 0.3), results(None, 0.2, 0.2)]]
    text = report.seeds_table(per_seed, ["s0", "s2"])
    assert ("| stage 1, information gap | 0,2 | 70.0 ± 14.1 (80.0, 60.0) | 30.0 ± 0.0 (30.0, 30.0) | "
            "40.0 ± 14.1 (50.0, 30.0) | 1.00 ± 0.00 (1.00, 1.00) | 10.0 ± 0.0 (10.0, 10.0) |") in text
    assert text.index("| warm start | 0,2 | 20.0 ± 0.0") < text.index("| stage 1, information gap |")
    # a seed whose run covered 3 of 191 items is marked, and one without a noise run is n/a in its place
    partial = results("runs/exp/s3/stage1/final", 0.0, None)
    partial["none"].update(num_items=3, num_total=191)
    del partial[DEPENDENCY_PROBE]
    text = report.seeds_table(per_seed + [[partial]], ["s0", "s2", "s3"])
    assert "| stage 1, information gap | 0,2,3* | 46.7 ± 41.6 (80.0, 60.0, 0.0) | 30.0 ± 0.0 (30.0, 30.0, n/a) |" in text
    assert "* partial (a run that has not covered its benchmark): stage 1, information gap, seed 3: 3 of 191 items" in text
    # a row is the Makefile's by its last two folders, not by how its path ends: another model is its own row
    other = [[results("runs/exp/s0/ablate_stage1/final", 0.1, 0.1)]]
    assert "| runs/exp/s0/ablate_stage1/final | 0 |" in report.seeds_table(other, ["s0"])
    # seeds in number order (s10 after s2)
    seen = []
    monkeypatch.setattr(ev, "probe_tables", lambda bench, root: [])
    monkeypatch.setattr(report, "seeds_table", lambda tables, seeds: seen.append(seeds) or "")
    for d in ("s10", "s2", "summary"):
        os.makedirs(tmp_path / d)
    ev.probe_summary("vstar", str(tmp_path))
    assert seen == [["s2", "s10"]]
