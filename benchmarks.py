"""The paper's benchmarks, read from the files users download: HR-Bench (TSV or parquet), V* Bench (its
folder), MME-RealWorld(-Lite) (JSON with its image folder). eval.py --bench NAME --data PATH uses them.

    python -c "import benchmarks; print(len(benchmarks.load_benchmark('vstar', 'vstar_bench')))"
"""
import base64
import csv
import io
import json
import os
import random
import re

from data import LETTERS, Sample, _image_from_bytes, _open_checked, _read_rows, _report, cell_text, unique_ids


BENCHMARKS = {
    "hrbench": "hr_bench_4k.tsv or hr_bench_8k.tsv (or .parquet), from the HR-Bench release (DreamMr/HR-Bench)",
    "vstar": "the V* Bench folder holding direct_attributes/ and relative_position/ (craigwu/vstar_bench)",
    "mmerw": "MME-RealWorld(-Lite) JSON with its image folder beside it (yifanzhang114/MME-RealWorld)",
}


def load_benchmark(bench, path, seed=0):
    """Samples of a benchmark from the file or folder users download (the formats: README, "Evaluation")."""
    if not path or not os.path.exists(path):
        raise SystemExit(f"error: --data {path!r} not found: --bench {bench} expects {BENCHMARKS[bench]}")
    return unique_ids(dict(hrbench=_hrbench, vstar=_vstar, mmerw=_mmerw)[bench](path, seed), path)


HRBENCH_SCORES = {"category": "DeepEyes' score (mean of FSP and FCP)",
                  "cycle_category": "HR-Bench's official score (accuracy per option-rotation cycle, averaged)"}


def _hrbench(path, seed):
    """HR-Bench TSV (or parquet): index, question, answer letter, A-D, category (single = FSP, cross = FCP),
    cycle_category, image (base64 text; in a parquet also bytes or the Hub's {bytes, path}; a short number instead
    refers to the row holding the image)."""
    rows = _read_rows(path) if path.endswith(".parquet") else _tsv_rows(path)
    if not rows:
        raise SystemExit(f"error: {path} holds no items")
    columns = set(rows[0])
    _require_columns(path, columns, ("index", "question", "answer", "image", "A", "B"))
    for column in [c for c in "CD" if c not in columns]:
        print(f"warning: {path} has no {column!r} column: its items have fewer options than HR-Bench's four")
    for column, score in HRBENCH_SCORES.items():
        if column not in columns:
            print(f"warning: {path} has no {column!r} column: {score} cannot be computed (reported as n/a)")
    by_index = {str(r["index"]): r for r in rows}
    samples, bad = [], []
    for r in rows:
        try:
            raw = _hrbench_image(r["image"], by_index)
            width, height = _open_checked(io.BytesIO(raw), f"of row {r['index']}")
            # options keep their letters: an empty one before a filled one would shift the answer's
            filled = [cell_text(r.get(k)) not in ("", "nan") for k in "ABCD"]
            options = [cell_text(r.get(k)) for k in "ABCD"[:sum(filled)]]
            if not all(filled[:len(options)]):
                raise ValueError(f"option {'ABCD'[filled.index(False)]} is empty but a later one is not")
            samples.append(Sample(
                id=str(r["index"]), question=str(r["question"]), answer=_option_letter(r["answer"], options),
                width=width, height=height, options=options, category=cell_text(r.get("category")) or "default",
                make=_image_from_bytes(raw), meta=dict(cycle=cell_text(r.get("cycle_category")))))
        except (KeyError, ValueError, OSError) as e:
            bad.append(f"{path}: row {r.get('index', '?')}: {type(e).__name__}: {e}")
    return _report(samples, bad, path)


def _hrbench_image(image, by_index):
    """A row's image bytes: base64 text (the TSV), raw bytes or the Hub's {bytes, path} (a parquet); a short
    number instead refers to the row holding the image (VLMEvalKit stores a repeated image once)."""
    if isinstance(image, dict):
        image = image.get("bytes")
    if isinstance(image, (bytes, bytearray)):
        if len(image) >= 64:  # no image is shorter: a shorter value is a reference
            return bytes(image)
        image = image.decode(errors="replace")
    image = str(image)
    if len(image) < 64 and image in by_index:
        return _hrbench_image(by_index[image]["image"], {})
    return base64.b64decode(image, validate=False)


def _tsv_rows(path):
    """A TSV's rows, read as a stream (HR-Bench 8K's file is gigabytes of base64: not held twice more as one
    text); a binary or non-UTF-8 file is one message naming it."""
    csv.field_size_limit(1 << 31)
    with open(path, "rb") as f:
        if b"\x00" in f.read(1 << 16):
            raise SystemExit(f"error: {path} is a binary file, not text: is it the benchmark's file?")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start}): is it the benchmark's file?") from None


def _read_text(path):
    """A benchmark's text file (a BOM is allowed); a binary or non-UTF-8 file is one message naming it."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start}): is it the benchmark's file?") from None
    if "\x00" in text:
        raise SystemExit(f"error: {path} is a binary file, not text: is it the benchmark's file?")
    return text


def _require_columns(path, columns, required):
    missing = [c for c in required if c not in columns]
    if missing:
        raise SystemExit(f"error: {path} lacks the column(s) {', '.join(missing)} (it has: "
                         f"{', '.join(sorted(columns))[:200] or 'none'})")


def _option_letter(answer, options):
    """The answer as an option letter, checked against the options there are."""
    letter = str(answer).strip().upper()
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options, more than the letters {LETTERS}")
    if letter not in LETTERS[:len(options)]:
        raise ValueError(f"answer {answer!r} is not one of the options {LETTERS[:len(options)]}")
    return letter


def _vstar(path, seed):
    """V* Bench: <folder>/<category>/X.jpg + X.json with question, options (options[0] is right) and bbox
    ([x, y, w, h], or a list of them). Options are shuffled into letters with a fixed seed per item. An image
    without its JSON is an unreadable item; macOS' ._X files are no items."""
    samples, bad = [], []
    for category in ("direct_attributes", "relative_position"):
        folder = os.path.join(path, category)
        if not os.path.isdir(folder):  # a whole category: said, not counted as one unreadable item
            print(f"warning: {folder} is missing: the {category} items are not evaluated")
            continue
        names = [n for n in os.listdir(folder) if not n.startswith("._")]  # AppleDouble files from a Mac's zip
        images = {}
        for n in sorted(names):  # a stem's JPEG (.JPG, .jpeg, .jpg) before its PNG
            stem, ext = os.path.splitext(n)
            if ext.lower() in (".jpg", ".jpeg", ".png"):
                images.setdefault(stem, n)
        questions = sorted(n for n in names if n.lower().endswith(".json"))
        bad += [f"{os.path.join(folder, images[stem])}: no question file ({stem}.json) beside it"
                for stem in sorted(set(images) - {n[:-5] for n in questions})]
        for name in questions:
            try:
                with open(os.path.join(folder, name), encoding="utf-8-sig") as f:  # a BOM, as Windows saves
                    item = json.load(f)
                stem = name[:-5]
                if stem not in images:
                    raise ValueError("no image beside it")
                image = os.path.join(folder, images[stem])
                width, height = _open_checked(image, image)
                options = [str(o) for o in item["options"]]
                _option_letter("A", options)  # options[0] is the answer: only the count is checked
                order = list(range(len(options)))
                random.Random(f"{seed}/{category}/{stem}").shuffle(order)
                boxes = item.get("bbox") or []
                boxes = [boxes] if boxes and isinstance(boxes[0], (int, float)) else boxes
                # as [x1, y1, x2, y2] inside the image: a box only serves the gt-box probe and the IoU, so one
                # past the edge is clipped and an empty one left out (one line each), and the question stays
                kept = []
                for box in boxes:
                    if not (isinstance(box, list) and len(box) == 4
                            and all(isinstance(v, (int, float)) for v in box)):
                        print(f"{os.path.join(folder, name)}: bbox {box!r} is not [x, y, w, h]: left out")
                        continue
                    x, y, w, h = box
                    b = [max(0, x), max(0, y), min(width, x + w), min(height, y + h)]
                    if b[2] <= b[0] or b[3] <= b[1]:
                        print(f"{os.path.join(folder, name)}: bbox {[x, y, w, h]} is empty or outside the "
                              f"{width}x{height} image: left out")
                        continue
                    if b != [x, y, x + w, y + h]:
                        print(f"{os.path.join(folder, name)}: bbox {[x, y, w, h]} reaches outside the "
                              f"{width}x{height} image: clipped")
                    kept.append(b)
                union = None
                if kept:  # every target's box, as one [x1, y1, x2, y2]: what the gt-box probe crops
                    union = [min(b[0] for b in kept), min(b[1] for b in kept),
                             max(b[2] for b in kept), max(b[3] for b in kept)]
                samples.append(Sample(
                    id=f"{category}/{stem}", question=str(item["question"]), answer=LETTERS[order.index(0)],
                    width=width, height=height, options=[options[k] for k in order], category=category,
                    image_path=image, boxes=[union] if union else None))
            except (KeyError, ValueError, TypeError, OSError) as e:
                bad.append(f"{os.path.join(folder, name)}: {type(e).__name__}: {e}")
    return _report(samples, bad, path)


def _mmerw(path, seed):
    """MME-RealWorld(-Lite) JSON: Question_id, Image (relative to the JSON's folder), Text, Answer choices
    ["(A) ...", ...], Ground truth (a letter), Category, Subtask, Task."""
    root = os.path.dirname(os.path.abspath(path))
    try:
        items = json.loads(_read_text(path))
    except ValueError as e:
        raise SystemExit(f"error: {path} is not valid JSON: {e}") from None
    if not isinstance(items, list):
        raise SystemExit(f"error: {path} holds a JSON {type(items).__name__}; a list of items was expected "
                         f"(MME-RealWorld's JSON)")
    samples, bad = [], []
    for item in items:
        try:
            image = os.path.join(root, item["Image"])
            width, height = _open_checked(image, image)
            options = [re.sub(r"^\s*\(?[A-E]\)\s*", "", str(c)) for c in item["Answer choices"]]
            letter = re.search(r"[A-E]", str(item["Ground truth"]).upper())  # "B" or "(B)"
            if letter is None:
                raise ValueError(f"ground truth {item['Ground truth']!r} is not a letter A-E")
            task, subtask = str(item.get("Task", "")), str(item.get("Subtask", ""))
            samples.append(Sample(
                id=str(item["Question_id"]), question=str(item["Text"]), answer=_option_letter(letter.group(0), options),
                width=width, height=height, options=options, image_path=image, meta=dict(task=task, subtask=subtask),
                # category names repeat across subtasks ("color" in several): each is kept under its own, as
                # MME-RealWorld's scoring script nests them
                category=f"{task}/{subtask}/{item.get('Category', 'default')}"))
        except (KeyError, ValueError, TypeError, OSError) as e:
            bad.append(f"{path}: item {item.get('Question_id', '?') if isinstance(item, dict) else '?'}: "
                       f"{type(e).__name__}: {e}")
    return _report(samples, bad, path)
