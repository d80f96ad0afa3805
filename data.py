"""Data: the synthetic high-resolution VQA set (the embedded default) and the project's JSONL format.

Synthetic: 2-4K images full of clutter with one small white label holding a short word or a tiny glyph.
At the global budget the label is a few pixels wide and unreadable; a crop of the original reads it.
JSONL (one sample per line; relative image paths resolve against the file's folder):
    {"id": "a1", "image": "imgs/a.jpg", "question": "...", "options": ["...", ...], "answer": "B",
     "boxes": [[x1, y1, x2, y2], ...]}     # options and boxes optional; boxes nested, innermost first

    python data.py show --data synthetic:4          # print samples
"""
import argparse
import base64
import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

WORDS = ("apple river stone cloud tiger lemon piano rocket candle forest silver window garden bridge "
         "honey violin planet marble castle dragon").split()
GLYPHS = ("circle", "square", "triangle", "cross")
LETTERS = "ABCDE"
# Decompression-bomb guard: images with more pixels are refused (an 8K image is 33 MP). LFPC_MAX_PIXELS sets it.
MAX_PIXELS = int(os.environ.get("LFPC_MAX_PIXELS", 200_000_000))
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImage(ValueError):
    """An image that cannot be used; the message names the file and says why."""

    def __init__(self, message, sample_id=None):
        super().__init__(message)
        self.sample_id = sample_id


def to_rgb(im):
    """Any PIL mode -> RGB: 16- and 32-bit images are scaled to 8 bits rather than clipped."""
    if im.mode.startswith("I") or im.mode == "F":
        import numpy as np
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if "16" in im.mode else max(float(a.max()), 1.0)
        im = Image.fromarray((a / peak * 255).clip(0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def _open_checked(path_or_file, name):
    """(width, height) of an image file after cheap checks: it decodes its header, passes verify(), and is
    within MAX_PIXELS. Raises ValueError with the reason."""
    try:
        with Image.open(path_or_file) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} is over the {MAX_PIXELS:,}-pixel limit (LFPC_MAX_PIXELS)")
            if width == 0 or height == 0:
                raise ValueError("zero-size image")
            im.verify()  # walks the file without decoding: catches truncated PNGs and bad chunks cheaply
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # SyntaxError: broken PNGs
        raise ValueError(f"image {name}: {e}") from None
    return width, height


@dataclass
class Sample:
    id: str
    question: str
    answer: str  # an option letter when `options` is set, else the answer text
    width: int
    height: int
    options: list = None
    boxes: list = None  # nested boxes, innermost first, original pixels
    category: str = "default"
    image_path: str = None  # where the original lives; None for synthetic samples
    make: object = field(default=None, repr=False)  # synthetic / embedded images: a function that makes the original
    global_tokens: int = None  # information-gap level (stage 1), if selected
    meta: dict = field(default_factory=dict)  # benchmark fields used in scoring (cycle, task, subtask)

    def image(self):
        """The original image, RGB. Raises BadImage (naming the file) when it cannot be decoded."""
        try:
            if self.make is not None:
                return self.make()
            with Image.open(self.image_path) as im:
                return to_rgb(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadImage(f"sample {self.id} ({self.image_path or 'embedded image'}): {e}", self.id) from None

    def prompt_text(self):
        """The question with its options as lettered lines."""
        if not self.options:
            return self.question
        lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options)]
        return self.question + "\n" + "\n".join(lines) + "\nAnswer with the option's letter."


# ---------------------------------------------------------------- synthetic

def synthetic(n, seed=0, min_side=2048, max_side=4096):
    """n deterministic samples: the same (n, seed) always gives the same images, questions and boxes."""
    return [_synthetic_sample(i, seed, min_side, max_side) for i in range(n)]


def _synthetic_sample(i, seed, min_side, max_side):
    rng = random.Random(seed * 1_000_003 + i)
    w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    category = rng.choice(("word", "glyph"))
    choices = rng.sample(WORDS if category == "word" else GLYPHS, 4)
    answer = rng.randrange(4)
    lw, lh = (96, 30) if category == "word" else (30, 30)  # the label: small against a 2-4K image
    lx, ly = rng.randint(lw, w - 2 * lw), rng.randint(lh, h - 2 * lh)
    b1 = [lx, ly, lx + lw, ly + lh]
    boxes = [b1] + [_expand(b1, k, w, h) for k in (4, 12)]
    question = ("What word is written on the small white label?" if category == "word"
                else "Which shape is drawn on the small white label?")
    draw_seed = rng.random()

    def make():
        return _draw(w, h, b1, category, choices[answer], random.Random(draw_seed))

    return Sample(id=f"syn-{seed}-{i}", question=question, answer=LETTERS[answer], width=w, height=h,
                  options=choices, boxes=boxes, category=category, make=make)


def _expand(box, k, w, h):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) * k / 2, (box[3] - box[1]) * k / 2
    return [max(0, round(cx - hw)), max(0, round(cy - hh)), min(w, round(cx + hw)), min(h, round(cy + hh))]


def _draw(w, h, label, category, target, rng):
    img = Image.new("RGB", (w, h), tuple(rng.randint(60, 200) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(250):  # clutter: shapes that blur into texture when downsampled
        x, y = rng.randint(0, w), rng.randint(0, h)
        s = rng.randint(20, max(40, w // 8))
        color = tuple(rng.randint(0, 255) for _ in range(3))
        shape = rng.choice((d.rectangle, d.ellipse, d.line))
        if shape is d.line:
            d.line([x, y, x + rng.randint(-s, s), y + rng.randint(-s, s)], fill=color, width=rng.randint(2, 9))
        else:
            shape([x, y, x + s, y + rng.randint(20, s)], fill=color)
    d.rectangle(label, fill="white", outline="black")
    x1, y1, x2, y2 = label
    if category == "word":
        d.text((x1 + 4, y1 + 6), target, fill="black", font=ImageFont.load_default(size=16))
    else:
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, 10
        if target == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill="black")
        elif target == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill="black")
        elif target == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill="black")
        else:
            d.line([cx - r, cy - r, cx + r, cy + r], fill="black", width=4)
            d.line([cx - r, cy + r, cx + r, cy - r], fill="black", width=4)
    return img


# ---------------------------------------------------------------- JSONL

def read_jsonl(path, max_reasons=5):
    """Samples from the project's JSONL. Bad rows are skipped; their count and first reasons are printed."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: data file not found: {path}")
    root = os.path.dirname(os.path.abspath(path))
    samples, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                samples.append(_jsonl_row(json.loads(line), root, n))
            except (ValueError, TypeError, KeyError, OSError) as e:
                bad.append(f"{path}:{n}: {e}")
    return _report(samples, bad, path, "row", max_reasons)


def _jsonl_row(row, root, n):
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    for key in ("image", "question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"missing or empty {key!r}")
    path = row["image"] if os.path.isabs(row["image"]) else os.path.join(root, row["image"])
    width, height = _open_checked(path, path)
    options = row.get("options")
    answer = row["answer"].strip()
    if options is not None:
        if not isinstance(options, list) or not 2 <= len(options) <= 5 or not all(isinstance(o, str) for o in options):
            raise ValueError("'options' must be a list of 2 to 5 strings")
        answer = answer.upper()
        if answer not in list(LETTERS[:len(options)]):
            raise ValueError(f"answer {row['answer']!r} is not an option letter")
    boxes = row.get("boxes")
    if boxes is not None:
        boxes = _check_nested(boxes, width, height)
    return Sample(id=str(row.get("id", n)), question=row["question"], answer=answer, width=width, height=height,
                  options=options, boxes=boxes, category=str(row.get("category", "default")), image_path=path,
                  global_tokens=row.get("global_tokens"))


def _check_nested(boxes, width, height):
    if not isinstance(boxes, list) or not boxes:
        raise ValueError("'boxes' must be a non-empty list of [x1, y1, x2, y2]")
    out = []
    for b in boxes:
        if (not isinstance(b, list) or len(b) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
            raise ValueError(f"box {b!r} is not [x1, y1, x2, y2]")
        if not (0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height):
            raise ValueError(f"box {b} is empty or outside the {width}x{height} image")
        if out and not (b[0] <= out[-1][0] and b[1] <= out[-1][1] and b[2] >= out[-1][2] and b[3] >= out[-1][3]):
            raise ValueError(f"box {b} does not contain the box before it (boxes go innermost first)")
        out.append([float(v) for v in b])
    return out


# ---------------------------------------------------------------- benchmarks, as users download them

BENCHMARKS = {
    "hrbench": "hr_bench_4k.tsv or hr_bench_8k.tsv (or .parquet), from the HR-Bench release (DreamMr/HR-Bench)",
    "vstar": "the V* Bench folder holding direct_attributes/ and relative_position/ (craigwu/vstar_bench)",
    "mmerw": "MME-RealWorld(-Lite) JSON with its image folder beside it (yifanzhang114/MME-RealWorld)",
}


def load_benchmark(bench, path, seed=0):
    """Samples of a benchmark from the file or folder users download (formats in METHOD.md §5)."""
    if not path or not os.path.exists(path):
        raise SystemExit(f"error: --data {path!r} not found: --bench {bench} expects {BENCHMARKS[bench]}")
    return dict(hrbench=_hrbench, vstar=_vstar, mmerw=_mmerw)[bench](path, seed)


def _image_from_bytes(raw):
    def make():
        with Image.open(io.BytesIO(raw)) as im:
            return to_rgb(im)
    return make


def _hrbench(path, seed):
    """HR-Bench TSV (or parquet): index, question, answer letter, A-D, category (single = FSP, cross = FCP),
    cycle_category, image (base64; a short number instead refers to the row holding the image)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    else:
        csv.field_size_limit(1 << 31)
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    by_index = {str(r["index"]): r for r in rows}
    samples, bad = [], []
    for r in rows:
        try:
            image = str(r["image"])
            if len(image) < 64 and image in by_index:  # VLMEvalKit stores a repeated image once
                image = str(by_index[image]["image"])
            raw = base64.b64decode(image, validate=False)
            width, height = _open_checked(io.BytesIO(raw), f"of row {r['index']}")
            options = [str(r[k]) for k in "ABCD" if r.get(k) not in (None, "") and str(r[k]) != "nan"]
            samples.append(Sample(
                id=str(r["index"]), question=str(r["question"]), answer=str(r["answer"]).strip().upper(),
                width=width, height=height, options=options, category=str(r.get("category", "default")),
                make=_image_from_bytes(raw), meta=dict(cycle=str(r.get("cycle_category", "")))))
        except (KeyError, ValueError, OSError) as e:
            bad.append(f"{path}: row {r.get('index', '?')}: {type(e).__name__}: {e}")
    return _report(samples, bad, path)


def _vstar(path, seed):
    """V* Bench: <folder>/<category>/X.jpg + X.json with question, options (options[0] is right) and bbox
    ([x, y, w, h], or a list of them). Options are shuffled into letters with a fixed seed per item."""
    samples, bad = [], []
    for category in ("direct_attributes", "relative_position"):
        folder = os.path.join(path, category)
        if not os.path.isdir(folder):
            bad.append(f"{folder}: missing")
            continue
        for name in sorted(n for n in os.listdir(folder) if n.endswith(".json")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    item = json.load(f)
                stem = name[:-5]
                image = next((os.path.join(folder, stem + ext) for ext in (".jpg", ".jpeg", ".png")
                              if os.path.exists(os.path.join(folder, stem + ext))), None)
                if image is None:
                    raise ValueError("no image beside it")
                width, height = _open_checked(image, image)
                options = [str(o) for o in item["options"]]
                order = list(range(len(options)))
                random.Random(f"{seed}/{category}/{stem}").shuffle(order)
                boxes = item.get("bbox") or []
                boxes = [boxes] if boxes and isinstance(boxes[0], (int, float)) else boxes
                union = None
                if boxes:  # every target's box, as one [x1, y1, x2, y2]: what the gt-box probe crops
                    union = [min(b[0] for b in boxes), min(b[1] for b in boxes),
                             max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)]
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
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    samples, bad = [], []
    for item in items:
        try:
            image = os.path.join(root, item["Image"])
            width, height = _open_checked(image, image)
            options = [re.sub(r"^\s*\(?[A-E]\)\s*", "", str(c)) for c in item["Answer choices"]]
            letter = re.search(r"[A-E]", str(item["Ground truth"]).upper())  # "B" or "(B)"
            if letter is None:
                raise ValueError(f"ground truth {item['Ground truth']!r} is not a letter A-E")
            samples.append(Sample(
                id=str(item["Question_id"]), question=str(item["Text"]), answer=letter.group(0),
                width=width, height=height, options=options, category=str(item.get("Category", "default")),
                image_path=image, meta=dict(task=str(item.get("Task", "")), subtask=str(item.get("Subtask", "")))))
        except (KeyError, ValueError, TypeError, OSError) as e:
            bad.append(f"{path}: item {item.get('Question_id', '?') if isinstance(item, dict) else '?'}: "
                       f"{type(e).__name__}: {e}")
    return _report(samples, bad, path)


def _report(samples, bad, path, what="item", max_reasons=5):
    """Print how many rows or items were skipped and the first reasons; stop if nothing usable is left."""
    if bad:
        print(f"skipped {len(bad)} bad {what}(s) of {path}:")
        for reason in bad[:max_reasons]:
            print("  " + reason)
    if not samples:
        raise SystemExit(f"error: no usable sample in {path}")
    return samples


def read_deepeyes(path):
    """DeepEyes-Datasets-47k parquet: prompt (chat messages, the user text with an <image> placeholder),
    images ([{bytes, path}]), reward_model.ground_truth, extra_info.question, data_source. A single-letter
    ground truth is scored as an option letter, anything else as a short answer. Bad rows are skipped."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise SystemExit(f"error: data file not found: {path}")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise SystemExit(f"error: cannot read {path} as parquet: {e}") from None
    root = os.path.dirname(os.path.abspath(path))
    samples, bad = [], []
    for n, r in enumerate(rows):
        try:
            image = (r.get("images") or [None])[0] or {}
            if image.get("bytes"):
                raw = image["bytes"]
                make, image_path = _image_from_bytes(raw), None
                width, height = _open_checked(io.BytesIO(raw), "(embedded)")
            elif image.get("path"):
                image_path, make = os.path.join(root, image["path"]), None
                width, height = _open_checked(image_path, image_path)
            else:
                raise ValueError("no image")
            answer = str((r.get("reward_model") or {}).get("ground_truth") or "").strip()
            if not answer:
                raise ValueError("no ground truth")
            question = (r.get("extra_info") or {}).get("question")
            if not question:
                users = [m["content"] for m in r.get("prompt") or [] if m.get("role") == "user"]
                question = users[-1].replace("<image>", "").strip() if users else ""
            if not question:
                raise ValueError("no question")
            samples.append(Sample(id=str((r.get("extra_info") or {}).get("index", n)), question=question,
                                  answer=answer, width=width, height=height, image_path=image_path, make=make,
                                  category=str(r.get("data_source") or "default")))
        except (KeyError, ValueError, TypeError, AttributeError, OSError, SyntaxError) as e:
            bad.append(f"{path}: row {n}: {type(e).__name__}: {e}")
    return _report(samples, bad, path, "row")


def load(spec, seed=0):
    """A data spec -> samples: `synthetic[:N]` (seeded), a project JSONL, a DeepEyes parquet, or a folder of
    images with one JSONL beside them."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = spec.partition(":")[2] or "256"
        if not n.isdigit() or int(n) < 1:
            raise SystemExit(f"error: bad data spec {spec!r}: expected synthetic:N with N a positive number")
        return synthetic(int(n), seed)
    if spec.endswith(".jsonl"):
        return read_jsonl(spec)
    if spec.endswith(".parquet"):
        return read_deepeyes(spec)
    if os.path.isdir(spec):  # a folder of images with one JSONL beside them
        found = sorted(f for f in os.listdir(spec) if f.endswith(".jsonl"))
        if len(found) != 1:
            raise SystemExit(f"error: {spec} holds {len(found)} .jsonl files; expected exactly one")
        return read_jsonl(os.path.join(spec, found[0]))
    if not os.path.exists(spec):
        raise SystemExit(f"error: data not found: {spec} (expected 'synthetic[:N]', a .jsonl, a .parquet or a folder)")
    raise SystemExit(f"error: unsupported data {spec!r}: expected 'synthetic[:N]', a .jsonl, a .parquet or a folder")


def main():
    ap = argparse.ArgumentParser(description="Print the first samples of a data set.")
    ap.add_argument("command", choices=["show"], help="show: print the first samples")
    ap.add_argument("--data", default="synthetic:4", help="synthetic[:N], a .jsonl, a .parquet or a folder")
    ap.add_argument("--limit", type=int, default=4, help="how many samples to print")
    args = ap.parse_args()
    for s in load(args.data)[:args.limit]:
        print(f"{s.id} [{s.category}] {s.width}x{s.height} answer={s.answer} boxes={s.boxes}\n  "
              + s.prompt_text().replace("\n", "\n  "))


if __name__ == "__main__":
    main()
